"""Promotion: a model that passed its evaluation gate becomes the served model of its head.

    result = promote(PromoteConfig(), "s3://lumos/runs/r1/export/t2i", eval_result, "s3://lumos/runs/r1/promote/t2i")
    current_promoted("s3://lumos/registry", "t2i")      # -> the promoted record, or None

For a model whose `eval_result.passed` is true this writes
- the registry record `<registry_uri>/<head>/<version>.json` (versions v0001, v0002, ... per head)
  with the model URI, the metrics, the lineage (checkpoint, dataset, export, evaluation report)
  and a timestamp, then `<head>/current.json`: the same record, naming the promoted version.
  current.json is written last, so a reader never sees a pointer to a missing record;
- the KServe `InferenceService` (serving.kserve.io/v1beta1) serving that model through the
  `lumos-onnx` ServingRuntime, validated against the CRD, to `<out_uri>/inferenceservice.yaml`.
  `kubectl apply -f` it to roll the new model out, or set `promote.rollout.apply`: then promotion
  applies it itself (lumos.serving.rollout: server-side apply, Ready, canary, the canary's own
  metrics decide) and current.json changes only once the new model serves all the traffic; a
  canary rolled back is recorded in its version's record and leaves current.json as it was.
For a model that did not pass nothing is registered: `promote.json` in `out_uri` says why.
The gate's regression check compared the model with the one current when it was evaluated
(`eval_result.baseline`, `baseline_version`): if another model has been promoted since, promotion
fails with a `PromotionError` asking to evaluate again against it, so a weaker model evaluated
earlier never replaces a stronger one promoted meanwhile.

With `storage_uri_base` set, the export is first copied to `<storage_uri_base>/<head>/<version>/`
so the served model is immutable and outlives the pipeline run that produced it.
Two promotions of the same head at the same moment are safe: the version's record is created
only if no record has that version yet, and current.json is replaced only if it has not changed
since this promotion read it (S3 conditional writes; a file lock on a local registry). The one
that loses a race fails with a `PromotionError` that says what the other one did.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import yaml
from pydantic import BaseModel, ConfigDict, Field

from lumos.configs.serving import PromoteConfig
from lumos.errors import LumosError
from lumos.k8s.crd_validation import validate_custom_resource
from lumos.k8s.resources import quantity_value
from lumos.storage import ObjectNotFound, PreconditionFailed, Storage, StorageError

if TYPE_CHECKING:
    from lumos.serving.rollout import Cluster

EXPORT_JSON = "export.json"  # written by lumos.export.onnx_export
RECORD_FORMAT = "lumos-registry-record/1"
CURRENT_KEY = "current.json"
ISVC_FILE = "inferenceservice.yaml"
RESULT_FILE = "promote.json"
HEADS = ("i2i", "t2i", "novel_view", "video")
_VERSION = re.compile(r"^v(\d{4,})\.json$")
# storageUri schemes KServe's storage initializer can fetch from
REMOTE_SCHEMES = ("s3://", "gs://", "pvc://", "https://", "http://", "hf://", "oci://")


@runtime_checkable
class EvalResultLike(Protocol):
    """What promotion needs of `lumos.evaluation.evaluate.EvalResult`."""

    head: str
    passed: bool
    metrics: dict[str, float]
    reasons: list[str]


class PromoteResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head: str
    promoted: bool
    reasons: list[str]  # why not promoted (empty when promoted)
    version: str | None = None
    model_uri: str | None = None  # the storageUri the InferenceService serves
    record_uri: str | None = None
    inference_service_name: str | None = None
    inference_service_uri: str | None = None  # the manifest file
    previous_version: str | None = None
    warnings: list[str] = Field(default_factory=list)


class PromotionError(LumosError, RuntimeError):
    """Promotion cannot proceed: the inputs disagree or are missing; the message says which."""


def _eval_dict(eval_result: Mapping[str, Any] | EvalResultLike | BaseModel) -> dict[str, Any]:
    if isinstance(eval_result, BaseModel):
        data = eval_result.model_dump(mode="json")
    elif isinstance(eval_result, Mapping):
        data = dict(eval_result)
    else:
        names = (
            "head",
            "passed",
            "metrics",
            "reasons",
            "checkpoint_uri",
            "checkpoint_step",
            "dataset_uri",
            "report_uri",
            "gates",
            "baseline",
            "baseline_version",
        )
        data = {n: getattr(eval_result, n) for n in names if hasattr(eval_result, n)}
    missing = [k for k in ("head", "passed", "metrics") if k not in data]
    if missing:
        raise PromotionError(
            f"eval_result lacks {', '.join(missing)}: pass lumos.evaluation.evaluate.EvalResult "
            "or a dict with head, passed, metrics and reasons"
        )
    if data["head"] not in HEADS:
        raise PromotionError(f"eval_result.head {data['head']!r} is not one of {', '.join(HEADS)}")
    if not isinstance(data["passed"], bool):
        raise PromotionError(f"eval_result.passed must be a bool, got {data['passed']!r}")
    data.setdefault("reasons", [])
    return data


def current_promoted(registry_uri: str, head: str) -> dict[str, Any] | None:
    """The record of the model currently promoted for `head`, or None if there is none yet."""
    registry = Storage.from_uri(registry_uri)
    key = f"{head}/{CURRENT_KEY}"
    return registry.read_json(key) if registry.exists(key) else None


def promoted_baseline(registry_uri: str, head: str) -> dict[str, Any]:
    """`evaluate`'s baseline arguments: the current model's metrics and registry version (None
    for both when nothing is promoted yet)."""
    promoted = current_promoted(registry_uri, head)
    return {
        "baseline": promoted.get("metrics") if promoted else None,
        "baseline_version": promoted.get("version") if promoted else None,
    }


def _check_baseline_is_current(
    ev: Mapping[str, Any], current: Mapping[str, Any] | None, registry_uri: str
) -> None:
    """Refuse a model whose regression check was against a model that is no longer current.

    The gate compared the candidate with the model current when it was evaluated. Two runs
    evaluated against the same model (or against none) can both pass; without this check the
    one promoted last replaces the other, even when it is the weaker.
    """
    head = ev["head"]
    baseline, baseline_version = ev.get("baseline"), ev.get("baseline_version")
    if baseline_version is not None:
        evaluated_against = f"version {baseline_version}"
        same = current is not None and current.get("version") == baseline_version
    elif baseline is not None:  # an evaluation that recorded the metrics but not the version
        evaluated_against = f"a promoted model with metrics {baseline}"
        same = current is not None and current.get("metrics") == baseline
    else:
        evaluated_against = "no promoted model"
        same = current is None
    if same:
        return
    if current is None:
        now = f"no model of head {head!r} is promoted in {registry_uri}"
    else:
        now = (
            f"another model was promoted since this evaluation: {current.get('version')} is "
            f"current in {registry_uri} (metrics {current.get('metrics')})"
        )
    raise PromotionError(
        f"the evaluation of this {head} model compared it with {evaluated_against}, but {now}: "
        "its regression check does not hold against the current model. Evaluate it again "
        "against the current model (`lumos evaluate --compare-promoted`, or a new pipeline "
        "run), then promote"
    )


def _resumable(
    registry: Storage, head: str, export_uri: str, ev: Mapping[str, Any]
) -> tuple[str, str, dict[str, Any]] | None:
    """(version, version token, record) of the head's newest record when it promotes
    `export_uri` on the same evaluation (the same baseline version and report): a run of this
    promotion got that far before it was killed. The same export judged again, against another
    baseline, is a new promotion."""
    latest = _next_version(registry, head)
    newest = f"v{int(latest[1:]) - 1:04d}"
    try:
        record, token = registry.read_json_versioned(f"{head}/{newest}.json")
    except ObjectNotFound:
        return None
    if (record.get("lineage") or {}).get("export_uri") != export_uri:
        return None
    evaluation = record.get("evaluation") or {}
    if any(evaluation.get(k) != ev.get(k) for k in ("baseline_version", "report_uri")):
        return None
    # A promotion that ended (its canary rolled back, or `lumos rollback` moved off it) is done:
    # promoting the same export again is a new attempt, not the rest of that one.
    if (record.get("rollout") or {}).get("outcome") == "rolled_back" or "rolled_back" in record:
        return None
    return newest, token, record


def _next_version(registry: Storage, head: str) -> str:
    numbers = [
        int(m.group(1))
        for obj in registry.list(f"{head}/")
        if (m := _VERSION.match(obj.key.removeprefix(f"{head}/")))
    ]
    return f"v{max(numbers, default=0) + 1:04d}"


def _read_export(export: Storage, head: str) -> dict[str, Any]:
    if not export.exists(EXPORT_JSON):
        raise PromotionError(
            f"{export.key_uri(EXPORT_JSON)} not found: promote an export directory written by "
            "`lumos export`"
        )
    meta = export.read_json(EXPORT_JSON)
    if meta.get("head") != head:
        raise PromotionError(
            f"the export at {export.uri} is of head {meta.get('head')!r} but the evaluation is of "
            f"head {head!r}: promote the export of the evaluated checkpoint"
        )
    onnx_files = [o.key for o in export.list() if o.key.endswith(".onnx")]
    if not onnx_files:
        raise PromotionError(f"the export at {export.uri} holds no .onnx file")
    return meta


# The serving process itself: its imports (CPU torch, onnxruntime, transformers, diffusers, kserve)
# took 0.47 GiB on the development VM; the rest is for request buffers and allocator slack.
SERVING_RUNTIME_BYTES = 3 << 29  # 1.5 GiB


def serving_memory(export: Storage, meta: dict[str, Any]) -> dict[str, int]:
    """Bytes a serving pod holds for this export, by part: the frozen encoders its head loads (in
    the dtype the export recorded, counted from their configs alone), the ONNX graphs and the
    server process."""
    from lumos.encoders.sizes import parameter_bytes
    from lumos.export.onnx_export import encoders_config
    from lumos.serving.onnx_pipeline import served_encoders

    if "encoders" not in meta or "graphs" not in meta:
        raise PromotionError(
            f"{export.key_uri(EXPORT_JSON)} records no encoders or graphs: promote an export "
            "directory written by `lumos export`"
        )
    encoders = encoders_config(meta["encoders"])
    need: dict[str, int] = {}
    for part in served_encoders(meta):
        try:
            need[part] = parameter_bytes(encoders, part)
        except (FileNotFoundError, StorageError) as err:
            raise PromotionError(
                f"cannot read the {part}'s config, which the served model loads: {err}. The "
                "serving pod reads the encoders from the same place: put them there first"
            ) from err
    sizes = {o.key: o.size for o in export.list()}
    graph_files = [f for graph in meta["graphs"].values() for f in graph["files"]]
    need["onnx graphs"] = sum(sizes.get(f, 0) for f in graph_files)
    need["server"] = SERVING_RUNTIME_BYTES
    return need


def _check_serving_memory(cfg: PromoteConfig, export: Storage, meta: dict[str, Any]) -> None:
    """Refuse to render an InferenceService whose memory limit cannot hold the model: its pod
    would be OOM-killed on start, far from the config that caused it."""
    need = serving_memory(export, meta)
    total, limit = sum(need.values()), quantity_value(cfg.resources.memory)
    if total > limit:
        parts = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in need.items())
        raise PromotionError(
            f"serving this {meta['head']} model needs about {total / 2**30:.1f} GiB of memory "
            f"({parts}), more than promote.resources.memory {cfg.resources.memory!r}: its pod "
            f"would be OOM-killed. Set promote.resources.memory to at least "
            f"{math.ceil(total / 2**30)}Gi"
        )


def _copy_export(export: Storage, target: Storage) -> None:
    # through a local directory: exports hold multi-GB weight files, kept out of memory
    with target.staging_dir() as tmp:
        export.download_dir("", tmp)
        target.upload_dir(tmp, move=True)


def render_inference_service(
    cfg: PromoteConfig, head: str, model_uri: str, version: str, record_uri: str
) -> dict[str, Any]:
    """The InferenceService serving `model_uri` with the lumos-onnx runtime, validated."""
    model: dict[str, Any] = {
        "modelFormat": {"name": cfg.model_format, "version": "1"},
        "runtime": cfg.runtime,
        "storageUri": model_uri,
        "resources": cfg.resources.to_k8s(),
        # appended to the ServingRuntime's args (lumos.serving.server's micro-batching)
        "args": [
            f"--max_batch_size={cfg.max_batch_size}",
            f"--max_batch_wait_ms={cfg.max_batch_wait_ms:g}",
            f"--max_queue={cfg.max_queue}",
        ],
    }
    predictor: dict[str, Any] = {
        "serviceAccountName": cfg.service_account,
        "minReplicas": cfg.min_replicas,
        "maxReplicas": cfg.max_replicas,
        "containerConcurrency": cfg.container_concurrency,
        "scaleMetric": cfg.scale_metric,
        "scaleTarget": cfg.scale_target,
        "model": model,
    }
    if cfg.node_selector:
        predictor["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        predictor["tolerations"] = [t.to_k8s() for t in cfg.tolerations]
    isvc = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": cfg.isvc_name(head),
            "namespace": cfg.namespace,
            "labels": {
                "app.kubernetes.io/part-of": "lumos",
                "app.kubernetes.io/component": "serving",
                "lumos.dev/head": head.replace("_", "-"),
                "lumos.dev/model-version": version,
            },
            "annotations": {"lumos.dev/registry-record": record_uri},
        },
        "spec": {"predictor": predictor},
    }
    if cfg.validate_manifest:
        validate_custom_resource(isvc)
    return isvc


def promote(
    cfg: PromoteConfig,
    export_uri: str,
    eval_result: Mapping[str, Any] | EvalResultLike | BaseModel,
    out_uri: str,
    cluster: Cluster | None = None,
) -> PromoteResult:
    """Register and render the serving manifest of a model that passed its gate (module docstring).

    With `cfg.rollout.apply` the InferenceService is rolled out first (lumos.serving.rollout,
    through `cluster`, by default the kubernetes client's): current.json changes only once the
    model serves all traffic; a canary rolled back leaves it as it was (promoted=False, reasons).
    """
    ev = _eval_dict(eval_result)
    head = ev["head"]
    out = Storage.from_uri(out_uri)
    if not ev["passed"]:
        reasons = list(ev["reasons"]) or ["the evaluation gate did not pass (no reason given)"]
        result = PromoteResult(head=head, promoted=False, reasons=reasons)
        out.write_json(RESULT_FILE, result.model_dump(mode="json"))
        return result

    export = Storage.from_uri(export_uri)
    export_meta = _read_export(export, head)
    _check_serving_memory(cfg, export, export_meta)
    registry = Storage.from_uri(cfg.registry_uri)
    current_key = f"{head}/{CURRENT_KEY}"
    try:  # the current record and its version, for the swap at the end
        previous, seen = registry.read_json_versioned(current_key)
    except ObjectNotFound:
        previous, seen = None, None
    # A run of this same promotion that was killed (after it registered its version, or after
    # it made it current) is taken up again: the same version, not one more.
    resumed = _resumable(registry, head, export.uri, ev)
    if resumed is None or resumed[0] != (previous or {}).get("version"):
        # Race-free with the swap below: a promotion landing after this read fails that swap.
        _check_baseline_is_current(ev, previous, cfg.registry_uri)
    version = resumed[0] if resumed else _next_version(registry, head)

    model_uri = export.uri
    target = None
    if cfg.storage_uri_base:
        target = Storage.from_uri(cfg.storage_uri_base).child(f"{head}/{version}")
        model_uri = target.uri
    warnings = []
    if not model_uri.startswith(REMOTE_SCHEMES):
        warnings.append(
            f"storageUri {model_uri!r} is a local path that KServe cannot fetch: set "
            "promote.storage_uri_base to an s3:// prefix to deploy this model on a cluster"
        )

    checkpoint = export_meta.get("checkpoint") or {}
    exported_ckpt, evaluated_ckpt = checkpoint.get("uri"), ev.get("checkpoint_uri")
    if exported_ckpt and evaluated_ckpt and exported_ckpt.rstrip("/") != evaluated_ckpt.rstrip("/"):
        # the same checkpoint may be named differently (a KFP artifact path vs s3://): record both
        warnings.append(
            f"the export was made from {exported_ckpt} but the evaluation names {evaluated_ckpt}: "
            "check that they are the same checkpoint"
        )

    record_key = f"{head}/{version}.json"
    record_uri = registry.key_uri(record_key)
    isvc = render_inference_service(cfg, head, model_uri, version, record_uri)
    isvc_uri = out.key_uri(ISVC_FILE)
    record = {
        "format": RECORD_FORMAT,
        "head": head,
        "version": version,
        "model_uri": model_uri,
        "model_format": cfg.model_format,
        "metrics": ev["metrics"],
        "evaluation": {
            "passed": True,
            "reasons": ev["reasons"],
            "gates": ev.get("gates"),
            "baseline": ev.get("baseline"),
            "baseline_version": ev.get("baseline_version"),
            "report_uri": ev.get("report_uri"),
        },
        "lineage": {
            "export_uri": export.uri,
            "checkpoint_uri": exported_ckpt or evaluated_ckpt,
            "evaluated_checkpoint_uri": evaluated_ckpt,
            "checkpoint_step": checkpoint.get("step", ev.get("checkpoint_step")),
            "parent_checkpoint_uri": checkpoint.get("parent"),
            "dataset_uri": (checkpoint.get("data") or {}).get("dataset_uri")
            or ev.get("dataset_uri"),
            "eval_dataset_uri": ev.get("dataset_uri"),
            "manifest_sha256": (checkpoint.get("data") or {}).get("manifest_sha256"),
        },
        "inference_service": {
            "name": isvc["metadata"]["name"],
            "namespace": cfg.namespace,
            "manifest_uri": isvc_uri,
        },
        "previous_version": resumed[2]["previous_version"]
        if resumed
        else (previous["version"] if previous else None),
        "promoted_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:  # takes the version: created only if no other promotion has taken it meanwhile
        registry.write_json(
            record_key,
            record,
            if_absent=resumed is None,
            if_version=resumed[1] if resumed else None,
        )
    except PreconditionFailed as err:
        raise PromotionError(
            f"version {version} of head {head!r} was registered by another promotion running "
            f"at the same time ({record_uri}): run this promotion again"
        ) from err
    try:
        if target is not None:
            _copy_export(export, target)
        out.write_bytes(ISVC_FILE, yaml.safe_dump(isvc, sort_keys=False).encode())
    except BaseException:
        registry.delete(record_key)  # nothing was promoted: the version is free again
        raise

    def finish(promoted: bool, reasons: list[str]) -> PromoteResult:
        """The result, also written beside the manifest."""
        result = PromoteResult(
            head=head,
            promoted=promoted,
            reasons=reasons,
            version=version,
            model_uri=model_uri,
            record_uri=record_uri,
            inference_service_name=isvc["metadata"]["name"],
            inference_service_uri=isvc_uri,
            previous_version=record["previous_version"],
            warnings=warnings,
        )
        out.write_json(RESULT_FILE, result.model_dump(mode="json"))
        return result

    if cfg.rollout.apply:
        from lumos.serving.rollout import roll_out

        try:
            outcome = roll_out(cfg, isvc, cluster)
        except BaseException:
            registry.delete(record_key)  # nothing was promoted: the version is free again
            raise
        record["rollout"] = outcome.model_dump(mode="json")
        registry.write_json(record_key, record)  # both outcomes, with their evidence
        if outcome.outcome == "rolled_back":
            return finish(False, [f"the canary was rolled back: {r}" for r in outcome.reasons])
    try:  # current.json, only if no other promotion has replaced it since it was read above
        current = {**record, "record_uri": record_uri}
        registry.write_json(current_key, current, if_version=seen, if_absent=seen is None)
    except PreconditionFailed as err:
        now = current_promoted(cfg.registry_uri, head) or {}
        raise PromotionError(
            f"another promotion of head {head!r} made {now.get('version')} current while this "
            f"one ran: {version} is registered ({record_uri}) but not served; promote it again "
            "to serve it"
        ) from err
    return finish(True, [])
