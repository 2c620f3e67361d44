"""The pipeline configuration: one strict model composing every stage's config, plus presets.

Defaults are the paper's recipe (Lumos-XL/2 on GPU nodes); a preset is a short YAML of overrides
(`presets/tiny.yaml` for a CPU laptop, `presets/xl.yaml` for a GPU cluster). A config is validated
once, at the entry point (`lumos ...` or the first pipeline step), and fails before any work starts
with one line per bad field.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lumos.configs.data import IngestConfig, SynthConfig
from lumos.configs.evaluation import EvaluateConfig
from lumos.configs.export import ExportConfig
from lumos.configs.k8s import TRAIN_IMAGE, DistributedConfig, StepsResources, Toleration
from lumos.configs.merge import deep_merge
from lumos.configs.serving import PromoteConfig
from lumos.configs.training import FeaturizeConfig, TrainConfig
from lumos.errors import LumosError

PRESETS = ("tiny", "xl")
FINETUNE_HEADS = ("t2i", "novel_view", "video")
# The pretrain TrainJob is named `<name>-i2i-<8 characters of the run id>` (lumos.pipeline.steps)
# and its last pod `<TrainJob>-node-0-<N-1>-xxxxx`, which must fit a 63-character DNS label
# (lumos.k8s.trainjob.render_trainjob): with up to 100 nodes, 63 - 16 - 13 = 34 characters.
NAME_MAX_LENGTH = 34
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class ConfigError(LumosError, ValueError):
    """A configuration that cannot be used; the message names every bad field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ClusterConfig(Strict):
    """Where the pipeline's steps run on Kubernetes (ignored by the local runner)."""

    image: str = Field(TRAIN_IMAGE, description="the image every step runs in")
    gpus_per_step: int = Field(
        1, ge=0, description="GPUs of the pretrain (without a TrainJob) and finetune steps"
    )
    steps: StepsResources = Field(
        default_factory=StepsResources,
        description="CPU / memory requests and limits and GPUs per kind of step (featurize, "
        "evaluate and export use one GPU; unset fields take each kind's default)",
    )
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
        description="node labels the GPU steps' pods must match",
    )
    gpu_tolerations: list[Toleration] = Field(
        default_factory=lambda: [Toleration(key="nvidia.com/gpu")],
        description="tolerations of the GPU steps' pods (the default tolerates nvidia.com/gpu "
        "taints)",
    )
    s3_secret: str = Field("lumos-s3", description="Secret with LUMOS_S3_ENDPOINT and AWS_* keys")
    shm_size_gib: int = Field(16, ge=1, description="/dev/shm for data-loader workers")
    feature_cache_gib: int = Field(
        500,
        ge=1,
        description="node-local disk (an emptyDir) where GPU steps keep the features of a "
        "dataset in the object store, memory-mapped from there (about 10 KB per image)",
    )
    distributed: DistributedConfig | None = Field(
        None, description="Pretrain as a Kubeflow Trainer TrainJob over several nodes when set"
    )
    train_retries: int = Field(
        2,
        ge=0,
        description="times KFP reruns a failed pretrain / fine-tune step (a preempted GPU node, "
        "which checkpoints on SIGTERM); the rerun resumes from the step's latest checkpoint",
    )

    def pretrain_as_trainjob(self) -> bool:
        """Whether the pretrain step runs as a TrainJob (`distributed` set, more than one process
        in all: GPUs, or CPU nodes): the step itself then only launches it and waits."""
        dist = self.distributed
        return dist is not None and dist.world_size() > 1


class DataConfig(Strict):
    """The raw sources. Empty means: generate the embedded default dataset."""

    images_uri: str = Field(
        "",
        description="raw images (local dir or s3://); empty, with views and clips: the embedded "
        "dataset",
    )
    views_uri: str = Field(
        "", description="multi-view objects for the novel-view head (local dir or s3://)"
    )
    clips_uri: str = Field(
        "", description="video clips as frames for the video head (local dir or s3://)"
    )
    datasets_root: str = Field(
        "",
        description="Where ingested datasets live across runs (scheduled retraining ingests "
        "incrementally into them); empty: inside each run's root",
    )
    ingest_partitions: int = Field(2, ge=1, description="ParallelFor fan-out of image ingest")
    featurize_partitions: int = Field(
        2,
        ge=1,
        description="ParallelFor fan-out of image featurize: GPU pods, one shard range each",
    )


# What each fine-tune changes in TrainConfig's defaults (the pretraining recipe).
FINETUNE_DEFAULTS: dict[str, dict[str, Any]] = {
    "t2i": {"head": "t2i", "steps": 65_000},
    "novel_view": {"head": "novel_view", "steps": 20_000},
    "video": {"head": "video", "steps": 20_000},
}


class FinetuneConfig(Strict):
    """Brief fine-tunes from the I2I checkpoint. T2I: the paper's 65K steps (PixArt-alpha used
    240K); the 3D and video step counts are ours (not published)."""

    t2i: TrainConfig = Field(
        default_factory=lambda: TrainConfig(**FINETUNE_DEFAULTS["t2i"]),
        description="the text-to-image fine-tune (the paper's 65K steps)",
    )
    novel_view: TrainConfig = Field(
        default_factory=lambda: TrainConfig(**FINETUNE_DEFAULTS["novel_view"]),
        description="the novel-view (3D) fine-tune",
    )
    video: TrainConfig = Field(
        default_factory=lambda: TrainConfig(**FINETUNE_DEFAULTS["video"]),
        description="the image-to-video fine-tune",
    )

    @model_validator(mode="before")
    @classmethod
    def _partial_heads_keep_their_defaults(cls, data: Any) -> Any:
        """`finetune: {t2i: {lr: ...}}` changes the T2I fine-tune's lr; its head and steps stay
        the fine-tune's, not TrainConfig's (pretraining's 400K steps)."""
        if isinstance(data, dict):
            data = {
                name: {**FINETUNE_DEFAULTS[name], **value}
                if name in FINETUNE_DEFAULTS and isinstance(value, dict)
                else value
                for name, value in data.items()
            }
        return data

    @model_validator(mode="after")
    def _heads_match(self) -> FinetuneConfig:
        for name in FINETUNE_HEADS:
            head = getattr(self, name).head
            if head != name:
                raise ValueError(f"finetune.{name}.head must be '{name}', got '{head}'")
        return self


