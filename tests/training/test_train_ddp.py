"""Two processes in data parallel (DDP over gloo on CPUs): the multi-GPU path, resumed exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import image_records, write_features
from tiny import TINY_CONFIG
from two_processes import assert_resumed_exactly, launch, run_processes

from lumos.checkpoints import list_checkpoints, read_checkpoint_meta
from lumos.storage import Storage

# several processes on gloo: tens of seconds each
pytestmark = pytest.mark.slow


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

    # SIGTERM reaching rank 1 alone during step 1 (one node preempted): with stop_check_every 2
    # the processes agree at step 2, both stop there after one checkpoint, and the run resumes.
    stopped, cfg = str(tmp_path / "stopped"), {**cfg, "stop_check_every": 2}
    agents = run_processes(
        tmp_path, cfg, images_features, stopped, node_env=[{"LUMOS_TEST_SIGTERM": "1:1"}]
    )
    returncode, _, stderr = agents[0]
    assert returncode != 0
    assert "TrainingStopped: SIGTERM: stopped at step 2 of 4" in stderr  # rank 1
    assert "TrainingStopped: SIGTERM on another process: stopped at step 2 of 4" in stderr
    assert [step for step, _ in list_checkpoints(stopped)] == [2]
    resumed = launch(tmp_path, cfg, images_features, stopped)
    assert resumed["resumed_from"].endswith("step-0000002")
    assert [loss for _, loss in resumed["losses"]] == pytest.approx(
        [loss for _, loss in full["losses"][2:]], rel=1e-6, abs=1e-9
    )


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


def test_two_nodes_read_only_their_own_parts_and_resume_exactly(s3_bucket, tmp_path):
    """shard_features_by_node: two nodes (two torchrun agents of one process each), features in
    the object store. Each node downloads only its own parts (node i: parts i, i+2, ...), and a
    run stopped and resumed reads each node's own data position back: with 3 parts the nodes
    hold 12 and 6 training items, so their epochs end at different steps."""
    local = write_features(tmp_path / "local", image_records(), parts=3, paired=True)
    store = Storage.from_uri(f"s3://{s3_bucket}/ds")
    store.upload_dir(local)
    cfg = {**TINY_CONFIG, "shard_features_by_node": True}

    def run(name: str, steps: int) -> dict:
        caches = [tmp_path / name / f"cache-node-{i}" for i in range(2)]
        result = launch(
            tmp_path, {**cfg, "steps": steps}, store.uri, str(tmp_path / name / "out"), nodes=2,
            node_env=[{"LUMOS_FEATURE_CACHE": str(c)} for c in caches],
        )  # fmt: skip
        for node, cache in enumerate(caches):  # files are cached as <version>-<key>
            fetched = {f.name.split("-", 1)[1] for f in cache.rglob("*") if f.is_file()}
            fetched = {name.split(".")[0] for name in fetched if not name.endswith(".lock")}
            assert fetched == [{"part-00000", "part-00002"}, {"part-00001"}][node]
        return result

    full = run("full", 6)
    assert full["global_batch"] == 4 and full["train_items"] == 18  # 12 + 6: both nodes
    first = run("interrupted", 4)
    state = Storage.from_uri(first["checkpoint_uri"]).child("training_state")
    position = state.read_json("state.json")
    assert position["feature_nodes"] == 2 and "data" not in position
    assert position["data_by_node"] == ["data-node-00000.json", "data-node-00001.json"]
    positions = [state.read_json(f"data-node-0000{i}.json") for i in range(2)]
    assert [(p["num_items"], p["epoch"], p["position"]) for p in positions] == [
        (12, 0, 4),
        (6, 1, 1),
    ]
    second = run("interrupted", 6)
    assert_resumed_exactly(full, first, second)
