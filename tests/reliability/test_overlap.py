"""Two runs at once on one dataset or one head, as two runs of a schedule overlap: real `lumos`
processes against the S3 test server. The overlap is made certain, not left to timing:
the first run goes through the fault proxy, which holds its commit (the manifest's or
current.json's PUT), or for two ingests that bring different images its shard uploads,
unforwarded; the second runs from start to end meanwhile; then the held requests go on. The
first must fail with one line saying what happened, and the dataset or registry must hold
exactly the second one's run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_proxy import FaultProxy

from lumos.data.shards import iter_shard_records
from lumos.storage import Storage

pytestmark = pytest.mark.slow  # each test starts three lumos processes

LUMOS = str(Path(sys.executable).with_name("lumos"))
CONFIG = """\
synth: {num_images: 24, num_objects: 2, num_clips: 2}
ingest: {shard_max_bytes: 20000}
"""


def _wait_until_held(proxy: FaultProxy, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not proxy.held.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the first run never reached its commit ({proc.poll()})")


# The first run's client waits for its held commit longer than the second run takes.
PATIENT = {"LUMOS_S3_TIMEOUT_S": "600"}


def _lumos(args: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [LUMOS, *args], env={**os.environ, **env}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, **kwargs,
    )  # fmt: skip


def test_two_ingests_into_one_dataset_one_wins_the_other_fails_clearly(
    s3_env, s3_endpoint, s3_bucket, tmp_path
):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    cfg = ["--config", str(tmp_path / "cfg.yaml")]
    subprocess.run([LUMOS, "data", "synth", *cfg, "--out", str(tmp_path / "raw")], check=True,
                   capture_output=True)  # fmt: skip
    dataset = f"s3://{s3_bucket}/ds"
    argv = ["ingest", *cfg, "--source", str(tmp_path / "raw"), "--dataset", dataset]
    store = Storage.from_uri(dataset)
    commit = lambda r: r.method == "PUT" and r.path.endswith("/ds/manifest.json")  # noqa: E731
    with FaultProxy(s3_endpoint, hold=commit) as proxy:
        first = _lumos(argv, {"LUMOS_S3_ENDPOINT": proxy.url, **PATIENT})
        _wait_until_held(proxy, first)  # it read no manifest, wrote its shards, is committing
        second = subprocess.run([LUMOS, *argv], capture_output=True, text=True, env=os.environ)
        assert second.returncode == 0, second.stderr
        proxy.release()
        assert first.wait(timeout=300) == 1
    errors = [line for line in first.stderr.read().splitlines() if line.startswith("lumos: ")]
    assert len(errors) == 1, errors  # one line (beside the progress bar on the terminal)
    assert f"another ingest committed to {dataset} while this one ran" in errors[0]
    assert "run this ingest again" in errors[0]

    manifest = store.read_json("manifest.json")
    assert len(manifest["runs"]) == 1  # the winner's run, once
    names = [s["name"] for s in manifest["shards"]]
    counts = {name: sum(1 for _ in iter_shard_records(store, name)) for name in names}
    assert counts == {s["name"]: s["count"] for s in manifest["shards"]}
    assert sum(counts.values()) == manifest["num_samples"] > 0

    # The loser, run again, builds on the winner's dataset: it is up to date.
    again = subprocess.run([LUMOS, *argv], capture_output=True, text=True, env=os.environ)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["up_to_date"] is True
    assert store.read_json("manifest.json")["runs"] == manifest["runs"]


def test_two_ingests_bringing_different_new_images_leave_the_winners_shards_intact(
    s3_env, s3_endpoint, s3_bucket, tmp_path
):
    """Two incremental runs of one schedule over a source that grew between them: both build on
    the same manifest and bring different new images. The loser's shard uploads are held until
    the winner has committed, so they land on top of the winner's if the names collide."""
    (tmp_path / "cfg.yaml").write_text(
        "synth: {num_images: 24, num_objects: 2, num_clips: 2}\n"
        "ingest: {shard_max_bytes: 20000, incremental: true}\n"
    )
    cfg = ["--config", str(tmp_path / "cfg.yaml")]
    subprocess.run([LUMOS, "data", "synth", *cfg, "--out", str(tmp_path / "raw")], check=True,
                   capture_output=True)  # fmt: skip
    images = sorted((tmp_path / "raw" / "images").iterdir())
    source = tmp_path / "source"
    source.mkdir()

    def arrive(first: int, stop: int) -> None:  # images first..stop-1, with their sidecars
        for path in images:
            if first <= int(path.stem.removeprefix("img-")) < stop:
                shutil.copy(path, source / path.name)

    dataset = f"s3://{s3_bucket}/ds"
    argv = ["ingest", *cfg, "--source", str(source), "--dataset", dataset]
    store = Storage.from_uri(dataset)
    arrive(0, 8)
    base = subprocess.run([LUMOS, *argv], capture_output=True, text=True, env=os.environ)
    assert base.returncode == 0, base.stderr
    base_manifest = store.read_json("manifest.json")

    arrive(8, 16)  # the first run of the schedule sees these
    shard_put = lambda r: r.method == "PUT" and "/ds/shards/" in r.path  # noqa: E731
    with FaultProxy(s3_endpoint, hold=shard_put) as proxy:
        first = _lumos(argv, {"LUMOS_S3_ENDPOINT": proxy.url, **PATIENT})
        _wait_until_held(proxy, first)  # it read the manifest and is uploading its first shard
        arrive(16, 24)  # the second run sees these too
        second = subprocess.run([LUMOS, *argv], capture_output=True, text=True, env=os.environ)
        assert second.returncode == 0, second.stderr
        won = store.read_json("manifest.json")
        proxy.release()  # the first run's shards land only now, after the second's commit
        assert first.wait(timeout=300) == 1
    errors = [line for line in first.stderr.read().splitlines() if line.startswith("lumos: ")]
    assert len(errors) == 1 and "another ingest committed to" in errors[0], errors

    # The history is the first run, then the winner's: nothing of the loser.
    manifest = store.read_json("manifest.json")
    assert manifest == won
    assert manifest["runs"][0] == base_manifest["runs"][0] and len(manifest["runs"]) == 2
    assert manifest["shards"][: len(base_manifest["shards"])] == base_manifest["shards"]
    # Every shard the manifest names holds exactly the samples its runs' reports put there,
    # with the count and size the manifest records, though the loser wrote shards after it.
    reported: dict[str, list[str]] = {}
    for run in manifest["runs"]:
        for line in store.read_bytes(run["report"]).decode().splitlines():
            row = json.loads(line)
            if row["outcome"] == "ingested":
                reported.setdefault(row["shard"], []).append(row["key"])
    assert set(reported) == {s["name"] for s in manifest["shards"]}
    sizes = {o.key: o.size for o in store.list("shards/")}
    for shard in manifest["shards"]:
        keys = [key for key, _ in iter_shard_records(store, shard["name"])]
        assert keys == reported[shard["name"]], shard["name"]
        assert len(keys) == shard["count"]
        assert sizes[f"shards/{shard['name']}"] == shard["bytes"]
    assert manifest["num_samples"] == sum(len(k) for k in reported.values())
    assert manifest["runs"][1]["counts"]["previously_seen"] == 16  # 8 images and their sidecars

    # The loser, run again, builds on the winner's dataset: nothing is new to it.
    again = subprocess.run([LUMOS, *argv], capture_output=True, text=True, env=os.environ)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["up_to_date"] is True
    assert store.read_json("manifest.json") == manifest


