"""The CLI's clear errors at the boundaries: each names the problem, and leaves nothing that
looks complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def lumos(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lumos.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_unreadable_source(tmp_path: Path) -> None:
    out = lumos("ingest", "--source", "/nonexistent/photos", "--dataset", str(tmp_path / "ds"))
    assert out.returncode == 1
    assert "/nonexistent/photos" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_missing_checkpoint(tmp_path: Path) -> None:
    out = lumos(
        "export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "export")
    )
    assert out.returncode == 1
    assert "no checkpoint at" in out.stderr
    assert not (tmp_path / "export" / "export.json").exists()


def test_dataset_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    out = lumos("featurize", "--dataset", str(tmp_path / "half"))
    assert out.returncode == 1
    assert "lumos: NotFoundError: no dataset at" in out.stderr and "manifest.json" in out.stderr
    assert "Traceback" not in out.stderr


def test_corrupt_image_is_rejected_with_its_reason(tmp_path: Path) -> None:
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(src / f"ok-{i}.png")
    good = (src / "ok-0.png").read_bytes()
    (src / "broken.png").write_bytes(good[: len(good) // 2])
    out = lumos("ingest", "--source", str(src), "--dataset", str(tmp_path / "ds"))
    assert out.returncode == 0, out.stderr
    import json

    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    text = json.dumps(manifest)
    assert "broken" in text or manifest["counts"].get("rejected", 0) == 1


def test_invalid_config_fails_before_any_work(tmp_path: Path) -> None:
    out = lumos("run", "--run-dir", str(tmp_path / "run"), "--set", "ingest.resolution=-5")
    assert out.returncode == 2
    assert "ingest.resolution" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # trains one step first, then two CLI processes import torch
def test_resume_with_another_config_is_one_line_and_v_adds_the_traceback(tmp_path: Path) -> None:
    """A run directory holds another run's checkpoint (here: another lr): the CLI says so in one
    line naming the differing setting, exit 1, no traceback; `lumos -v` shows the traceback."""
    from lumos.config import load_config
    from lumos.data.ingest import ingest
    from lumos.data.synthetic import generate_default_dataset
    from lumos.training.featurize import featurize
    from lumos.training.train import train

    small = [
        "synth.num_images=12",
        "synth.num_objects=0",
        "synth.num_clips=0",
        "pretrain.steps=1",
        "pretrain.batch_size=4",
        "pretrain.model_overrides.depth=1",
    ]
    cfg = load_config("tiny", overrides=small)
    generate_default_dataset(cfg.synth, str(tmp_path / "raw"))
    dataset, out = str(tmp_path / "ds"), str(tmp_path / "run")
    ingest(cfg.ingest, str(tmp_path / "raw" / "images"), dataset)
    featurize(cfg.featurize, dataset)
    train(cfg.pretrain, dataset, out)

    args = ["pretrain", "--dataset", dataset, "--out", out]
    for item in [*small, "pretrain.lr=0.01"]:
        args += ["--set", item]
    quiet = lumos(*args)
    assert quiet.returncode == 1, quiet.stderr
    [line] = [x for x in quiet.stderr.splitlines() if x.startswith("lumos:")]
    assert line.startswith("lumos: CheckpointError:") and "'lr'" in line, line
    assert "Traceback" not in quiet.stderr

    verbose = lumos("-v", *args)
    assert verbose.returncode == 1
    assert "Traceback" in verbose.stderr and "CheckpointError" in verbose.stderr
