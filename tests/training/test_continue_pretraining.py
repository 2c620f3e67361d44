"""Retraining pretrains on from the current I2I checkpoint: the pretrain step of an incremental
run continues the checkpoint the last finished pretraining recorded (raw weights into the model,
EMA into the EMA, a fresh optimizer and schedule), and its checkpoint records that parent."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import Artifact
from kfp import dsl

from lumos.checkpoints import load_checkpoint, read_checkpoint_meta
from lumos.config import load_config
from lumos.pipeline.layout import RunLayout
from lumos.pipeline.steps import current_i2i, train_step


def pretrain(
    features: str, run_root: Path, registry: Path, steps: int, incremental: bool, **artifacts
) -> str:
    cfg = load_config(
        preset="tiny",
        overrides=[
            f"pretrain.steps={steps}",
            "pretrain.batch_size=4",
            "pretrain.checkpoint_every=100",
            f"promote.registry_uri={registry}",
            f"ingest.incremental={str(incremental).lower()}",
        ],
    )
    features_artifact = Artifact(run_root / "features.json", {"uri": features})
    checkpoint = Artifact(run_root / "ckpt")
    train_step(
        cfg.model_dump_json(), "i2i", str(run_root), features_artifact, checkpoint, **artifacts
    )
    return read_checkpoint_meta(RunLayout(str(run_root)).checkpoint("i2i"))["uri"]


def weights(uri: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    loaded = load_checkpoint(uri, raw=True)
    assert loaded.model is not None
    return loaded.model.state_dict(), loaded.ema_model.state_dict()


def test_retraining_continues_the_current_i2i_checkpoint(images_features, tmp_path) -> None:
    registry = tmp_path / "registry"
    # What the KFP UI shows of the step: its metrics and the loss curve (kfp's own artifacts)
    metrics = dsl.Metrics(name="metrics", uri=str(tmp_path / "metrics"), metadata={})
    curve = dsl.HTML(name="loss_curve", uri=str(tmp_path / "loss.html"), metadata={})
    first = pretrain(
        images_features, tmp_path / "run-1", registry, steps=3, incremental=True,
        metrics=metrics, loss_curve=curve,
    )  # fmt: skip
    assert metrics.metadata["step"] == 3 and metrics.metadata["final_loss"] > 0
    assert (
        "<svg" in Path(curve.path).read_text()
        and "i2i: training loss" in Path(curve.path).read_text()
    )
    assert read_checkpoint_meta(first)["parent"] is None  # nothing to continue yet: from scratch
    assert current_i2i(load_config(overrides=[f"promote.registry_uri={registry}"])) == first

    # The next retraining (0 steps: its checkpoint is what it starts from) continues the first.
    second = pretrain(images_features, tmp_path / "run-2", registry, steps=0, incremental=True)
    meta = read_checkpoint_meta(second)
    assert meta["parent"] == first
    assert meta["transfer_report"]["continued"] is True
    assert meta["transfer_report"]["source_weights"] == "raw and ema"
    (raw_1, ema_1), (raw_2, ema_2) = weights(first), weights(second)
    assert all(torch.equal(raw_1[k], raw_2[k]) for k in raw_1)
    assert all(torch.equal(ema_1[k], ema_2[k]) for k in ema_1)
    assert not all(torch.equal(raw_1[k], ema_1[k]) for k in raw_1)  # two different things kept
    assert current_i2i(load_config(overrides=[f"promote.registry_uri={registry}"])) == second

    # A run that is not retraining (full ingest) pretrains from scratch.
    fresh = pretrain(images_features, tmp_path / "run-3", registry, steps=0, incremental=False)
    assert read_checkpoint_meta(fresh)["parent"] is None
