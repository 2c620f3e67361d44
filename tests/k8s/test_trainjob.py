"""TrainJob rendering is validated against the real Trainer CRD. No Kubernetes cluster exists
here, so `launch_and_wait` runs against a fake API server object that walks a TrainJob through the
status conditions the Trainer controller sets; the polling, failure and log logic is real."""

from __future__ import annotations

import copy
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from lumos.config import NAME_MAX_LENGTH, ConfigError, validate_config
from lumos.configs.k8s import DistributedConfig, Toleration
from lumos.errors import LumosError
from lumos.k8s.crd_validation import ResourceValidationError, validate_resource
from lumos.k8s.trainjob import POD_LABEL, TrainJobFailed, launch_and_wait, render_trainjob
from lumos.pipeline import steps
from lumos.training.stopping import TrainingStopped

COMMAND = ["lumos", "pretrain", "--config", "/etc/lumos/config.yaml"]


def test_render_default_is_valid_and_complete(crds_dir: Path) -> None:
    cfg = DistributedConfig(num_nodes=4, gpus_per_node=8, env={"NCCL_DEBUG": "WARN"})
    job = render_trainjob(cfg, COMMAND, "lumos-pretrain-42")
    validate_resource(job, crds_dir)
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                  "name": "torch-distributed"}  # fmt: skip
    trainer = spec["trainer"]
    # Trainer runs trainer.command verbatim, with the PET_* variables that torchrun reads
    # (kubeflow/trainer pkg/runtime/framework/plugins/torch/torch.go): the launcher is ours.
    assert trainer["command"] == ["torchrun", "--no-python", *COMMAND]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    # Guaranteed QoS: CPU and memory limited to what is requested.
    assert (
        trainer["resourcesPerNode"]["limits"]["cpu"]
        == trainer["resourcesPerNode"]["requests"]["cpu"]
    )
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
    assert trainer["resourcesPerNode"]["requests"]["nvidia.com/gpu"] == "8"
    env = {e["name"]: e for e in trainer["env"]}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "lumos-s3", "key": "AWS_ACCESS_KEY_ID"}  # fmt: skip
    assert env["LUMOS_S3_REGION"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["NCCL_DEBUG"] == {"name": "NCCL_DEBUG", "value": "WARN"}
    assert env["LUMOS_EXPECTED_WORLD"] == {"name": "LUMOS_EXPECTED_WORLD", "value": "4x8"}
    assert "ACCELERATE_USE_CPU" not in env  # GPU nodes
    [patch] = spec["runtimePatches"]
    [job_patch] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert job_patch["name"] == "node"
    pod = job_patch["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    # A token-less identity (training never calls the API) under the Restricted profile.
    assert pod["serviceAccountName"] == "lumos-trainer"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]  # fmt: skip
    # Node-local disk for the memory-mapped features, where lumos.features.cache looks for it.
    assert pod["volumes"] == [{"name": "feature-cache", "emptyDir": {"sizeLimit": "500Gi"}}]
    [container] = pod["containers"]
    assert container["name"] == "node"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    [mount] = container["volumeMounts"]
    assert env["LUMOS_FEATURE_CACHE"]["value"] == mount["mountPath"]
    # After SIGTERM a pod has 10 minutes to checkpoint (lumos.training.stopping); torchrun
    # waits as long for its workers, less 10 s.
    assert pod["terminationGracePeriodSeconds"] == 600
    assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == {
        "name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "590"}  # fmt: skip


def test_cpu_only_cluster_runtime_without_placement(crds_dir: Path) -> None:
    cfg = DistributedConfig(num_nodes=1, gpus_per_node=0, node_selector={}, tolerations=[],
                            runtime_kind="ClusterTrainingRuntime", env_secret=None,
                            active_deadline_s=3600)  # fmt: skip
    job = render_trainjob(cfg, ["lumos", "pretrain"], "cpu-run")
    [patch] = job["spec"]["runtimePatches"]
    [job_patch] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    pod = job_patch["template"]["spec"]["template"]["spec"]
    # Identity, security, the feature cache and the grace period only: no placement.
    assert sorted(pod) == [
        "containers", "securityContext", "serviceAccountName", "terminationGracePeriodSeconds",
        "volumes",
    ]  # fmt: skip
    env = job["spec"]["trainer"]["env"]
    assert env == [
        {"name": "LUMOS_FEATURE_CACHE", "value": "/var/cache/lumos-features"},
        {"name": "LUMOS_EXPECTED_WORLD", "value": "1x1"},
        # CPU nodes: accelerate joins torchrun's gloo world only when told to use the CPU.
        {"name": "ACCELERATE_USE_CPU", "value": "1"},
        {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "590"},
    ]
    assert job["spec"]["runtimeRef"]["kind"] == "ClusterTrainingRuntime"
    assert job["spec"]["trainer"]["numProcPerNode"] == 1
    assert "nvidia.com/gpu" not in job["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert job["spec"]["activeDeadlineSeconds"] == 3600


def test_bad_inputs_fail_loudly(crds_dir: Path) -> None:
    cfg = DistributedConfig()
    with pytest.raises(ValueError, match="DNS-1123"):
        render_trainjob(cfg, COMMAND, "Lumos_Pretrain")
    with pytest.raises(ValueError, match="start with a letter"):
        render_trainjob(cfg, COMMAND, "1-pretrain")
    with pytest.raises(ValueError, match="non-empty list"):
        render_trainjob(cfg, [], "pretrain")
    with pytest.raises(LumosError, match="puts torchrun --no-python in front of it"):
        render_trainjob(cfg, ["torchrun", *COMMAND], "pretrain")
    # The Trainer's webhook rejects a TrainJob whose trainer.env sets a PET_* variable
    # (TorchRunReservedEnvNames, kubeflow/trainer pkg/constants/constants.go).
    with pytest.raises(ValidationError, match="must not set PET_NNODES.*Kubeflow Trainer"):
        DistributedConfig(env={"PET_NNODES": "3"})
    with pytest.raises(ValidationError, match="must not set LUMOS_EXPECTED_WORLD"):
        DistributedConfig(env={"LUMOS_EXPECTED_WORLD": "3x1"})
    with pytest.raises(ValidationError, match="extra"):
        DistributedConfig(num_node=2)
    with pytest.raises(ValidationError, match="Kubernetes quantity"):
        DistributedConfig(memory="480 GB")
    with pytest.raises(ValidationError, match="Equal needs a value"):
        Toleration(key="k", operator="Equal")


def test_tampered_trainjob_fails_crd_validation(crds_dir: Path) -> None:
    job = render_trainjob(DistributedConfig(), COMMAND, "pretrain")
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["nodeSelector"] = {"a": "b"}  # not a trainer field: use runtimePatches
    with pytest.raises(ResourceValidationError, match=r"spec\.trainer: Additional properties"):
        validate_resource(bad, crds_dir)


def test_env_has_one_entry_per_name(crds_dir: Path) -> None:
    """trainer.env is a list-map keyed by name: a plain variable replaces the secret's of the same
    name, and a TrainJob with two entries of one name fails validation (the API server would
    refuse it)."""
    cfg = DistributedConfig(env={"AWS_ACCESS_KEY_ID": "minio", "NCCL_DEBUG": "INFO"})
    job = render_trainjob(cfg, COMMAND, "pretrain")
    validate_resource(job, crds_dir)
    env = job["spec"]["trainer"]["env"]
    names = [e["name"] for e in env]
    assert len(names) == len(set(names)), names
    by_name = {e["name"]: e for e in env}
    assert by_name["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "value": "minio"}
    assert "secretKeyRef" in by_name["AWS_SECRET_ACCESS_KEY"]["valueFrom"]  # the others stay

    duplicated = copy.deepcopy(job)
    duplicated["spec"]["trainer"]["env"].append({"name": "NCCL_DEBUG", "value": "WARN"})
    index = len(env)
    with pytest.raises(
        ResourceValidationError,
        match=rf"spec\.trainer\.env\[{index}\]: duplicate entry name='NCCL_DEBUG'",
    ):
        validate_resource(duplicated, crds_dir)


def test_feature_cache_env_cannot_be_overridden() -> None:
    """The cache volume is mounted at a fixed path: a LUMOS_FEATURE_CACHE elsewhere would cache
    the features outside it."""
    with pytest.raises(ValidationError, match="LUMOS_FEATURE_CACHE.*feature_cache_gib"):
        DistributedConfig(env={"LUMOS_FEATURE_CACHE": "/tmp/features"})


def test_trainjob_name_leaves_room_for_the_pod_names(crds_dir: Path) -> None:
    """The JobSet webhook refuses a pod name `<job>-node-0-<node>-xxxxx` over 63 characters:
    the name is checked for the last node's pod when the TrainJob is rendered."""
    cfg = DistributedConfig(num_nodes=100)
    render_trainjob(cfg, COMMAND, "a" * 47)  # a...a-node-0-99-xxxxx: 63 characters
    with pytest.raises(ValueError, match=r"'a{48}' is too long for 100 nodes.*at most 63"):
        render_trainjob(cfg, COMMAND, "a" * 48)
    render_trainjob(cfg.model_copy(update={"num_nodes": 10}), COMMAND, "a" * 48)


def test_pipeline_name_fits_the_pretrain_trainjob(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config name that would make the pretrain TrainJob's name invalid fails when the config
    is validated, not hours later at the pretrain step; the longest valid one renders for 100
    nodes through the real step."""
    for bad in ("1lumos", "a" * (NAME_MAX_LENGTH + 1)):
        with pytest.raises(ConfigError, match=f"name .*at most {NAME_MAX_LENGTH} characters"):
            validate_config({"name": bad})
    longest = "a" * NAME_MAX_LENGTH
    cfg = validate_config({"name": longest, "cluster": {"distributed": {"num_nodes": 100}}})

    class Launched(Exception):
        pass

    def launch(job: dict, **kw) -> None:
        raise Launched(job["metadata"]["name"])

    monkeypatch.setattr("lumos.k8s.trainjob.launch_and_wait", launch)
    features = SimpleNamespace(path="unused", metadata={"uri": "s3://lumos/datasets/images"})
    with pytest.raises(Launched) as info:
        steps.train_step(cfg.model_dump_json(), "i2i", "s3://lumos/runs/run-0123456789abcdef",
                         features, SimpleNamespace(path="unused", metadata={}))  # fmt: skip
    assert str(info.value) == f"{longest}-i2i-89abcdef"


class FakeTrainerAPI:
    """Stands in for the API server: returns the TrainJob with the next status on every get."""

    def __init__(self, statuses: list[dict]) -> None:
        self.statuses = statuses
        self.created: list[dict] = []
        self.deleted: list[tuple[str, str]] = []
        self.gets = 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
        assert (group, version, plural) == ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
        assert namespace == body["metadata"]["namespace"]
        self.created.append(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        status = self.statuses[min(self.gets, len(self.statuses) - 1)]
        self.gets += 1
        return {**self.created[-1], "status": status}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
        self.deleted.append((name, kw.get("propagation_policy")))


def pod_status(phase: str = "Running", unschedulable: str = "", image_pull: str = ""):
    """A pod's status as the kubernetes client returns it (attributes, not dicts)."""
    conditions = []
    if unschedulable:
        conditions.append(SimpleNamespace(type="PodScheduled", status="False",
                                          reason="Unschedulable", message=unschedulable))  # fmt: skip
    waiting = SimpleNamespace(reason="ImagePullBackOff", message=image_pull) if image_pull else None
    containers = [SimpleNamespace(name="node", state=SimpleNamespace(waiting=waiting))]
    return SimpleNamespace(phase=phase, conditions=conditions, container_statuses=containers)


class FakeCoreAPI:
    def __init__(self, logs: dict[str, str], statuses: dict | None = None) -> None:
        self.logs = logs
        self.statuses = statuses or {}
        self.selectors: list[str] = []

    def list_namespaced_pod(self, namespace, label_selector=None, **kw):
        self.selectors.append(label_selector)
        return SimpleNamespace(
            items=[
                SimpleNamespace(
                    metadata=SimpleNamespace(name=n), status=self.statuses.get(n, pod_status())
                )
                for n in self.logs
            ]
        )

    def read_namespaced_pod_log(self, name, namespace, container=None, tail_lines=None, **kw):
        if self.logs[name] is None:
            raise RuntimeError("container not started")
        return "\n".join(self.logs[name].splitlines()[-tail_lines:])


def cond(kind: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture()
def job() -> dict:
    return render_trainjob(DistributedConfig(num_nodes=2), COMMAND, "pretrain-7")


def test_wait_until_complete(job: dict) -> None:
    api = FakeTrainerAPI([{}, {"conditions": [cond("Created")]},
                          {"conditions": [cond("Created"), cond("Complete", reason="JobSetCompleted")]}])  # fmt: skip
    core = FakeCoreAPI({"pretrain-7-node-0-0": "step 1\nstep 2\ndone", "pretrain-7-node-0-1": "ok"})
    clock = FakeClock()
    outcome = launch_and_wait(
        job, api, core, timeout_s=600, poll_s=10, sleep=clock.sleep, clock=clock
    )
    assert api.created == [job] and api.gets == 3
    assert outcome.state == "Complete" and outcome.seconds == 20.0
    assert outcome.message == "JobSetCompleted"
    assert outcome.logs["pretrain-7-node-0-0"].endswith("done")
    assert core.selectors == [f"{POD_LABEL}=pretrain-7"]


def test_failure_raises_with_message_and_log_tail(job: dict) -> None:
    failed = cond("Failed", reason="JobSetFailed", message="node-0 exited with code 1")
    api = FakeTrainerAPI([{"conditions": [cond("Complete", status="False")]},
                          {"conditions": [failed]}])  # fmt: skip
    core = FakeCoreAPI({
        "pretrain-7-node-0-0": "\n".join(f"line {i}" for i in range(200)) + "\nCUDA out of memory",
        "pretrain-7-node-0-1": None,
    })  # fmt: skip
    clock = FakeClock()
    with pytest.raises(TrainJobFailed) as info:
        launch_and_wait(job, api, core, timeout_s=600, poll_s=5, sleep=clock.sleep, clock=clock)
    text = str(info.value)
    assert "lumos/pretrain-7 failed: JobSetFailed: node-0 exited with code 1" in text
    assert "CUDA out of memory" in text and "line 151" in text and "line 149" not in text
    assert "<no log: container not started>" in text
    assert info.value.outcome.state == "Failed"


def test_timeout(job: dict) -> None:
    api = FakeTrainerAPI([{"conditions": [cond("Created")]}])
    clock = FakeClock()
    with pytest.raises(TrainJobFailed, match="timed out: no Complete/Failed condition after 60s"):
        launch_and_wait(job, api, FakeCoreAPI({}), timeout_s=60, poll_s=15,
                        sleep=clock.sleep, clock=clock)  # fmt: skip
    assert api.gets == 5  # at 0, 15, 30, 45 and 60 s


def test_retried_step_follows_the_existing_job(job: dict) -> None:
    class AlreadyExists(Exception):
        status = 409  # what kubernetes.client.ApiException carries for AlreadyExists

    class RetriedAPI(FakeTrainerAPI):
        def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
            self.created.append(body)
            raise AlreadyExists()

    api = RetriedAPI([{"conditions": [cond("Complete")]}])
    clock = FakeClock()
    outcome = launch_and_wait(job, api, FakeCoreAPI({}), sleep=clock.sleep, clock=clock)
    assert outcome.state == "Complete"

    class Forbidden(Exception):
        status = 403

    class ForbiddenAPI(FakeTrainerAPI):
        def create_namespaced_custom_object(self, *args, **kw):
            raise Forbidden("trainjobs is forbidden")

    with pytest.raises(Forbidden):
        launch_and_wait(job, ForbiddenAPI([{}]), FakeCoreAPI({}), sleep=clock.sleep, clock=clock)


def test_retried_step_replaces_a_failed_job(job: dict) -> None:
    """The first attempt's TrainJob failed (its JobSet restarts used up): the retried step
    deletes it, waits until the name is free and creates it again, then follows the new job.
    One that has not failed is followed, never replaced."""

    class ApiError(Exception):
        def __init__(self, status: int) -> None:
            self.status = status

    class ExistingJobAPI(FakeTrainerAPI):
        """The API server holding a TrainJob of that name, in `state`: failed -> deleting
        (for two more gets) -> gone -> created; or complete."""

        def __init__(self, state: str) -> None:
            super().__init__([])
            self.state, self.deleted, self.deleting_gets = state, [], 0

        def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kw):
            if self.state != "gone":
                raise ApiError(409)  # AlreadyExists
            self.created.append(body)
            self.state = "complete"
            return body

        def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
            self.gets += 1
            if self.state == "deleting":  # the pods take two polls to go away
                self.deleting_gets += 1
                self.state = "deleting" if self.deleting_gets <= 2 else "gone"
            if self.state == "gone":
                raise ApiError(404)
            if self.state == "deleting":
                metadata = {**job["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}
                return {**job, "metadata": metadata, "status": {}}
            kind = "Complete" if self.state == "complete" else "Failed"
            return {**job, "status": {"conditions": [cond(kind, reason=f"JobSet{kind}")]}}

        def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kw):
            self.deleted.append((name, kw.get("propagation_policy")))
            self.state = "deleting"

    api = ExistingJobAPI("failed")
    clock = FakeClock()
    outcome = launch_and_wait(job, api, FakeCoreAPI({}), poll_s=5, sleep=clock.sleep, clock=clock)
    assert api.deleted == [("pretrain-7", "Foreground")]
    assert api.created == [job] and outcome.state == "Complete"
    assert clock.now == 10.0  # two polls of the deletion, then the new job

    complete = ExistingJobAPI("complete")
    outcome = launch_and_wait(job, complete, FakeCoreAPI({}), sleep=clock.sleep, clock=clock)
    assert outcome.state == "Complete" and complete.deleted == [] and complete.created == []

    # The previous attempt's job is being deleted (it did not start, or the step was stopped):
    # it is created again once the name is free, not followed until it vanishes.
    deleting = ExistingJobAPI("deleting")
    outcome = launch_and_wait(job, deleting, FakeCoreAPI({}), poll_s=5, sleep=clock.sleep,
                              clock=clock)  # fmt: skip
    assert outcome.state == "Complete" and deleting.deleted == [] and deleting.created == [job]


def jobs_status(ready: int = 0) -> list[dict]:
    return [{"name": "node", "active": 2, "ready": ready, "succeeded": 0, "failed": 0,
             "suspended": 0}]  # fmt: skip


def test_job_that_never_starts_is_deleted_with_the_reason(job: dict) -> None:
    """No pod of the job gets ready within start_timeout_s: the job (which never trained) is
    deleted and the error says why: its conditions that are not True and why each pod waits."""
    created_false = cond("Created", status="False", reason="JobsCreationFailed",
                         message="admission webhook denied the JobSet")  # fmt: skip
    api = FakeTrainerAPI([{"conditions": [created_false], "jobsStatus": jobs_status()}])
    core = FakeCoreAPI(
        {"pretrain-7-node-0-0": None, "pretrain-7-node-0-1": None},
        {"pretrain-7-node-0-0": pod_status("Pending", unschedulable="0/4 nodes are available: "
                                           "4 Insufficient nvidia.com/gpu."),
         "pretrain-7-node-0-1": pod_status("Pending", image_pull="Back-off pulling image "
                                           "ghcr.io/lumos-mlops/lumos-train:0.1.0")},
    )  # fmt: skip
    clock = FakeClock()
    with pytest.raises(TrainJobFailed) as info:
        launch_and_wait(job, api, core, timeout_s=7 * 24 * 3600, poll_s=60, start_timeout_s=600,
                        sleep=clock.sleep, clock=clock)  # fmt: skip
    assert info.value.outcome.state == "NotStarted"
    assert api.deleted == [("pretrain-7", "Background")]
    assert clock.now == 600.0
    text = str(info.value)
    assert "lumos/pretrain-7 did not start: no pod ready or finished after 600s" in text
    assert "Created=False (JobsCreationFailed: admission webhook denied the JobSet)" in text
    assert ("pretrain-7-node-0-0: Pending; not scheduled: Unschedulable: 0/4 nodes are "
            "available: 4 Insufficient nvidia.com/gpu.") in text  # fmt: skip
    assert ("pretrain-7-node-0-1: Pending; container node waiting: ImagePullBackOff: Back-off "
            "pulling image ghcr.io/lumos-mlops/lumos-train:0.1.0") in text  # fmt: skip
    assert "start_timeout_s" in text

    # None: no start deadline, the job is waited for up to timeout_s and left alone.
    api = FakeTrainerAPI([{"jobsStatus": jobs_status()}])
    with pytest.raises(TrainJobFailed, match="timed out"):
        launch_and_wait(job, api, core, timeout_s=3000, poll_s=60, start_timeout_s=None,
                        sleep=clock.sleep, clock=clock)  # fmt: skip
    assert api.deleted == []


def test_start_clock_waits_while_the_job_is_suspended(job: dict) -> None:
    """Queued by Kueue (spec.suspend) for longer than start_timeout_s, then started: not
    deleted. Once started, a long run is no concern of the start deadline."""

    class QueuedAPI(FakeTrainerAPI):
        def get_namespaced_custom_object(self, *args, **kw):
            got = super().get_namespaced_custom_object(*args, **kw)
            suspended = self.gets <= 4  # gets at 0, 50, 100 and 150 s
            return {**got, "spec": {**got["spec"], "suspend": suspended}}

    not_started = {"jobsStatus": jobs_status()}
    api = QueuedAPI([not_started] * 6 + [{"jobsStatus": jobs_status(ready=2)}] * 8
                    + [{"conditions": [cond("Complete")]}])  # fmt: skip
    clock = FakeClock()
    outcome = launch_and_wait(job, api, FakeCoreAPI({}), poll_s=50, start_timeout_s=100,
                              sleep=clock.sleep, clock=clock)  # fmt: skip
    # unsuspended at 200 s, still not started at 250 s (50 s < 100 s), ready at 300 s
    assert outcome.state == "Complete" and outcome.seconds == 700.0
    assert api.deleted == []


def test_sigterm_deletes_the_trainjob(job: dict) -> None:
    """A real SIGTERM while the step waits (the KFP run terminated, the step's pod deleted): the
    TrainJob is deleted within a poll (its pods then checkpoint in their grace period), the step
    fails with TrainingStopped and the previous SIGTERM handler is back."""
    received_by_previous: list[int] = []

    def previous(signum, frame) -> None:
        received_by_previous.append(signum)

    class SignallingClock(FakeClock):
        def sleep(self, seconds: float) -> None:
            super().sleep(seconds)
            if self.now == 61.0:  # one second into the third poll's sleep
                os.kill(os.getpid(), signal.SIGTERM)

    running = {"conditions": [cond("Created")], "jobsStatus": jobs_status(ready=2)}
    api = FakeTrainerAPI([running])
    clock = SignallingClock()
    original = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(TrainingStopped, match="TrainJob lumos/pretrain-7 was deleted.*retry"):
            launch_and_wait(job, api, FakeCoreAPI({}), timeout_s=600, poll_s=30,
                            sleep=clock.sleep, clock=clock)  # fmt: skip
        assert signal.getsignal(signal.SIGTERM) is previous
    finally:
        signal.signal(signal.SIGTERM, original)
    assert api.deleted == [("pretrain-7", "Background")]
    assert received_by_previous == []  # launch_and_wait handled it
    assert clock.now == 61.0 and api.gets == 3  # acted on at once, not after the 30 s sleep


def test_training_refuses_a_world_other_than_the_trainjobs() -> None:
    """lumos.training.world: the TrainJob's LUMOS_EXPECTED_WORLD against what torchrun set."""
    from lumos.training.world import WorldMismatch, check_launched_world

    check_launched_world({})  # not in a TrainJob: nothing to check
    job = render_trainjob(DistributedConfig(num_nodes=2, gpus_per_node=8), COMMAND, "pretrain")
    expected = {e["name"]: e["value"] for e in job["spec"]["trainer"]["env"] if "value" in e}
    env = {"LUMOS_EXPECTED_WORLD": expected["LUMOS_EXPECTED_WORLD"]}
    check_launched_world({**env, "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"})
    with pytest.raises(WorldMismatch, match="not started by torchrun"):
        check_launched_world(env)
    # numNodes edited to 4 after rendering: torchrun's world is 32
    with pytest.raises(WorldMismatch, match="2 nodes x 8 processes.*WORLD_SIZE=32"):
        check_launched_world({**env, "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8"})
    with pytest.raises(WorldMismatch, match="LOCAL_WORLD_SIZE=4"):  # numProcPerNode edited
        check_launched_world({**env, "WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(WorldMismatch, match="not NODESxPROCESSES"):
        check_launched_world({"LUMOS_EXPECTED_WORLD": "16"})
    assert issubclass(WorldMismatch, LumosError)
