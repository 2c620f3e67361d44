"""`kubectl kustomize` renders the base and the overlay offline, and every rendered resource
validates: core kinds strictly for Kubernetes 1.32, custom resources against ../shared/crds.
The manifests also agree with the code that uses them (names, runtime, secret keys, RBAC)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lumos.config import PipelineConfig, load_config, validate_config
from lumos.configs.k8s import DistributedConfig
from lumos.configs.serving import PromoteConfig
from lumos.k8s.crd_validation import validate_resource, validate_resources
from lumos.k8s.pipeline_resources import (
    RETRAINING_OVERRIDES,
    load_config_map,
    main,
    render_from_config_map,
    render_overlay_patch,
    write_overlay_patch,
    write_resources,
)
from lumos.k8s.resources import S3_SECRET_KEYS, S3_SECRET_OPTIONAL_KEYS
from lumos.k8s.trainjob import render_trainjob

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"
BASE_CONFIG_MAP = Path("base") / "pipeline-config.yaml"
BASE_PIPELINE = Path("base") / "pipeline.yaml"
OVERLAY = Path("overlays") / "gpu-cluster"
OVERLAY_CONFIG_MAP = OVERLAY / "pipeline-config.yaml"
OVERLAY_PATCH = OVERLAY / "pipeline-patch" / "kustomization.yaml"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifests as checked in; when the pipeline resources have not been generated yet, a
    copy with them generated from the ConfigMaps (what `make compile` does)."""
    if (MANIFESTS / BASE_PIPELINE).exists() and (MANIFESTS / OVERLAY_PATCH).exists():
        return MANIFESTS
    copy = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, copy)
    base_config_map, overlay_config_map = copy / BASE_CONFIG_MAP, copy / OVERLAY_CONFIG_MAP
    write_resources(render_from_config_map(base_config_map), copy / BASE_PIPELINE, base_config_map)
    component = render_overlay_patch(overlay_config_map, copy / BASE_PIPELINE)
    write_overlay_patch(component, copy / OVERLAY_PATCH, overlay_config_map, copy / BASE_PIPELINE)
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
                     "ServingRuntime", "TrainingRuntime", "PodMonitor", "Pipeline",
                     "PipelineVersion", "ScheduledWorkflow", "Deployment", "Service"}  # fmt: skip
    assert "Secret" not in kinds, "credentials must not be part of the kustomization"
    assert all(r["metadata"].get("namespace") == "lumos" for r in base if r["kind"] != "Namespace")


def test_overlay_renders_and_validates(manifests: Path, crds_dir: Path) -> None:
    overlay = kustomize(manifests / "overlays" / "gpu-cluster")
    validate_resources(overlay, crds_dir)
    runtime = by_kind(overlay, "TrainingRuntime")["torch-distributed"]
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "spec"
    ]
    assert pod["containers"][0]["image"].startswith("registry.example.com/")
    assert pod["containers"][0]["volumeMounts"], (
        "the JSON patch must keep the rest of the container"
    )
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    [swf] = by_kind(overlay, "ScheduledWorkflow").values()
    assert len(swf["spec"]["trigger"]["cronSchedule"]["cron"].split()) == 6


def test_example_secret_has_the_keys_storage_reads() -> None:
    secret = yaml.safe_load((MANIFESTS / "base" / "s3-secret.example.yaml").read_text())
    validate_resource(secret)
    assert set(secret["stringData"]) == set(S3_SECRET_KEYS) | set(S3_SECRET_OPTIONAL_KEYS)
    assert "serving.kserve.io/s3-endpoint" in secret["metadata"]["annotations"]
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
    account = by_kind(base, "ServiceAccount")[cfg.service_account]
    assert {"name": "lumos-s3"} in account["secrets"]


def test_serving_runtime_args_are_server_args(base: list[dict]) -> None:
    pytest.importorskip("kserve")
    from lumos.serving.server import build_parser

    [runtime] = by_kind(base, "ServingRuntime").values()
    [container] = runtime["spec"]["containers"]
    args = build_parser().parse_args(container["args"])
    assert args.export_uri == "/mnt/models" and args.http_port == 8080


def test_role_grants_what_the_pipeline_does(base: list[dict]) -> None:
    [role] = by_kind(base, "Role").values()
    [binding] = by_kind(base, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == "lumos-pipeline"

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
                   for r in role["rules"])  # fmt: skip

    assert allowed("trainer.kubeflow.org", "trainjobs", "create")  # launch_and_wait
    assert allowed("trainer.kubeflow.org", "trainjobs", "get")
    assert allowed("", "pods", "list") and allowed("", "pods/log", "get")
    assert allowed("serving.kserve.io", "inferenceservices", "create")  # deploy a promotion
    assert allowed("serving.kserve.io", "inferenceservices", "patch")


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


