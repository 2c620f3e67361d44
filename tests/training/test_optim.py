"""MasterWeightAdamW: torch's AdamW on fp32 masters of bf16 parameters."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from lumos.training.optim import MasterWeightAdamW

ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-10, weight_decay=0.03)


class TwoLayers(nn.Module):
    """`unused` never gets a gradient, like the one-token cross-attention's query projection."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.unused = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x))) * self.scale  # (B, 4)


def bf16_model(seed: int = 0) -> TwoLayers:
    torch.manual_seed(seed)
    return TwoLayers().bfloat16()


def backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)
    dtype = next(model.parameters()).dtype
    nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()


def saved(state: dict) -> dict:
    """`state` through torch.save and torch.load, as a checkpoint stores it: a copy."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_matches_fp32_adamw_on_the_same_weights_and_gradients():
    model = bf16_model()
    optimizer = MasterWeightAdamW(model.parameters(), max_grad_norm=0.05, **ADAMW)
    # The fp32 reference starts from the same (bf16-representable) weights.
    reference = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    reference_opt = torch.optim.AdamW(reference, **ADAMW)
    clipped = []
    for step in range(5):
        backward(model, seed=step)
        for r, p in zip(reference, model.parameters(), strict=True):
            r.grad = None if p.grad is None else p.grad.float()  # the same (bf16) gradients
        norm = nn.utils.clip_grad_norm_([r for r in reference if r.grad is not None], 0.05)
        clipped.append(norm.item() > 0.05)
        reference_opt.step()
        optimizer.step()
        optimizer.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert all(clipped), "the test should exercise clipping"

    for master, r, p in zip(optimizer.master_params, reference, model.parameters(), strict=True):
        assert master.dtype == torch.float32 and p.dtype == torch.bfloat16
        torch.testing.assert_close(master, r.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p, master.to(torch.bfloat16))  # the model holds the rounded masters
    # The masters keep what rounding to bf16 loses: small updates still accumulate there.
    masters_and_params = zip(optimizer.master_params, model.parameters(), strict=True)
    assert any(not torch.equal(m, p.float()) for m, p in masters_and_params)


def test_a_parameter_without_gradient_is_skipped_as_adamw_skips_it():
    model = bf16_model()
    before = model.unused.weight.detach().clone()
    optimizer = MasterWeightAdamW(model.parameters(), **ADAMW)
    for step in range(3):
        backward(model, seed=step)
        optimizer.step()
        optimizer.zero_grad()
    # No weight decay and no Adam state, as torch.optim.AdamW on fp32 weights.
    assert torch.equal(model.unused.weight, before)
    state_of = dict(zip(optimizer.model_params, optimizer.master_params, strict=True))
    assert state_of[model.unused.weight] not in optimizer.state
    assert len(optimizer.state) == 4  # fc1 and fc2, weight and bias


def test_state_dict_resumes_exactly():
    model = bf16_model()
    optimizer = MasterWeightAdamW(model.parameters(), max_grad_norm=1.0, **ADAMW)
    for step in range(2):
        backward(model, seed=step)
        optimizer.step()
        optimizer.zero_grad()
    state = saved(optimizer.state_dict())
    assert all(m.dtype == torch.float32 for m in state["master_weights"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    for step in range(2, 4):  # the uninterrupted run
        backward(model, seed=step)
        optimizer.step()
        optimizer.zero_grad()

    resumed = bf16_model(seed=1)  # other initial weights: everything comes from the state
    resumed.load_state_dict(weights)
    resumed_opt = MasterWeightAdamW(resumed.parameters(), max_grad_norm=1.0, **ADAMW)
    resumed_opt.load_state_dict(state)
    for step in range(2, 4):
        backward(resumed, seed=step)
        resumed_opt.step()
        resumed_opt.zero_grad()
    for a, b in zip(optimizer.master_params, resumed_opt.master_params, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_loading_a_plain_adamw_state_is_a_clear_error():
    model = bf16_model()
    plain = torch.optim.AdamW(model.parameters(), **ADAMW)
    optimizer = MasterWeightAdamW(model.parameters(), **ADAMW)
    with pytest.raises(ValueError, match="no master_weights.*plain AdamW"):
        optimizer.load_state_dict(plain.state_dict())


def test_master_state_dict_is_the_fp32_model():
    model = bf16_model()
    optimizer = MasterWeightAdamW(model.parameters(), **ADAMW)
    backward(model, seed=0)
    optimizer.step()
    weights = optimizer.master_state_dict(model)
    assert weights.keys() == model.state_dict().keys()
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert weights["fc1.weight"] is optimizer.master_params[0]  # shared, not copied
    fp32 = TwoLayers()
    fp32.load_state_dict(weights)
    with pytest.raises(ValueError, match="not in the given module"):
        optimizer.master_state_dict(bf16_model())
