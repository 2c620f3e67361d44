"""bench/condition_use.py: the x0 error with and without the condition, per frame and timestep."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from lumos.training.train import train

BENCH = Path(__file__).resolve().parents[2] / "bench" / "condition_use.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("condition_use_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_an_untrained_video_model_reads_nothing_of_its_first_frame(
    clips_features, tmp_path, tiny_config
):
    cfg = tiny_config(head="video", init="scratch", num_frames=2, steps=0)
    ckpt = train(cfg, clips_features, str(tmp_path / "video")).checkpoint_uri
    result = load_bench().measure(ckpt, clips_features, "train", items=4, seed=0)
    assert result["head"] == "video" and result["items"] == 4
    assert result["copy_first"][0] == 0.0 and result["copy_first"][1] > 0  # frame 0 is the copy
    assert [row["t"] for row in result["x0_mse"]] == [10, 100, 300, 500, 700, 900, 999]
    for row in result["x0_mse"]:
        # The zero-initialised output layer predicts epsilon 0 whatever the condition.
        assert row["with"] == row["without"] and len(row["with"]) == 2
        assert all(e > 0 for e in row["with"])


def test_a_trained_video_model_predicts_differently_without_its_condition(
    clips_features, tmp_path, tiny_config
):
    cfg = tiny_config(head="video", init="scratch", num_frames=2, steps=5, ema_decay=0.0)
    ckpt = train(cfg, clips_features, str(tmp_path / "video")).checkpoint_uri
    rows = load_bench().measure(ckpt, clips_features, "train", items=4, seed=0)["x0_mse"]
    assert any(row["with"] != row["without"] for row in rows)
