"""Kubernetes settings of the configs: tolerations, compute resources, the distributed TrainJob.

    cfg = DistributedConfig(num_nodes=4, gpus_per_node=8)
    cfg.resources().to_k8s()        # {"requests": {...}, "limits": {...}}

`lumos.k8s` renders these into resources (`lumos.k8s.trainjob.render_trainjob`); the pipeline
config (`lumos.config.ClusterConfig`) and promotion (`lumos.configs.serving.PromoteConfig`) hold
them. The checks of names and quantities are Kubernetes' own rules, so a bad value fails when the
config is read, not when the cluster rejects the resource.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# A Kubernetes resource quantity: "4", "500m", "32Gi", "1.5", "2e3".
QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?\d+))?$")
_LABEL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

FEATURE_CACHE_ENV = "LUMOS_FEATURE_CACHE"  # lumos.training.data.CACHE_ENV
FEATURE_CACHE_PATH = "/var/cache/lumos-features"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_quantity(value: str) -> str:
    if not QUANTITY.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity: use e.g. '4', '500m', '32Gi'")
    return value


def check_dns_label(value: str, what: str = "name") -> str:
    if len(value) > 63 or not _LABEL_NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must be a DNS-1123 label: lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters"
        )
    return value


class Toleration(Strict):
    """A pod toleration; the default tolerates the NoSchedule taint GPU node pools usually carry."""

    key: str
    operator: Literal["Equal", "Exists"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = "NoSchedule"

    @model_validator(mode="after")
    def _value_matches_operator(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError(f"toleration {self.key!r}: operator Exists takes no value")
        if self.operator == "Equal" and self.value is None:
            raise ValueError(f"toleration {self.key!r}: operator Equal needs a value")
        return self

    def to_k8s(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ComputeResources(Strict):
    """Requests and limits of one container (or one training node). GPUs are requested and limited
    alike (Kubernetes requires it for extended resources); memory is limited to what is requested
    so a pod is never OOM-killed for using memory the scheduler did not reserve."""

    cpu: str = "4"
    memory: str = "16Gi"
    gpu: int = Field(0, ge=0)
    gpu_resource: str = "nvidia.com/gpu"
    cpu_limit: str | None = Field(
        default=None, description="None: no CPU limit (avoids CFS throttling)"
    )

    @field_validator("cpu", "memory", "cpu_limit")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return value if value is None else check_quantity(value)

    def to_k8s(self) -> dict[str, dict[str, Any]]:
        requests: dict[str, Any] = {"cpu": self.cpu, "memory": self.memory}
        limits: dict[str, Any] = {"memory": self.memory}
        if self.cpu_limit:
            limits["cpu"] = self.cpu_limit
        if self.gpu:
            requests[self.gpu_resource] = str(self.gpu)
            limits[self.gpu_resource] = str(self.gpu)
        return {"requests": requests, "limits": limits}


class DistributedConfig(Strict):
    """Where and how wide a distributed training run is. Defaults: two 8-GPU nodes."""

    num_nodes: int = Field(2, ge=1)
    gpus_per_node: int = Field(8, ge=0)
    procs_per_node: int | None = Field(
        None, ge=1, description="torchrun processes per node; None: one per GPU (1 on CPU nodes)"
    )
    image: str = "ghcr.io/lumos-mlops/lumos-train:0.1.0"
    runtime_ref: str = "torch-distributed"
    runtime_kind: Literal["TrainingRuntime", "ClusterTrainingRuntime"] = "TrainingRuntime"
    namespace: str = "lumos"
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu")]
    )
    cpu: str = "32"
    memory: str = "480Gi"
    env_secret: str | None = Field(
        "lumos-s3", description="Secret holding LUMOS_S3_ENDPOINT and AWS_* (None: no secret env)"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="extra plain env variables of the training container, one entry per name: "
        f"one named like a variable from env_secret replaces it; {FEATURE_CACHE_ENV} is not "
        "allowed (the cache volume's mount path is fixed: size it with feature_cache_gib)",
    )
    feature_cache_gib: int = Field(
        500, ge=1, description="node-local disk (emptyDir) for the memory-mapped features"
    )
    active_deadline_s: int | None = Field(None, ge=1, description="kill the job after this long")
    termination_grace_s: int = Field(
        600,
        ge=30,
        description="after SIGTERM (a preempted or drained node, a deleted job), how long a pod "
        "has to finish its step and write a checkpoint (lumos.training.stopping) before it is "
        "killed; also torchrun's wait for its workers (an XL/2 checkpoint is about 13 GB)",
    )
    timeout_s: float = Field(7 * 24 * 3600.0, gt=0, description="how long launch_and_wait waits")
    start_timeout_s: float | None = Field(
        3600.0,
        gt=0,
        description="how long the TrainJob may take to start (a pod ready, or one finished): "
        "after that launch_and_wait deletes it (it never trained) and fails, saying why its pods "
        "are pending (Unschedulable, ImagePullBackOff, ...). The clock stops while the job is "
        "suspended (queued by Kueue). None: no start deadline, only timeout_s",
    )
    poll_s: float = Field(30.0, gt=0)

    @field_validator("namespace", "runtime_ref")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        return check_dns_label(value)

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        return check_quantity(value)

    @field_validator("env")
    @classmethod
    def _no_feature_cache_env(cls, value: dict[str, str]) -> dict[str, str]:
        if FEATURE_CACHE_ENV in value:
            raise ValueError(
                f"env must not set {FEATURE_CACHE_ENV}: it points at the feature cache volume, "
                f"mounted at {FEATURE_CACHE_PATH}; size that volume with feature_cache_gib instead"
            )
        return value

    def resources(self) -> ComputeResources:
        return ComputeResources(cpu=self.cpu, memory=self.memory, gpu=self.gpus_per_node)
