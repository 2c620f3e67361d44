"""Featurize's and training's configs.

    TrainConfig(head="t2i", model_size="B/2", steps=20_000, lr=2e-5)
    FeaturizeConfig(encoders=EncodersConfig.tiny(), batch_size=16)

Read by `lumos.training.featurize.featurize` and `lumos.training.train.train`. `TrainConfig`'s
defaults are the pretraining recipe; the pipeline's fine-tunes change head and steps
(`lumos.config.FINETUNE_DEFAULTS`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lumos.configs.encoders import EncodersConfig

Head = Literal["i2i", "t2i", "novel_view", "video"]
# Heads whose items are groups of frames (views of an object, frames of a clip).
MULTI_FRAME_HEADS = ("novel_view", "video")

# LumosDiT config keys set from the features (latent size and channels, embedding widths, caption
# length, frames) and by the head: model_overrides may not set them.
FROM_DATA_AND_HEAD = (
    "input_size",
    "in_channels",
    "cond_kind",
    "cond_dim",
    "cond_tokens",
    "micro_conditions",
    "num_frames",
    "frame_embed",
    "concat_latent_channels",
)


class FeaturizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    encoders: EncodersConfig = Field(
        default_factory=EncodersConfig, description="the frozen encoders whose outputs are cached"
    )
    batch_size: int = Field(64, ge=1, description="images per encoder call")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when available")
    progress_bar: bool = Field(True, description="show a progress bar")


class TrainConfig(BaseModel):
    """One training run. The defaults are the pretraining recipe (PixArt-alpha's, see the method)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    head: Head = Field(
        "i2i", description="the head trained: i2i (pretraining), t2i, novel_view or video"
    )
    model_size: str = Field(
        "XL/2",
        description="a key of lumos.models.lumos_dit.LUMOS_SIZES (XL/2, L/2, B/2, S/2, tiny)",
    )
    # LumosDiT config overrides (e.g. {"depth": 1}); data dims (latent size, embedding widths)
    # come from the features, conditioning from the head: `FROM_DATA_AND_HEAD` is an error here.
    model_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="LumosDiT config overrides, e.g. {depth: 1}; the data dims come from the "
        "features and the conditioning from the head",
    )
    steps: int = Field(400_000, ge=0, description="optimizer steps (ours: not published)")
    batch_size: int = Field(64, ge=1, description="per process and micro-step (PixArt: 64/GPU)")
    grad_accum: int = Field(1, ge=1, description="micro-steps per optimizer step")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.03, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    adam_eps: float = Field(1e-10, gt=0, description="AdamW epsilon")
    grad_clip: float = Field(1.0, gt=0, description="max global gradient norm")
    warmup_steps: int = Field(500, ge=0, description="linear warm-up, then constant LR")
    # Min-SNR-gamma (Hang et al. 2023): not in the paper's recipe; short runs need it to learn the
    # noisy steps, where the condition matters (docs/benchmarks.md, "The tiny models beside ...").
    snr_gamma: float | None = Field(
        None,
        gt=0,
        description="Min-SNR-gamma weighting of the epsilon loss (5 is the method's recommended "
        "value); null: unweighted, the paper's recipe",
    )
    # Truncated SNR (Salimans & Ho 2022; Imagen Video): not in the paper's recipe either; a video
    # model needs it to learn the motion where the noisy frame does not yet show the object.
    snr_floor: float | None = Field(
        None,
        gt=0,
        description="truncated-SNR weighting: each step's x0 error weighs at least this much "
        "(1 is Imagen Video's max(SNR, 1)); with snr_gamma the weight is SNR clamped to "
        "[snr_floor, snr_gamma]; null: no floor",
    )
    ema_decay: float = Field(
        0.9999, ge=0, lt=1, description="decay of the EMA weights that evaluation and export use"
    )
    # diffusers' EMA warm-up: a 0.9999 EMA of a short fine-tune would be mostly its initialisation.
    ema_warmup: bool = Field(
        True,
        description="EMA decay min(ema_decay, (1 + step) / (10 + step)), so a short fine-tune's "
        "EMA is not mostly its start",
    )
    # "bf16": fp32 weights, the forward and backward under bf16 autocast.
    # "bf16-weights": bf16 weights and activations (no autocast); the optimizer keeps fp32 master
    #   weights, which the EMA follows and the checkpoints hold (bench/train_throughput.py's
    #   `lumos-bf16w`). Gradients are bf16, so with grad_accum they also accumulate in bf16.
    #   Not with distributed "fsdp", whose "bf16" already keeps fp32 sharded masters.
    # "no": fp32 throughout.
    mixed_precision: Literal["bf16", "bf16-weights", "no"] = Field(
        "bf16",
        description="bf16: fp32 weights under bf16 autocast; bf16-weights: bf16 weights with fp32 "
        "master weights in the optimizer; no: fp32",
    )
    compile: bool = Field(True, description="torch.compile the model for the training step")
    num_frames: int | None = Field(
        None, ge=2, description="frames per item for novel_view / video (default 4)"
    )
    # "prior": the fine-tune starts from another head's checkpoint (train's `init_from`, `lumos
    # finetune --init`): the I2I prior, or a T2I model for the second claim's comparison.
    # "scratch": fresh weights, no init checkpoint: T2I from scratch, the paper's baseline.
    init: Literal["prior", "scratch"] = Field(
        "prior",
        description="fine-tunes: prior starts from the checkpoint given as init_from (lumos "
        "finetune --init), scratch from fresh weights (T2I from scratch, the paper's baseline)",
    )
    init_from_ema: bool = Field(
        True,
        description="fine-tunes start from the I2I checkpoint's EMA weights (else its raw weights)",
    )
    checkpoint_every: int = Field(5_000, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept in out_uri")
    log_every: int = Field(
        100, ge=1, description="optimizer steps between logged (and pushed) losses"
    )
    # The agreement is one small all-reduce; one process checks after every step.
    stop_check_every: int = Field(
        10,
        ge=1,
        description="with several processes, steps between their agreement on a SIGTERM (the run "
        "stops with a checkpoint at the first one after the signal)",
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="seeds the model init, the data order and the noise"
    )
    pushgateway_url: str | None = Field(
        None,
        description="push training metrics to this Prometheus Pushgateway, e.g. http://prometheus-"
        "pushgateway:9091",
    )
    progress_bar: bool = Field(True, description="show a progress bar")
    # "ddp": every process holds the whole model (replicas); "fsdp": the processes shard model,
    # gradients, optimizer state and EMA (ZeRO-3), for sizes whose replicas do not fit.
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model; fsdp: the processes shard model, "
        "gradients, optimizer state and EMA",
    )
    # Several nodes: node i of N fetches and trains on feature parts i, i+N, ... (`node_parts`)
    # instead of every part; its processes split its parts' items. A node then downloads and
    # caches 1/N of the features (at the paper's scale, terabytes) and each epoch of a node
    # covers its own parts. One node: no effect. For i2i and t2i: a multi-frame group's frames
    # may span parts.
    shard_features_by_node: bool = Field(
        False,
        description="several nodes: node i of N fetches and trains on feature parts i, i+N, ... "
        "only (i2i and t2i)",
    )

    @field_validator("model_overrides")
    @classmethod
    def _overrides_are_not_data(cls, value: dict[str, Any]) -> dict[str, Any]:
        derived = sorted(set(value) & set(FROM_DATA_AND_HEAD))
        if derived:
            raise ValueError(
                f"model_overrides may not set {derived}: they come from the features (latent "
                "size and channels, embedding widths, caption length, frames: see "
                "features.json) and from the head; set num_frames for the frames of a "
                "multi-frame head"
            )
        return value

    @model_validator(mode="after")
    def _frames_match_head(self) -> TrainConfig:
        if self.head in MULTI_FRAME_HEADS and self.num_frames is None:
            self.num_frames = 4
        if self.head not in MULTI_FRAME_HEADS and self.num_frames is not None:
            raise ValueError(f"num_frames is for novel_view / video, not head {self.head!r}")
        if self.head in MULTI_FRAME_HEADS and self.shard_features_by_node:
            raise ValueError(
                f"shard_features_by_node is for i2i and t2i, not head {self.head!r}: a group's "
                "frames may span feature parts, which would then be on different nodes"
            )
        return self

    @model_validator(mode="after")
    def _snr_floor_below_gamma(self) -> TrainConfig:
        if (
            self.snr_floor is not None
            and self.snr_gamma is not None
            and self.snr_floor > self.snr_gamma
        ):
            raise ValueError(
                f"snr_floor {self.snr_floor} is above snr_gamma {self.snr_gamma}: the x0 weight "
                "is SNR clamped to [snr_floor, snr_gamma], so the floor must not exceed gamma"
            )
        return self

    @model_validator(mode="after")
    def _bf16_weights_are_replicated(self) -> TrainConfig:
        if self.mixed_precision == "bf16-weights" and self.distributed == "fsdp":
            raise ValueError(
                "mixed_precision 'bf16-weights' is for distributed 'ddp' (or one process); "
                "with distributed 'fsdp' use mixed_precision 'bf16': FSDP then already keeps "
                "the sharded master weights in fp32 and computes with bf16 copies of them"
            )
        return self