def _config_json(value: str) -> PipelineConfig:
    return validate_config(json.loads(value))


def test_generated_pipeline_manifest_is_current() -> None:
    """base/pipeline.yaml is what `make compile` renders from the base's ConfigMap."""
    checked_in = MANIFESTS / BASE_PIPELINE
    assert checked_in.exists(), "run `make compile` to generate manifests/base/pipeline.yaml"
    docs = [d for d in yaml.safe_load_all(checked_in.read_text()) if d]
    version = docs[0]["metadata"]["labels"]["app.kubernetes.io/version"]
    expected = render_from_config_map(
        MANIFESTS / BASE_CONFIG_MAP, docs[0]["metadata"]["name"], version
    )
    assert docs == expected, "stale: edit the ConfigMap, then run `make compile`"
    scheduled = _config_json(docs[2]["spec"]["workflow"]["parameters"][0]["value"])
    assert scheduled == load_config_map(MANIFESTS / BASE_CONFIG_MAP, RETRAINING_OVERRIDES)
    assert scheduled.ingest.incremental is True


def test_generated_overlay_patch_is_current(tmp_path: Path) -> None:
    """The overlay's pipeline-patch/ is what `make compile` renders from its ConfigMap."""
    checked_in = MANIFESTS / OVERLAY_PATCH
    assert checked_in.exists(), f"run `make compile` to generate manifests/{OVERLAY_PATCH}"
    fresh = tmp_path / "kustomization.yaml"
    main(["--config-map", str(MANIFESTS / OVERLAY_CONFIG_MAP),
          "--as-patch-of", str(MANIFESTS / BASE_PIPELINE), "--out", str(fresh)])  # fmt: skip
    assert fresh.read_text() == checked_in.read_text(), (
        f"manifests/{OVERLAY_PATCH} is stale: run `make compile`"
    )
    kustomization = yaml.safe_load((MANIFESTS / OVERLAY / "kustomization.yaml").read_text())
    assert OVERLAY_PATCH.parent.name in kustomization.get("components", [])


def test_overlay_pipeline_runs_the_overlays_config(manifests: Path, crds_dir: Path) -> None:
    """What `kubectl apply -k` creates for the overlay: the scheduled runs' config, the pipeline's
    images and GPU settings and its default config are the overlay ConfigMap's (as rendered)."""
    overlay = kustomize(manifests / OVERLAY)
    validate_resources(overlay, crds_dir)
    [config_map] = by_kind(overlay, "ConfigMap").values()
    data = config_map["data"]
    cfg = load_config(preset=data["preset"], config_text=("overlay", data["overrides.yaml"]))
    assert cfg.cluster.image != load_config_map(manifests / BASE_CONFIG_MAP).cluster.image

    [schedule] = by_kind(overlay, "ScheduledWorkflow").values()
    [parameter] = schedule["spec"]["workflow"]["parameters"]
    scheduled = _config_json(parameter["value"])
    assert cfg.cluster.distributed is not None and scheduled.cluster.distributed is not None
    assert scheduled.cluster.image == cfg.cluster.image
    assert scheduled.cluster.distributed.num_nodes == cfg.cluster.distributed.num_nodes
    assert scheduled.promote.registry_uri == cfg.promote.registry_uri
    assert scheduled.ingest.incremental is True
    assert scheduled.model_copy(update={"ingest": cfg.ingest}) == cfg  # nothing else differs

    [version] = by_kind(overlay, "PipelineVersion").values()
    pipeline_spec = version["spec"]["pipelineSpec"]
    executors = pipeline_spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {cfg.cluster.image}
    finetune = executors["exec-finetune"]["container"]["resources"]["accelerator"]
    assert int(finetune["resourceCount"]) == cfg.cluster.gpus_per_step
    platform = version["spec"]["platformSpec"]["platforms"]["kubernetes"]["deploymentSpec"]
    node_selector = platform["executors"]["exec-finetune"]["nodeSelector"]["labels"]
    assert node_selector == cfg.cluster.gpu_node_selector
    inputs = pipeline_spec["root"]["inputDefinitions"]["parameters"]
    assert _config_json(inputs["config_json"]["defaultValue"]) == cfg
    # the schedule runs this same pipeline, with the overlay's cron
    assert next(yaml.safe_load_all(schedule["spec"]["workflow"]["spec"])) == pipeline_spec
    assert schedule["spec"]["pipelineName"] == version["metadata"]["name"]
    assert schedule["spec"]["trigger"]["cronSchedule"]["cron"] == "0 0 2 * * *"

    # TrainJobs set their image from the config; the runtime's is the default for others
    runtime = by_kind(overlay, "TrainingRuntime")["torch-distributed"]
    pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["image"] == cfg.cluster.distributed.image
