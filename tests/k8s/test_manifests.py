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

from lumos.k8s.crd_validation import validate_resource, validate_resources
from lumos.k8s.pipeline_resources import (
    render_pipeline_resources,
    retraining_parameters,
    write_resources,
)
from lumos.k8s.resources import S3_SECRET_KEYS, S3_SECRET_OPTIONAL_KEYS
from lumos.k8s.trainjob import DistributedConfig, render_trainjob
from lumos.serving.promote import PromoteConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = REPO_ROOT / "manifests"
COMPILED_PIPELINE = REPO_ROOT / "pipelines" / "lumos_pipeline.yaml"


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifests as checked in; when `base/pipeline.yaml` has not been generated yet, a copy
    with one generated from a pipeline compiled here (the real one when it exists)."""
    if (MANIFESTS / "base" / "pipeline.yaml").exists():
        return MANIFESTS
    copy = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, copy)
    compiled = COMPILED_PIPELINE
    if not compiled.exists():
        from test_pipeline_resources import compile_tiny

        compiled = compile_tiny(copy.parent / "tiny.yaml")
    write_resources(render_pipeline_resources(compiled), copy / "base" / "pipeline.yaml")
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


def test_generated_pipeline_manifest_is_current() -> None:
    checked_in = MANIFESTS / "base" / "pipeline.yaml"
    if not COMPILED_PIPELINE.exists() or not checked_in.exists():
        pytest.skip(
            "pipelines/lumos_pipeline.yaml or manifests/base/pipeline.yaml not generated yet"
        )
    docs = [d for d in yaml.safe_load_all(checked_in.read_text()) if d]
    version = docs[0]["metadata"]["labels"]["app.kubernetes.io/version"]
    expected = render_pipeline_resources(
        COMPILED_PIPELINE,
        docs[0]["metadata"]["name"],
        version,
        schedule_parameters=retraining_parameters(COMPILED_PIPELINE),
    )
    scheduled = json.loads(docs[2]["spec"]["workflow"]["parameters"][0]["value"])
    assert json.loads(scheduled)["ingest"]["incremental"] is True
    assert docs == expected, "stale: run `python -m lumos.k8s.pipeline_resources`"
