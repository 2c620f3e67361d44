"""Contract: the pretrain step's TrainJob, run as Kubeflow Trainer runs it, trains one model in one
world of nodes x processes.

No Kubernetes cluster or Trainer controller can run here, so `launch_and_wait` is replaced by the
Trainer stand-in of tests/kubeflow_trainer.py, which builds each node's pod as kubeflow/trainer
does (`pkg/runtime/core/trainingruntime.go`, `pkg/runtime/framework/plugins/jobset/builder.go`,
`pkg/runtime/framework/plugins/torch/torch.go`) from our TrainJob and our runtime
(manifests/base/training-runtime.yaml), and runs each pod's container command VERBATIM as a
process with only the env those pods get: the runtime's and the TrainJob's container env and the
PET_* variables the torch plugin injects. Two CPU nodes of one process each (gloo). Everything
else is the real step and the real CLI."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import Artifact
from kubeflow_trainer import load_runtime, node_pods, run_pods
from local_servers import free_port

from lumos.checkpoints import list_checkpoints
from lumos.config import load_config
from lumos.k8s.crd_validation import validate_resource
from lumos.k8s.trainjob import LAUNCHER, TrainJobFailed, TrainJobOutcome
from lumos.pipeline import steps

TWO_CPU_NODES = (
    "cluster.distributed={num_nodes: 2, gpus_per_node: 0, env_secret: null, node_selector: {},"
    " tolerations: [], env: {OMP_NUM_THREADS: '1'}}"
)


def image_env(home: Path) -> dict[str, str]:
    """The image's own env (docker/train.Dockerfile): PATH with `torchrun` and `lumos` on it."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def trainer_standin(tmp_path: Path, launched: list, strip_launcher: bool = False):
    def launch_and_wait(
        job: dict, timeout_s: float, poll_s: float, start_timeout_s: float | None
    ) -> TrainJobOutcome:
        validate_resource(job)
        launched.append(job)
        pods = node_pods(job, load_runtime())
        if strip_launcher:  # the bug this contract guards against: no torchrun in the command
            for pod in pods:
                pod["containers"][0]["command"] = pod["containers"][0]["command"][len(LAUNCHER) :]
        results = run_pods(pods, image_env(tmp_path), free_port(), timeout_s=240)
        launched.append(results)
        name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
        logs = {f"{name}-node-0-{i}": err[-3000:] for i, (_, _, err) in enumerate(results)}
        state = "Complete" if all(rc == 0 for rc, _, _ in results) else "Failed"
        outcome = TrainJobOutcome(
            name=name, namespace=namespace, state=state, seconds=1.0, logs=logs
        )
        if state == "Failed":
            raise TrainJobFailed(f"TrainJob {name} failed: {logs}", outcome)
        return outcome

    return launch_and_wait


def pretrain_as_trainjob(tmp_path, features, monkeypatch, strip_launcher=False):
    cfg = load_config(
        preset="tiny",
        overrides=[
            TWO_CPU_NODES,
            "pretrain.steps=2",
            "pretrain.batch_size=4",
            "pretrain.model_overrides={hidden_size: 32, depth: 1, num_heads: 2, patch_size: 2}",
        ],
    )
    launched: list = []
    monkeypatch.setattr(
        "lumos.k8s.trainjob.launch_and_wait", trainer_standin(tmp_path, launched, strip_launcher)
    )
    features_in = Artifact(tmp_path / "features.json", {"uri": features})
    checkpoint = Artifact(tmp_path / "checkpoint.json")
    run_root = str(tmp_path / "runs" / "run-1234567890")
    steps.train_step(cfg.model_dump_json(), "i2i", run_root, features_in, checkpoint)
    return launched, checkpoint, run_root


@pytest.mark.slow  # two torchrun agents, each starting a training process that imports torch
def test_trainjob_command_trains_one_model_in_a_world_of_two(
    images_features, tmp_path, monkeypatch
):
    launched, checkpoint, run_root = pretrain_as_trainjob(tmp_path, images_features, monkeypatch)
    job, results = launched
    assert job["spec"]["trainer"]["numNodes"] == 2
    assert job["spec"]["trainer"]["command"][:2] == ["torchrun", "--no-python"]
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    described = json.loads(Path(checkpoint.path).read_text())
    assert described["uri"] == f"{run_root}/checkpoints/i2i"
    assert described["result"]["trainjob"]["state"] == "Complete"
    meta = described["result"]["checkpoint"]
    assert meta["step"] == 2
    # One world of the TrainJob's two processes (one per node), not two models of one process.
    assert [step for step, _ in list_checkpoints(described["uri"])] == [2]
    state = json.loads(
        Path(described["uri"], "step-0000002", "training_state", "state.json").read_text()
    )
    assert state["world_size"] == 2


def test_command_without_torchrun_fails_the_world_check(images_features, tmp_path, monkeypatch):
    with pytest.raises(TrainJobFailed) as failed:
        pretrain_as_trainjob(tmp_path, images_features, monkeypatch, strip_launcher=True)
    for pod, log in failed.value.outcome.logs.items():
        assert "WorldMismatch: refusing to train: the job is configured for 2 nodes x 1 " in log, (
            pod,
            log,
        )
        assert "not started by torchrun" in log
    assert not os.path.exists(tmp_path / "runs" / "run-1234567890" / "checkpoints" / "i2i")
