"""Promotion's config: where promoted models are registered and how KServe serves them.

    PromoteConfig(registry_uri="s3://lumos/registry", min_replicas=0)   # scale to zero

Read by `lumos.serving.promote.promote`, which writes the registry record and the
InferenceService.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from lumos.configs.k8s import ComputeResources, Strict, Toleration, check_dns_label


class PromoteConfig(Strict):
    """Where promoted models are registered and how they are served."""

    namespace: str = "lumos"
    model_name_prefix: str = Field("lumos", description="InferenceService name: <prefix>-<head>")
    service_account: str = Field(
        "lumos-serving", description="holds the lumos-s3 secret KServe's storage initializer uses"
    )
    runtime: str = Field("lumos-onnx", description="the ServingRuntime in manifests/base")
    model_format: str = Field("lumos-onnx", description="a format the runtime declares")
    registry_uri: str = "s3://lumos/registry"
    storage_uri_base: str | None = Field(
        None, description="copy the export to <base>/<head>/<version>/ and serve that copy"
    )
    resources: ComputeResources = Field(
        default_factory=lambda: ComputeResources(cpu="4", memory="16Gi", gpu=1)
    )
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    min_replicas: int = Field(1, ge=0, description="0 enables scale-to-zero (serverless mode)")
    max_replicas: int = Field(2, ge=1)
    validate_manifest: bool = Field(
        True, description="validate the InferenceService against the CRD"
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
