"""Every pod Lumos renders meets the Restricted Pod Security profile and has CPU and memory
requests and limits: the pods of every kustomization (base and every overlay), the TrainJob's
node pods as Kubeflow Trainer builds them, and the pipeline's steps as far as KFP lets a
pipeline decide.

The check (tests/pod_security.py) is written from the Kubernetes Pod Security Standards; no API
server runs here to enforce it. The TrainJob's pods come from the Trainer stand-in
(tests/kubeflow_trainer.py, from kubeflow/trainer's trainingruntime.go and torch plugin). A KFP
step's pod is built as KFP 2.17's compiler builds an executor's (kubeflow/pipelines
backend/src/v2/compiler/argocompiler/security_context.go: the pod gets the RuntimeDefault
seccomp profile; the user container allowPrivilegeEscalation false, every capability dropped and
RuntimeDefault, and runAsNonRoot only if the pipeline sets it) from the compiled pipeline's
resources and its kfp-kubernetes platform config (whose securityContext KFP's driver puts on the
step's container: backend/src/v2/driver/k8s.go). KFP's own containers in that pod (its launcher
init container, Argo's executor) are KFP's to harden: its compiler gives them the full
Restricted context, which this test does not model.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from kubeflow_trainer import node_pods
from pod_security import pod_specs, restricted_violations

from lumos.config import load_config
from lumos.configs.k8s import DistributedConfig
from lumos.k8s.resources import quantity_value
from lumos.k8s.trainjob import render_trainjob

REPO_ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ["base"] + [
    f"overlays/{p.name}" for p in sorted((REPO_ROOT / "manifests" / "overlays").iterdir())
]


def kustomize(where: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    proc = subprocess.run(["kubectl", "kustomize", str(REPO_ROOT / "manifests" / where)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {where: kustomize(where) for where in KUSTOMIZATIONS}


def test_the_check_catches_each_control() -> None:
    """A compliant pod passes; each change a Restricted admission would refuse is reported."""
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "resources": {
                    "requests": {"cpu": "1", "memory": "1Gi"},
                    "limits": {"cpu": "1", "memory": "1Gi"},
                },
            }
        ],
        "volumes": [{"name": "v", "emptyDir": {}}],
    }
    assert restricted_violations(good) == []
    breaks = {
        "Host Namespaces": lambda p: p.update(hostNetwork=True),
        "HostPath Volumes": lambda p: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
        "Volume Types": lambda p: p["volumes"].append({"name": "n", "nfs": {"server": "x"}}),
        "Privileged Containers": lambda p: p["containers"][0]["securityContext"].update(
            privileged=True
        ),
        "Privilege Escalation": lambda p: p["containers"][0]["securityContext"].pop(
            "allowPrivilegeEscalation"
        ),
        "Running as Non-root:": lambda p: p["securityContext"].pop("runAsNonRoot"),
        "Running as Non-root user": lambda p: p["securityContext"].update(runAsUser=0),
        "Seccomp": lambda p: p["securityContext"].update(seccompProfile={"type": "Unconfined"}),
        "Capabilities": lambda p: p["containers"][0]["securityContext"]["capabilities"].update(
            add=["SYS_ADMIN"]
        ),
        "Host Ports": lambda p: p["containers"][0].update(ports=[{"hostPort": 80}]),
        "Sysctls": lambda p: p["securityContext"].update(sysctls=[{"name": "kernel.msgmax"}]),
        "Resources": lambda p: p["containers"][0]["resources"].pop("limits"),
        "Resources: containers[c] requests": lambda p: p["containers"][0]["resources"][
            "requests"
        ].update(cpu="2"),
    }
    for control, change in breaks.items():
        pod = copy.deepcopy(good)
        change(pod)
        assert any(v.startswith(control) for v in restricted_violations(pod)), control


@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_every_rendered_pod_is_restricted(rendered: dict[str, list[dict]], where: str) -> None:
    specs = [spec for obj in rendered[where] for spec in pod_specs(obj)]
    kinds = {name.split("/")[0] for name, _ in specs}
    assert {"Deployment", "Job", "CronJob", "ServingRuntime", "TrainingRuntime"} <= kinds, kinds
    for name, spec in specs:
        # A ServingRuntime's resources are defaults the InferenceService's override: the
        # predictor's are checked merged, below.
        full = not name.startswith("ServingRuntime/")
        assert restricted_violations(spec, require_resources=full) == [], name


def merged_predictor(runtime: dict, isvc: dict) -> dict:
    """The predictor pod's spec as KServe builds it (kserve/kserve pkg/controller/v1beta1/
    inferenceservice/utils/utils.go: MergeRuntimeContainers, a strategic merge of the
    InferenceService's model container into the runtime's, args appended; MergePodSpec)."""
    from kubeflow_trainer import strategic_merge

    predictor = isvc["spec"]["predictor"]
    [container] = runtime["spec"]["containers"]
    model = {k: v for k, v in predictor["model"].items() if k in ("resources", "env", "args")}
    merged = strategic_merge(container, {k: v for k, v in model.items() if k != "args"})
    merged["args"] = [*container.get("args", []), *model.get("args", [])]
    pod_fields = ("serviceAccountName", "nodeSelector", "tolerations", "securityContext")
    return {
        **{k: predictor[k] for k in pod_fields if k in predictor},
        "containers": [merged],
        "volumes": runtime["spec"].get("volumes", []),
    }


@pytest.mark.parametrize("preset", ["tiny", "xl"])
def test_predictor_pod_is_restricted_and_schedulable(
    rendered: dict[str, list[dict]], preset: str
) -> None:
    """The predictor container (our runtime's, with the InferenceService promotion renders)
    is Restricted, requests CPU and memory, is limited in memory, and no request exceeds its
    limit (the API server refuses such a pod). No CPU limit unless PromoteConfig sets one:
    CFS throttling would add latency to every request."""
    from lumos.serving.promote import render_inference_service

    cfg = load_config(preset=preset).promote.model_copy(update={"validate_manifest": False})
    isvc = render_inference_service(cfg, "t2i", "s3://b/m", "v1", "s3://b/r.json")
    [runtime] = [r for r in rendered["base"] if r["kind"] == "ServingRuntime"]
    pod = merged_predictor(runtime, isvc)
    violations = restricted_violations(pod, require_resources=False)
    assert violations == []
    resources = pod["containers"][0]["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    for key, limit in resources["limits"].items():
        request = resources["requests"].get(key, limit)
        assert quantity_value(str(request)) <= quantity_value(str(limit)), (key, request, limit)


@pytest.mark.parametrize("where", ["base", "overlays/gpu-cluster"])
def test_our_namespace_has_pod_security_labels(rendered: dict[str, list[dict]], where: str) -> None:
    """Baseline enforced (KServe's storage initializer and pre-2.17 KFP containers meet only
    that), Restricted audited and warned on: namespace.yaml says why."""
    [namespace] = [r for r in rendered[where] if r["kind"] == "Namespace"]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    for mode in ("audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_pushgateway_takes_traffic_only_from_the_namespace_and_prometheus(
    rendered: dict[str, list[dict]],
) -> None:
    [policy] = [r for r in rendered["base"] if r["kind"] == "NetworkPolicy"]
    gateway = next(r for r in rendered["base"] if r["kind"] == "Deployment")
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    # no peer that admits every pod of every namespace
    assert all(peer.get("podSelector") or "namespaceSelector" not in peer for peer in rule["from"])
    assert {"podSelector": {}} in rule["from"]  # this namespace's pods (the pushers)


@pytest.mark.parametrize("where", KUSTOMIZATIONS)
def test_trainjob_pods_are_restricted(rendered: dict[str, list[dict]], where: str) -> None:
    """The TrainJob's node pods, as the Trainer builds them from the runtime each kustomization
    installs and the TrainJob's runtime patch."""
    [runtime] = [r for r in rendered[where] if r["kind"] == "TrainingRuntime"]
    small = DistributedConfig(gpus_per_node=0, node_selector={}, cpu="2", memory="8Gi")
    for cfg in (DistributedConfig(), small):
        job = render_trainjob(cfg, ["lumos", "pretrain"], "pretrain")
        for pod in node_pods(job, runtime):
            assert restricted_violations(pod) == []
            assert pod["serviceAccountName"] == "lumos-trainer"


KFP_EXECUTOR_VOLUMES = ("kfp-launcher", "gcs-scratch", "s3-scratch", "minio-scratch",
                        "dot-local-scratch", "dot-cache-scratch", "dot-config-scratch")  # fmt: skip


def kfp_step_pods(compiled: Path) -> dict[str, dict]:
    """Each executor's pod as KFP 2.17 builds it (see the module docstring)."""
    spec, platform = list(yaml.safe_load_all(compiled.read_text()))[:2]
    platform_executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pods = {}
    for name, executor in spec["deploymentSpec"]["executors"].items():
        resources = executor["container"].get("resources") or {}
        settings = platform_executors.get(name) or {}
        security = {  # argocompiler: defaultUserContainerSecurityContext
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        for field in ("runAsUser", "runAsGroup", "runAsNonRoot"):  # kfp-kubernetes
            if field in (settings.get("securityContext") or {}):
                security[field] = settings["securityContext"][field]
        container = {
            "name": "main",
            "securityContext": security,
            "resources": {
                "requests": {"cpu": resources.get("cpuRequest"), "memory": resources.get("memoryRequest")},
                "limits": {"cpu": resources.get("cpuLimit"), "memory": resources.get("memoryLimit")},
            },
        }  # fmt: skip
        for kind in ("requests", "limits"):
            container["resources"][kind] = {
                k: v for k, v in container["resources"][kind].items() if v is not None
            }
        # argocompiler/container.go: the launcher's volume and the scratch directories
        volumes = [{"name": n, "emptyDir": {}} for n in KFP_EXECUTOR_VOLUMES]
        volumes += [
            {"name": v["volumeName"], "emptyDir": {}} for v in settings.get("emptyDirMounts", [])
        ]
        volumes += [
            {"name": s["secretName"], "secret": {}} for s in settings.get("secretAsVolume", [])
        ]
        pods[name] = {
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [container],
            "volumes": volumes,
        }
    return pods


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
@pytest.mark.parametrize("distributed", [False, True])
def test_pipeline_steps_are_restricted(tmp_path: Path, distributed: bool) -> None:
    """Every step of the compiled pipeline (xl preset, pretraining in a step or as a TrainJob) has
    requests and limits, and its pod meets the Restricted profile; GPUs per step follow the
    config: featurize, evaluate and export one, training gpus_per_step."""
    from pipelines.lumos_pipeline import compile_pipeline

    overrides = ["cluster.gpus_per_step=8", "cluster.steps.export.memory=96Gi"]
    overrides.append(
        "cluster.distributed={num_nodes: 2}" if distributed else "cluster.distributed=null"
    )
    cfg = load_config(preset="xl", overrides=overrides)
    compiled = compile_pipeline(cfg, tmp_path / "pipeline.yaml")
    pods = kfp_step_pods(compiled)
    spec = next(yaml.safe_load_all(compiled.read_text()))
    for name, pod in pods.items():
        assert restricted_violations(pod) == [], name
        accelerator = spec["deploymentSpec"]["executors"][name]["container"]["resources"].get(
            "accelerator"
        )
        gpus = int(accelerator["resourceCount"]) if accelerator else 0
        kind = name.removeprefix("exec-").rstrip("-0123456789")
        expected = {"featurize": 1, "featurize-partition": 1, "evaluate": 1, "export": 1,
                    "finetune": 8, "pretrain": 0 if distributed else 8}.get(kind, 0)  # fmt: skip
        assert gpus == expected, (name, gpus)
    export = spec["deploymentSpec"]["executors"]["exec-export"]["container"]["resources"]
    assert export["memoryRequest"] == export["memoryLimit"] == 96 * 2**30 / 1e9
