"""Checkpoints: a directory (local or in the object store) that describes itself.

A training run writes its checkpoints under its output URI, one directory per step:

    <out_uri>/step-0001000/transformer/          save_pretrained of the raw model
                          /transformer_ema/      the EMA weights: what sampling and export use
                          /training_state/       optimizer.pt, data.json, rng-rank-XXXXX.pt
                          /lumos_checkpoint.json written last: a checkpoint without it is partial

A new directory per step (instead of overwriting one) means a job killed while saving still has
its previous complete checkpoint to resume from; older ones are pruned once a newer one is
complete. Every reader accepts either a checkpoint directory or a run's output URI, which stands
for the run's latest complete checkpoint.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumos.errors import CheckpointError, LumosError
from lumos.models.lumos_dit import LumosDiT
from lumos.storage import LocalStorage, Storage, reporting_disk_full
from lumos.tempdirs import OwnedTemporaryDirectory

CHECKPOINT_FORMAT = "lumos-checkpoint/1"
META_FILE = "lumos_checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

logger = logging.getLogger(__name__)


class CheckpointNotFound(LumosError, FileNotFoundError):
    """No complete checkpoint where one was expected."""


def checkpoint_dirname(step: int) -> str:
    return f"step-{step:07d}"


def _step_dirs(store: Storage) -> dict[str, bool]:
    """The step directories under a run's store (one listing): name -> complete (its metadata
    written)."""
    dirs: dict[str, bool] = {}
    for obj in store.list():
        name, _, rest = obj.key.partition("/")
        if rest and _STEP_DIR.match(name):
            dirs[name] = dirs.get(name, False) or rest == META_FILE
    return dirs


def _step(name: str) -> int:
    match = _STEP_DIR.match(name)
    if match is None:
        raise CheckpointError(f"not a step directory: {name}")
    return int(match.group(1))


def list_checkpoints(out_uri: str) -> list[tuple[int, str]]:
    """Complete checkpoints under a run's output URI as (step, uri), oldest first."""
    store = Storage.from_uri(out_uri)
    return sorted(
        (_step(name), store.child(name).uri) for name, done in _step_dirs(store).items() if done
    )


def is_checkpoint(uri: str) -> bool:
    """Whether `uri` is one complete checkpoint (not a run directory holding several)."""
    return Storage.from_uri(uri).exists(META_FILE)


def latest_checkpoint(out_uri: str) -> str | None:
    """The URI of the checkpoint `out_uri` stands for: itself if it is one, else its latest step."""
    if is_checkpoint(out_uri):
        return Storage.from_uri(out_uri).uri
    found = list_checkpoints(out_uri)
    return found[-1][1] if found else None


def resolve_checkpoint(uri: str) -> str:
    """Like `latest_checkpoint`, but a missing checkpoint is an error that says what to do."""
    resolved = latest_checkpoint(uri)
    if resolved is None:
        raise CheckpointNotFound(
            f"no checkpoint at URI: {uri} (expected {META_FILE} there or in a step-XXXXXXX/ "
            "directory under it; train first, or check the URI)"
        )
    return resolved


def read_checkpoint_meta(uri: str) -> dict[str, Any]:
    """`lumos_checkpoint.json` of a checkpoint (or of a run's latest one), with its `uri` added."""
    resolved = resolve_checkpoint(uri)
    meta = Storage.from_uri(resolved).read_json(META_FILE)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{resolved}/{META_FILE} has format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
        )
    return {**meta, "uri": resolved}


def save_checkpoint(
    checkpoint_uri: str,
    model: LumosDiT,
    ema_model: LumosDiT,
    meta: dict[str, Any],
    training_state: dict[str, bytes] | None = None,
) -> str:
    """Write a complete checkpoint to `checkpoint_uri`; `lumos_checkpoint.json` goes last.

    `meta` holds the contract's fields (head, step, encoders, data, parent, train_config,
    transfer_report); `training_state` maps file names under `training_state/` to their bytes.
    """
    store = Storage.from_uri(checkpoint_uri)
    # A full disk fails naming the checkpoint and its size; the staging directory goes with it,
    # so the step never appears and the previous checkpoint stays the latest.
    needed = sum(
        t.numel() * t.element_size() for m in (model, ema_model) for t in m.state_dict().values()
    )
    needed += sum(len(data) for data in (training_state or {}).values())
    with reporting_disk_full(store.uri, needed), store.staging_dir() as tmp:
        model.save_pretrained(Path(tmp) / "transformer")
        ema_model.save_pretrained(Path(tmp) / "transformer_ema")
        for name, data in (training_state or {}).items():
            path = Path(tmp) / "training_state" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        store.upload_dir(tmp, move=True)
    store.write_json(META_FILE, {"format": CHECKPOINT_FORMAT, **meta})
    return store.uri


