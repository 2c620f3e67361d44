"""The compiled pipeline as Kubernetes resources, for KFP's Kubernetes-native API mode
(`pipelines.kubeflow.org` Pipeline / PipelineVersion) plus a `ScheduledWorkflow` for retraining.

    python -m lumos.k8s.pipeline_resources        # pipelines/lumos_pipeline.yaml -> manifests/base/pipeline.yaml

A compiled KFP YAML holds the pipeline spec, and a second document with the platform spec when
`kfp.kubernetes` settings are used (secrets, GPUs, node selectors). The PipelineVersion carries both
(`pipelineSpec`, `platformSpec`); the ScheduledWorkflow carries the compiled YAML as a string in
`spec.workflow.spec`, which is how the KFP API server itself stores a recurring run.
KFP cron schedules have six fields, seconds first: "0 0 3 * * 0" is Sundays at 03:00:00.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
from pathlib import Path
from typing import Any

import yaml

from lumos.k8s.crd_validation import validate_custom_resource
from lumos.k8s.resources import check_dns_label

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_COMPILED = REPO_ROOT / "pipelines" / "lumos_pipeline.yaml"
DEFAULT_OUT = REPO_ROOT / "manifests" / "base" / "pipeline.yaml"
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
    version_name = check_dns_label(
        re.sub(r"[^a-z0-9-]", "-", f"{name}-v{version}".lower()), "version"
    )
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


def write_resources(resources: list[dict[str, Any]], out: Path) -> None:
    header = (
        "# Generated by `python -m lumos.k8s.pipeline_resources` from pipelines/lumos_pipeline.yaml:\n"
        "# do not edit; recompile the pipeline and regenerate.\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + yaml.safe_dump_all(resources, sort_keys=False, width=100))


def retraining_parameters(compiled_pipeline_yaml: Path, preset: str = "xl") -> dict[str, Any]:
    """What a scheduled run passes: the preset's config with incremental ingest, so a retraining
    processes only the objects new since the last manifest. Empty for a pipeline that takes no
    `config_json` (a test pipeline)."""
    from lumos.config import load_config

    if not compiled_pipeline_yaml.is_file():
        return {}  # render_pipeline_resources reports the missing file
    spec = next(d for d in yaml.safe_load_all(compiled_pipeline_yaml.read_text()) if d)
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    if "config_json" not in declared:
        return {}
    cfg = load_config(preset=preset, overrides=["ingest.incremental=true"])
    return {"config_json": cfg.model_dump_json()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compiled", type=Path, default=DEFAULT_COMPILED)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--name", default="lumos")
    parser.add_argument("--version", default=metadata.version("lumos"), help="the project's")
    parser.add_argument("--namespace", default="lumos")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="6 fields, seconds first")
    parser.add_argument("--retrain-preset", default="xl", help="config of the scheduled runs")
    args = parser.parse_args(argv)
    try:
        resources = render_pipeline_resources(
            args.compiled,
            args.name,
            args.version,
            namespace=args.namespace,
            cron=args.cron,
            schedule_parameters=retraining_parameters(args.compiled, args.retrain_preset),
        )
    except PipelineResourceError as err:
        raise SystemExit(f"error: {err}") from None
    write_resources(resources, args.out)
    print(f"wrote {len(resources)} resources to {args.out}")


if __name__ == "__main__":
    main()
