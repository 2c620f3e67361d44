"""The pipeline as Kubernetes resources for KFP's Kubernetes-native API mode: a
`pipelines.kubeflow.org` Pipeline and PipelineVersion, from one deployment's config (the
`lumos-pipeline-config` ConfigMap of its kustomization).

    python -m lumos.k8s.pipeline_resources   # base/pipeline-config.yaml ->
                                             #   overlays/kubernetes-native/pipeline.yaml

Only KFP installed in Kubernetes-native mode (API server flag --pipelinesStore=kubernetes) reads
these custom resources; in its default (database) mode, standalone or multi-user, `lumos deploy`
registers the pipeline through the API instead (lumos.deploy.kfp_api), and the recurring run in
both modes: a ScheduledWorkflow applied with kubectl never runs (see lumos.deploy.kfp_api).

The ConfigMap's `data.preset` and `data["overrides.yaml"]` resolve to the config exactly as
`lumos config show --preset P --config overrides.yaml` does; the pipeline is compiled from it
(images, GPUs, node selectors, tolerations and the pretrain TrainJob are baked in, and the config
is the `config_json` default). A compiled KFP YAML holds the pipeline spec, and a second document
with the platform spec when `kfp.kubernetes` settings are used; the PipelineVersion carries both
(`pipelineSpec`, `platformSpec`). Its name is `lumos deploy`'s version name for the same config.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lumos.configs.k8s import VERSION, check_dns_label
from lumos.errors import LumosError
from lumos.k8s.crd_validation import validate_custom_resource

if TYPE_CHECKING:
    from lumos.config import PipelineConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG_MAP = REPO_ROOT / "manifests" / "base" / "pipeline-config.yaml"
DEFAULT_OUT = REPO_ROOT / "manifests" / "overlays" / "kubernetes-native" / "pipeline.yaml"
CONFIG_MAP_NAME = "lumos-pipeline-config"
CONFIG_MAP_KEYS = ("preset", "overrides.yaml")


class PipelineResourceError(LumosError, ValueError):
    """The compiled pipeline cannot be turned into resources."""


def version_name(name: str, version: str, compiled: bytes) -> str:
    """`<name>-v<version>-<8 hex digits of the compiled file's sha256>`, a DNS label: KFP keeps a
    PipelineVersion's spec immutable, so a changed pipeline or config is a new version and the
    same one keeps its name (`lumos deploy` names the versions it uploads the same way)."""
    digest = hashlib.sha256(compiled).hexdigest()[:8]
    return check_dns_label(
        re.sub(r"[^a-z0-9-]", "-", f"{name}-v{version}-{digest}".lower()), "version"
    )


def load_compiled_pipeline(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """(pipeline spec, platform spec or None, the file's text) of a KFP-compiled YAML."""
    if not path.is_file():
        raise PipelineResourceError(
            f"compiled pipeline {path} not found: compile the pipeline first "
            "(kfp.compiler.Compiler().compile(pipeline, package_path=...))"
        )
    text = path.read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    if not docs or "pipelineInfo" not in docs[0] or "root" not in docs[0]:
        raise PipelineResourceError(f"{path} is not a compiled KFP pipeline (no pipelineInfo/root)")
    platform = docs[1] if len(docs) > 1 else None
    if platform is not None and "platforms" not in platform:
        raise PipelineResourceError(f"{path}: the second document is not a KFP platform spec")
    return docs[0], platform, text


def render_pipeline_resources(
    compiled_pipeline_yaml: Path,
    name: str = "lumos",
    version: str = VERSION,
    *,
    namespace: str = "lumos",
) -> list[dict[str, Any]]:
    """[Pipeline, PipelineVersion] for the compiled pipeline, each validated."""
    spec, platform, text = load_compiled_pipeline(Path(compiled_pipeline_yaml))
    check_dns_label(name, "pipeline name")
    info = spec["pipelineInfo"]
    description = info.get("description") or f"{name} pipeline"
    labels = {"app.kubernetes.io/part-of": "lumos", "app.kubernetes.io/version": version}
    pipeline = {
        "apiVersion": "pipelines.kubeflow.org/v2beta1",
        "kind": "Pipeline",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "displayName": info.get("displayName") or info["name"],
            "description": description,
        },
    }
    version_spec: dict[str, Any] = {
        "pipelineName": name,
        "displayName": f"{name} {version}",
        "description": description,
        "pipelineSpec": spec,
    }
    if platform is not None:
        version_spec["platformSpec"] = platform
    pipeline_version = {
        "apiVersion": "pipelines.kubeflow.org/v2beta1",
        "kind": "PipelineVersion",
        "metadata": {
            "name": version_name(name, version, text.encode()),
            "namespace": namespace,
            "labels": labels,
        },
        "spec": version_spec,
    }
    resources = [pipeline, pipeline_version]
    for resource in resources:
        validate_custom_resource(resource)
    return resources


