"""Multi-node training as a Kubeflow Trainer (v2) TrainJob.

    job = render_trainjob(cfg, ["lumos", "pretrain", "--config", "/etc/lumos/config.yaml"], "lumos-pretrain-1")
    outcome = launch_and_wait(job)      # creates it, polls status.conditions, surfaces the pod logs

The TrainJob points (`runtimeRef`) at the `torch-distributed` runtime that `manifests/base` installs:
a TrainingRuntime in the job's namespace by default, or the ClusterTrainingRuntime of the same name
that Kubeflow Trainer ships. Kubeflow Trainer's torch plugin (kubeflow/trainer
`pkg/runtime/framework/plugins/torch/torch.go`) launches nothing itself: it only injects PET_NNODES,
PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT into the `node` container,
whose command becomes `trainer.command` verbatim (`plugins/jobset/builder.go`). So the command
rendered here is `torchrun --no-python <command>`: torchrun reads the PET_* variables and starts
`numProcPerNode` processes per node, all in one world. The job also sets LUMOS_EXPECTED_WORLD
(nodes x processes): training refuses to start in any other world (lumos.training.world), so a
command edited to drop torchrun fails at once instead of training N separate models into one output.
`trainer.numNodes` and `numProcPerNode` override the runtime's defaults, `resourcesPerNode`
requests the GPUs. Node selector, tolerations, the pod's identity and its security context are not
fields of `trainer`: the CRD takes them as a `runtimePatches` entry on the runtime's `node` job,
which is what is written here. The pods run as `service_account` (by default `lumos-trainer`, which
mounts no API token: training never calls the Kubernetes API) under the Restricted Pod Security
profile (non-root, no privilege escalation, no capabilities, the runtime's seccomp profile).

`launch_and_wait` owns the job while it waits: one that has not started within
`start_timeout_s` (pods unschedulable, an image that cannot be pulled) is deleted with the reason,
and so is the job when the waiting process gets SIGTERM (the pipeline run terminated); the pods
then checkpoint within their grace period and a retry resumes from there.
"""

from __future__ import annotations

import logging
import time
from types import FrameType
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

from lumos.configs.k8s import (
    FEATURE_CACHE_ENV,
    FEATURE_CACHE_PATH,
    IMAGE_UID,
    DistributedConfig,
    check_dns_label,
)
from lumos.errors import LumosError
from lumos.k8s.crd_validation import validate_custom_resource
from lumos.k8s.resources import secret_env
from lumos.training.stopping import TrainingStopped, handling_sigterm
from lumos.training.world import EXPECTED_WORLD_ENV, expected_world_value

log = logging.getLogger(__name__)

TRAINER_GROUP = "trainer.kubeflow.org"
TRAINER_VERSION = "v1alpha1"
TRAINJOB_PLURAL = "trainjobs"
RUNTIME_JOB_NAME = "node"  # the replicated job (and container) name in the torch runtime
PATCH_MANAGER = "lumos.dev/launcher"  # who owns our runtimePatches entry
# TrainJob -> JobSet of the same name -> pods labelled with the JobSet (= TrainJob) name.
POD_LABEL = "jobset.sigs.k8s.io/jobset-name"
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
# The launcher in front of the command: torchrun reads its rendezvous from the PET_* variables
# (torch.distributed.run: every option defaults to the variable PET_<OPTION>); --no-python runs
# the command as an executable (the image's `lumos` entry point) instead of a Python script.
LAUNCHER = ("torchrun", "--no-python")


class TrainJobConfigError(LumosError, ValueError):
    """A TrainJob that cannot be rendered from this configuration or command."""


