"""The pretrain step with `cluster.distributed` set: it renders a Kubeflow Trainer TrainJob whose
command is this project's own CLI, waits for it and reads the checkpoint it wrote.

There is no Kubernetes cluster here, so `launch_and_wait` is replaced by a stand-in "cluster"
that checks the TrainJob against the CRD and runs its trainer command as a local process
(one node, CPU). Everything else is the real step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Artifact

from lumos.config import load_config
from lumos.k8s.crd_validation import validate_resource
from lumos.k8s.trainjob import TrainJobOutcome
from lumos.pipeline import steps


def test_pretrain_runs_as_a_trainjob_of_the_project_cli(images_features, tmp_path, monkeypatch):
    cfg = load_config(
        preset="tiny",
        overrides=[
            "cluster.distributed={num_nodes: 2, gpus_per_node: 8}",
            "pretrain.steps=2",
            "pretrain.batch_size=4",
            "pretrain.model_overrides={hidden_size: 32, depth: 1, num_heads: 2, patch_size: 2}",
        ],
    )
    launched: list[dict] = []

    def local_cluster(
        job: dict, timeout_s: float, poll_s: float, start_timeout_s: float | None
    ) -> TrainJobOutcome:
        validate_resource(job)
        launched.append(job)
        trainer = job["spec"]["trainer"]
        command = [*trainer["command"], *trainer.get("args", [])]
        assert command[0] == "lumos"
        done = subprocess.run(
            [sys.executable, "-m", "lumos.cli", *command[1:]],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        name = job["metadata"]["name"]
        return TrainJobOutcome(name=name, namespace="lumos", state="Complete", seconds=1.0)

    monkeypatch.setattr("lumos.k8s.trainjob.launch_and_wait", local_cluster)
    features = Artifact(tmp_path / "features.json", {"uri": images_features})
    checkpoint = Artifact(tmp_path / "checkpoint.json")
    run_root = str(tmp_path / "runs" / "run-1234567890")

    steps.train_step(cfg.model_dump_json(), "i2i", run_root, features, checkpoint)

    assert len(launched) == 1
    job = launched[0]
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 2
    assert job["metadata"]["name"] == "lumos-i2i-34567890"
    described = json.loads(Path(checkpoint.path).read_text())
    assert described["uri"] == f"{run_root}/checkpoints/i2i"
    assert described["result"]["trainjob"]["state"] == "Complete"
    assert described["result"]["checkpoint"]["step"] == 2
