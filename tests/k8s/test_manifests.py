"""`kubectl kustomize` renders the base and the overlay offline, and every rendered resource
validates: core kinds strictly for Kubernetes 1.32, custom resources against ../shared/crds.
The manifests also agree with the code that uses them (names, runtime, secret keys, RBAC)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lumos.config import load_config
from lumos.configs.k8s import DistributedConfig
from lumos.configs.serving import PromoteConfig
from lumos.k8s.crd_validation import validate_resource, validate_resources
from lumos.k8s.pipeline_resources import render_from_config_map, write_resources
from lumos.k8s.resources import S3_SECRET_KEYS, S3_SECRET_OPTIONAL_KEYS
from lumos.k8s.trainjob import render_trainjob

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"
BASE_CONFIG_MAP = Path("base") / "pipeline-config.yaml"
# Pipeline / PipelineVersion resources, for KFP's Kubernetes-native API mode only
NATIVE_PIPELINE = Path("overlays") / "kubernetes-native" / "pipeline.yaml"
OVERLAY = Path("overlays") / "gpu-cluster"
OVERLAY_CONFIG_MAP = OVERLAY / "pipeline-config.yaml"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifests as checked in; when the Kubernetes-native overlay's pipeline resources have
    not been generated yet, a copy with them generated from the base's ConfigMap (`make compile`)."""
    if (MANIFESTS / NATIVE_PIPELINE).exists():
        return MANIFESTS
    copy = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, copy)
    base_config_map = copy / BASE_CONFIG_MAP
    write_resources(
        render_from_config_map(base_config_map), copy / NATIVE_PIPELINE, base_config_map
    )
    return copy


def kustomize(directory: Path) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    proc = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.fixture(scope="module")
def base(manifests: Path) -> list[dict]:
    return kustomize(manifests / "base")


def by_kind(resources: list[dict], kind: str) -> dict[str, dict]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def test_base_renders_and_validates(base: list[dict], crds_dir: Path) -> None:
    validate_resources(base, crds_dir)
    kinds = {r["kind"] for r in base}
    assert kinds >= {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                     "ServingRuntime", "TrainingRuntime", "PodMonitor", "Job", "CronJob",
                     "Deployment", "Service"}  # fmt: skip
    # KFP's API registers the pipeline and its recurring run (the lumos-deploy Job): a
    # ScheduledWorkflow applied with kubectl would never run (lumos.deploy.kfp_api)
    assert not kinds & {"Pipeline", "PipelineVersion", "ScheduledWorkflow"}
    assert "Secret" not in kinds, "credentials must not be part of the kustomization"
    assert all(r["metadata"].get("namespace") == "lumos" for r in base if r["kind"] != "Namespace")


OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())


