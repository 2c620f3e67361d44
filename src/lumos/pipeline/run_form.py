"""The run form a KFP UI user fills in: typed pipeline parameters on top of the compiled config.

    form = RunForm(images_uri="s3://b/images", heads="t2i", pretrain_steps=20_000)
    cfg = resolve_config(compiled, form, override="")      # what this run trains with
    heads_to_run(cfg, form.heads)                           # {"t2i": True, "novel_view": False, ...}

Each typed parameter's default is the compiled config's value, so an untouched form runs the
compiled config. `config_json` is the advanced override: a JSON (or YAML) mapping of config fields,
deep-merged last (the scheduled runs pass their whole config there). The cluster shape stays the
compiled one (lumos.pipeline.run_guard). A user with images alone runs I2I and T2I: `heads: auto`
fine-tunes every head whose source is given (T2I: images, novel view: views, video: clips).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from lumos.pipeline.run_guard import RunConfigError, check_cluster_unchanged

if TYPE_CHECKING:
    from lumos.config import PipelineConfig

HEAD_SOURCE = {"t2i": "images", "novel_view": "views", "video": "clips"}
AUTO = "auto"


class RunForm(BaseModel):
    """The pipeline's typed parameters (what the KFP UI shows above `config_json`)."""

    images_uri: str = ""
    views_uri: str = ""
    clips_uri: str = ""
    heads: str = AUTO
    pretrain_steps: int = 0
    finetune_steps: int = 0
    paired_fraction: float = 0.0

    @classmethod
    def defaults(cls, cfg: PipelineConfig) -> RunForm:
        """The form of a run that changes nothing: the compiled config's values."""
        return cls(
            images_uri=cfg.data.images_uri,
            views_uri=cfg.data.views_uri,
            clips_uri=cfg.data.clips_uri,
            heads=AUTO,
            pretrain_steps=cfg.pretrain.steps,
            finetune_steps=0,
            paired_fraction=cfg.ingest.paired_fraction,
        )


def parse_override(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        data = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as err:
        raise RunConfigError(f"config_json is neither JSON nor YAML: {err}") from None
    if not isinstance(data, dict):
        raise RunConfigError(f"config_json must be a mapping of config fields, got {data!r}")
    return data


def resolve_config(compiled: PipelineConfig, form: RunForm, override: str) -> PipelineConfig:
    """The compiled config, the form's values, then `override`; validated (one line per bad
    field), with the compiled cluster."""
    from lumos.config import FINETUNE_HEADS, deep_merge, validate_config

    if form.pretrain_steps < 0 or form.finetune_steps < 0:
        raise RunConfigError("pretrain_steps and finetune_steps must be >= 0")
    data = compiled.model_dump(mode="json")
    data["data"].update(
        images_uri=form.images_uri, views_uri=form.views_uri, clips_uri=form.clips_uri
    )
    data["pretrain"]["steps"] = form.pretrain_steps
    if form.finetune_steps:  # 0: each head's own steps
        for head in FINETUNE_HEADS:
            data["finetune"][head]["steps"] = form.finetune_steps
    data["ingest"]["paired_fraction"] = form.paired_fraction
    cfg = validate_config(deep_merge(data, parse_override(override)))
    check_cluster_unchanged(cfg, compiled.cluster.model_dump_json())
    return cfg


def heads_to_run(cfg: PipelineConfig, heads: str) -> dict[str, bool]:
    """Which heads this run fine-tunes: `auto` (every head whose source is given) or a
    comma-separated list, each of which needs its source."""
    sources = {
        "images": cfg.data.images_uri,
        "views": cfg.data.views_uri,
        "clips": cfg.data.clips_uri,
    }
    if heads.strip() in ("", AUTO):
        return {head: bool(sources[kind]) for head, kind in HEAD_SOURCE.items()}
    requested = [h.strip() for h in heads.split(",") if h.strip()]
    unknown = sorted(set(requested) - set(HEAD_SOURCE))
    if unknown:
        raise RunConfigError(
            f"heads {unknown} are not heads: give 'auto' or some of {', '.join(HEAD_SOURCE)}"
        )
    missing = [h for h in requested if not sources[HEAD_SOURCE[h]]]
    if missing:
        raise RunConfigError(
            "; ".join(f"head {h} needs data.{HEAD_SOURCE[h]}_uri" for h in missing)
            + ": give its source or leave the head out"
        )
    return {head: head in requested for head in HEAD_SOURCE}
