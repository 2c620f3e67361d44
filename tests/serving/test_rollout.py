"""Promotion rolled out through a stand-in of the Kubernetes API that answers as KServe's
controller does (kserve_standin.py names the upstream files it follows): the first model goes
to 100%, a challenger takes the canary share and is promoted on its metrics, a slow challenger
and one whose pods crash are rolled back automatically, the registry records each outcome, and
`rollback` serves the previous version again. The canary's metrics come from a real predictor
process serving a tiny export, with real requests sent to it during the soak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kserve_standin import KServeStandIn
from predictor_process import post, serve, tiny_export

from lumos.configs.serving import PromoteConfig, RolloutConfig
from lumos.serving.promote import current_promoted, promote
from lumos.serving.rollout import FIELD_MANAGER, Cluster, rollback

# a real predictor process under a soak of live traffic: tens of seconds in all
pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
ISVC = "lumos-t2i"  # PromoteConfig's <prefix>-<head>; the ServingRuntime's --model_name


@pytest.fixture(scope="module")
def crds_dir() -> Path:
    path = Path(os.environ.get("LUMOS_CRDS_DIR") or REPO_ROOT.parent / "shared" / "crds")
    if not path.is_dir():
        pytest.skip(f"CRD directory {path} not found (set LUMOS_CRDS_DIR)")
    return path


@pytest.fixture(scope="module")
def export_and_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    export_dir = tiny_export(tmp_path_factory.mktemp("rollout"), "t2i")
    for url in serve(export_dir, model=ISVC):
        yield export_dir, url


def eval_result(baseline_version: str | None) -> dict:
    """What promote needs of an evaluation (a passed gate against the current version)."""
    return {
        "head": "t2i", "passed": True, "reasons": [],
        "metrics": {"clip_attribute_accuracy": 0.8, "fid_proxy": 12.5},
        "baseline": {"fid_proxy": 12.5} if baseline_version else None,
        "baseline_version": baseline_version,
    }  # fmt: skip


class LiveTraffic:
    """The cluster's clock and sleep: while the rollout waits, users' requests reach the
    predictor (each wait sends `per_wait` real requests) and the clock advances."""

    def __init__(self, url: str, per_wait: int = 3) -> None:
        self.url, self.per_wait, self.now, self.sent = url, per_wait, 0.0, 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        for i in range(self.per_wait):
            body = {"instances": [{"prompt": f"a ring {i}", "seed": self.sent, "steps": 2}]}
            status, answer, _ = post(f"{self.url}/v1/models/{ISVC}:predict", body)
            assert status == 200, answer
            self.sent += 1
        self.now += seconds


def test_promotion_canary_rollback_and_the_registry(
    tmp_path: Path, crds_dir: Path, export_and_server: tuple[str, str]
) -> None:
    export_dir, url = export_and_server
    crashing: set[str] = set()
    standin = KServeStandIn(
        crds_dir, lambda uri: ("crash", None) if uri in crashing else ("ready", url)
    )
    traffic = LiveTraffic(url)
    registry = str(tmp_path / "registry")
    cfg = PromoteConfig(
        registry_uri=registry,
        storage_uri_base=str(tmp_path / "models"),
        rollout=RolloutConfig(apply=True, canary_traffic_percent=20, soak_s=3, poll_s=1,
                              ready_timeout_s=30, min_requests=5, max_p95_latency_s=60),
    )  # fmt: skip
    seen_current: list[str | None] = []  # the registry's current version at every read

    def record(_isvc: dict) -> None:
        current = current_promoted(registry, "t2i")
        seen_current.append(current["version"] if current else None)

    standin.on_get = record

    def promote_one(baseline: str | None, config: PromoteConfig = cfg):
        cluster = Cluster(api=standin, events=standin, sleep=traffic.sleep, clock=traffic.clock)
        out = tmp_path / f"promote-{len(standin.applies)}"
        return promote(config, export_dir, eval_result(baseline), str(out), cluster=cluster)

    def isvc() -> dict:
        return standin.get_namespaced_custom_object(
            "serving.kserve.io", "v1beta1", "lumos", "inferenceservices", ISVC
        )

    def record_of(version: str) -> dict:
        return json.loads((tmp_path / "registry" / "t2i" / f"{version}.json").read_text())

    # 1. The first model: applied without a canary, Ready, then current.
    first = promote_one(None)
    assert first.promoted and first.version == "v0001"
    assert set(seen_current) == {None}, "current.json changed before the model was Ready"
    rollout = record_of("v0001")["rollout"]
    assert rollout["outcome"] == "promoted" and rollout["revision"] == f"{ISVC}-predictor-00001"
    assert current_promoted(registry, "t2i")["version"] == "v0001"

    # 2. A challenger: canary 20%, soak with live traffic, metrics fine -> 100%.
    seen_current.clear()
    second = promote_one("v0001")
    assert second.promoted and second.version == "v0002", second.reasons
    assert set(seen_current) == {"v0001"}, "current.json changed before the canary took 100%"
    assert current_promoted(registry, "t2i")["version"] == "v0002"
    bodies = [body for _, _, body in standin.applies]
    assert [b["spec"]["predictor"].get("canaryTrafficPercent") for b in bodies] == [None, 20, None]
    assert {(manager, force) for manager, force, _ in standin.applies} == {(FIELD_MANAGER, True)}
    rollout = record_of("v0002")["rollout"]
    assert rollout["outcome"] == "promoted" and rollout["canary_traffic_percent"] == 20
    assert rollout["previous_revision"] == f"{ISVC}-predictor-00001"
    evidence = rollout["evidence"]
    assert evidence["requests"] >= 5 and evidence["model_errors"] == 0
    assert 0 < evidence["p95_latency_s"] <= 60
    status = isvc()["status"]["components"]["predictor"]
    assert status["latestRolledoutRevision"] == f"{ISVC}-predictor-00002"
    assert status["previousRolledoutRevision"] == f"{ISVC}-predictor-00001"
    assert [(t["revisionName"], t["percent"]) for t in status["traffic"]] == [
        (f"{ISVC}-predictor-00002", 100)
    ]
    # Server-side apply removed the canary percent this manager no longer sets.
    assert "canaryTrafficPercent" not in isvc()["spec"]["predictor"]

    # 3. A challenger slower than the limit: rolled back on its metrics, recorded, not current.
    slow = cfg.model_copy(
        update={"rollout": cfg.rollout.model_copy(update={"max_p95_latency_s": 1e-4})}
    )
    third = promote_one("v0002", slow)
    assert not third.promoted and third.version == "v0003"
    assert any("p95 latency" in r and "max_p95_latency_s" in r for r in third.reasons)
    assert current_promoted(registry, "t2i")["version"] == "v0002"
    rollout = record_of("v0003")["rollout"]
    assert rollout["outcome"] == "rolled_back" and rollout["evidence"]["p95_latency_s"] > 1e-4
    assert standin.applies[-1][2]["spec"]["predictor"]["canaryTrafficPercent"] == 0
    traffic_now = isvc()["status"]["components"]["predictor"]["traffic"]
    assert {(t["revisionName"], t["percent"]) for t in traffic_now} == {
        (f"{ISVC}-predictor-00003", 0), (f"{ISVC}-predictor-00002", 100)}  # fmt: skip

    # 4. A challenger whose pods crash: never Ready, rolled back with the reason and the events.
    crashing.add(str(tmp_path / "models" / "t2i" / "v0004"))
    fourth = promote_one("v0002")
    assert not fourth.promoted and fourth.version == "v0004"
    assert "canary Ready not reached after 30 s" in fourth.reasons[0]
    assert "RevisionFailed" in fourth.reasons[0]
    rollout = record_of("v0004")["rollout"]
    assert rollout["outcome"] == "rolled_back"
    assert any("BackOff" in e for e in rollout["events"])
    assert current_promoted(registry, "t2i")["version"] == "v0002"
    served = isvc()["status"]["components"]["predictor"]["traffic"]
    assert (f"{ISVC}-predictor-00002", 100) in {(t["revisionName"], t["percent"]) for t in served}

    # 5. `lumos rollback`: the previous version of the current one (v0001) serves again.
    cluster = Cluster(api=standin, events=standin, sleep=traffic.sleep, clock=traffic.clock)
    back = rollback(cfg, "t2i", cluster)
    assert (back.version, back.rolled_back_from) == ("v0001", "v0002")
    current = current_promoted(registry, "t2i")
    assert current["version"] == "v0001" and current["rolled_back_from"] == "v0002"
    assert record_of("v0002")["rolled_back"]["to_version"] == "v0001"
    spec = isvc()["spec"]["predictor"]
    assert spec["model"]["storageUri"] == str(tmp_path / "models" / "t2i" / "v0001")
    assert isvc()["status"]["components"]["predictor"]["traffic"][0]["percent"] == 100
    with pytest.raises(Exception, match="no earlier version to roll back to"):
        rollback(cfg, "t2i", cluster)


def test_rollback_command_says_what_is_wrong(tmp_path: Path) -> None:
    """`lumos rollback --head t2i` is one command; with nothing promoted it says so in one line."""
    command = [sys.executable, "-m", "lumos.cli", "rollback", "--head", "t2i",
               "--set", f"promote.registry_uri={tmp_path / 'registry'}"]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "no model of head 't2i' is promoted" in lines[0], out.stderr


def test_first_model_that_never_gets_ready_fails_and_frees_its_version(
    tmp_path: Path, crds_dir: Path
) -> None:
    """No champion to fall back to: promotion fails with the conditions and the pods' events,
    the version's record is removed again and nothing is current."""
    from test_promote import make_export

    from lumos.serving.rollout import RolloutFailed

    standin = KServeStandIn(crds_dir, lambda uri: ("crash", None))
    clock = [0.0]
    cluster = Cluster(api=standin, events=standin, sleep=lambda s: clock.__setitem__(0, clock[0] + s),
                      clock=lambda: clock[0])  # fmt: skip
    registry = str(tmp_path / "registry")
    cfg = PromoteConfig(registry_uri=registry,
                        rollout=RolloutConfig(apply=True, ready_timeout_s=60, poll_s=5))  # fmt: skip
    export = make_export(tmp_path / "export")
    with pytest.raises(RolloutFailed, match="Ready not reached after 60 s") as err:
        promote(cfg, str(export), eval_result(None), str(tmp_path / "out"), cluster=cluster)
    assert "RevisionFailed" in str(err.value) and "BackOff" in str(err.value)
    assert current_promoted(registry, "t2i") is None
    assert not (tmp_path / "registry" / "t2i" / "v0001.json").exists()