def load_config_map(path: Path, overrides: list[str] | None = None) -> PipelineConfig:
    """The config of a `lumos-pipeline-config` ConfigMap file: `data["overrides.yaml"]` on
    `data.preset`, as `lumos config show --preset P --config overrides.yaml` resolves it, then
    `overrides` (`key.path=value`, like --set). An overlay's ConfigMap file is a strategic-merge
    patch that replaces each data key it names; it is read alone, so it must name both."""
    from lumos.config import ConfigError, load_config

    if not path.is_file():
        raise PipelineResourceError(f"ConfigMap file {path} not found")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if (
        len(docs) != 1
        or docs[0].get("kind") != "ConfigMap"
        or docs[0].get("metadata", {}).get("name") != CONFIG_MAP_NAME
    ):
        raise PipelineResourceError(f"{path} must hold one ConfigMap named {CONFIG_MAP_NAME}")
    data = docs[0].get("data") or {}
    missing = [key for key in CONFIG_MAP_KEYS if not isinstance(data.get(key), str)]
    if missing:
        raise PipelineResourceError(
            f"{path}: data lacks {missing}: give both data.preset and data['overrides.yaml'] "
            "(an overlay's ConfigMap replaces each data key it names, and its file is read alone)"
        )
    try:
        return load_config(
            preset=data["preset"],
            overrides=overrides,
            config_text=(f"{path} data['overrides.yaml']", data["overrides.yaml"]),
        )
    except ConfigError as err:
        raise PipelineResourceError(f"{path}: {err}") from None


def render_from_config_map(
    config_map: Path, name: str = "lumos", version: str = VERSION, *, namespace: str = "lumos"
) -> list[dict[str, Any]]:
    """[Pipeline, PipelineVersion] of the pipeline compiled from a ConfigMap file's config."""
    from pipelines.lumos_pipeline import compile_pipeline  # the KFP wiring (imports kfp)

    cfg = load_config_map(config_map)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_pipeline(cfg, Path(tmp) / f"{name}.yaml")
        return render_pipeline_resources(compiled, name, version, namespace=namespace)


def _shown(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def write_resources(resources: list[dict[str, Any]], out: Path, config_map: Path) -> None:
    header = (
        f"# Generated by `python -m lumos.k8s.pipeline_resources` from {_shown(config_map)}:\n"
        "# do not edit; edit the ConfigMap and run `make compile`.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump_all(resources, sort_keys=False, width=100))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-map",
        type=Path,
        default=DEFAULT_CONFIG_MAP,
        help="the kustomization's lumos-pipeline-config ConfigMap file: the pipeline's config",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="lumos")
    parser.add_argument("--version", default=metadata.version("lumos"), help="the project's")
    parser.add_argument("--namespace", default="lumos")
    args = parser.parse_args(argv)
    try:
        resources = render_from_config_map(
            args.config_map, args.name, args.version, namespace=args.namespace
        )
    except PipelineResourceError as err:
        raise SystemExit(f"error: {err}") from None
    write_resources(resources, args.out, args.config_map)
    print(f"wrote {len(resources)} resources to {args.out}")


if __name__ == "__main__":
    main()
