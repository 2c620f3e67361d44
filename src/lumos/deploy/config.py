"""A deployment's settings: where KFP is, and how the pipeline is scheduled and triggered.

    deployment = load_deployment(config_map="manifests/base/pipeline-config.yaml")
    deployment.pipeline        # the PipelineConfig: data.preset + data["overrides.yaml"]
    deployment.deploy.kfp_host # DeployConfig: data["deploy.yaml"] (optional; defaults below)

The three keys live in one ConfigMap, `lumos-pipeline-config`: kustomize renders it, the deploy
Job and the trigger CronJob mount it as files (`--config-dir /etc/lumos`), and `make compile` reads
its file (`--config-map FILE`). The pipeline's config is compile-time (it is baked into the
pipeline spec); the deployment settings are not, so changing the schedule uploads no new version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lumos.errors import LumosError

if TYPE_CHECKING:
    from lumos.config import PipelineConfig

DEPLOY_KEY = "deploy.yaml"
# robfig/cron as KFP's API server parses a schedule (backend/src/apiserver/server/api_converter.go
# toModelJob): six fields, seconds first.
_CRON_FIELD = re.compile(r"^[0-9*/,\-?A-Za-z]+$")


class DeployError(LumosError):
    """The deployment cannot be registered, scheduled or triggered as configured."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecurringRunConfig(Strict):
    """The scheduled retraining. It always runs with max concurrency 1 (promotions must not race)
    and no catch-up (after downtime it runs once, not once per missed period)."""

    name: str = Field("lumos-retrain", min_length=1, description="the recurring run's name")
    cron: str = Field(
        "0 0 3 * * 0",
        description="6 fields, seconds first (KFP's cron): '0 0 3 * * 0' is Sundays 03:00:00. "
        "Leave more time between runs than a run takes (docs/deploy.md)",
    )
    enabled: bool = True

    @field_validator("cron")
    @classmethod
    def _six_fields(cls, cron: str) -> str:
        fields = cron.split()
        if len(fields) != 6 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(
                f"cron {cron!r} must have 6 fields, seconds first (KFP schedules): e.g. "
                "'0 0 3 * * 0' for Sundays at 03:00:00"
            )
        return cron


class TriggerConfig(Strict):
    """`lumos trigger`: start a run when the sources hold at least this many new items."""

    min_new_items: int = Field(
        1000,
        ge=1,
        description="items (an image with its sidecars) in the sources that the datasets have "
        "not seen; fewer: no run",
    )
    run_name: str = Field("lumos-new-data", min_length=1, description="the runs' name prefix")


class DeployConfig(Strict):
    kfp_host: str = Field(
        "http://ml-pipeline.kubeflow:8888",
        description="the KFP API server (standalone KFP and Kubeflow: the ml-pipeline Service)",
    )
    namespace: str = Field(
        "",
        description="multi-user Kubeflow: the Profile namespace the pipeline and its runs belong "
        "to; standalone KFP: empty",
    )
    pipeline_name: str = Field("lumos", min_length=1)
    experiment: str = Field("lumos", min_length=1, description="the experiment runs are filed in")
    service_account: str = Field(
        "lumos-pipeline", min_length=1, description="the account the runs' pods use"
    )
    recurring_run: RecurringRunConfig | None = Field(
        default_factory=RecurringRunConfig,
        description="null: no scheduled retraining (an existing one is deleted)",
    )
    trigger: TriggerConfig = Field(default_factory=TriggerConfig)


@dataclass(frozen=True)
class Deployment:
    pipeline: PipelineConfig
    deploy: DeployConfig


def parse_deploy_config(text: str | None, source: str) -> DeployConfig:
    if not text:
        return DeployConfig()
    try:
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise DeployError(f"{source} must hold a mapping, got {type(data).__name__}")
        return DeployConfig.model_validate(data)
    except yaml.YAMLError as err:
        raise DeployError(f"{source} is not valid YAML: {err}") from None
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise DeployError(f"{source}: {problems}") from None


def load_deployment(
    config_map: str | Path | None = None, config_dir: str | Path | None = None
) -> Deployment:
    """The deployment of a `lumos-pipeline-config` ConfigMap: its file, or the directory where a
    pod mounts it (one file per data key)."""
    from lumos.config import ConfigError, load_config
    from lumos.k8s.pipeline_resources import PipelineResourceError, load_config_map

    if (config_map is None) == (config_dir is None):
        raise DeployError("give the ConfigMap file (--config-map) or its mounted directory")
    if config_map is not None:
        path = Path(config_map)
        try:
            pipeline = load_config_map(path)
        except PipelineResourceError as err:
            raise DeployError(str(err)) from None
        data = yaml.safe_load(path.read_text()).get("data") or {}
        return Deployment(
            pipeline=pipeline,
            deploy=parse_deploy_config(data.get(DEPLOY_KEY), f"{path} data['{DEPLOY_KEY}']"),
        )
    directory = Path(str(config_dir))
    files = {key: directory / key for key in ("preset", "overrides.yaml", DEPLOY_KEY)}
    missing = [key for key in ("preset", "overrides.yaml") if not files[key].is_file()]
    if missing:
        raise DeployError(
            f"{directory} lacks {missing}: mount the lumos-pipeline-config ConfigMap there"
        )
    try:
        pipeline = load_config(
            preset=files["preset"].read_text().strip(),
            config_text=(str(files["overrides.yaml"]), files["overrides.yaml"].read_text()),
        )
    except ConfigError as err:
        raise DeployError(f"{directory}: {err}") from None
    deploy_text = files[DEPLOY_KEY].read_text() if files[DEPLOY_KEY].is_file() else None
    return Deployment(
        pipeline=pipeline, deploy=parse_deploy_config(deploy_text, str(files[DEPLOY_KEY]))
    )
