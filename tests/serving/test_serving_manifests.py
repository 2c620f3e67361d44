"""The serving manifests (manifests/base) against the CRDs and against what the code does: the
PodMonitor selects the pods of the InferenceServices promote renders, the ServingRuntime mounts
the encoder cache where lumos.encoders looks for it, and its probes name real endpoints
(test_fuzz checks them on a running server)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lumos.configs.serving import PromoteConfig
from lumos.k8s.crd_validation import validate_resource
from lumos.serving.promote import render_inference_service

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE = REPO_ROOT / "manifests" / "base"
# KServe labels every predictor pod with this (constants.KServiceComponentLabel = "component").
KSERVE_POD_LABELS = {"component": "predictor"}


@pytest.fixture(scope="module")
def crds_dir() -> Path:
    path = Path(os.environ.get("LUMOS_CRDS_DIR") or REPO_ROOT.parent / "shared" / "crds")
    if not path.is_dir():
        pytest.skip(f"CRD directory {path} not found (set LUMOS_CRDS_DIR)")
    return path


def load(name: str) -> dict:
    return yaml.safe_load((BASE / name).read_text())


def serving_runtime_container() -> dict:
    [container] = load("serving-runtime.yaml")["spec"]["containers"]
    return container


def test_podmonitor_selects_the_predictor_pods(crds_dir: Path) -> None:
    monitor = load("serving-podmonitor.yaml")
    validate_resource(monitor, crds_dir)
    cfg = PromoteConfig()
    isvc = render_inference_service(cfg, "t2i", "s3://b/m", "v0001", "s3://b/r.json")
    pod_labels = {**isvc["metadata"]["labels"], **KSERVE_POD_LABELS}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), (selector, pod_labels)
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["portNumber"] == serving_runtime_container()["ports"][0]["containerPort"]


def test_serving_runtime_probes_cache_and_throughput(crds_dir: Path) -> None:
    runtime = load("serving-runtime.yaml")
    validate_resource(runtime, crds_dir)
    container = serving_runtime_container()
    startup = container["startupProbe"]
    # Long enough for the weights download and the first sample: at least 20 minutes.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 20 * 60
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    env = {e["name"]: e.get("value") for e in container["env"]}
    [mount] = container["volumeMounts"]
    assert env["LUMOS_CACHE_DIR"].startswith(mount["mountPath"] + "/")
    [volume] = runtime["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    claim = load("serving-cache.yaml")
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    kustomization = load("kustomization.yaml")["resources"]
    assert {"serving-cache.yaml", "serving-podmonitor.yaml"} <= set(kustomization)


def test_inference_service_carries_the_throughput_settings(crds_dir: Path) -> None:
    cfg = PromoteConfig(container_concurrency=24, scale_target=12, max_batch_size=12)
    isvc = render_inference_service(cfg, "t2i", "s3://b/m", "v0001", "s3://b/r.json")
    validate_resource(isvc, crds_dir)
    predictor = isvc["spec"]["predictor"]
    assert (predictor["containerConcurrency"], predictor["scaleMetric"],
            predictor["scaleTarget"]) == (24, "concurrency", 12)  # fmt: skip
    assert "--max_batch_size=12" in predictor["model"]["args"]
    # The server parses exactly these arguments.
    from lumos.serving.server import build_parser

    args, unknown = build_parser().parse_known_args(
        ["--export_uri", "/mnt/models", *predictor["model"]["args"]]
    )
    assert unknown == [] and args.max_batch_size == 12 and args.max_queue == cfg.max_queue
