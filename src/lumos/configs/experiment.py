"""The claim experiment's configs: its data (rich scenes), its self-supervised encoder, its arms.

    ExperimentConfig.from_preset("experiment-cpu")      # src/lumos/presets/experiment-cpu.yaml
    SceneConfig(num_images=2000, holdout_combinations=4)
    SSLEncoderConfig(steps=400, hidden_size=64)

Read by `lumos.data.scenes` (the generator), `lumos.encoders.ssl` (the encoder trained on the
unlabeled pool) and `lumos.experiments.claim` (`lumos experiment claim`). Torch-free, like every
module of `lumos.configs`.
"""

from __future__ import annotations

from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lumos.configs.data import SynthConfig
from lumos.configs.encoders import TinyT5Config
from lumos.configs.evaluation import EvaluateConfig
from lumos.configs.merge import deep_merge
from lumos.errors import LumosError

EXPERIMENT_PRESETS = ("experiment-micro", "experiment-cpu", "experiment-gpu")


class ExperimentConfigError(LumosError, ValueError):
    """An experiment preset or override that does not exist."""


SceneKind = Literal["single", "count", "relation"]
_DEFAULT_KINDS: dict[SceneKind, float] = {"single": 0.5, "count": 0.25, "relation": 0.25}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SceneConfig(_Strict):
    """Scenes of one to three objects with exact ground truth (`lumos.data.scenes`)."""

    resolution: int = Field(32, ge=32, le=512, description="image side in pixels")
    num_images: int = Field(2000, ge=20, description="images generated (train and eval)")
    eval_fraction: float = Field(
        0.06, gt=0.0, lt=0.5, description="fraction of the images marked split=eval"
    )
    kinds: dict[SceneKind, float] = Field(
        default_factory=lambda: dict(_DEFAULT_KINDS),
        description="share of each scene kind: one object; two or three identical objects "
        "(counting); two different objects in a spatial relation",
    )
    holdout_combinations: int = Field(
        4,
        ge=0,
        le=8,
        description="(colour, shape) combinations never captioned in the training split: they "
        "appear only in the unlabeled pool and in the eval split (the composition test)",
    )
    seed: int = Field(0, ge=0, description="fixes every scene: the same seed, the same files")

    @model_validator(mode="after")
    def _check(self) -> SceneConfig:
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {self.resolution}")
        if (
            not self.kinds
            or any(v < 0 for v in self.kinds.values())
            or sum(self.kinds.values()) <= 0
        ):
            raise ValueError("kinds needs at least one kind with a positive share")
        return self


class SSLEncoderConfig(_Strict):
    """A small ViT trained self-supervised on the unlabeled pool (`lumos.encoders.ssl`): by
    default its CLS token of a corrupted view (noise, masked patches) must reconstruct the clean
    image at `recon_size` px (colour and position have to pass through the one token the I2I
    condition uses); `infonce` is SimCLR's objective, kept for comparison."""

    objective: Literal["reconstruct", "infonce"] = Field(
        "reconstruct",
        description="reconstruct: CLS-bottleneck masked reconstruction; infonce: SimCLR",
    )
    recon_size: int = Field(16, ge=2, description="side of the image the CLS token reconstructs")
    hidden_size: int = Field(64, ge=8, description="ViT width (the CLS embedding's size)")
    num_hidden_layers: int = Field(3, ge=1, description="transformer layers")
    num_attention_heads: int = Field(4, ge=1, description="attention heads")
    intermediate_size: int = Field(128, ge=8, description="MLP width")
    patch_size: int = Field(4, ge=1, description="patch side in pixels")
    projection_dim: int = Field(64, ge=8, description="width of the projection head InfoNCE sees")
    steps: int = Field(300, ge=0, description="optimizer steps (0: an untrained ViT)")
    batch_size: int = Field(64, ge=8, description="images per step (infonce: two views each)")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature")
    mask_fraction: float = Field(
        0.25, ge=0.0, lt=1.0, description="fraction of patches replaced by the mean pixel"
    )
    noise_std: float = Field(0.05, ge=0.0, description="std of the Gaussian pixel noise, in [0, 1]")
    max_shift: int = Field(0, ge=0, description="largest shift of a view in pixels (each axis)")
    seed: int = Field(0, ge=0, description="seeds the init, the batches and the views")

    @model_validator(mode="after")
    def _check(self) -> SSLEncoderConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        return self


