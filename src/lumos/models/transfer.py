"""Weight transfer from the I2I checkpoint into a head's model, with an explicit report.

Rules:
- a parameter (or persistent buffer) present in both with the same shape is loaded, unless it sits
  under one of the head's `allowed_new` prefixes (those are created or re-initialised by the head:
  the target keeps its fresh initialisation and the source weight is recorded as dropped);
  with `reinitialise=False` (a head continued from its own checkpoint, e.g. T2I's next resolution
  stage) those load too where the source has them in the same shape, and only the rest are new;
- the patch embedding grown by a concatenated latent (more input channels) gets the source
  weights in its first channels and zeros for the new ones ("partially_loaded"), so at start the
  head's model ignores the extra channels and computes what the I2I model computed;
- anything else that does not load (a backbone weight missing on either side or of another
  shape) raises, naming the parameters: a silently skipped backbone weight would quietly turn a
  fine-tune into training from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from pydantic import BaseModel, ConfigDict

from lumos.errors import LumosError

# Parameters whose input-channel axis (dim 1) may grow when a latent is concatenated.
GROWABLE_INPUT_CHANNELS = ("x_embedder.weight",)


class WeightTransferError(LumosError, RuntimeError):
    """A backbone weight could not be transferred."""


class TransferReport(BaseModel):
    """Which target tensors were loaded, newly initialised or partially loaded; which were dropped."""

    model_config = ConfigDict(extra="forbid")

    loaded: list[str]
    new: list[str]
    dropped: list[str]
    partially_loaded: list[str]
    num_loaded_elements: int
    num_new_elements: int

    def summary(self) -> str:
        return (
            f"weight transfer: {len(self.loaded)} loaded ({self.num_loaded_elements:,} values), "
            f"{len(self.new)} new ({self.num_new_elements:,} values), "
            f"{len(self.partially_loaded)} partially loaded, {len(self.dropped)} dropped"
        )


def _is_allowed(name: str, allowed_new: Sequence[str]) -> bool:
    return any(name.startswith(prefix) for prefix in allowed_new)


def transfer_weights(
    source_state_dict: Mapping[str, torch.Tensor],
    target_model: torch.nn.Module,
    allowed_new: Sequence[str] = (),
    reinitialise: bool = True,
) -> TransferReport:
    """Load `source_state_dict` into `target_model` in place and return the report.

    Raises WeightTransferError listing every backbone tensor that is missing, unexpected or of
    another shape.
    """
    target_state = target_model.state_dict()
    merged: dict[str, torch.Tensor] = {}
    loaded, new, dropped, partial = [], [], [], []
    missing, mismatched = [], []
    num_loaded = num_new = 0

    for name, target in target_state.items():
        source = source_state_dict.get(name)
        reused = not reinitialise and source is not None and source.shape == target.shape
        if _is_allowed(name, allowed_new) and not reused:
            new.append(name)
            num_new += target.numel()
            continue
        if source is None:
            missing.append(name)
            continue
        if source.shape == target.shape:
            merged[name] = source.to(dtype=target.dtype)
            loaded.append(name)
            num_loaded += target.numel()
            continue
        grows = (
            name in GROWABLE_INPUT_CHANNELS
            and source.ndim == target.ndim
            and source.shape[0] == target.shape[0]
            and source.shape[2:] == target.shape[2:]
            and source.shape[1] < target.shape[1]
        )
        if grows:
            grown = torch.zeros_like(target)
            grown[:, : source.shape[1]] = source.to(dtype=target.dtype)
            merged[name] = grown
            partial.append(name)
            num_loaded += source.numel()
            num_new += target.numel() - source.numel()
            continue
        mismatched.append(f"{name}: source {tuple(source.shape)} vs target {tuple(target.shape)}")

    taken = set(loaded) | set(partial)
    for name in source_state_dict:
        if name in taken:
            continue
        allowed = _is_allowed(name, allowed_new)
        if name in target_state and not allowed:
            continue  # loaded, grown or reported as a shape mismatch above
        dropped.append(name)  # re-initialised by the head, or absent from the target
        if not allowed:
            missing.append(f"{name} (in the source, not in the target)")

    if missing or mismatched:
        lines = [f"  missing: {m}" for m in missing] + [f"  shape: {m}" for m in mismatched]
        raise WeightTransferError(
            "backbone weights failed to transfer (allowed new prefixes: "
            f"{list(allowed_new)}); is the source checkpoint the same size as the target "
            "config?\n" + "\n".join(lines)
        )
    # Tensors the head creates keep the target's fresh initialisation.
    for name in new:
        merged[name] = target_state[name]
    target_model.load_state_dict(merged, strict=True)
    return TransferReport(
        loaded=sorted(loaded),
        new=sorted(new),
        dropped=sorted(dropped),
        partially_loaded=sorted(partial),
        num_loaded_elements=num_loaded,
        num_new_elements=num_new,
    )
