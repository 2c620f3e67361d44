"""Promotion's config: where promoted models are registered and how KServe serves them.

    PromoteConfig(registry_uri="s3://lumos/registry", min_replicas=0)   # scale to zero

Read by `lumos.serving.promote.promote`, which writes the registry record and the
InferenceService.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lumos.configs.k8s import ComputeResources, Strict, Toleration, check_dns_label


class RolloutConfig(Strict):
    """How a promoted model goes live through the Kubernetes API (KServe serverless mode)."""

    apply: bool = Field(
        False,
        description="apply the InferenceService and wait for it (canary, soak, promote or roll "
        "back) before the registry's current record changes; False: only write the manifest",
    )
    canary_traffic_percent: int = Field(
        10, ge=1, le=99, description="share of the traffic the challenger takes during the soak"
    )
    soak_s: float = Field(
        900.0, gt=0, description="how long the canary serves before its metrics are judged"
    )
    ready_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="how long a new revision may take to become ready (image pull, weights, "
        "first sample); after that it is rolled back (or, for a first model, promotion fails)",
    )
    poll_s: float = Field(10.0, gt=0, description="how often the InferenceService is read")
    min_requests: int = Field(
        50, ge=1, description="requests the canary must serve during the soak to be judged at all"
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="model errors (bad output, internal) per request"
    )
    max_p95_latency_s: float = Field(
        30.0, gt=0, description="95th percentile of the canary's request latency, queue included"
    )
    max_bad_output_rate: float = Field(
        0.01, ge=0, le=1, description="generated images failing the output check per request"
    )


class PromoteConfig(Strict):
    """Where promoted models are registered and how they are served."""

    namespace: str = Field("lumos", description="the namespace of the InferenceService")
    model_name_prefix: str = Field("lumos", description="InferenceService name: <prefix>-<head>")
    service_account: str = Field(
        "lumos-serving", description="holds the lumos-s3 secret KServe's storage initializer uses"
    )
    runtime: str = Field("lumos-onnx", description="the ServingRuntime in manifests/base")
    model_format: str = Field("lumos-onnx", description="a format the runtime declares")
    registry_uri: str = Field(
        "s3://lumos/registry",
        description="where promotion records live: <registry_uri>/<head>/<version>.json and "
        "current.json",
    )
    storage_uri_base: str | None = Field(
        None, description="copy the export to <base>/<head>/<version>/ and serve that copy"
    )
    resources: ComputeResources = Field(
        default_factory=lambda: ComputeResources(cpu="4", memory="16Gi", gpu=1),
        description="requests and limits of each predictor pod",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels the predictor pods must match"
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="tolerations of the predictor pods"
    )
    min_replicas: int = Field(1, ge=0, description="0 enables scale-to-zero (serverless mode)")
    max_replicas: int = Field(2, ge=1, description="the most predictor pods the autoscaler runs")
    validate_manifest: bool = Field(
        True, description="validate the InferenceService against the CRD"
    )
    # Throughput (docs/benchmarks.md, "Serving load" has the figures behind these defaults).
    max_batch_size: int = Field(
        8, ge=1, description="instances per model call: the server batches concurrent requests"
    )
    max_batch_wait_ms: float = Field(
        10.0, ge=0, description="how long a batch's first request waits for others to join it"
    )
    max_queue: int = Field(
        64,
        ge=16,
        description="queued instances per pod beyond which requests get 429 with Retry-After "
        "(at least 16: one request may carry 16 instances)",
    )
    container_concurrency: int = Field(
        16,
        ge=0,
        description="requests one pod takes at once (Knative's hard limit; the activator queues "
        "the rest): two batches, one running and one gathering. 0: unlimited",
    )
    scale_metric: Literal["concurrency", "rps", "cpu", "memory"] = Field(
        "concurrency", description="what KServe's autoscaler scales the predictor on"
    )
    scale_target: int = Field(
        8,
        ge=1,
        description="per-pod target of scale_metric: one full batch in flight per pod, so a new "
        "pod starts before requests wait behind a second batch",
    )
    rollout: RolloutConfig = Field(
        default_factory=RolloutConfig,
        description="applying the InferenceService, canary and rollback (lumos.serving.rollout)",
    )

    @field_validator("namespace", "service_account", "runtime", "model_name_prefix")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        return check_dns_label(value)

    @field_validator("registry_uri")
    @classmethod
    def _registry_set(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("registry_uri must name a directory or s3:// prefix")
        return value

    @model_validator(mode="after")
    def _replicas_in_order(self) -> PromoteConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas}): "
                "KServe's autoscaler needs min_replicas <= max_replicas"
            )
        return self

    def isvc_name(self, head: str) -> str:
        return check_dns_label(f"{self.model_name_prefix}-{head.replace('_', '-')}", "model name")
