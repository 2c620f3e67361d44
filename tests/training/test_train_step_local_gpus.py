"""The pipeline's training step on a node with several GPUs: one process per GPU under
`accelerate launch`, and a SIGTERM to the step (its pod preempted) passed on to them.

There are no GPUs here: the step is told there are 2 (`_local_gpu_count`, the only stand-in)
and accelerate runs its 2 processes on the CPU (gloo). Everything else is the real step."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import Artifact

from lumos.checkpoints import list_checkpoints
from lumos.config import load_config
from lumos.pipeline import steps
from lumos.storage import Storage
from lumos.training.stopping import TrainingStopped

# accelerate launch with several processes
pytestmark = pytest.mark.slow


@pytest.fixture()
def two_local_gpus(monkeypatch):
    monkeypatch.setattr(steps, "_local_gpu_count", lambda: 2)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def tiny_pipeline_config(**pretrain) -> str:
    overrides = [f"pretrain.{k}={v}" for k, v in {"batch_size": 2, **pretrain}.items()]
    return load_config(preset="tiny", overrides=overrides).model_dump_json()


def test_several_local_gpus_train_under_accelerate(images_features, tmp_path, two_local_gpus):
    checkpoint = Artifact(tmp_path / "checkpoint.json")
    run_root = str(tmp_path / "run")
    steps.train_step(
        tiny_pipeline_config(steps=2), "i2i", run_root, Artifact(tmp_path, {"uri": images_features}),
        checkpoint,
    )  # fmt: skip
    described = json.loads(Path(checkpoint.path).read_text())
    assert described["result"]["step"] == 2
    state = Storage.from_uri(described["result"]["uri"]).child("training_state")
    assert state.read_json("state.json")["world_size"] == 2  # two processes trained


def test_sigterm_to_the_step_stops_its_processes_with_a_checkpoint(
    images_features, tmp_path, two_local_gpus, capfd
):
    """Once training runs (its step-2 checkpoint exists), this process gets SIGTERM: the step
    passes it on, both training processes stop after one more step with a checkpoint there, and
    the step fails with TrainingStopped naming it."""
    run_root = str(tmp_path / "run")
    out = Path(run_root) / "checkpoints" / "i2i"

    def signal_once_training_runs() -> None:
        deadline = time.monotonic() + 240
        while not (out / "step-0000002").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    config = tiny_pipeline_config(
        steps=100_000, checkpoint_every=2, keep_checkpoints=100_000, stop_check_every=1
    )
    threading.Thread(target=signal_once_training_runs, daemon=True).start()
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingStopped, match="SIGTERM: the i2i training stopped") as stopped:
        steps.train_step(
            config, "i2i", run_root, Artifact(tmp_path, {"uri": images_features}),
            Artifact(tmp_path / "checkpoint.json"),
        )  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is handler
    # Both processes stopped on the signal, at the same step, and said so.
    err = capfd.readouterr().err
    stops = re.findall(r"lumos: TrainingStopped: SIGTERM: stopped at step (\d+) of 100000", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]
    step = max(s for s, _ in list_checkpoints(str(out)))
    assert int(stops[0]) == step
    assert 2 <= step < 100_000 and f"step-{step:07d}" in str(stopped.value)
