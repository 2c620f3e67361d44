"""A stand-in for the Kubernetes API server with KServe's controller in serverless mode, for
InferenceServices: no cluster can run here, so this does what the upstream source does.

Followed (kserve/kserve, read 2026-12-02):
- pkg/controller/v1beta1/inferenceservice/reconcilers/knative/ksvc_reconciler.go,
  `createKnativeService`: the Knative traffic targets. With `canaryTrafficPercent` set and a
  revision rolled out before (status latestRolledoutRevision): the latest ready revision gets the
  canary percent (tag "latest" when the serving.kserve.io/enable-tag-routing annotation is
  "true") and the last rolled-out revision the rest (tag "prev"); otherwise the latest revision
  takes 100%.
- pkg/apis/serving/v1beta1/inference_service_status.go, `PropagateStatus`: latestCreatedRevision,
  latestReadyRevision, traffic copied from the Knative service; latestRolledoutRevision moves to
  the latest ready revision (and previousRolledoutRevision to the one before) when that revision
  takes 100%; PredictorReady from the Knative Ready condition; the InferenceService's Ready is
  the conjunction of PredictorReady and IngressReady (`conditionSet`).
Knative itself (what KServe reads back): every change of the revision template (the predictor
spec, canaryTrafficPercent aside) creates a revision `<isvc>-predictor-0000N`; `latestRevision`
targets resolve to the latest *ready* revision; the service is Ready when its latest created
revision is ready and its routes are.

Server-side apply: a field manager is required; fields the manager set before and leaves out now
are removed, fields of other managers stay (maps merge, lists are atomic). Applied bodies are
validated against the InferenceService CRD, as the API server does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lumos.k8s.crd_validation import validate_resource

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"


class ApiError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"({status}) {reason}")
        self.status = status


@dataclass
class Revision:
    name: str
    config: dict[str, Any]
    behaviour: str  # "ready" or "crash"
    url: str | None
    ticks_left: int
    ready: bool = False
    failed: bool = False


@dataclass
class Served:
    obj: dict[str, Any]
    owned: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)  # manager -> leaf paths
    revisions: list[Revision] = field(default_factory=list)


def _leaves(obj: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if isinstance(obj, dict) and obj:
        out: set[tuple[str, ...]] = set()
        for k, v in obj.items():
            out |= _leaves(v, (*prefix, k))
        return out
    return {prefix}


def _remove(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        obj = obj.get(key)  # type: ignore[assignment]
        if not isinstance(obj, dict):
            return
    obj.pop(path[-1], None)


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict) and v:
            _merge(into[k], v)
        else:
            into[k] = copy.deepcopy(v)


class KServeStandIn:
    """`InferenceServiceAPI` + `EventsAPI` (lumos.serving.rollout) over an in-memory cluster.

    `serve(storage_uri)` says what a revision serving that model does: ("ready", url) - its pods
    become ready after `ticks_to_ready` reads and its route is `url` - or ("crash", None): its
    container exits on start and restarts in a back-off loop. `on_get` runs before each read
    (tests record the registry's state there).
    """

    def __init__(
        self,
        crds_dir: Path,
        serve: Callable[[str], tuple[str, str | None]],
        ticks_to_ready: int = 2,
    ) -> None:
        self.crds_dir = crds_dir
        self.serve = serve
        self.ticks_to_ready = ticks_to_ready
        self.objects: dict[tuple[str, str], Served] = {}
        self.applies: list[tuple[str, bool, dict[str, Any]]] = []  # (manager, force, body)
        self.on_get: Callable[[dict[str, Any]], None] | None = None

    # ------------------------------------------------------------------ API server

    def _check_where(self, group: str, version: str, plural: str) -> None:
        if (group, version, plural) != (GROUP, VERSION, PLURAL):
            raise ApiError(
                404, f"the server could not find the resource {group}/{version}/{plural}"
            )

    def apply_namespaced_custom_object(
        self, group, version, namespace, plural, name, body, *, field_manager: str, force: bool
    ) -> dict[str, Any]:
        self._check_where(group, version, plural)
        if not field_manager:
            raise ApiError(400, "fieldManager is required for apply requests")
        meta = body.get("metadata") or {}
        if (meta.get("name"), meta.get("namespace")) != (name, namespace):
            raise ApiError(400, "the name/namespace of the body does not match the request")
        validate_resource(body, self.crds_dir)  # the CRD's schema, as admission does
        self.applies.append((field_manager, force, copy.deepcopy(body)))
        key = (namespace, name)
        applied = {k: v for k, v in copy.deepcopy(body).items() if k in ("metadata", "spec")}
        if key not in self.objects:
            obj = {"apiVersion": body["apiVersion"], "kind": body["kind"], **copy.deepcopy(applied)}
            obj["metadata"]["generation"] = 1  # the API server's, owned by no manager
            self.objects[key] = Served(obj, {field_manager: _leaves(applied)})
        else:
            served = self.objects[key]
            old_spec = copy.deepcopy(served.obj["spec"])
            for path in served.owned.get(field_manager, set()) - _leaves(applied):
                _remove(served.obj, path)
            _merge(served.obj, applied)
            served.owned[field_manager] = _leaves(applied)
            if served.obj["spec"] != old_spec:
                served.obj["metadata"]["generation"] += 1
        self._reconcile(self.objects[key])
        return copy.deepcopy(self.objects[key].obj)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self._check_where(group, version, plural)
        if (namespace, name) not in self.objects:
            raise ApiError(404, f'inferenceservices.serving.kserve.io "{name}" not found')
        served = self.objects[(namespace, name)]
        for rev in served.revisions:  # time passes: pods start (or crash again)
            if not rev.ready and not rev.failed:
                rev.ticks_left -= 1
                if rev.ticks_left <= 0:
                    rev.ready, rev.failed = rev.behaviour == "ready", rev.behaviour == "crash"
        self._reconcile(served)
        obj = copy.deepcopy(served.obj)
        if self.on_get:
            self.on_get(obj)
        return obj

    def list_namespaced_pod(self, namespace, label_selector: str = "", **kw):
        key, _, name = label_selector.partition("=")
        served = self.objects.get((namespace, name))
        pods = []
        if key == "serving.kserve.io/inferenceservice" and served:
            pods = [SimpleNamespace(metadata=SimpleNamespace(name=f"{r.name}-deployment-7d9f-x2x"))
                    for r in served.revisions if not r.ready]  # fmt: skip
        return SimpleNamespace(items=pods)

    def list_namespaced_event(self, namespace, field_selector: str = "", **kw):
        pod = field_selector.removeprefix("involvedObject.name=")
        served = [r for s in self.objects.values() for r in s.revisions if pod.startswith(r.name)]
        events = []
        if served and served[0].failed:
            events = [
                SimpleNamespace(type="Normal", reason="Started", message="Started container kserve-container"),
                SimpleNamespace(type="Warning", reason="BackOff",
                                message="Back-off restarting failed container kserve-container"),
            ]  # fmt: skip
        return SimpleNamespace(items=events)

    # ------------------------------------------------------------------ KServe + Knative

    def _reconcile(self, served: Served) -> None:
        obj = served.obj
        name, namespace = obj["metadata"]["name"], obj["metadata"]["namespace"]
        predictor = obj["spec"]["predictor"]
        template = {k: v for k, v in predictor.items() if k != "canaryTrafficPercent"}
        template = copy.deepcopy({"predictor": template, "labels": obj["metadata"].get("labels")})
        if not served.revisions or served.revisions[-1].config != template:
            behaviour, url = self.serve(predictor["model"]["storageUri"])
            served.revisions.append(Revision(
                name=f"{name}-predictor-{len(served.revisions) + 1:05d}", config=template,
                behaviour=behaviour, url=url, ticks_left=self.ticks_to_ready,
            ))  # fmt: skip
        status = obj.setdefault("status", {})
        component = status.setdefault("components", {}).setdefault("predictor", {})
        annotations = obj["metadata"].get("annotations") or {}

        # createKnativeService: the route's traffic targets from the component's status.
        canary = predictor.get("canaryTrafficPercent")
        last_rolled_out = component.get("latestRolledoutRevision")
        tag = "latest" if annotations.get(TAG_ROUTING) == "true" else None
        if canary is not None and last_rolled_out:
            targets = [{"latestRevision": True, "percent": canary, "tag": tag}]
            if canary < 100:
                targets.append({"revisionName": last_rolled_out, "latestRevision": False,
                                "percent": 100 - canary, "tag": "prev"})  # fmt: skip
        else:
            targets = [{"latestRevision": True, "percent": 100, "tag": tag}]

        # Knative: latestRevision resolves to the latest ready revision.
        created = served.revisions[-1]
        ready = [r for r in served.revisions if r.ready]
        latest_ready = ready[-1] if ready else None
        by_name = {r.name: r for r in served.revisions}
        ks_traffic = []
        for t in targets:
            rev = latest_ready if t["latestRevision"] else by_name.get(t["revisionName"])
            if rev is None:
                continue
            entry = {"revisionName": rev.name, "latestRevision": t["latestRevision"],
                     "percent": t["percent"]}  # fmt: skip
            if t["tag"]:
                entry["tag"] = t["tag"]
                entry["url"] = rev.url
            ks_traffic.append(entry)
        if created.ready:
            config_ready = {"type": "ConfigurationsReady", "status": "True"}
        elif created.failed:
            config_ready = {"type": "ConfigurationsReady", "status": "False",
                            "reason": "RevisionFailed",
                            "message": f'Revision "{created.name}" failed with message: '
                                       "Container failed with: exit status 1."}  # fmt: skip
        else:
            config_ready = {"type": "ConfigurationsReady", "status": "Unknown",
                            "reason": "RevisionMissing",
                            "message": f'Configuration "{name}-predictor" is waiting for a '
                                       "Revision to become ready."}  # fmt: skip
        routes_ready = latest_ready is not None
        ksvc_ready = config_ready["status"] == "True" and routes_ready

        # PropagateStatus.
        component["latestCreatedRevision"] = created.name
        per_revision: dict[str, int] = {}
        for t in ks_traffic:
            per_revision[t["revisionName"]] = per_revision.get(t["revisionName"], 0) + t["percent"]
        for t in ks_traffic:
            if (latest_ready is not None and t["revisionName"] == latest_ready.name
                    and t["latestRevision"]):  # fmt: skip
                if component.get("latestRolledoutRevision") != latest_ready.name:
                    if t["percent"] == 100:
                        component["previousRolledoutRevision"] = component.get(
                            "latestRolledoutRevision", ""
                        )
                        component["latestRolledoutRevision"] = latest_ready.name
                elif (latest_ready is created and t["percent"] < 100
                      and per_revision[t["revisionName"]] == 100
                      and component.get("previousRolledoutRevision")):  # fmt: skip
                    # the same revision split over two targets: rolled back
                    component["latestRolledoutRevision"] = component["previousRolledoutRevision"]
        if latest_ready is not None:
            component["latestReadyRevision"] = latest_ready.name
            component["url"] = f"http://{name}-predictor.{namespace}.example.com"
        component["traffic"] = ks_traffic
        if not component.get("previousRolledoutRevision"):
            component.pop("previousRolledoutRevision", None)
        predictor_ready = (
            {"type": "PredictorReady", "status": "True"}
            if ksvc_ready
            else {**config_ready, "type": "PredictorReady"}
        )
        ingress_ready = {"type": "IngressReady", "status": "True" if routes_ready else "Unknown"}
        overall = (
            {"type": "Ready", "status": "True"}
            if predictor_ready["status"] == "True" and ingress_ready["status"] == "True"
            else {**predictor_ready, "type": "Ready"}
        )
        status["conditions"] = [ingress_ready, predictor_ready, overall]
        status["observedGeneration"] = obj["metadata"]["generation"]
        if routes_ready:
            status["url"] = f"http://{name}.{namespace}.example.com"