class PipelineConfig(Strict):
    name: str = Field(
        "lumos",
        description="the pipeline's name, and the start of its TrainJob's name: lower-case "
        "letters, digits and '-', starting with a letter, ending with a letter or digit, at most "
        f"{NAME_MAX_LENGTH} characters (its pods' names must fit 63 with up to 100 nodes)",
    )
    preset: str | None = Field(
        None,
        description="the preset the config started from (tiny, xl), recorded by load_config; None:"
        " the defaults",
    )
    runs_root: str = Field(
        "s3://lumos/runs",
        description="Each run writes under runs_root/<run id> (local dir or s3://)",
    )
    data: DataConfig = Field(
        default_factory=DataConfig, description="the raw sources and where datasets live"
    )
    synth: SynthConfig = Field(
        default_factory=SynthConfig,
        description="the embedded default dataset, generated when data names no sources",
    )
    ingest: IngestConfig = Field(
        default_factory=IngestConfig,
        description="how raw images become a sharded, deduplicated dataset",
    )
    featurize: FeaturizeConfig = Field(
        default_factory=FeaturizeConfig,
        description="the frozen encoders and how their features are cached",
    )
    pretrain: TrainConfig = Field(
        default_factory=lambda: TrainConfig(head="i2i"), description="I2I pretraining (head i2i)"
    )
    finetune: FinetuneConfig = Field(
        default_factory=FinetuneConfig,
        description="the fine-tunes from the I2I checkpoint, one per head",
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="how checkpoints are evaluated and gated"
    )
    export: ExportConfig = Field(
        default_factory=ExportConfig,
        description="the ONNX (and TensorRT) export of the gated models",
    )
    promote: PromoteConfig = Field(
        default_factory=PromoteConfig,
        description="where promoted models are registered and how KServe serves them",
    )
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig,
        description="where the steps run on Kubernetes (ignored by the local runner)",
    )

    @field_validator("name")
    @classmethod
    def _name_fits_a_trainjob(cls, value: str) -> str:
        if not _NAME.match(value) or len(value) > NAME_MAX_LENGTH:
            raise ValueError(
                f"name {value!r} must be lower-case letters, digits and '-', start with a letter, "
                f"end with a letter or digit and be at most {NAME_MAX_LENGTH} characters: the "
                "pretrain TrainJob is named '<name>-i2i-<8 characters of the run id>' and its "
                "pods' names must fit 63 characters with up to 100 nodes"
            )
        return value

    @model_validator(mode="after")
    def _pretrain_is_i2i(self) -> PipelineConfig:
        if self.pretrain.head != "i2i":
            raise ValueError(f"pretrain.head must be 'i2i', got '{self.pretrain.head}'")
        return self

    def multiframe_ingest(self) -> IngestConfig:
        """Ingest settings for the views and clips datasets: their frames are legitimately alike,
        so near-duplicate detection (which would drop them) is off; exact dedup stays on."""
        return self.ingest.model_copy(update={"near_duplicate_distance": None})


def preset_overrides(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    text = resources.files("lumos.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text) or {}


def parse_set(assignments: list[str]) -> dict[str, Any]:
    """`a.b.c=value` pairs (values parsed as YAML scalars) into a nested override dict."""
    out: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects key.path=value, got '{item}'")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise ConfigError(f"--set has an empty key in '{item}'")
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = yaml.safe_load(raw)
    return out


def format_validation_error(err: ValidationError) -> str:
    lines = [f"invalid config ({err.error_count()} problem(s)):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {json.dumps(got, default=str)})"
        lines.append(f"  - {where}: {e['msg']}{shown}")
    return "\n".join(lines)


def load_config(
    preset: str | None = "tiny",
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    config_text: tuple[str, str] | None = None,
) -> PipelineConfig:
    """Defaults <- preset <- config file <- --set overrides, validated once. `config_text` is
    (where it comes from, text) of a config file not on disk (a ConfigMap's overrides.yaml)."""
    data: dict[str, Any] = {}
    if preset:
        data = deep_merge(data, preset_overrides(preset))
        data["preset"] = preset
    if config_file and config_text:
        raise ConfigError("give a config file or its text, not both")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        config_text = (f"config file {path}", path.read_text())
    if config_text:
        source, text = config_text
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{source} is not valid YAML: {err}") from err
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source} must hold a mapping, got {type(loaded).__name__}")
        data = deep_merge(data, loaded)
    if overrides:
        data = deep_merge(data, parse_set(overrides))
    return validate_config(data)


def validate_config(data: dict[str, Any] | str) -> PipelineConfig:
    try:
        if isinstance(data, str):
            return PipelineConfig.model_validate_json(data)
        return PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None


def config_schema() -> dict[str, Any]:
    return PipelineConfig.model_json_schema()