class ArmSteps(_Strict):
    """Optimizer steps of every training run of the experiment."""

    pretrain: int = Field(400, ge=1, description="I2I pretraining on the unlabeled pool (arm C)")
    t2i: int = Field(
        200, ge=1, description="T2I steps of arms A, B and C; arm D gets pretrain + t2i steps"
    )
    multiframe: int = Field(
        100, ge=1, description="novel-view and video fine-tunes, from either prior"
    )
    eval_points: int = Field(
        3, ge=1, description="checkpoints evaluated per arm, evenly spaced (the curves' points)"
    )


class ExperimentConfig(_Strict):
    """`lumos experiment claim`: the paper's two claims as arms trained and evaluated here."""

    name: str = Field(description="the preset's name, written into the report")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="training seeds: each arm is trained once per seed (init, data order, noise)",
    )
    scenes: SceneConfig = Field(default_factory=SceneConfig, description="the T2I data")
    multiframe: SynthConfig = Field(
        default_factory=lambda: SynthConfig(num_images=0, num_objects=48, num_clips=48),
        description="the novel-view and video data (the embedded generator's views and clips)",
    )
    paired_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="pairs arms B, C and D see (arm A sees all of them)"
    )
    ssl_encoder: SSLEncoderConfig = Field(
        default_factory=SSLEncoderConfig, description="the frozen image encoder (the I2I condition)"
    )
    condition_encoder: Literal["ssl", "random"] = Field(
        "ssl",
        description="the I2I condition: ssl, the ViT trained on the unlabeled pool; random, the "
        "random tiny ViT of the tiny preset (the ablation)",
    )
    text_encoder: TinyT5Config = Field(
        default_factory=TinyT5Config, description="the frozen text encoder (random tiny T5)"
    )
    max_tokens: int = Field(64, ge=8, description="caption tokens kept")
    model_size: str = Field("tiny", description="a LumosDiT registry size")
    model_overrides: dict[str, Any] = Field(
        default_factory=lambda: {"hidden_size": 64, "depth": 3, "num_heads": 4, "patch_size": 4},
        description="LumosDiT overrides for every arm",
    )
    steps: ArmSteps = Field(default_factory=ArmSteps, description="steps per training run")
    batch_size: int = Field(64, ge=1, description="images per step (frames: batch_size / 4 items)")
    lr: float = Field(3e-3, gt=0, description="AdamW learning rate of every run")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps of every run")
    ema_decay: float = Field(0.99, ge=0, lt=1, description="EMA decay of every run")
    snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-gamma loss weighting of every training run (TrainConfig.snr_gamma; "
        "5 recommended, the presets use it: unweighted, tiny runs ignore their condition); "
        "null: unweighted, the paper's recipe",
    )
    mixed_precision: Literal["bf16", "no"] = Field("no", description="bf16 on GPUs, no on CPUs")
    evaluate: EvaluateConfig = Field(
        default_factory=lambda: EvaluateConfig(
            num_samples=128,
            batch_size=64,
            bootstrap_resamples=200,
            report_samples=0,
            gates={
                "t2i": {"fd_dino": {"margin": 0.0}},
                "novel_view": {"psnr": 0.0},
                "video": {"psnr": 0.0},
            },
        ),  # fmt: skip
        description="sampling steps, eval items and seed of every evaluation (guidance is "
        "`guidance_scales`); gates are not applied, the report compares the arms",
    )
    guidance_scales: list[float] = Field(
        default_factory=lambda: [1.0, 4.5], min_length=1, description="T2I guidance scales"
    )
    grid_items: int = Field(8, ge=1, description="eval captions shown per arm in the sample grid")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")

    @classmethod
    def from_preset(cls, name: str, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
        """A preset of src/lumos/presets/ (`experiment-cpu` ...) with nested `overrides` (as
        `lumos.config.parse_set` makes them from `--set a.b=value`) merged on top."""
        import yaml

        if name not in EXPERIMENT_PRESETS:
            raise ExperimentConfigError(
                f"unknown experiment preset {name!r}; choose one of {', '.join(EXPERIMENT_PRESETS)}"
            )
        text = resources.files("lumos.presets").joinpath(f"{name}.yaml").read_text()
        data = deep_merge(yaml.safe_load(text) or {}, overrides or {})
        return cls.model_validate({"name": name, **data})
