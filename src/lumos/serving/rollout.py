"""Rolling a promoted model out through KServe: apply, wait for Ready, canary, decide, record.

    outcome = roll_out(cfg.promote, isvc)                  # called by promote() when rollout.apply
    rollback(cfg.promote, "t2i")                            # `lumos rollback --head t2i`

The InferenceService is applied with server-side apply under one field manager (FIELD_MANAGER),
so fields this code stops setting (a canary percent) are removed and fields other managers own
(KServe's defaults, an operator's annotations) are kept. KServe (serverless mode) turns every
change of the predictor into a new Knative revision and splits traffic by
`spec.predictor.canaryTrafficPercent` between the latest ready revision and the last one rolled
out at 100% (`status.components.predictor.latestRolledoutRevision`).

- No model served yet: the InferenceService is applied without a canary and must become Ready
  (its latest created revision ready) within `ready_timeout_s`.
- A model is served (the champion): the challenger is applied with `canary_traffic_percent`; once
  its revision is ready and takes that share, the predictor's own metrics (lumos.serving.metrics,
  scraped from the canary's tagged route before and after `soak_s`) decide: enough requests, an
  error rate, a p95 latency and a bad-output rate within their limits promote it to 100% (the
  canary percent dropped); anything else rolls it back (`canaryTrafficPercent: 0`, KServe's
  rollback: all traffic to the champion's revision). A challenger whose revision does not become
  ready in time is rolled back the same way, with the conditions' reasons and its pods' events.

The registry's current record changes only after the new model serves 100% of the traffic
(promote.py writes it); both outcomes are recorded in the version's record with their evidence.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, Field

from lumos.configs.serving import RolloutConfig
from lumos.errors import LumosError

if TYPE_CHECKING:
    from lumos.configs.serving import PromoteConfig

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
FIELD_MANAGER = "lumos.dev/promote"
# KServe adds a "latest" tag (its own URL) to the canary's traffic target with this annotation.
TAG_ROUTING_ANNOTATION = "serving.kserve.io/enable-tag-routing"
POD_LABEL = "serving.kserve.io/inferenceservice"
SAME_POD_ATTEMPTS = 20


class RolloutFailed(LumosError):
    """The InferenceService did not become ready, or could not be applied; the message says why."""


class InferenceServiceAPI(Protocol):
    """Reading and server-side applying InferenceServices (`KubernetesInferenceServices`)."""

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw): ...
    def apply_namespaced_custom_object(
        self, group, version, namespace, plural, name, body, *, field_manager: str, force: bool
    ): ...


class EventsAPI(Protocol):
    """The part of `kubernetes.client.CoreV1Api` used here."""

    def list_namespaced_pod(self, namespace, **kw): ...
    def list_namespaced_event(self, namespace, **kw): ...


class KubernetesInferenceServices:
    """`InferenceServiceAPI` on the kubernetes client: reads through CustomObjectsApi, applies
    with a PATCH of type application/apply-patch+yaml (the client's own patch is a merge patch)."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        self.api_client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        return self.custom.get_namespaced_custom_object(
            group, version, namespace, plural, name, **kw
        )

    def apply_namespaced_custom_object(
        self, group, version, namespace, plural, name, body, *, field_manager: str, force: bool
    ):
        return self.api_client.call_api(
            f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}",
            "PATCH",
            query_params=[("fieldManager", field_manager), ("force", str(force).lower())],
            header_params={
                "Content-Type": "application/apply-patch+yaml",  # JSON is YAML
                "Accept": "application/json",
            },
            body=body,
            response_type="object",
            auth_settings=["BearerToken"],
            _return_http_data_only=True,
        )


def _scrape(url: str) -> str:
    with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=30) as resp:
        return resp.read().decode()


@dataclass
class Cluster:
    """What a rollout talks to; defaults: the kubernetes client (in-cluster config, else the
    kubeconfig) and HTTP scrapes of the canary's /metrics."""

    api: InferenceServiceAPI | None = None
    events: EventsAPI | None = None
    scrape: Callable[[str], str] = _scrape
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    applied: list[dict[str, Any]] = field(default_factory=list)  # what this rollout applied

    def connect(self) -> Cluster:
        if self.api is None or self.events is None:
            from kubernetes import client, config

            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            self.api = self.api or KubernetesInferenceServices()
            self.events = self.events or client.CoreV1Api()
        return self


