"""Two processes in data parallel (DDP over gloo on CPUs): the multi-GPU path, resumed exactly."""

from __future__ import annotations

import torch
from tiny import TINY_CONFIG
from two_processes import assert_resumed_exactly, launch

from lumos.storage import Storage
from lumos.training.checkpoint import read_checkpoint_meta


def test_two_processes_train_and_resume_exactly(images_features, tmp_path):
    cfg = TINY_CONFIG
    full = launch(tmp_path, cfg, images_features, str(tmp_path / "full"))
    assert full["global_batch"] == 4 and full["step"] == 4

    out = str(tmp_path / "interrupted")
    first = launch(tmp_path, {**cfg, "steps": 2}, images_features, out)
    state = Storage.from_uri(first["checkpoint_uri"]).child("training_state")
    assert state.exists("rng-rank-00000.pt") and state.exists("rng-rank-00001.pt")
    second = launch(tmp_path, cfg, images_features, out)
    assert_resumed_exactly(full, first, second)
    assert read_checkpoint_meta(out)["step"] == 4


def test_two_processes_train_with_bf16_weights(images_features, tmp_path):
    # One launch: bf16 replicas, each with its fp32 masters, train under DDP (the exact resume of
    # this mode is checked in one process, in test_train.py).
    cfg = {**TINY_CONFIG, "steps": 3, "grad_accum": 2, "mixed_precision": "bf16-weights"}
    result = launch(tmp_path, cfg, images_features, str(tmp_path / "bf16w"))
    assert result["step"] == 3 and result["global_batch"] == 8
    assert read_checkpoint_meta(result["checkpoint_uri"])["train_config"]["mixed_precision"] == (
        "bf16-weights"
    )
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result["losses"])