def _exposition(requests: int, errors: int, bad: int, latencies: list[float]) -> str:
    """Prometheus text as the predictor exposes it (its own metric classes, a fresh registry)."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from lumos.serving.metrics import LATENCY_BUCKETS

    reg = CollectorRegistry()
    Counter("lumos_serving_requests", "", ["model", "protocol"], registry=reg).labels(
        model=ISVC, protocol="v1").inc(requests)  # fmt: skip
    errs = Counter("lumos_serving_errors", "", ["model", "reason"], registry=reg)
    errs.labels(model=ISVC, reason="internal").inc(errors)
    errs.labels(model=ISVC, reason="invalid_input").inc(1000)  # clients' faults: not counted
    Counter("lumos_serving_bad_outputs", "", ["model", "reason"], registry=reg).labels(
        model=ISVC, reason="blank").inc(bad)  # fmt: skip
    Gauge("lumos_serving_process", "", ["process_id"], registry=reg).labels(
        process_id="p1").set(1)  # fmt: skip
    hist = Histogram("lumos_serving_request_latency_seconds", "", ["model"],
                     buckets=LATENCY_BUCKETS, registry=reg)  # fmt: skip
    for value in latencies:
        hist.labels(model=ISVC).observe(value)
    return generate_latest(reg).decode()


def test_canary_judged_on_the_soak_window_only() -> None:
    from lumos.serving.rollout import canary_evidence, judge, process_id

    before = _exposition(100, 50, 0, [0.02] * 100)  # an old burst of errors: before the soak
    after = _exposition(200, 52, 3, [0.02] * 100 + [0.3] * 90 + [4.0] * 10)
    assert process_id(before) == process_id(after) == "p1"
    ev = canary_evidence(before, after, ISVC)
    assert (ev.requests, ev.model_errors, ev.bad_outputs) == (100, 2, 3)
    assert 2.5 < ev.p95_latency_s <= 5.0  # inside the bucket of the slowest 10 requests
    rc = RolloutConfig(min_requests=50, max_error_rate=0.05, max_bad_output_rate=0.05,
                       max_p95_latency_s=10)  # fmt: skip
    assert judge(rc, ev) == []
    strict = rc.model_copy(update={"max_error_rate": 0.01, "max_p95_latency_s": 1.0})
    reasons = judge(strict, ev)
    assert len(reasons) == 2 and "error rate 0.020" in reasons[0] and "p95" in reasons[1]
    assert "not enough evidence" in judge(rc.model_copy(update={"min_requests": 500}), ev)[0]


def test_canary_scrapes_that_reach_different_pods_are_no_evidence(
    tmp_path: Path, crds_dir: Path
) -> None:
    """Two pods behind the canary's route: the counters of one cannot be subtracted from the
    other's, so a canary whose scrapes never come from one process twice is rolled back."""
    from test_promote import make_export

    standin = KServeStandIn(crds_dir, lambda uri: ("ready", "http://canary.example"))
    pods = iter(range(1000))

    def scrape(url: str) -> str:  # each scrape reaches another pod
        return _exposition(10, 0, 0, [0.1] * 10).replace('"p1"', f'"p{next(pods)}"')

    clock = [0.0]
    cluster = Cluster(api=standin, events=standin, scrape=scrape,
                      sleep=lambda s: clock.__setitem__(0, clock[0] + s), clock=lambda: clock[0])  # fmt: skip
    registry = str(tmp_path / "registry")
    cfg = PromoteConfig(registry_uri=registry, storage_uri_base=str(tmp_path / "models"),
                        rollout=RolloutConfig(apply=True, soak_s=5, poll_s=1))  # fmt: skip
    export = str(make_export(tmp_path / "export"))
    assert promote(cfg, export, eval_result(None), str(tmp_path / "a"), cluster=cluster).promoted
    second = promote(cfg, export, eval_result("v0001"), str(tmp_path / "b"), cluster=cluster)
    assert not second.promoted and "never reached the pod of the first scrape" in second.reasons[0]
    assert current_promoted(registry, "t2i")["version"] == "v0001"
