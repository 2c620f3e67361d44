"""AdamW with fp32 master weights, for a model whose parameters are bf16.

bf16 parameters let every op compute in bf16 without autocast and halve the weights' memory
traffic, but an update smaller than about 1/256 of a bf16 weight rounds away (at lr 1e-4,
AdamW's steps of about 1e-4 vanish on every weight above about 0.03). So the optimizer keeps an
fp32 copy of each parameter and steps torch's own AdamW on those copies:

    model.to(torch.bfloat16)
    optimizer = MasterWeightAdamW(model.parameters(), max_grad_norm=1.0, lr=1e-4)
    loss.backward()        # bf16 gradients on the model
    optimizer.step()       # fp32 copies of them -> clip -> AdamW on the fp32 masters -> bf16 model
    optimizer.zero_grad()

This file imports only torch: bench/train_throughput.py loads it by path on GPU images that lack
the project's other dependencies, so the benchmark measures this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lumos.errors import CheckpointError


class MasterWeightAdamW(torch.optim.AdamW):
    """torch.optim.AdamW over fp32 master copies of (bf16) parameters.

    Its param_groups hold the masters, so setting `group["lr"]` (an LR schedule) drives it as
    any AdamW. Each `step()` copies the model's gradients to fp32, clips their global norm to
    `max_grad_norm` (when given), steps AdamW on the masters and copies them back to the model.

    A parameter without a gradient (the one-token cross-attention never uses its query
    projection) is skipped, exactly as torch's AdamW skips it on fp32 weights: no update, no
    weight decay, no Adam state. `state_dict()` carries the masters, so a resumed run continues
    exactly.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        max_grad_norm: float | None = None,
        **adamw: Any,
    ) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        self.master_params = [p.detach().float().clone() for p in self.model_params]
        super().__init__(self.master_params, **adamw)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        """gradients -> fp32 -> clip -> AdamW on the masters -> masters copied to the model."""
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step takes no closure: call backward() first")
        model_grads = [p.grad for p in self.model_params]
        trained = [  # (bf16 parameter, its gradient, fp32 master) wherever there is a gradient
            (p, g, m)
            for p, g, m in zip(self.model_params, model_grads, self.master_params, strict=True)
            if g is not None
        ]
        # The fp32 gradients exist only during the step (allocated from the caching allocator).
        grads = [torch.empty_like(m) for _, _, m in trained]
        torch._foreach_copy_(grads, [g for _, g, _ in trained])
        for (_, _, master), grad in zip(trained, grads, strict=True):
            master.grad = grad
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_([m for _, _, m in trained], self.max_grad_norm)
        super().step()
        for _, _, master in trained:
            master.grad = None
        torch._foreach_copy_([p for p, _, _ in trained], [m for _, _, m in trained])  # to bf16

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the model's gradients (the masters hold none between steps)."""
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state plus the fp32 master weights, in parameter order."""
        return {**super().state_dict(), "master_weights": list(self.master_params)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore AdamW's state and the masters, and copy the masters to the model."""
        state_dict = dict(state_dict)
        saved = state_dict.pop("master_weights", None)
        if saved is None:
            raise CheckpointError(
                "this optimizer state has no master_weights: it was saved by a plain AdamW "
                "(mixed_precision 'bf16' or 'no'), not by MasterWeightAdamW ('bf16-weights')"
            )
        shapes = [tuple(m.shape) for m in self.master_params]
        if [tuple(m.shape) for m in saved] != shapes:
            raise CheckpointError(
                f"the saved master weights ({len(saved)} tensors) do not match this model's "
                f"{len(shapes)} trainable parameters: the state belongs to another model"
            )
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for master, value, param in zip(
                self.master_params, saved, self.model_params, strict=True
            ):
                master.copy_(value)
                param.copy_(master)

    def master_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """`module.state_dict()` in fp32 with each parameter's master (shared, not copied) in
        place of its bf16 copy: the weights to save, as an fp32 model would save its own."""
        masters = {id(p): m for p, m in zip(self.model_params, self.master_params, strict=True)}
        weights: dict[str, torch.Tensor] = {}
        for name, value in module.state_dict(keep_vars=True).items():
            if id(value) in masters:
                weights[name] = masters.pop(id(value))
            else:  # a buffer, or a frozen parameter
                weights[name] = value.detach().float() if value.is_floating_point() else value
        if masters:
            raise ValueError(
                f"{len(masters)} parameters of this optimizer are not in the given module: "
                "pass the (unwrapped) model it was built for"
            )
        return weights


__all__ = ["MasterWeightAdamW"]
