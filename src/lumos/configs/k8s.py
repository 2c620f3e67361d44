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
from importlib import metadata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lumos.training.world import EXPECTED_WORLD_ENV

# The images are tagged with the package's version (pyproject.toml): the one place a tag is
# written. Manifests, Dockerfiles and the compiled pipeline are checked against these
# (tests/test_image_tag.py).
VERSION = metadata.version("lumos")
IMAGE_REPOSITORY = "ghcr.io/lumos-mlops"
TRAIN_IMAGE = f"{IMAGE_REPOSITORY}/lumos-train:{VERSION}"  # docker/train.Dockerfile
SERVE_IMAGE = f"{IMAGE_REPOSITORY}/lumos-serve:{VERSION}"  # docker/serve.Dockerfile

# A Kubernetes resource quantity: "4", "500m", "32Gi", "1.5", "2e3".
QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?\d+))?$")
_LABEL_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

FEATURE_CACHE_ENV = "LUMOS_FEATURE_CACHE"  # lumos.features.cache.CACHE_ENV
FEATURE_CACHE_PATH = "/var/cache/lumos-features"
# Names the Trainer's torch plugin reserves (TorchRunReservedEnvNames in kubeflow/trainer
# pkg/constants/constants.go): its webhook rejects a TrainJob whose trainer.env sets one.
PET_ENV = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
# Set by render_trainjob itself: env may not set them.
RENDERED_ENV = (FEATURE_CACHE_ENV, EXPECTED_WORLD_ENV, *PET_ENV)
TRAINER_SERVICE_ACCOUNT = "lumos-trainer"  # manifests/base/rbac.yaml: no API token mounted
# The user of the project's images (docker/train.Dockerfile, serve.Dockerfile: USER 1000).
IMAGE_UID = 1000


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

    key: str = Field(description="the taint key tolerated, e.g. nvidia.com/gpu")
    operator: Literal["Equal", "Exists"] = Field(
        "Exists", description="Exists (any value) or Equal (the value below)"
    )
    value: str | None = Field(None, description="the taint value, with operator Equal only")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        "NoSchedule", description="the taint effect tolerated; None: every effect"
    )

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

    cpu: str = Field("4", description="CPU request (a Kubernetes quantity, e.g. '4', '500m')")
    memory: str = Field("16Gi", description="memory request and limit (a quantity, e.g. '16Gi')")
    gpu: int = Field(0, ge=0, description="GPUs, requested and limited alike")
    gpu_resource: str = Field("nvidia.com/gpu", description="the extended resource name of a GPU")
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

    num_nodes: int = Field(2, ge=1, description="nodes (pods) of the TrainJob")
    gpus_per_node: int = Field(8, ge=0, description="GPUs each node requests")
    procs_per_node: int | None = Field(
        None, ge=1, description="torchrun processes per node; None: one per GPU (1 on CPU nodes)"
    )
    image: str = Field(TRAIN_IMAGE, description="the training image of every node")
    service_account: str = Field(
        TRAINER_SERVICE_ACCOUNT,
        description="the training pods' service account: lumos-trainer mounts no API token "
        "(training never calls the Kubernetes API, and must not be able to create TrainJobs)",
    )
    runtime_ref: str = Field(
        "torch-distributed",
        description="the TrainingRuntime (or ClusterTrainingRuntime) the TrainJob runs on",
    )
    runtime_kind: Literal["TrainingRuntime", "ClusterTrainingRuntime"] = Field(
        "TrainingRuntime",
        description="whether runtime_ref names a namespaced TrainingRuntime or a "
        "ClusterTrainingRuntime",
    )
    namespace: str = Field("lumos", description="the namespace the TrainJob is created in")
    node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="node labels the training pods must match",
    )
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu")],
        description="tolerations of the training pods",
    )
    cpu: str = Field("32", description="CPU request (and limit) per node, a Kubernetes quantity")
    memory: str = Field(
        "480Gi", description="memory request and limit per node, a Kubernetes quantity"
    )
    env_secret: str | None = Field(
        "lumos-s3", description="Secret holding LUMOS_S3_ENDPOINT and AWS_* (None: no secret env)"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="extra plain env variables of the training container, one entry per name: "
        f"one named like a variable from env_secret replaces it; {', '.join(RENDERED_ENV)} are "
        "not allowed (the cache volume's mount path is fixed: size it with feature_cache_gib; "
        "the PET_* variables are the Trainer's, the expected world is num_nodes x processes)",
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
    poll_s: float = Field(
        30.0, gt=0, description="seconds between launch_and_wait's looks at the TrainJob's status"
    )

    @field_validator("namespace", "runtime_ref", "service_account")
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
        reserved = sorted(set(value) & {EXPECTED_WORLD_ENV, *PET_ENV})
        if reserved:
            raise ValueError(
                f"env must not set {', '.join(reserved)}: Kubeflow Trainer injects the PET_* "
                f"variables (its webhook rejects a TrainJob that sets them) and {EXPECTED_WORLD_ENV}"
                " is num_nodes x the processes per node"
            )
        return value

    def processes_per_node(self) -> int:
        """torchrun processes per node: procs_per_node, else one per GPU (1 on CPU nodes)."""
        return self.procs_per_node or max(self.gpus_per_node, 1)

    def world_size(self) -> int:
        return self.num_nodes * self.processes_per_node()

    def resources(self) -> ComputeResources:
        # CPU limited to what is requested too: with memory alike, the training pods are in the
        # Guaranteed QoS class, so the kubelet's static CPU manager can give them whole cores.
        return ComputeResources(
            cpu=self.cpu, memory=self.memory, gpu=self.gpus_per_node, cpu_limit=self.cpu
        )


# The pipeline's steps by what they need: CPU steps that only plan, merge, promote or launch a
# TrainJob ("control"); ingest (decoding images); and the GPU steps. featurize, evaluate and
# export use one GPU; pretrain and finetune use cluster.gpus_per_step (gpus None here).
STEP_KINDS = ("control", "ingest", "featurize", "pretrain", "finetune", "evaluate", "export")
_STEP_DEFAULTS: dict[str, dict[str, Any]] = {
    "control": {"cpu": "500m", "memory": "1Gi", "gpus": 0},
    "ingest": {"cpu": "4", "memory": "16Gi", "gpus": 0},
    "featurize": {"cpu": "8", "memory": "64Gi", "gpus": 1},
    "pretrain": {"cpu": "32", "memory": "480Gi", "gpus": None},
    "finetune": {"cpu": "32", "memory": "480Gi", "gpus": None},
    "evaluate": {"cpu": "8", "memory": "64Gi", "gpus": 1},
    "export": {"cpu": "8", "memory": "64Gi", "gpus": 1},
}


class StepResources(Strict):
    """One kind of step's requests and limits; an unset field takes the kind's default
    (`StepsResources.resolve`). Limits default to the requests (Guaranteed QoS: the step is
    neither throttled below nor evicted above what the scheduler reserved)."""

    cpu: str | None = Field(None, description="CPU request (a quantity, e.g. '8', '500m')")
    memory: str | None = Field(None, description="memory request (e.g. '64Gi')")
    cpu_limit: str | None = Field(None, description="CPU limit; unset: the request")
    memory_limit: str | None = Field(None, description="memory limit; unset: the request")
    gpus: int | None = Field(
        None, ge=0, description="GPUs (nvidia.com/gpu); 0: a CPU pod on any node"
    )

    @field_validator("cpu", "memory", "cpu_limit", "memory_limit")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        return value if value is None else check_quantity(value)


class ResolvedStepResources(Strict):
    cpu: str
    memory: str
    cpu_limit: str
    memory_limit: str
    gpus: int


class StepsResources(Strict):
    """CPU, memory and GPUs per kind of pipeline step (`cluster.steps.<kind>.<field>`)."""

    control: StepResources = Field(
        default_factory=StepResources,
        description="sources, plans, merges, promote, pretrain launching a TrainJob: 500m, 1Gi",
    )
    ingest: StepResources = Field(
        default_factory=StepResources, description="ingest steps: 4 CPUs, 16Gi"
    )
    featurize: StepResources = Field(
        default_factory=StepResources, description="featurize steps: 8 CPUs, 64Gi, 1 GPU"
    )
    pretrain: StepResources = Field(
        default_factory=StepResources,
        description="pretrain in a step (no TrainJob): 32 CPUs, 480Gi, gpus_per_step GPUs",
    )
    finetune: StepResources = Field(
        default_factory=StepResources, description="fine-tuning: 32 CPUs, 480Gi, gpus_per_step"
    )
    evaluate: StepResources = Field(
        default_factory=StepResources, description="evaluation: 8 CPUs, 64Gi, 1 GPU"
    )
    export: StepResources = Field(
        default_factory=StepResources, description="ONNX / TensorRT export: 8 CPUs, 64Gi, 1 GPU"
    )

    def resolve(self, kind: str, gpus_per_step: int) -> ResolvedStepResources:
        """The requests and limits of `kind`: its settings over its defaults; a training step
        without a GPU count gets `gpus_per_step`."""
        merged = {**_STEP_DEFAULTS[kind], **getattr(self, kind).model_dump(exclude_none=True)}
        if merged["gpus"] is None:
            merged["gpus"] = gpus_per_step
        merged.setdefault("cpu_limit", merged["cpu"])
        merged.setdefault("memory_limit", merged["memory"])
        return ResolvedStepResources(**merged)