def restricted_pod_security(uid: int = IMAGE_UID) -> dict[str, Any]:
    """The pod-level securityContext of the Restricted Pod Security profile."""
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_container_security() -> dict[str, Any]:
    """The container-level securityContext of the Restricted Pod Security profile."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def render_trainjob(cfg: DistributedConfig, command: list[str], name: str) -> dict[str, Any]:
    """A TrainJob running `command` under torchrun on every node, validated against the CRD.

    `command` is what one training process runs (e.g. `lumos pretrain ...`), an executable on the
    image's PATH: the TrainJob's command is `torchrun --no-python` followed by it."""
    if not command or not all(isinstance(c, str) and c for c in command):
        raise TrainJobConfigError(
            f"command must be a non-empty list of non-empty strings, got {command!r}"
        )
    if command[0] == "torchrun" or "torch.distributed.run" in command:
        raise TrainJobConfigError(
            f"command {command!r} must be the training command itself (e.g. lumos pretrain ...): "
            f"render_trainjob puts {' '.join(LAUNCHER)} in front of it"
        )
    check_dns_label(name, "TrainJob name")
    if not name[0].isalpha():
        raise TrainJobConfigError(
            f"TrainJob name {name!r} must start with a letter (RFC 1035 label)"
        )
    # The JobSet webhook requires every pod name, `<name>-node-0-<node index>-<5 random chars>`,
    # to be a DNS-1035 label: the last node's is the longest.
    longest_pod_suffix = f"-{RUNTIME_JOB_NAME}-0-{cfg.num_nodes - 1}-xxxxx"
    if len(name) + len(longest_pod_suffix) > 63:
        raise TrainJobConfigError(
            f"TrainJob name {name!r} is too long for {cfg.num_nodes} nodes: its last pod's name "
            f"{name + longest_pod_suffix!r} must be at most 63 characters (a DNS-1035 label); "
            f"use a name of at most {63 - len(longest_pod_suffix)} characters"
        )
    # trainer.env is a list-map keyed by name (one entry per name): cfg.env replaces a variable
    # of the same name from the secret.
    env = (
        [e for e in secret_env(cfg.env_secret) if e["name"] not in cfg.env]
        if cfg.env_secret
        else []
    )
    env += [{"name": k, "value": v} for k, v in sorted(cfg.env.items())]
    env.append({"name": FEATURE_CACHE_ENV, "value": FEATURE_CACHE_PATH})  # cfg.env may not set it
    env.append(
        {
            "name": EXPECTED_WORLD_ENV,
            "value": expected_world_value(cfg.num_nodes, cfg.processes_per_node()),
        }
    )
    if cfg.gpus_per_node == 0 and "ACCELERATE_USE_CPU" not in cfg.env:
        # CPU nodes: without it accelerate looks for GPUs under torchrun and does not join the
        # gloo world (lumos.training.train refuses to train then).
        env.append({"name": "ACCELERATE_USE_CPU", "value": "1"})
    if SHUTDOWN_TIMEOUT_ENV not in cfg.env:  # torchrun's wait before it kills its workers
        env.append({"name": SHUTDOWN_TIMEOUT_ENV, "value": str(cfg.termination_grace_s - 10)})
    trainer: dict[str, Any] = {
        "image": cfg.image,
        "command": [*LAUNCHER, *command],
        "numNodes": cfg.num_nodes,
        "numProcPerNode": cfg.processes_per_node(),
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
    # memory-mapped from there (lumos.features.cache): an emptyDir shared by the node's processes.
    pod_patch: dict[str, Any] = {
        "serviceAccountName": cfg.service_account,
        "securityContext": restricted_pod_security(),
        "terminationGracePeriodSeconds": cfg.termination_grace_s,
        "volumes": [
            {"name": "feature-cache", "emptyDir": {"sizeLimit": f"{cfg.feature_cache_gib}Gi"}}
        ],
        "containers": [
            {
                "name": RUNTIME_JOB_NAME,
                "securityContext": restricted_container_security(),
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


class TrainJobFailed(LumosError, RuntimeError):
    """The TrainJob failed, did not start or timed out; the message says why (the condition, or
    why its pods are pending) and has the pods' log tail."""

    def __init__(self, message: str, outcome: TrainJobOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class TrainJobOutcome(BaseModel):
    name: str
    namespace: str
    state: Literal["Complete", "Failed", "TimedOut", "NotStarted"]
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


def _has_started(job: dict[str, Any]) -> bool:
    """A pod of the job is ready or has finished (or the job ended): it got nodes and its image."""
    for jobs in (job.get("status") or {}).get("jobsStatus") or []:
        if any(jobs.get(count, 0) >= 1 for count in ("ready", "succeeded", "failed")):
            return True
    return _terminal_condition(job) is not None


def _reason_text(reason: str | None, message: str | None) -> str:
    return ": ".join(x for x in (reason, message) if x)


def _where(namespace: str) -> tuple[str, str, str, str]:
    return TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL


def _delete_trainjob(api: CustomObjectsAPI, name: str, namespace: str) -> None:
    """Delete the TrainJob; its JobSet and pods go in the background (each pod gets SIGTERM and
    its termination grace period to write a checkpoint)."""
    try:
        api.delete_namespaced_custom_object(
            *_where(namespace), name, propagation_policy="Background"
        )
    except Exception as err:
        if getattr(err, "status", None) != 404:  # already gone: nothing to do
            raise


def _follow_or_replace(
    api: CustomObjectsAPI, trainjob: dict[str, Any], timeout_s: float, poll_s: float, sleep, clock
) -> None:
    """The TrainJob of this name exists: keep it unless it failed; a failed one is deleted and
    created again (the new one resumes from the checkpoints the failed one wrote), one being
    deleted (a previous attempt's, stopped or not started) is created again once it is gone. One
    that has not started yet is followed: its start deadline runs from now."""
    name, namespace = trainjob["metadata"]["name"], trainjob["metadata"]["namespace"]
    where = _where(namespace)
    existing = api.get_namespaced_custom_object(*where, name)
    cond = _terminal_condition(existing)
    if (existing.get("metadata") or {}).get("deletionTimestamp"):
        log.warning("TrainJob %s/%s is being deleted: creating it again once it is gone",
                    namespace, name)  # fmt: skip
    elif cond is None or cond["type"] != "Failed":
        log.warning("TrainJob %s/%s already exists: waiting for it", namespace, name)
        return
    else:
        log.warning(
            "TrainJob %s/%s failed before (%s): replacing it; the new job resumes from its "
            "checkpoints", namespace, name, _reason_text(cond.get("reason"), cond.get("message")),
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


def _pods(core: CoreAPI, name: str, namespace: str) -> list[Any]:
    """The TrainJob's pods (kubernetes.client V1Pod objects), by name."""
    pods = core.list_namespaced_pod(namespace, label_selector=f"{POD_LABEL}={name}")
    return sorted(pods.items, key=lambda p: p.metadata.name)


def pod_logs(core: CoreAPI, name: str, namespace: str, tail_lines: int = 50) -> dict[str, str]:
    """Log tails of the TrainJob's pods (the `node` container), keyed by pod name."""
    logs: dict[str, str] = {}
    for pod in _pods(core, name, namespace):
        try:
            logs[pod.metadata.name] = core.read_namespaced_pod_log(
                pod.metadata.name, namespace, container=RUNTIME_JOB_NAME, tail_lines=tail_lines
            )
        except Exception as err:  # a pod that never started has no log: say so, keep going
            logs[pod.metadata.name] = f"<no log: {err}>"
    return logs


def _why_pending(pod: Any) -> str:
    """Why a pod has not started: its phase, why it is not scheduled (PodScheduled=False, e.g.
    Unschedulable) and what its containers wait for (e.g. ImagePullBackOff)."""
    status = pod.status
    if status is None:
        return "no status yet"
    parts = [status.phase or "no phase"]
    for cond in status.conditions or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            parts.append(f"not scheduled: {_reason_text(cond.reason, cond.message)}")
    for container in status.container_statuses or []:
        waiting = container.state.waiting if container.state else None
        if waiting is not None:
            parts.append(
                f"container {container.name} waiting: "
                f"{_reason_text(waiting.reason, waiting.message)}"
            )
    return "; ".join(parts)


def _why_not_started(job: dict[str, Any], pods: list[Any]) -> str:
    conditions = [
        f"{c.get('type')}={c.get('status')} ({_reason_text(c.get('reason'), c.get('message'))})"
        for c in (job.get("status") or {}).get("conditions") or []
        if c.get("status") != "True"
    ]
    pending = [f"{pod.metadata.name}: {_why_pending(pod)}" for pod in pods]
    return (
        f"conditions not True: {'; '.join(conditions) or 'none'}\n"
        f"pods: {'; '.join(pending) or 'none created'}"
    )


def _sleep_unless_stopped(seconds: float, stopped: list[int], sleep, clock) -> None:
    """Sleep `seconds`, in steps of at most 1 s so that a SIGTERM is acted on within a second:
    a pod being deleted has its grace period (30 s by default) to clean up."""
    end = clock() + seconds
    while not stopped and (left := end - clock()) > 0:
        sleep(min(left, 1.0))


def launch_and_wait(
    trainjob: dict[str, Any],
    api: CustomObjectsAPI | None = None,
    core_api: CoreAPI | None = None,
    timeout_s: float = 7 * 24 * 3600.0,
    poll_s: float = 30.0,
    start_timeout_s: float | None = 3600.0,
    *,
    sleep=time.sleep,
    clock=time.monotonic,
) -> TrainJobOutcome:
    """Create the TrainJob (if it already exists, as for a retried pipeline step: follow it, or
    replace it if it failed) and wait for its Complete or Failed condition.

    On failure or timeout raises `TrainJobFailed` with the condition message and the log tail of
    every pod. A job that has not started within `start_timeout_s` (not counting the time it is
    suspended) is deleted, and `TrainJobFailed` says why its pods are pending. On SIGTERM (the
    pipeline run terminated, this pod deleted) the TrainJob is deleted and `TrainingStopped`
    raised. `api`/`core_api` default to the kubernetes client (in-cluster config, else kubeconfig).
    """
    if api is None or core_api is None:
        default_api, default_core = _default_apis()
        api, core_api = api or default_api, core_api or default_core
    name, namespace = trainjob["metadata"]["name"], trainjob["metadata"]["namespace"]
    stopped: list[int] = []  # the SIGTERM handler only records it: the loop below acts on it

    def record_sigterm(signum: int, frame: FrameType | None) -> None:
        stopped.append(signum)

    with handling_sigterm(record_sigterm) as handled:
        if not handled:
            log.warning("not on the main thread: a SIGTERM would leave TrainJob %s/%s running",
                        namespace, name)  # fmt: skip
        try:
            api.create_namespaced_custom_object(*_where(namespace), trainjob)
            log.info("created TrainJob %s/%s", namespace, name)
        except Exception as err:
            if getattr(err, "status", None) != 409:  # kubernetes.client.ApiException: AlreadyExists
                raise
            # A retried pipeline step: follow the job the first attempt created, or replace it if
            # it failed (its JobSet restarts used up), so that the retry trains again.
            _follow_or_replace(api, trainjob, timeout_s, poll_s, sleep, clock)
        start = clock()
        started = False
        pending_since: float | None = start  # the start deadline's clock; None while suspended
        state: Literal["Complete", "Failed", "TimedOut", "NotStarted"]
        while True:
            if stopped:
                _delete_trainjob(api, name, namespace)
                log.warning("SIGTERM: deleted TrainJob %s/%s", namespace, name)
                raise TrainingStopped(
                    f"SIGTERM: this step was stopped (the run terminated or its pod deleted) and "
                    f"TrainJob {namespace}/{name} was deleted; its pods write a checkpoint within "
                    "their termination grace period, and a retry of this step resumes from its "
                    "checkpoints"
                )
            job = api.get_namespaced_custom_object(*_where(namespace), name)
            cond = _terminal_condition(job)
            now = clock()
            elapsed = now - start
            if cond is not None:
                state = "Complete" if cond["type"] == "Complete" else "Failed"
                message = _reason_text(cond.get("reason"), cond.get("message"))
                break
            if elapsed >= timeout_s:
                state, message = (
                    "TimedOut",
                    f"no Complete/Failed condition after {timeout_s:.0f}s; the job is still there "
                    f"(kubectl -n {namespace} delete trainjob {name} to stop it)",
                )
                break
            started = started or _has_started(job)
            if not started and start_timeout_s is not None:
                if (job.get("spec") or {}).get("suspend"):
                    pending_since = None  # queued (by Kueue): the start clock waits too
                elif pending_since is None:
                    pending_since = now
                elif now - pending_since >= start_timeout_s:
                    state = "NotStarted"
                    message = (
                        f"no pod ready or finished after {start_timeout_s:.0f}s; the TrainJob "
                        f"was deleted (it never trained)\n"
                        f"{_why_not_started(job, _pods(core_api, name, namespace))}"
                    )
                    break
            _sleep_unless_stopped(poll_s, stopped, sleep, clock)
    logs = pod_logs(core_api, name, namespace)
    if state == "NotStarted":
        _delete_trainjob(api, name, namespace)
        log.warning("TrainJob %s/%s did not start: deleted it", namespace, name)
    outcome = TrainJobOutcome(
        name=name, namespace=namespace, state=state, message=message, seconds=elapsed, logs=logs
    )
    if state != "Complete":
        what = {"Failed": "failed", "TimedOut": "timed out", "NotStarted": "did not start"}[state]
        hint = (
            "fix the cause and run the step again, or raise cluster.distributed.start_timeout_s "
            "if the cluster needs longer to provide the nodes"
            if state == "NotStarted"
            else f"inspect with: kubectl -n {namespace} describe trainjob {name}"
        )
        tails = "\n".join(f"--- {pod} ---\n{text}" for pod, text in logs.items()) or "<no pods>"
        raise TrainJobFailed(
            f"TrainJob {namespace}/{name} {what}: {message or 'no message'}\n"
            f"pod logs (tail):\n{tails}\n{hint}",
            outcome,
        )
    log.info("TrainJob %s/%s complete after %.0fs", namespace, name, elapsed)
    return outcome
