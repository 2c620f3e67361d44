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

`fused_step=True` runs the same step through one small compiled function (`fused_master_update`)
called once per parameter: each parameter's master, Adam moments and bf16 copy are updated in
one pass that reads its bf16 gradient (clipping reads it once more, for the norm), instead of
five passes over fp32 copies (about 30 instead of 52 bytes of memory traffic per parameter with
clipping). The function is compiled once for any parameter size (1-D views, a dynamic length):
compiled over all of XL/2's 462 parameters as one graph, it took 4 to 5 minutes to compile (on
CPU). Its speed on a GPU has not been measured yet: the benchmark's `lumos-bf16w-fusedopt`
variant and bench/optimizer_step.py measure it; the training loop uses it with
`fused_optimizer_step: true`.

This file imports only torch: bench/train_throughput.py loads it by path on GPU images that lack
the project's other dependencies, so the benchmark measures this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


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
        fused_step: bool = False,
        **adamw: Any,
    ) -> None:
        self.model_params = [p for p in params if p.requires_grad]
        self.master_params = [p.detach().float().clone() for p in self.model_params]
        super().__init__(self.master_params, **adamw)
        self.max_grad_norm = max_grad_norm
        self.fused_step = fused_step
        if fused_step:
            unsupported = [k for k in ("amsgrad", "maximize", "capturable", "differentiable")
                           if adamw.get(k)]  # fmt: skip
            if unsupported:
                raise ValueError(f"fused_step=True does not implement AdamW's {unsupported}")
            # One graph for every parameter: 1-D views of a dynamic length.
            self._update = torch.compile(fused_master_update, dynamic=True)
            self._lr: torch.Tensor | None = None  # on the device: a new lr is no recompile
            self._no_clip: torch.Tensor | None = None

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
        if self.fused_step:
            self._fused_step(trained)
            return
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

    def _fused_step(self, trained: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """AdamW's step through `fused_master_update`, on AdamW's own state (the same
        state_dict as the default path, so either resumes the other's checkpoint)."""
        if not trained:
            return
        if len(self.param_groups) != 1:
            raise ValueError(
                f"fused_step=True steps one parameter group, not {len(self.param_groups)}"
            )
        (group,) = self.param_groups
        device = trained[0][2].device
        for _, _, master in trained:
            state = self.state[master]
            if not state:  # as AdamW initialises it (the step on the device, as fused=True)
                state["step"] = torch.zeros((), dtype=torch.float32, device=device)
                state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            elif state["step"].device != device:  # saved by a non-fused AdamW: a CPU tensor
                state["step"] = state["step"].to(device, torch.float32)
        if self._lr is None or self._lr.device != device:
            self._lr = torch.zeros((), dtype=torch.float32, device=device)
            self._no_clip = torch.ones((), dtype=torch.float32, device=device)
        self._lr.fill_(group["lr"])  # an LR schedule changes a tensor, not the compiled graph
        coef = self._no_clip
        if self.max_grad_norm is not None:  # as clip_grad_norm_, from the bf16 gradients
            norms = torch._foreach_norm([g for _, g, _ in trained], dtype=torch.float32)
            norm = torch.linalg.vector_norm(torch.stack(norms))
            coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        assert coef is not None
        beta1, beta2 = group["betas"]
        hyper = (float(beta1), float(beta2), float(group["weight_decay"]), float(group["eps"]))
        for param, grad, master in trained:
            state = self.state[master]
            self._update(
                param.view(-1),
                grad.reshape(-1),
                master.view(-1),
                state["exp_avg"].view(-1),
                state["exp_avg_sq"].view(-1),
                state["step"],
                self._lr,
                coef,
                *hyper,
            )

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
            raise ValueError(
                "this optimizer state has no master_weights: it was saved by a plain AdamW "
                "(mixed_precision 'bf16' or 'no'), not by MasterWeightAdamW ('bf16-weights')"
            )
        shapes = [tuple(m.shape) for m in self.master_params]
        if [tuple(m.shape) for m in saved] != shapes:
            raise ValueError(
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


def fused_master_update(
    param: torch.Tensor,
    grad: torch.Tensor,
    master: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    lr: torch.Tensor,
    clip_coef: torch.Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
) -> None:
    """One AdamW step (torch's formula) of one parameter: its fp32 `master` from its bf16 `grad`
    times `clip_coef` (clip_grad_norm_'s coefficient, or 1), then `param` = the master in bf16.
    Written for torch.compile, which fuses it into one pass over the tensors."""
    g = grad.float() * clip_coef
    step.add_(1)
    master.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    step_size = lr / (1 - beta1**step)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(eps)
    master.sub_(step_size * exp_avg / denom)
    param.copy_(master)


__all__ = ["MasterWeightAdamW", "fused_master_update"]
