"""Multi-node training as a Kubeflow Trainer (v2) TrainJob.

    job = render_trainjob(cfg, ["lumos", "pretrain", "--config", "/etc/lumos/config.yaml"], "lumos-pretrain-1")
    outcome = launch_and_wait(job)      # creates it, polls status.conditions, surfaces the pod logs

The TrainJob points (`runtimeRef`) at the `torch-distributed` runtime that `manifests/base` installs:
a TrainingRuntime in the job's namespace by default, or the ClusterTrainingRuntime of the same name
that Kubeflow Trainer ships. The runtime runs `torchrun` with the PET_* rendezvous variables the
Trainer injects; `trainer.numNodes` and `numProcPerNode` override its defaults, `resourcesPerNode`
requests the GPUs. Node selector and tolerations are not fields of `trainer`: the CRD takes them as
a `runtimePatches` entry on the runtime's `node` job, which is what is written here.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, field_validator

from lumos.k8s.crd_validation import validate_custom_resource
from lumos.k8s.resources import (
    ComputeResources,
    Strict,
    Toleration,
    check_dns_label,
    check_quantity,
    secret_env,
)

log = logging.getLogger(__name__)

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
RUNTIME_JOB_NAME = "node"  # the replicated job (and container) name in the torch runtime
PATCH_MANAGER = "lumos.dev/launcher"  # who owns our runtimePatches entry
# TrainJob -> JobSet of the same name -> pods labelled with the JobSet (= TrainJob) name.
POD_LABEL = "jobset.sigs.k8s.io/jobset-name"
FEATURE_CACHE_ENV = "LUMOS_FEATURE_CACHE"  # lumos.training.data.CACHE_ENV
FEATURE_CACHE_PATH = "/var/cache/lumos-features"
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"


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
    env: dict[str, str] = Field(default_factory=dict, description="extra plain env variables")
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
    poll_s: float = Field(30.0, gt=0)

    @field_validator("namespace", "runtime_ref")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        return check_dns_label(value)

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str) -> str:
        return check_quantity(value)

    def resources(self) -> ComputeResources:
        return ComputeResources(cpu=self.cpu, memory=self.memory, gpu=self.gpus_per_node)


def render_trainjob(cfg: DistributedConfig, command: list[str], name: str) -> dict[str, Any]:
    """A TrainJob running `command` on every node (under torchrun), validated against the CRD."""
    if not command or not all(isinstance(c, str) and c for c in command):
        raise ValueError(f"command must be a non-empty list of non-empty strings, got {command!r}")
    check_dns_label(name, "TrainJob name")
    if not name[0].isalpha():
        raise ValueError(f"TrainJob name {name!r} must start with a letter (RFC 1035 label)")
    env = secret_env(cfg.env_secret) if cfg.env_secret else []
    env += [{"name": k, "value": v} for k, v in sorted(cfg.env.items())]
    if FEATURE_CACHE_ENV not in cfg.env:
        env.append({"name": FEATURE_CACHE_ENV, "value": FEATURE_CACHE_PATH})
    if SHUTDOWN_TIMEOUT_ENV not in cfg.env:  # torchrun's wait before it kills its workers
        env.append({"name": SHUTDOWN_TIMEOUT_ENV, "value": str(cfg.termination_grace_s - 10)})
    trainer: dict[str, Any] = {
        "image": cfg.image,
        "command": list(command),
        "numNodes": cfg.num_nodes,
        "numProcPerNode": cfg.procs_per_node or max(cfg.gpus_per_node, 1),
        "resourcesPerNode": cfg.resources().to_k8s(),
    }
    if env:
        trainer["env"] = env
    spec: dict[str, Any] = {
        "runtimeRef": {
            "apiGroup": TRAINER_GROUP,
            "kind": cfg.runtime_kind,
            "name": cfg.runtime_ref,
        },
        "trainer": trainer,
    }
    if cfg.active_deadline_s:
        spec["activeDeadlineSeconds"] = cfg.active_deadline_s
    # The features of a dataset in the object store are copied to node-local disk once and
    # memory-mapped from there (lumos.training.data): an emptyDir shared by the node's processes.
    pod_patch: dict[str, Any] = {
        "terminationGracePeriodSeconds": cfg.termination_grace_s,
        "volumes": [
            {"name": "feature-cache", "emptyDir": {"sizeLimit": f"{cfg.feature_cache_gib}Gi"}}
        ],
        "containers": [
            {
                "name": RUNTIME_JOB_NAME,
                "volumeMounts": [{"name": "feature-cache", "mountPath": FEATURE_CACHE_PATH}],
            }
        ],
    }
    if cfg.node_selector:
        pod_patch["nodeSelector"] = dict(cfg.node_selector)
    if cfg.tolerations:
        pod_patch["tolerations"] = [t.to_k8s() for t in cfg.tolerations]
    job_patch = {
        "name": RUNTIME_JOB_NAME,
        "template": {"spec": {"template": {"spec": pod_patch}}},
    }
    spec["runtimePatches"] = [
        {
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [job_patch]}}},
        }
    ]
    job = {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": cfg.namespace,
            "labels": {
                "app.kubernetes.io/part-of": "lumos",
                "app.kubernetes.io/component": "train",
            },
        },
        "spec": spec,
    }
    validate_custom_resource(job)
    return job


class TrainJobFailed(RuntimeError):
    """The TrainJob failed or timed out; the message has the condition and the pods' log tail."""

    def __init__(self, message: str, outcome: TrainJobOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class TrainJobOutcome(BaseModel):
    name: str
    namespace: str
    state: Literal["Complete", "Failed", "TimedOut"]
    message: str = ""
    seconds: float
    logs: dict[str, str] = Field(default_factory=dict, description="pod name -> log tail")


class CustomObjectsAPI(Protocol):
    """The part of `kubernetes.client.CustomObjectsApi` used here."""

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw): ...
    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw): ...
    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw): ...