def test_every_overlay_is_tested() -> None:
    assert set(OVERLAYS) >= {"gpu-cluster", "standalone-kfp", "kubeflow-multi-user"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_renders_and_validates(manifests: Path, crds_dir: Path, overlay: str) -> None:
    """Offline: `kubectl kustomize`, core kinds strictly, custom resources against the CRDs."""
    rendered = kustomize(manifests / "overlays" / overlay)
    validate_resources(rendered, crds_dir)
    namespaces = {r["metadata"].get("namespace") for r in rendered if r["kind"] != "Namespace"}
    assert len(namespaces) == 1, namespaces
    # RoleBinding subjects name accounts in the namespace the overlay installs into
    for binding in by_kind(rendered, "RoleBinding").values():
        assert {s["namespace"] for s in binding["subjects"]} == namespaces


def test_standalone_kfp_overlay(manifests: Path) -> None:
    """Standalone KFP runs pipelines in its own namespace with its pipeline-runner account; its
    default (database) API mode has no Pipeline/PipelineVersion CRDs, and its namespace is
    KFP's (not created or relabelled here); kfp-launcher and mlpipeline-minio-artifact ship with
    KFP there."""
    rendered = kustomize(manifests / "overlays" / "standalone-kfp")
    assert {r["metadata"]["namespace"] for r in rendered} == {"kubeflow"}
    kinds = {r["kind"] for r in rendered}
    assert "Namespace" not in kinds and not kinds & {"Pipeline", "PipelineVersion"}
    [binding] = by_kind(rendered, "RoleBinding").values()
    assert {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "kubeflow"} in (
        binding["subjects"]
    )
    assert {"TrainingRuntime", "ServingRuntime", "Deployment", "NetworkPolicy"} <= kinds


def test_multi_user_overlay_targets_the_profile_namespace(manifests: Path) -> None:
    """Multi-user Kubeflow: everything in the Profile's namespace (the Profile, an example file,
    creates it; KFP's profile controller puts kfp-launcher and the artifact secret there), the
    TrainJob and Pushgateway pods without Istio sidecars."""
    directory = manifests / "overlays" / "kubeflow-multi-user"
    rendered = kustomize(directory)
    profile = yaml.safe_load((directory / "profile.example.yaml").read_text())
    assert profile["kind"] == "Profile" and profile["spec"]["owner"]["kind"] == "User"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert "profile.example.yaml" not in kustomization["resources"]
    assert {r["metadata"]["namespace"] for r in rendered} == {profile["metadata"]["name"]}
    kinds = {r["kind"] for r in rendered}
    assert "Namespace" not in kinds and not kinds & {"Pipeline", "PipelineVersion"}
    role = by_kind(rendered, "Role")["lumos-pipeline-runner"]
    names = {n for rule in role["rules"] for n in rule.get("resourceNames", [])}
    assert {"kfp-launcher", "mlpipeline-minio-artifact"} <= names
    runtime = by_kind(rendered, "TrainingRuntime")["torch-distributed"]
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert node["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    gateway = by_kind(rendered, "Deployment")["lumos-pushgateway"]
    assert gateway["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"


# What each kfp.Client method the deploy code calls asks of KFP's API server in multi-user mode
# (kubeflow/pipelines backend/src/apiserver/server/*_server.go: resourceAttributes of the
# SubjectAccessReview; create_experiment looks the experiment up by name first).
KFP_CLIENT_AUTHZ = {
    "list_pipelines": {("pipelines", "list")},
    "list_pipeline_versions": {("pipelines", "list")},
    "upload_pipeline": {("pipelines", "create")},
    "upload_pipeline_version": {("pipelines", "create"), ("pipelines", "get")},
    "create_experiment": {("experiments", "list"), ("experiments", "get"),
                          ("experiments", "create")},
    "list_recurring_runs": {("jobs", "list")},
    "create_recurring_run": {("jobs", "create")},
    "delete_recurring_run": {("jobs", "delete")},
    "get_recurring_run": {("jobs", "get")},
    "run_pipeline": {("runs", "create")},
    "list_runs": {("runs", "list")},
    "get_run": {("runs", "get")},
}  # fmt: skip


def test_multi_user_deployer_may_call_what_deploy_calls(manifests: Path) -> None:
    """The lumos-deployer account may make, in its Profile namespace, every KFP API call of
    lumos.deploy, and nothing else."""
    calls = set()
    for path in (REPO_ROOT / "src" / "lumos" / "deploy").glob("*.py"):
        calls |= set(re.findall(r"client\.([a-z_]+)\(", path.read_text()))
    unknown = calls - set(KFP_CLIENT_AUTHZ)
    assert not unknown, f"kfp.Client methods new to this test: {unknown}"
    needed = {("pipelines.kubeflow.org", *rv) for call in calls for rv in KFP_CLIENT_AUTHZ[call]}
    rendered = kustomize(manifests / "overlays" / "kubeflow-multi-user")
    role = by_kind(rendered, "Role")["lumos-deployer-kfp"]
    binding = by_kind(rendered, "RoleBinding")["lumos-deployer-kfp"]
    assert binding["roleRef"]["name"] == "lumos-deployer-kfp"
    assert [s["name"] for s in binding["subjects"]] == ["lumos-deployer"]
    assert "lumos-deployer" in by_kind(rendered, "ServiceAccount")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert granted == needed, (granted - needed, needed - granted)


def test_gpu_overlay_patches_keep_the_rest(manifests: Path) -> None:
    overlay = kustomize(manifests / "overlays" / "gpu-cluster")
    runtime = by_kind(overlay, "TrainingRuntime")["torch-distributed"]
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "spec"
    ]
    assert pod["containers"][0]["image"].startswith("registry.example.com/")
    assert pod["containers"][0]["volumeMounts"], (
        "the JSON patch must keep the rest of the container"
    )
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_example_secrets_have_the_keys_storage_reads() -> None:
    """A read-write key for the pipeline and training, a read-only one for serving."""
    docs = yaml.safe_load_all((MANIFESTS / "base" / "s3-secret.example.yaml").read_text())
    secrets = {d["metadata"]["name"]: d for d in docs if d}
    assert set(secrets) == {"lumos-s3", "lumos-s3-readonly"}
    for secret in secrets.values():
        validate_resource(secret)
        assert set(secret["stringData"]) == set(S3_SECRET_KEYS) | set(S3_SECRET_OPTIONAL_KEYS)
    readonly = secrets["lumos-s3-readonly"]
    assert "serving.kserve.io/s3-endpoint" in readonly["metadata"]["annotations"]
    assert (
        readonly["stringData"]["AWS_ACCESS_KEY_ID"]
        != secrets["lumos-s3"]["stringData"]["AWS_ACCESS_KEY_ID"]
    )
    kustomization = yaml.safe_load((MANIFESTS / "base" / "kustomization.yaml").read_text())
    assert "s3-secret.example.yaml" not in kustomization["resources"]


def test_trainjob_runtime_exists_in_base(base: list[dict], crds_dir: Path) -> None:
    cfg = DistributedConfig()
    job = render_trainjob(cfg, ["lumos", "pretrain"], "pretrain")
    runtime = by_kind(base, cfg.runtime_kind)[cfg.runtime_ref]
    replicated = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    patched = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    assert {j["name"] for j in patched["replicatedJobs"]} <= {j["name"] for j in replicated}
    containers = replicated[0]["template"]["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["node"]  # torchrun's PET_* envs go to `node`
    # A preempted node (which checkpointed on SIGTERM) restarts the JobSet, which resumes.
    assert runtime["spec"]["template"]["spec"]["failurePolicy"] == {"maxRestarts": 3}


def test_serving_runtime_and_account_match_promotion(base: list[dict]) -> None:
    cfg = PromoteConfig()
    runtime = by_kind(base, "ServingRuntime")[cfg.runtime]
    assert cfg.model_format in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    # Serving reads the models with the read-only key only: the storage initializer through the
    # account's secrets, the predictor through the runtime's env.
    account = by_kind(base, "ServiceAccount")[cfg.service_account]
    assert account["secrets"] == [{"name": "lumos-s3-readonly"}]
    assert account["automountServiceAccountToken"] is False
    [container] = runtime["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "lumos-s3-readonly"}}]


def test_serving_runtime_args_are_server_args(base: list[dict]) -> None:
    pytest.importorskip("kserve")
    from lumos.serving.server import build_parser

    [runtime] = by_kind(base, "ServingRuntime").values()
    [container] = runtime["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.export_uri == "/mnt/models" and args.http_port == 8080


# What KFP runs in every step's pod besides our code, with the pipeline's account: Argo's executor
# reports outputs as WorkflowTaskResults; KFP's launcher reads its ConfigMap and the artifact
# store's secret (kubeflow/pipelines backend/src/v2: config.FetchLauncherConfigMap, objectstore).
KFP_EXECUTOR_NEEDS = {
    ("argoproj.io", "workflowtaskresults", "create", None),
    ("argoproj.io", "workflowtaskresults", "patch", None),
    ("", "configmaps", "get", "kfp-launcher"),
    ("", "secrets", "get", "mlpipeline-minio-artifact"),
}
_CALL = re.compile(r"\.(create|get|read|delete|patch|replace|list|apply)_namespaced_(\w+?)\(")
# A server-side apply is a PATCH, and a create when the object does not exist yet.
_VERBS = {"create": ["create"], "get": ["get"], "read": ["get"], "delete": ["delete"],
          "patch": ["patch"], "replace": ["update"], "list": ["list"],
          "apply": ["patch", "create"]}  # fmt: skip
_CORE = {"pod": "pods", "pod_log": "pods/log", "config_map": "configmaps", "secret": "secrets",
         "event": "events", "service": "services"}  # fmt: skip
_CUSTOM = {"trainjobs": "trainer.kubeflow.org", "trainingruntimes": "trainer.kubeflow.org",
           "inferenceservices": "serving.kserve.io"}  # fmt: skip


def kubernetes_api_calls() -> set[tuple[str, str, str, None]]:
    """(API group, resource, verb) of every Kubernetes API call in src/lumos (the kubernetes
    client's `<verb>_namespaced_<kind>` methods); a custom-object call counts for the plurals
    its module names."""
    calls = set()
    for path in (REPO_ROOT / "src" / "lumos").rglob("*.py"):
        text = path.read_text()
        plurals = [p for p in _CUSTOM if f'"{p}"' in text]
        for verb, kind in _CALL.findall(text):
            if kind == "custom_object":
                assert plurals, f"{path}: a custom-object call on a plural this test does not know"
                calls |= {(_CUSTOM[p], p, v, None) for p in plurals for v in _VERBS[verb]}
            else:
                assert kind in _CORE, f"{path}: {verb}_namespaced_{kind} is new to this test"
                calls |= {("", _CORE[kind], v, None) for v in _VERBS[verb]}
    return calls


def test_role_grants_only_what_the_code_calls(base: list[dict]) -> None:
    """The pipeline's Role is exactly the API calls in the code plus what KFP's executor needs:
    a verb the code never uses is not granted, and a new call fails here until the Role has it."""
    [role] = by_kind(base, "Role").values()
    [binding] = by_kind(base, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [s["name"] for s in binding["subjects"]] == ["lumos-pipeline"]
    granted = {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }
    calls = kubernetes_api_calls()
    assert ("trainer.kubeflow.org", "trainjobs", "create", None) in calls  # the scan works
    assert granted == calls | KFP_EXECUTOR_NEEDS


def test_training_and_serving_accounts_have_no_api_token(base: list[dict]) -> None:
    """Training and the predictor never call the Kubernetes API: their accounts mount no token
    and no RoleBinding names them (a training pod cannot create TrainJobs)."""
    accounts = by_kind(base, "ServiceAccount")
    bound = {s["name"] for b in by_kind(base, "RoleBinding").values() for s in b["subjects"]}
    for name in ("lumos-trainer", "lumos-serving"):
        assert accounts[name]["automountServiceAccountToken"] is False
        assert name not in bound
    runtime = by_kind(base, "TrainingRuntime")["torch-distributed"]
    node = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert node["spec"]["serviceAccountName"] == "lumos-trainer"
    job = render_trainjob(DistributedConfig(), ["lumos", "pretrain"], "pretrain")
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    pod = patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "lumos-trainer"


@pytest.mark.parametrize("where", ["base", "overlays/gpu-cluster"])
def test_pipeline_config_overrides_are_a_valid_config(manifests: Path, where: str) -> None:
    from lumos.config import deep_merge, preset_overrides, validate_config

    [configmap] = [d for d in kustomize(manifests / where) if d["kind"] == "ConfigMap"]
    overrides = yaml.safe_load(configmap["data"]["overrides.yaml"])
    validate_config(overrides)  # on the defaults
    try:
        preset = preset_overrides(configmap["data"]["preset"])
    except (OSError, ValueError) as err:  # the presets are another part's files
        pytest.skip(f"preset {configmap['data']['preset']!r} not loadable yet: {err}")
    validate_config(deep_merge(preset, overrides))


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
def test_kubernetes_native_pipeline_is_current(manifests: Path, crds_dir: Path) -> None:
    """overlays/kubernetes-native/pipeline.yaml is what `make compile` renders from the base's
    ConfigMap, and that overlay adds exactly those resources to the base."""
    checked_in = MANIFESTS / NATIVE_PIPELINE
    assert checked_in.exists(), f"run `make compile` to generate manifests/{NATIVE_PIPELINE}"
    docs = [d for d in yaml.safe_load_all(checked_in.read_text()) if d]
    version = docs[0]["metadata"]["labels"]["app.kubernetes.io/version"]
    expected = render_from_config_map(
        MANIFESTS / BASE_CONFIG_MAP, docs[0]["metadata"]["name"], version
    )
    assert docs == expected, "stale: edit the ConfigMap, then run `make compile`"
    native = kustomize(manifests / NATIVE_PIPELINE.parent)
    validate_resources(native, crds_dir)
    assert {r["kind"] for r in native} - {r["kind"] for r in kustomize(manifests / "base")} == {
        "Pipeline",
        "PipelineVersion",
    }


def _mounted(config_map: dict, directory: Path) -> Path:
    """The ConfigMap as a pod sees it mounted: one file per data key."""
    directory.mkdir(parents=True)
    for key, value in config_map["data"].items():
        (directory / key).write_text(value)
    return directory


@pytest.mark.parametrize(
    "where",
    ["base", "overlays/gpu-cluster", "overlays/standalone-kfp", "overlays/kubeflow-multi-user"],
)
def test_deploy_job_and_trigger_read_the_mounted_config(
    manifests: Path, where: str, tmp_path: Path
) -> None:
    """The lumos-deploy Job and the lumos-trigger CronJob run the CLI on the ConfigMap mounted at
    /etc/lumos; what they read there is the deployment the ConfigMap's file describes."""
    from lumos.cli import build_parser
    from lumos.deploy.commands import cmd_deploy, cmd_trigger
    from lumos.deploy.config import load_deployment

    rendered = kustomize(manifests / where)
    [config_map] = by_kind(rendered, "ConfigMap").values()
    job = by_kind(rendered, "Job")["lumos-deploy"]["spec"]["template"]["spec"]
    cron = by_kind(rendered, "CronJob")["lumos-trigger"]["spec"]["jobTemplate"]["spec"]
    for pod, func in ((job, cmd_deploy), (cron["template"]["spec"], cmd_trigger)):
        [container] = pod["containers"]
        assert container["command"][0] == "lumos"
        args = build_parser().parse_args(container["command"][1:])
        assert args.func is func
        mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        config_volume = next(n for n, p in mount.items() if p == args.config_dir)
        assert volumes[config_volume]["configMap"]["name"] == config_map["metadata"]["name"]
        # multi-user KFP authenticates the projected token kfp.Client reads from this path
        token = volumes[next(n for n, p in mount.items() if p.endswith("kubeflow/pipelines"))]
        [source] = token["projected"]["sources"]
        assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
        assert pod["automountServiceAccountToken"] is False
    assert cron["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "lumos-s3-readonly"}}
    ]
    mounted = load_deployment(config_dir=_mounted(config_map, tmp_path / "etc-lumos"))
    data = config_map["data"]
    cfg = load_config(preset=data["preset"], config_text=("rendered", data["overrides.yaml"]))
    assert mounted.pipeline == cfg
    # Scheduled retraining needs the real sources and the datasets that persist across runs.
    assert cfg.data.images_uri.startswith("s3://") and cfg.data.datasets_root.startswith("s3://")
    assert mounted.deploy.recurring_run is not None
    # Multi-user KFP files the pipeline and its runs in a namespace, the Profile's (ours); a
    # standalone KFP in its own
    multi_user = where.endswith("multi-user")
    assert mounted.deploy.namespace == (config_map["metadata"]["namespace"] if multi_user else "")


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
def test_gpu_overlay_deploys_its_own_config(manifests: Path, tmp_path: Path) -> None:
    """What the overlay's lumos-deploy Job registers: the pipeline compiled from the overlay's
    ConfigMap (its images, node pool and default config), on the overlay's schedule (weekly: an
    XL run takes days)."""
    from lumos.deploy.config import load_deployment
    from lumos.deploy.kfp_api import compile_for_deployment
    from pipelines.lumos_pipeline import compiled_config

    overlay = kustomize(manifests / OVERLAY)
    [config_map] = by_kind(overlay, "ConfigMap").values()
    deployment = load_deployment(config_dir=_mounted(config_map, tmp_path / "etc-lumos"))
    cfg = deployment.pipeline
    base = load_deployment(config_map=manifests / BASE_CONFIG_MAP).pipeline
    assert cfg.cluster.image != base.cluster.image
    assert deployment.deploy.recurring_run is not None
    assert deployment.deploy.recurring_run.cron.split()[5] != "*"  # a day of the week: weekly

    path, version = compile_for_deployment(cfg, tmp_path, "lumos")
    pipeline_spec, platform = list(yaml.safe_load_all(path.read_text()))
    executors = pipeline_spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {cfg.cluster.image}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-finetune"]["nodeSelector"]["labels"] == cfg.cluster.gpu_node_selector
    assert compiled_config(pipeline_spec) == cfg
    inputs = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["images_uri"]["defaultValue"] == cfg.data.images_uri  # the run form's default
    assert version.startswith("lumos-v")

    # TrainJobs set their image from the config; the runtime's is the default for others
    runtime = by_kind(overlay, "TrainingRuntime")["torch-distributed"]
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["image"] == cfg.cluster.distributed.image