class CanaryEvidence(BaseModel):
    """What the canary's metrics showed during the soak (deltas between two scrapes)."""

    requests: int
    model_errors: int
    bad_outputs: int
    p95_latency_s: float | None
    error_rate: float
    bad_output_rate: float


class RolloutOutcome(BaseModel):
    outcome: Literal["promoted", "rolled_back"]
    reasons: list[str] = Field(default_factory=list, description="why it was rolled back")
    inference_service: str
    revision: str | None = None  # the new model's revision
    previous_revision: str | None = None  # the champion's, when there was one
    canary_traffic_percent: int | None = None
    evidence: CanaryEvidence | None = None
    events: list[str] = Field(default_factory=list)
    finished_at: str


# ----------------------------------------------------------------------------- status reading


def _predictor(isvc: dict[str, Any] | None) -> dict[str, Any]:
    return ((isvc or {}).get("status") or {}).get("components", {}).get("predictor") or {}


def _condition(isvc: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in (isvc.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def _is_ready(isvc: dict[str, Any]) -> bool:
    cond = _condition(isvc, "Ready")
    return cond is not None and cond.get("status") == "True"


def _latest_traffic(isvc: dict[str, Any]) -> dict[str, Any] | None:
    for target in _predictor(isvc).get("traffic") or []:
        if target.get("latestRevision"):
            return target
    return None


def _not_ready_text(isvc: dict[str, Any]) -> str:
    conds = [
        f"{c.get('type')}={c.get('status')}"
        + (f" ({': '.join(x for x in (c.get('reason'), c.get('message')) if x)})"
           if c.get("reason") or c.get("message") else "")
        for c in (isvc.get("status") or {}).get("conditions") or []
        if c.get("status") != "True"
    ]  # fmt: skip
    return "; ".join(conds) or "no conditions reported yet"


def pod_events(events: EventsAPI, namespace: str, name: str, limit: int = 20) -> list[str]:
    """Warning and normal events of the InferenceService's pods, oldest first: why a revision
    does not become ready (image pull, OOM, crash loop, failed probes)."""
    out = []
    pods = events.list_namespaced_pod(namespace, label_selector=f"{POD_LABEL}={name}")
    for pod in sorted(pods.items, key=lambda p: p.metadata.name):
        found = events.list_namespaced_event(
            namespace, field_selector=f"involvedObject.name={pod.metadata.name}"
        )
        for ev in found.items:
            out.append(f"{pod.metadata.name}: {ev.type} {ev.reason}: {ev.message}")
    return out[-limit:]


# ----------------------------------------------------------------------------- metrics


def _samples(text: str, model: str) -> dict[str, Any]:
    """Counter totals and latency histogram buckets of `model` from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    from lumos.serving.metrics import MODEL_ERROR_REASONS

    totals = {"requests": 0.0, "model_errors": 0.0, "bad_outputs": 0.0}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model") != model:
                continue
            if s.name == "lumos_serving_requests_total":
                totals["requests"] += s.value
            elif s.name == "lumos_serving_errors_total":
                if s.labels.get("reason") in MODEL_ERROR_REASONS:
                    totals["model_errors"] += s.value
            elif s.name == "lumos_serving_bad_outputs_total":
                totals["bad_outputs"] += s.value
            elif s.name == "lumos_serving_request_latency_seconds_bucket":
                buckets[float(s.labels["le"])] = s.value
    return {**totals, "buckets": buckets}


def _quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q."""
    edges = sorted(buckets)
    if not edges or buckets[edges[-1]] <= 0:
        return None
    rank = q * buckets[edges[-1]]
    lower_edge, lower_count = 0.0, 0.0
    for edge in edges:
        count = buckets[edge]
        if count >= rank:
            if edge == float("inf"):
                return lower_edge  # above the largest finite bucket: its bound, as Prometheus
            if count == lower_count:
                return edge
            return lower_edge + (edge - lower_edge) * (rank - lower_count) / (count - lower_count)
        lower_edge, lower_count = edge, count
    return edges[-1]


def process_id(text: str) -> str | None:
    """The predictor process that answered a scrape (lumos_serving_process{process_id})."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "lumos_serving_process":
                return sample.labels.get("process_id")
    return None


def canary_evidence(before: str, after: str, model: str) -> CanaryEvidence:
    """The canary's metrics over the soak: the difference of two scrapes."""
    a, b = _samples(before, model), _samples(after, model)
    requests = int(b["requests"] - a["requests"])
    errors = int(b["model_errors"] - a["model_errors"])
    bad = int(b["bad_outputs"] - a["bad_outputs"])
    delta = {le: n - a["buckets"].get(le, 0.0) for le, n in b["buckets"].items()}
    return CanaryEvidence(
        requests=requests,
        model_errors=errors,
        bad_outputs=bad,
        p95_latency_s=_quantile(delta, 0.95),
        error_rate=errors / requests if requests else 0.0,
        bad_output_rate=bad / requests if requests else 0.0,
    )


def judge(cfg: RolloutConfig, ev: CanaryEvidence) -> list[str]:
    """Why the canary must be rolled back (empty: promote it)."""
    reasons = []
    if ev.requests < cfg.min_requests:
        reasons.append(
            f"the canary served {ev.requests} requests during the {cfg.soak_s:.0f} s soak, "
            f"fewer than rollout.min_requests {cfg.min_requests}: not enough evidence"
        )
        return reasons
    if ev.error_rate > cfg.max_error_rate:
        reasons.append(
            f"error rate {ev.error_rate:.3f} ({ev.model_errors} of {ev.requests}) is above "
            f"rollout.max_error_rate {cfg.max_error_rate}"
        )
    if ev.p95_latency_s is not None and ev.p95_latency_s > cfg.max_p95_latency_s:
        reasons.append(
            f"p95 latency {ev.p95_latency_s:.3f} s is above rollout.max_p95_latency_s "
            f"{cfg.max_p95_latency_s}"
        )
    if ev.bad_output_rate > cfg.max_bad_output_rate:
        reasons.append(
            f"bad-output rate {ev.bad_output_rate:.3f} ({ev.bad_outputs} of {ev.requests}) is "
            f"above rollout.max_bad_output_rate {cfg.max_bad_output_rate}"
        )
    return reasons


# ----------------------------------------------------------------------------- the rollout


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _get(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    if cluster.api is None:
        raise RuntimeError("Cluster.connect() first")
    try:
        return cluster.api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except Exception as err:
        if getattr(err, "status", None) == 404:
            return None
        raise


def _apply(cluster: Cluster, body: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply `body`; returns the object as the API server stored it."""
    if cluster.api is None:
        raise RuntimeError("Cluster.connect() first")
    meta = body["metadata"]
    stored = cluster.api.apply_namespaced_custom_object(
        GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body,
        field_manager=FIELD_MANAGER, force=True,
    )  # fmt: skip
    cluster.applied.append(copy.deepcopy(body))
    return stored if isinstance(stored, dict) else {}


def _generation(isvc: dict[str, Any] | None) -> int | None:
    return ((isvc or {}).get("metadata") or {}).get("generation")


def _expected_new_revision(existing: dict[str, Any] | None, stored: dict[str, Any]) -> str | None:
    """The revision the wait must see replaced: the latest created one, if the apply changed the
    spec (a new generation, so KServe makes a new revision); None if it did not (re-applying the
    same model, a retried promotion): then the current revision is the one to wait for."""
    if existing is None or _generation(stored) != _generation(existing):
        return _predictor(existing).get("latestCreatedRevision")
    return None


def _with_canary(isvc: dict[str, Any], percent: int | None) -> dict[str, Any]:
    body = copy.deepcopy(isvc)
    body["metadata"].setdefault("annotations", {})[TAG_ROUTING_ANNOTATION] = "true"
    if percent is None:
        body["spec"]["predictor"].pop("canaryTrafficPercent", None)
    else:
        body["spec"]["predictor"]["canaryTrafficPercent"] = percent
    return body


def _wait(
    cluster: Cluster,
    cfg: RolloutConfig,
    namespace: str,
    name: str,
    done: Callable[[dict[str, Any]], bool],
    what: str,
) -> tuple[dict[str, Any] | None, str | None]:
    """Poll until `done(isvc)`; returns (isvc, None), or (last isvc, why not) on timeout."""
    start = cluster.clock()
    isvc = None
    while True:
        isvc = _get(cluster, namespace, name)
        if isvc is not None and done(isvc):
            return isvc, None
        if cluster.clock() - start >= cfg.ready_timeout_s:
            state = _not_ready_text(isvc) if isvc else "the InferenceService does not exist"
            return isvc, f"{what} not reached after {cfg.ready_timeout_s:.0f} s: {state}"
        cluster.sleep(cfg.poll_s)


def _new_revision_serving(before: str | None, percent: int) -> Callable[[dict[str, Any]], bool]:
    """Ready, with a revision newer than `before` ready and taking `percent` of the traffic."""

    def done(isvc: dict[str, Any]) -> bool:
        pred = _predictor(isvc)
        latest = pred.get("latestCreatedRevision")
        target = _latest_traffic(isvc)
        return (
            _is_ready(isvc)
            and latest is not None
            and latest != before
            and pred.get("latestReadyRevision") == latest
            and target is not None
            and target.get("revisionName") == latest
            and target.get("percent") == percent
        )

    return done


def roll_out(
    cfg: PromoteConfig, isvc: dict[str, Any], cluster: Cluster | None = None
) -> RolloutOutcome:
    """Apply `isvc` (the challenger) and see it through to 100% or back (module docstring).

    Raises RolloutFailed when there is no champion and the first model does not become ready.
    """
    rc = cfg.rollout
    cluster = (cluster or Cluster()).connect()
    meta = isvc["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    existing = _get(cluster, namespace, name)
    champion = _predictor(existing).get("latestRolledoutRevision")

    if champion is None:  # nothing served yet: straight to 100%
        before = _expected_new_revision(existing, _apply(cluster, _with_canary(isvc, None)))
        ready, why = _wait(
            cluster, rc, namespace, name, _new_revision_serving(before, 100), "Ready"
        )
        if why:
            events = pod_events(cluster.events, namespace, name) if cluster.events else []
            raise RolloutFailed(
                f"InferenceService {namespace}/{name}: {why}. Pod events:\n"
                + ("\n".join(events) or "none")
            )
        return RolloutOutcome(
            outcome="promoted",
            inference_service=f"{namespace}/{name}",
            revision=_predictor(ready).get("latestReadyRevision"),
            finished_at=_now(),
        )

    percent = rc.canary_traffic_percent
    before = _expected_new_revision(existing, _apply(cluster, _with_canary(isvc, percent)))
    canary, why = _wait(
        cluster, rc, namespace, name, _new_revision_serving(before, percent), "canary Ready"
    )
    outcome: dict[str, Any] = {
        "inference_service": f"{namespace}/{name}",
        "previous_revision": champion,
        "canary_traffic_percent": percent,
    }
    if why:
        events = pod_events(cluster.events, namespace, name) if cluster.events else []
        _roll_back(cluster, rc, isvc, champion)
        return RolloutOutcome(
            outcome="rolled_back",
            reasons=[why],
            revision=_predictor(canary).get("latestCreatedRevision"),
            events=events,
            finished_at=_now(),
            **outcome,
        )
    if canary is None:
        raise RuntimeError("a finished wait returns the InferenceService it saw")
    revision = _predictor(canary)["latestReadyRevision"]
    url = _canary_url(canary)
    model = name  # the ServingRuntime passes --model_name={{.Name}}
    first = cluster.scrape(url)
    end = cluster.clock() + rc.soak_s
    while (left := end - cluster.clock()) > 0:
        cluster.sleep(min(left, rc.poll_s))
    # The route spreads requests over the canary's pods: scrape until the same process answers.
    for _ in range(SAME_POD_ATTEMPTS):
        last = cluster.scrape(url)
        if process_id(last) == process_id(first):
            break
    if process_id(last) != process_id(first):
        _roll_back(cluster, rc, isvc, champion)
        return RolloutOutcome(
            outcome="rolled_back", revision=revision, finished_at=_now(),
            reasons=[f"{SAME_POD_ATTEMPTS} scrapes of the canary's /metrics after the soak never "
                     "reached the pod of the first scrape (it restarted, or the canary has "
                     "several pods): no evidence to judge it on"],
            **outcome,
        )  # fmt: skip
    evidence = canary_evidence(first, last, model)
    reasons = judge(rc, evidence)
    if reasons:
        _roll_back(cluster, rc, isvc, champion)
        return RolloutOutcome(
            outcome="rolled_back", reasons=reasons, revision=revision, evidence=evidence,
            finished_at=_now(), **outcome,
        )  # fmt: skip
    _apply(cluster, _with_canary(isvc, None))
    _, why = _wait(cluster, rc, namespace, name, _serves_all(revision), "100% of the traffic")
    if why:
        raise RolloutFailed(f"InferenceService {namespace}/{name}: the canary passed but {why}")
    return RolloutOutcome(
        outcome="promoted", revision=revision, evidence=evidence, finished_at=_now(), **outcome
    )


def _canary_url(isvc: dict[str, Any]) -> str:
    target = _latest_traffic(isvc) or {}
    url = target.get("url") or _predictor(isvc).get("url")
    if not url:
        raise RolloutFailed(
            f"InferenceService {isvc['metadata']['name']} reports no URL for its canary (traffic "
            f"tag 'latest'): is {TAG_ROUTING_ANNOTATION} honoured (KServe serverless mode)?"
        )
    return str(url)


def _serves_all(revision: str) -> Callable[[dict[str, Any]], bool]:
    def done(isvc: dict[str, Any]) -> bool:
        target = _latest_traffic(isvc)
        return (
            _is_ready(isvc)
            and _predictor(isvc).get("latestRolledoutRevision") == revision
            and target is not None
            and target.get("percent") == 100
        )

    return done


def _roll_back(cluster: Cluster, rc: RolloutConfig, isvc: dict[str, Any], champion: str) -> None:
    """KServe's rollback: canaryTrafficPercent 0 sends all traffic to the champion's revision."""
    meta = isvc["metadata"]
    _apply(cluster, _with_canary(isvc, 0))

    def champion_serves(current: dict[str, Any]) -> bool:
        return any(
            t.get("revisionName") == champion and t.get("percent") == 100
            for t in _predictor(current).get("traffic") or []
        )

    _, why = _wait(cluster, rc, meta["namespace"], meta["name"], champion_serves, "rollback")
    if why:
        raise RolloutFailed(f"InferenceService {meta['namespace']}/{meta['name']}: {why}")
    log.warning("rolled %s/%s back to revision %s", meta["namespace"], meta["name"], champion)


class RollbackResult(BaseModel):
    head: str
    version: str  # the version serving again
    rolled_back_from: str
    inference_service: str
    revision: str | None
    record_uri: str


def rollback(cfg: PromoteConfig, head: str, cluster: Cluster | None = None) -> RollbackResult:
    """Serve the head's previous version again: its InferenceService is applied (a new revision of
    the previous model, at 100% once ready), then current.json names it again. The rolled-back
    version's record gets a `rolled_back` entry; the restored record keeps its own
    previous_version, so a second rollback steps further back."""
    from lumos.serving.promote import CURRENT_KEY, render_inference_service
    from lumos.storage import Storage

    registry = Storage.from_uri(cfg.registry_uri)
    current_key = f"{head}/{CURRENT_KEY}"
    if not registry.exists(current_key):
        raise RolloutFailed(f"no model of head {head!r} is promoted in {cfg.registry_uri}")
    current, seen = registry.read_json_versioned(current_key)
    previous = current.get("previous_version")
    if not previous:
        raise RolloutFailed(
            f"{current.get('version')} is the first promoted model of head {head!r} in "
            f"{cfg.registry_uri}: there is no earlier version to roll back to"
        )
    record_key = f"{head}/{previous}.json"
    record = registry.read_json(record_key)
    record_uri = registry.key_uri(record_key)
    isvc = render_inference_service(cfg, head, record["model_uri"], previous, record_uri)
    cluster = (cluster or Cluster()).connect()
    meta = isvc["metadata"]
    existing = _get(cluster, meta["namespace"], meta["name"])
    before = _expected_new_revision(existing, _apply(cluster, _with_canary(isvc, None)))
    ready, why = _wait(
        cluster, cfg.rollout, meta["namespace"], meta["name"],
        _new_revision_serving(before, 100), "Ready",
    )  # fmt: skip
    if why:
        raise RolloutFailed(
            f"rollback of head {head!r} to {previous}: InferenceService "
            f"{meta['namespace']}/{meta['name']}: {why}"
        )
    now = _now()
    from_version = str(current.get("version"))
    rolled = registry.read_json(f"{head}/{from_version}.json")
    rolled["rolled_back"] = {"at": now, "to_version": previous}
    registry.write_json(f"{head}/{from_version}.json", rolled)
    restored = {**record, "record_uri": record_uri, "restored_at": now,
                "rolled_back_from": from_version}  # fmt: skip
    registry.write_json(current_key, restored, if_version=seen)
    return RollbackResult(
        head=head,
        version=previous,
        rolled_back_from=from_version,
        inference_service=f"{meta['namespace']}/{meta['name']}",
        revision=_predictor(ready).get("latestReadyRevision"),
        record_uri=record_uri,
    )
