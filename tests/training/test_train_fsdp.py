"""Two processes sharding the model (FSDP over gloo on CPUs): full checkpoints, resumed exactly."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_CONFIG
from two_processes import assert_resumed_exactly, launch

from lumos.checkpoints import load_checkpoint, read_checkpoint_meta
from lumos.configs.training import TrainConfig
from lumos.training.train import train

# two FSDP processes: tens of seconds
pytestmark = pytest.mark.slow

CONFIG = {
    **TINY_CONFIG,
    # depth 2: two FSDP units plus the root, so the gather spans several units.
    "model_overrides": {"depth": 2, "hidden_size": 32, "num_heads": 2},
    "ema_decay": 0.5,  # an EMA that visibly differs from the raw weights after 4 steps
    "distributed": "fsdp",
}


def test_fsdp_trains_like_ddp_saves_full_checkpoints_and_resumes_exactly(images_features, tmp_path):
    full = launch(tmp_path, CONFIG, images_features, str(tmp_path / "full"))
    assert full["global_batch"] == 4 and full["step"] == 4

    # Sharding changes where the parameters live, not the maths: DDP on the same data and seeds
    # follows the same loss curve and ends at the same raw and EMA weights.
    ddp = launch(tmp_path, {**CONFIG, "distributed": "ddp"}, images_features, str(tmp_path / "ddp"))
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in full["losses"]], dtype=torch.float64),
        torch.tensor([loss for _, loss in ddp["losses"]], dtype=torch.float64),
        rtol=1e-5,
        atol=1e-7,
    )

    # The checkpoint is a normal full one: one process loads it without any process group.
    loaded = load_checkpoint(full["checkpoint_uri"])
    reference = load_checkpoint(ddp["checkpoint_uri"])
    assert loaded.model is not None and reference.model is not None
    assert loaded.meta["train_config"]["distributed"] == "fsdp"
    assert sum(p.numel() for p in loaded.model.parameters()) == full["num_parameters"]
    for got, want in ((loaded.model, reference.model), (loaded.ema_model, reference.ema_model)):
        torch.testing.assert_close(got.state_dict(), want.state_dict(), rtol=1e-4, atol=1e-6)
    raw, ema = loaded.model.state_dict(), loaded.ema_model.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw), "the EMA is not the raw model"

    out = str(tmp_path / "interrupted")
    first = launch(tmp_path, {**CONFIG, "steps": 2}, images_features, out)
    second = launch(tmp_path, CONFIG, images_features, out)
    assert_resumed_exactly(full, first, second)
    assert read_checkpoint_meta(out)["step"] == 4
    torch.testing.assert_close(
        load_checkpoint(out).ema_model.state_dict(), loaded.ema_model.state_dict()
    )


def test_fsdp_needs_several_processes(images_features, tmp_path):
    with pytest.raises(ValueError, match="launch several"):
        train(TrainConfig(**{**CONFIG, "steps": 1}), images_features, str(tmp_path / "out"))
