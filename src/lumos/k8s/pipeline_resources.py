"""The pipeline as Kubernetes resources, for KFP's Kubernetes-native API mode
(`pipelines.kubeflow.org` Pipeline / PipelineVersion) plus a `ScheduledWorkflow` for retraining,
all from one deployment's config: the `lumos-pipeline-config` ConfigMap of its kustomization.

    python -m lumos.k8s.pipeline_resources        # base/pipeline-config.yaml -> base/pipeline.yaml
    python -m lumos.k8s.pipeline_resources --config-map overlays/X/pipeline-config.yaml \
        --as-patch-of manifests/base/pipeline.yaml --out overlays/X/pipeline-patch/kustomization.yaml

The ConfigMap's `data.preset` and `data["overrides.yaml"]` resolve to the config exactly as
`lumos config show --preset P --config overrides.yaml` does. The pipeline is compiled from that
config (step images, GPUs, node selectors, tolerations and the pretrain TrainJob are baked in at
compile time, and the config is the `config_json` default), and the ScheduledWorkflow runs it with
that config plus incremental ingest. An overlay cannot drop the base's resources, and a
strategic-merge patch of a custom resource merges maps (the base's stale keys would survive), so
for an overlay this writes a kustomize Component whose JSON patches replace each differing `spec`
wholesale.

A compiled KFP YAML holds the pipeline spec, and a second document with the platform spec when
`kfp.kubernetes` settings are used (secrets, GPUs, node selectors). The PipelineVersion carries both
(`pipelineSpec`, `platformSpec`); the ScheduledWorkflow carries the compiled YAML as a string in
`spec.workflow.spec`, which is how the KFP API server itself stores a recurring run.
KFP cron schedules have six fields, seconds first: "0 0 3 * * 0" is Sundays at 03:00:00.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lumos.configs.k8s import check_dns_label
from lumos.k8s.crd_validation import validate_custom_resource

if TYPE_CHECKING:
    from lumos.config import PipelineConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG_MAP = REPO_ROOT / "manifests" / "base" / "pipeline-config.yaml"
DEFAULT_OUT = REPO_ROOT / "manifests" / "base" / "pipeline.yaml"
CONFIG_MAP_NAME = "lumos-pipeline-config"
CONFIG_MAP_KEYS = ("preset", "overrides.yaml")
# A scheduled retraining processes only the objects new since the last manifest.
RETRAINING_OVERRIDES = ["ingest.incremental=true"]
DEFAULT_CRON = "0 0 3 * * 0"  # Sundays 03:00:00
_CRON_FIELD = re.compile(r"^[0-9*/,\-?A-Za-z]+$")


class PipelineResourceError(ValueError):
    """The compiled pipeline or the schedule cannot be turned into resources."""


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


def check_cron(cron: str) -> str:
    fields = cron.split()
    if len(fields) != 6 or not all(_CRON_FIELD.match(f) for f in fields):
        raise PipelineResourceError(
            f"cron {cron!r} must have 6 fields, seconds first (KFP schedules): e.g. '0 0 3 * * 0'"
        )
    return cron


def render_pipeline_resources(
    compiled_pipeline_yaml: Path,
    name: str = "lumos",
    version: str = "0.1.0",
    *,
    namespace: str = "lumos",
    cron: str = DEFAULT_CRON,
    service_account: str = "lumos-pipeline",
    schedule_parameters: dict[str, Any] | None = None,
    schedule_enabled: bool = True,
) -> list[dict[str, Any]]:
    """[Pipeline, PipelineVersion, ScheduledWorkflow] for the compiled pipeline, each validated."""
    spec, platform, text = load_compiled_pipeline(Path(compiled_pipeline_yaml))
    check_dns_label(name, "pipeline name")
    check_cron(cron)
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
    # KFP's webhook keeps a PipelineVersion's spec immutable: the name ends with a hash of it, so
    # a changed pipeline or config is applied as a new version instead of being refused.
    digest = hashlib.sha256(json.dumps(version_spec, sort_keys=True).encode()).hexdigest()[:8]
    version_name = check_dns_label(
        re.sub(r"[^a-z0-9-]", "-", f"{name}-v{version}-{digest}".lower()), "version"
    )
    pipeline_version = {
        "apiVersion": "pipelines.kubeflow.org/v2beta1",
        "kind": "PipelineVersion",
        "metadata": {"name": version_name, "namespace": namespace, "labels": labels},
        "spec": version_spec,
    }
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(schedule_parameters or {}) - set(declared))
    if unknown:
        raise PipelineResourceError(
            f"schedule parameters {unknown} are not inputs of the pipeline "
            f"(it takes: {', '.join(sorted(declared)) or 'none'})"
        )
    scheduled = {
        "apiVersion": "kubeflow.org/v1beta1",
        "kind": "ScheduledWorkflow",
        "metadata": {"name": f"{name}-retrain", "namespace": namespace, "labels": labels},
        "spec": {
            "enabled": schedule_enabled,
            "maxConcurrency": 1,  # promotions must not race (see lumos.serving.promote)
            "noCatchup": True,  # after downtime run once, not once per missed period
            "maxHistory": 10,
            "trigger": {"cronSchedule": {"cron": cron}},
            "pipelineName": version_name,
            "serviceAccount": service_account,
            "workflow": {
                "parameters": [
                    {"name": k, "value": json.dumps(v)}
                    for k, v in sorted((schedule_parameters or {}).items())
                ],
                "spec": text,
            },
        },
        "status": {},  # required by the CRD; the controller fills it
    }
    resources = [pipeline, pipeline_version, scheduled]
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
    config_map: Path,
    name: str = "lumos",
    version: str = "0.1.0",
    *,
    namespace: str = "lumos",
    cron: str = DEFAULT_CRON,
    service_account: str = "lumos-pipeline",
) -> list[dict[str, Any]]:
    """[Pipeline, PipelineVersion, ScheduledWorkflow] of the config a ConfigMap file holds: the
    pipeline compiled from that config, scheduled with it plus incremental ingest."""
    from pipelines.lumos_pipeline import compile_pipeline  # the KFP wiring (imports kfp)

    cfg = load_config_map(config_map)
    scheduled = load_config_map(config_map, RETRAINING_OVERRIDES)
    with tempfile.TemporaryDirectory() as tmp:
        compiled = compile_pipeline(cfg, Path(tmp) / "lumos_pipeline.yaml")
        return render_pipeline_resources(
            compiled,
            name,
            version,
            namespace=namespace,
            cron=cron,
            service_account=service_account,
            schedule_parameters={"config_json": scheduled.model_dump_json()},
        )


def load_resources(path: Path) -> list[dict[str, Any]]:
    """The [Pipeline, PipelineVersion, ScheduledWorkflow] of a file this module wrote."""
    if not path.is_file():
        raise PipelineResourceError(f"{path} not found: generate the base's resources first")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    if [d.get("kind") for d in docs] != ["Pipeline", "PipelineVersion", "ScheduledWorkflow"]:
        raise PipelineResourceError(
            f"{path} is not a file of this module (Pipeline, PipelineVersion, ScheduledWorkflow)"
        )
    return docs


def render_overlay_patch(config_map: Path, base_resources: Path) -> dict[str, Any]:
    """A kustomize Component for an overlay: JSON patches that replace the `spec` of each of the
    base's resources that differs from the one rendered from the overlay's ConfigMap file, whole
    (a strategic merge would keep the base's keys the overlay's pipeline lacks). Name, version,
    namespace, cron and service account are the base's."""
    base = load_resources(base_resources)
    pipeline, _, schedule = base
    rendered = render_from_config_map(
        config_map,
        pipeline["metadata"]["name"],
        pipeline["metadata"]["labels"]["app.kubernetes.io/version"],
        namespace=pipeline["metadata"]["namespace"],
        cron=schedule["spec"]["trigger"]["cronSchedule"]["cron"],
        service_account=schedule["spec"]["serviceAccount"],
    )
    patches = []
    for old, new in zip(base, rendered, strict=True):
        # Only a PipelineVersion's name differs: it ends with the hash of its spec.
        renamed = old["metadata"]["name"] != new["metadata"]["name"]
        unnamed = [{**meta, "name": None} for meta in (old["metadata"], new["metadata"])]
        if unnamed[0] != unnamed[1] or (renamed and new["kind"] != "PipelineVersion"):
            raise PipelineResourceError(
                f"{base_resources}: the {old['kind']}'s metadata is not what this module renders "
                "for its name and version: regenerate the base first"
            )
        if old["spec"] != new["spec"]:
            group, version = new["apiVersion"].split("/")
            target = {"group": group, "version": version, "kind": new["kind"]}
            target["name"] = old["metadata"]["name"]
            ops = [{"op": "replace", "path": "/spec", "value": new["spec"]}]
            if renamed:
                ops.append(
                    {"op": "replace", "path": "/metadata/name", "value": new["metadata"]["name"]}
                )
            patches.append({"target": target, "patch": yaml.safe_dump(ops, sort_keys=False)})
    return {
        "apiVersion": "kustomize.config.k8s.io/v1alpha1",
        "kind": "Component",
        "patches": patches,
    }


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


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the patches) as `|` blocks, so the file reads and diffs as YAML."""


def _literal(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _literal)


def write_overlay_patch(
    component: dict[str, Any], out: Path, config_map: Path, base_resources: Path
) -> None:
    header = (
        "# Generated by `python -m lumos.k8s.pipeline_resources\n"
        f"#   --config-map {_shown(config_map)}\n"
        f"#   --as-patch-of {_shown(base_resources)}`:\n"
        "# do not edit; edit the ConfigMap and run `make compile`. The pipeline resources of this\n"
        "# config replace the base's (their whole spec: a merge would keep the base's stale keys).\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.dump(component, Dumper=_LiteralDumper, sort_keys=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config-map",
        type=Path,
        default=DEFAULT_CONFIG_MAP,
        help="the kustomization's lumos-pipeline-config ConfigMap file: the pipeline's config",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--as-patch-of",
        type=Path,
        metavar="BASE_PIPELINE_YAML",
        help="write, for an overlay, a kustomize Component replacing these base resources' spec "
        "(name, version, namespace, cron and account are then the base's)",
    )
    parser.add_argument("--name", default="lumos")
    parser.add_argument("--version", default=metadata.version("lumos"), help="the project's")
    parser.add_argument("--namespace", default="lumos")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="6 fields, seconds first")
    args = parser.parse_args(argv)
    try:
        if args.as_patch_of is not None:
            component = render_overlay_patch(args.config_map, args.as_patch_of)
            write_overlay_patch(component, args.out, args.config_map, args.as_patch_of)
            print(f"wrote {len(component['patches'])} patches to {args.out}")
            return
        resources = render_from_config_map(
            args.config_map,
            args.name,
            args.version,
            namespace=args.namespace,
            cron=args.cron,
        )
    except PipelineResourceError as err:
        raise SystemExit(f"error: {err}") from None
    write_resources(resources, args.out, args.config_map)
    print(f"wrote {len(resources)} resources to {args.out}")


if __name__ == "__main__":
    main()