class CoreAPI(Protocol):
    """The part of `kubernetes.client.CoreV1Api` used here."""

    def list_namespaced_pod(self, namespace, **kw): ...
    def read_namespaced_pod_log(self, name, namespace, **kw): ...


def _default_apis() -> tuple[CustomObjectsAPI, CoreAPI]:
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # inside a pipeline step's pod
    except config.ConfigException:
        config.load_kube_config()  # a laptop with a kubeconfig
    return client.CustomObjectsApi(), client.CoreV1Api()


def _terminal_condition(job: dict[str, Any]) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond
    return None


def _follow_or_replace(
    api: CustomObjectsAPI, trainjob: dict[str, Any], timeout_s: float, poll_s: float, sleep, clock
) -> None:
    """The TrainJob of this name exists: keep it unless it failed; a failed one is deleted and
    created again (the new one resumes from the checkpoints the failed one wrote)."""
    name, namespace = trainjob["metadata"]["name"], trainjob["metadata"]["namespace"]
    where = (TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL)
    cond = _terminal_condition(api.get_namespaced_custom_object(*where, name))
    if cond is None or cond["type"] != "Failed":
        log.warning("TrainJob %s/%s already exists: waiting for it", namespace, name)
        return
    log.warning(
        "TrainJob %s/%s failed before (%s): replacing it; the new job resumes from its checkpoints",
        namespace, name, ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x),
    )  # fmt: skip
    api.delete_namespaced_custom_object(*where, name, propagation_policy="Foreground")
    start = clock()
    while True:  # deletion is asynchronous: the name is free once its pods are gone
        try:
            api.get_namespaced_custom_object(*where, name)
        except Exception as err:
            if getattr(err, "status", None) != 404:
                raise
            break
        if clock() - start >= timeout_s:
            raise RuntimeError(
                f"TrainJob {namespace}/{name} was still being deleted after {timeout_s:.0f}s; "
                f"check it with: kubectl -n {namespace} describe trainjob {name}"
            )
        sleep(poll_s)
    api.create_namespaced_custom_object(*where, trainjob)
    log.info("created TrainJob %s/%s again", namespace, name)