def remove_stale_staging(out_uri: str) -> None:
    """Delete what a run killed while saving a checkpoint left beside its checkpoints on local
    storage (the checkpoint's staging directory: an XL/2 checkpoint is about 13 GB). Only the
    run's own main process calls this, when it is not saving."""
    removed = Storage.from_uri(out_uri).remove_staging()
    if removed:
        logger.warning("removed %s under %s: checkpoints a killed run was saving", removed, out_uri)


def prune_checkpoints(out_uri: str, keep: int) -> None:
    """Delete all but the `keep` latest complete checkpoints of a run (metadata first), the
    incomplete step directories older than its latest complete one (a save cut off, say by a
    SIGTERM's grace period running out during an upload), and `remove_stale_staging`. Only the
    run's main process calls this, after its save."""
    if keep < 1:
        raise ValueError("keep at least the latest checkpoint")
    remove_stale_staging(out_uri)
    store = Storage.from_uri(out_uri)
    dirs = _step_dirs(store)
    complete = sorted((name for name, done in dirs.items() if done), key=_step)
    if not complete:
        return
    incomplete = sorted(
        (name for name, done in dirs.items() if not done and _step(name) < _step(complete[-1])),
        key=_step,
    )
    if incomplete:
        logger.warning(
            "removing incomplete checkpoints under %s (a save that was cut off): %s",
            out_uri, incomplete,
        )  # fmt: skip
    for name in complete[:-keep] + incomplete:
        old = store.child(name)
        old.delete(META_FILE)  # first, so a half-deleted checkpoint never looks complete
        for obj in list(old.list()):
            old.delete(obj.key)
        if isinstance(old, LocalStorage):  # object stores have no empty directories
            shutil.rmtree(old.root, ignore_errors=True)


@dataclass
class LoadedCheckpoint:
    model: LumosDiT | None  # raw weights (None when loaded with raw=False)
    ema_model: LumosDiT  # EMA weights: use these for sampling, evaluation and export
    meta: dict[str, Any]  # lumos_checkpoint.json, with "uri"
    uri: str


def load_checkpoint(
    uri: str, device: str | torch.device = "cpu", raw: bool = True
) -> LoadedCheckpoint:
    """Load a checkpoint (or a run's latest one) for evaluation, export or fine-tuning.

    Both models come back in eval mode. `raw=False` skips the raw weights (half the memory).
    """
    meta = read_checkpoint_meta(uri)
    resolved = meta["uri"]
    with local_copy(
        resolved, ["transformer_ema", "transformer"] if raw else ["transformer_ema"]
    ) as root:
        ema_model = _load_weights(root / "transformer_ema", resolved, device)
        model = _load_weights(root / "transformer", resolved, device) if raw else None
    return LoadedCheckpoint(model=model, ema_model=ema_model, meta=meta, uri=resolved)


def _load_weights(weights_dir: Path, uri: str, device: str | torch.device) -> LumosDiT:
    """The model saved in `weights_dir`, on `device`, in eval mode. The saved tensors must be
    exactly the model's: diffusers' from_pretrained only warns about a file of another layout and
    leaves the model's missing tensors uninitialised, so a checkpoint written before a model change
    (issue 18's final layer) would fail later with an obscure error, or load without its weights."""
    try:
        model, info = LumosDiT.from_pretrained(weights_dir, output_loading_info=True)
    except OSError as err:  # diffusers' error for missing or unreadable weight files
        raise CheckpointError(
            f"the weights of checkpoint {uri} cannot be read ({err}); it is damaged: "
            "use another checkpoint (the run's previous one is kept beside it)"
        ) from err
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {uri} was written by another layout of the model (missing: "
            f"{', '.join(missing[:5]) or 'none'}; not in the model: "
            f"{', '.join(unexpected[:5]) or 'none'}): retrain it, or convert released weights "
            "with `lumos convert`"
        )
    return model.to(device).eval()


class local_copy:
    """Context manager: a local directory holding `subdirs` of a checkpoint (no copy if local)."""

    def __init__(self, checkpoint_uri: str, subdirs: list[str]) -> None:
        self.store = Storage.from_uri(checkpoint_uri)
        self.subdirs = subdirs
        self._tmp: OwnedTemporaryDirectory | None = None

    def __enter__(self) -> Path:
        if isinstance(self.store, LocalStorage):
            return self.store.root
        self._tmp = OwnedTemporaryDirectory("lumos-ckpt-")
        for sub in self.subdirs:
            self.store.download_dir(sub, Path(self._tmp.name) / sub)
        return Path(self._tmp.name)

    def __exit__(self, *exc: object) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
