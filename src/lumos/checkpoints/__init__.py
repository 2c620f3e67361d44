"""Checkpoints: the directory format a training run writes and every later stage reads.

    from lumos.checkpoints import load_checkpoint, read_checkpoint_meta
    ckpt = load_checkpoint("s3://lumos/runs/r1/checkpoints/i2i")  # a run: its latest checkpoint
    ckpt.ema_model, ckpt.meta["step"], ckpt.meta["parent"]

`format` holds the layout: save, load, listing, lineage (`parent`) and pruning;
`training_state` the part only a resumed run reads (optimizer, RNG states, data position). Neither
imports the training loop, so evaluation and export read checkpoints without it.
"""

from lumos.checkpoints.format import (
    CHECKPOINT_FORMAT,
    META_FILE,
    CheckpointNotFound,
    LoadedCheckpoint,
    checkpoint_dirname,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    local_copy,
    prune_checkpoints,
    read_checkpoint_meta,
    remove_stale_staging,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "META_FILE",
    "CheckpointNotFound",
    "LoadedCheckpoint",
    "checkpoint_dirname",
    "is_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "local_copy",
    "prune_checkpoints",
    "read_checkpoint_meta",
    "remove_stale_staging",
    "resolve_checkpoint",
    "save_checkpoint",
]