def pod_logs(core: CoreAPI, name: str, namespace: str, tail_lines: int = 50) -> dict[str, str]:
    """Log tails of the TrainJob's pods (the `node` container), keyed by pod name."""
    logs: dict[str, str] = {}
    pods = core.list_namespaced_pod(namespace, label_selector=f"{POD_LABEL}={name}")
    for pod in sorted(pods.items, key=lambda p: p.metadata.name):
        try:
            logs[pod.metadata.name] = core.read_namespaced_pod_log(
                pod.metadata.name, namespace, container=RUNTIME_JOB_NAME, tail_lines=tail_lines
            )
        except Exception as err:  # a pod that never started has no log: say so, keep going
            logs[pod.metadata.name] = f"<no log: {err}>"
    return logs


def launch_and_wait(
    trainjob: dict[str, Any],
    api: CustomObjectsAPI | None = None,
    core_api: CoreAPI | None = None,
    timeout_s: float = 7 * 24 * 3600.0,
    poll_s: float = 30.0,
    *,
    sleep=time.sleep,
    clock=time.monotonic,
) -> TrainJobOutcome:
    """Create the TrainJob (if it already exists, as for a retried pipeline step: follow it, or
    replace it if it failed) and wait for its Complete or Failed condition.

    On failure or timeout raises `TrainJobFailed` with the condition message and the log tail of
    every pod. `api`/`core_api` default to the kubernetes client (in-cluster config, else kubeconfig).
    """
    if api is None or core_api is None:
        default_api, default_core = _default_apis()
        api, core_api = api or default_api, core_api or default_core
    name, namespace = trainjob["metadata"]["name"], trainjob["metadata"]["namespace"]
    try:
        api.create_namespaced_custom_object(
            TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, trainjob
        )
        log.info("created TrainJob %s/%s", namespace, name)
    except Exception as err:
        if getattr(err, "status", None) != 409:  # kubernetes.client.ApiException: AlreadyExists
            raise
        # A retried pipeline step: follow the job the first attempt created, or replace it if it
        # failed (its JobSet restarts used up), so that the retry trains again.
        _follow_or_replace(api, trainjob, timeout_s, poll_s, sleep, clock)
    start = clock()
    while True:
        job = api.get_namespaced_custom_object(
            TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name
        )
        cond = _terminal_condition(job)
        elapsed = clock() - start
        if cond is not None or elapsed >= timeout_s:
            break
        sleep(poll_s)
    logs = pod_logs(core_api, name, namespace)
    state: Literal["Complete", "Failed", "TimedOut"]
    if cond is None:
        state, message = (
            "TimedOut",
            (
                f"no Complete/Failed condition after {timeout_s:.0f}s; the job is still there "
                f"(kubectl -n {namespace} delete trainjob {name} to stop it)"
            ),
        )
    else:
        state = "Complete" if cond["type"] == "Complete" else "Failed"
        message = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
    outcome = TrainJobOutcome(
        name=name, namespace=namespace, state=state, message=message, seconds=elapsed, logs=logs
    )
    if state != "Complete":
        tails = "\n".join(f"--- {pod} ---\n{text}" for pod, text in logs.items()) or "<no pods>"
        raise TrainJobFailed(
            f"TrainJob {namespace}/{name} {'timed out' if state == 'TimedOut' else 'failed'}: "
            f"{message or 'no message'}\n"
            f"pod logs (tail):\n{tails}\n"
            f"inspect with: kubectl -n {namespace} describe trainjob {name}",
            outcome,
        )
    log.info("TrainJob %s/%s complete after %.0fs", namespace, name, elapsed)
    return outcome
