"""The stages through a faulty object store: ingest, featurize, pretrain, export and promote,
with their data on the S3 test server behind `fault_proxy.FaultProxy` (every fault kind, a seeded
schedule), end exactly as the same stages through a perfect link."""

from __future__ import annotations

import hashlib
import re

import pytest
from fault_proxy import TRANSIENT_KINDS, FaultProxy, Schedule
from harness import differences, snapshot

from lumos.cli import main
from lumos.storage import Storage

pytestmark = pytest.mark.slow  # the stages twice

CONFIG = """\
synth: {num_images: 16, num_objects: 0, num_clips: 0}
ingest: {shard_max_bytes: 30000}
pretrain: {steps: 2, batch_size: 4, checkpoint_every: 1, log_every: 1, warmup_steps: 1}
export: {dynamic_batch: false, check_batch_sizes: [1]}
"""


def _stages(root: str, cfg: list[str], raw: str) -> None:
    main(["ingest", *cfg, "--source", raw, "--dataset", f"{root}/ds"])
    main(["featurize", *cfg, "--dataset", f"{root}/ds"])
    main(["pretrain", *cfg, "--dataset", f"{root}/ds", "--out", f"{root}/ck"])
    main(["export", *cfg, "--checkpoint", f"{root}/ck", "--out", f"{root}/ex"])


def test_the_stages_end_the_same_through_a_faulty_store(
    s3_endpoint, s3_bucket, tmp_path, monkeypatch
):
    (tmp_path / "cfg.yaml").write_text(CONFIG)
    cfg = ["--config", str(tmp_path / "cfg.yaml")]
    main(["data", "synth", *cfg, "--out", str(tmp_path / "raw")])
    monkeypatch.setenv("LUMOS_FEATURE_CACHE", str(tmp_path / "cache"))
    clean, faulty = f"s3://{s3_bucket}/clean", f"s3://{s3_bucket}/faulty"
    _stages(clean, cfg, str(tmp_path / "raw"))

    schedule = Schedule(seed=19, rate=0.15, kinds=TRANSIENT_KINDS)
    with FaultProxy(s3_endpoint, schedule, stall_s=4) as proxy:
        monkeypatch.setenv("LUMOS_S3_ENDPOINT", proxy.url)
        monkeypatch.setenv("LUMOS_S3_TIMEOUT_S", "3")
        monkeypatch.setenv("LUMOS_S3_BACKOFF_S", "0.01")
        monkeypatch.setenv("LUMOS_FEATURE_CACHE", str(tmp_path / "cache-faulty"))
        _stages(faulty, cfg, str(tmp_path / "raw"))
    assert set(proxy.injected()) == set(TRANSIENT_KINDS), proxy.injected()
    monkeypatch.setenv("LUMOS_S3_ENDPOINT", s3_endpoint)
    # Each ingest's manifest records its own time, so its hash (which later stages record as
    # their data's) differs between the two: it must be the hash of its own manifest.
    manifest = Storage.from_uri(f"{faulty}/ds").read_bytes("manifest.json")
    features = Storage.from_uri(f"{faulty}/ds").read_json("features/features.json")
    assert features["manifest_sha256"] == hashlib.sha256(manifest).hexdigest()
    for out in ("ds", "ck", "ex"):
        got = _masked(snapshot(f"{faulty}/{out}", faulty))
        want = _masked(snapshot(f"{clean}/{out}", clean))
        assert differences(got, want) == [], out


def _masked(files: dict[str, bytes]) -> dict[str, bytes]:
    """Mask what differs between any two runs: the manifest hash. (export.json's model config
    names the S3 checkpoint it was made from, under the run's root, which `snapshot` masks.)"""
    sha = re.compile(rb'"manifest_sha256": "[0-9a-f]{64}"')
    return {key: sha.sub(b'"manifest_sha256": "<sha>"', data) for key, data in files.items()}