def test_two_promotions_of_one_head_one_wins_the_other_fails_clearly(
    s3_env, s3_endpoint, s3_bucket, tmp_path
):
    crds = os.environ.get("LUMOS_CRDS_DIR") or Path(__file__).parents[3] / "shared" / "crds"
    if not Path(crds).is_dir():  # promote validates what it renders against them
        pytest.skip(f"CRD directory {crds} not found (set LUMOS_CRDS_DIR)")
    sys.path.insert(0, str(Path(__file__).parents[1] / "serving"))
    from test_promote import eval_result, make_export

    registry = f"s3://{s3_bucket}/registry"
    (tmp_path / "cfg.yaml").write_text(
        f"promote: {{registry_uri: {registry}, storage_uri_base: s3://{s3_bucket}/models}}\n"
    )
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "eval.json").write_text(eval_result().model_dump_json())

    def argv(name: str) -> list[str]:
        export = make_export(tmp_path / f"export-{name}")
        return ["promote", "--config", str(tmp_path / "cfg.yaml"), "--export", str(export),
                "--evaluation", str(evaluation), "--out", str(tmp_path / f"out-{name}")]  # fmt: skip

    store = Storage.from_uri(registry)
    swap = lambda r: r.method == "PUT" and r.path.endswith("/t2i/current.json")  # noqa: E731
    with FaultProxy(s3_endpoint, hold=swap) as proxy:
        first = _lumos(argv("a"), {"LUMOS_S3_ENDPOINT": proxy.url, **PATIENT})
        _wait_until_held(proxy, first)  # it registered v0001, copied the model, is swapping
        second = subprocess.run([LUMOS, *argv("b")], capture_output=True, text=True, env=os.environ)
        assert second.returncode == 0, second.stderr
        proxy.release()
        assert first.wait(timeout=300) == 1
    errors = [line for line in first.stderr.read().splitlines() if line.startswith("lumos: ")]
    assert len(errors) == 1, errors  # one line (beside the progress bar on the terminal)
    assert "made v0002 current while this one ran" in errors[0]

    assert sorted(o.key for o in store.list()) == [
        "t2i/current.json",
        "t2i/v0001.json",
        "t2i/v0002.json",
    ]
    current = store.read_json("t2i/current.json")
    assert current["version"] == "v0002"
    assert store.read_json("t2i/v0002.json")["lineage"]["export_uri"].endswith("export-b")
