"""Evaluation's config: how a checkpoint is sampled, scored beside baselines and gated.

    EvaluateConfig(num_samples=128, clip_path="s3://weights/clip", gates={"t2i": {
        "clip_score": {"margin": 1.0}, "fd_dino": {"margin": 0.3, "relative": True}}})

Read by `lumos.evaluation.evaluate.evaluate`; the gates and `max_regression` are the gate
(`lumos.evaluation.gate.decide`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lumos.configs.encoders import ImageEncoderConfig

EVAL_HEADS = ("i2i", "t2i", "novel_view", "video")


class MetricGate(BaseModel):
    """What the gate asks of one metric: a lead over the best trivial baseline."""

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(
        0.0,
        ge=0.0,
        description="the model's lead over the best baseline, at the lower end of the lead's "
        "bootstrap interval, must exceed this (in the metric's units, or a fraction of the best "
        "baseline's value when relative); 0 asks for a lead the eval items cannot erase",
    )
    relative: bool = Field(
        False,
        description="margin is a fraction of the best baseline's value (for the Fréchet "
        "distance, whose scale depends on the feature network)",
    )

    @model_validator(mode="before")
    @classmethod
    def _number_is_a_margin(cls, value: object) -> object:
        # `psnr: 1.0` in YAML is short for `psnr: {margin: 1.0}`.
        return {"margin": value} if isinstance(value, int | float) else value


def _default_gates() -> dict[str, dict[str, MetricGate]]:
    # The real recipe's bar (XL/2 on real data with DINO ViT-B/16 and a CLIP ViT-L/14) (ours: the
    # paper reports no gate). Every margin is over the best trivial baseline on the same items:
    # the Fréchet distance at most half the blank image's; CLIP score a point above caption-
    # shuffled samples; views and frames ahead of copying the input view / first frame. The
    # attribute checks apply only where the data carries ground truth.
    def g(margin: float, relative: bool = False) -> MetricGate:
        return MetricGate(margin=margin, relative=relative)

    return {
        "t2i": {"fd_dino": g(0.5, True), "clip_score": g(1.0), "dino_similarity": g(0.02),
                "color_accuracy": g(0.2), "position_accuracy": g(0.2)},
        "i2i": {"fd_dino": g(0.5, True), "dino_similarity": g(0.05),
                "color_agreement": g(0.2), "position_agreement": g(0.2)},
        "novel_view": {"fd_dino": g(0.5, True), "perceptual_distance": g(0.02),
                       "psnr": g(0.5), "ssim": g(0.02)},
        "video": {"fd_dino": g(0.5, True), "perceptual_distance": g(0.02),
                  "psnr": g(0.5), "ssim": g(0.02)},
    }  # fmt: skip


class EvaluateConfig(BaseModel):
    """How a checkpoint is evaluated and gated."""

    model_config = ConfigDict(extra="forbid")

    num_samples: int = Field(
        500,
        ge=2,
        description="eval items per head (fewer if the split is smaller); with 500 items the "
        "95% interval of an accuracy is about +-0.04, so a lead of a few points is not noise",
    )
    sampling_steps: int = Field(20, ge=1, description="DPM-Solver++ steps (paper: 20)")
    guidance_scale: float = Field(4.5, ge=1.0, description="classifier-free guidance (paper: 4.5)")
    batch_size: int = Field(16, ge=1, description="items sampled (and measured) together")
    seed: int = Field(
        0, ge=0, description="fixes the initial noise, the baselines' draws and the bootstrap"
    )
    feature_encoder: ImageEncoderConfig | None = Field(
        None,
        description="the frozen ViT (transformers ViTModel, path or s3:// prefix, or tiny) whose "
        "CLS gives the Fréchet distance and similarity and whose patch tokens give the "
        "perceptual distance; None: the checkpoint's own image encoder (the pipeline's DINO)",
    )
    clip_path: str | None = Field(
        None,
        description="a CLIP model for the T2I CLIP score (transformers CLIPModel + tokenizer, "
        "as save_pretrained writes them), a directory or s3:// prefix; None: no CLIP score",
    )
    gates: dict[str, dict[str, MetricGate]] = Field(
        default_factory=_default_gates,
        description="per head: metric -> the margin over the best baseline the gate asks for",
    )
    bootstrap_resamples: int = Field(
        1000, ge=100, description="bootstrap draws of the eval items for every interval"
    )
    confidence: float = Field(
        0.95, gt=0.5, lt=1.0, description="coverage of the bootstrap intervals the gate reads"
    )
    max_regression: float = Field(
        0.05, ge=0.0, lt=1.0, description="largest relative drop below the promoted model allowed"
    )
    report_samples: int = Field(12, ge=0, description="samples shown in report.html")
    device: str = Field("auto", description="'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1'")

    @field_validator("gates")
    @classmethod
    def _known_heads(
        cls, value: dict[str, dict[str, MetricGate]]
    ) -> dict[str, dict[str, MetricGate]]:
        unknown = sorted(set(value) - set(EVAL_HEADS))
        if unknown:
            raise ValueError(f"gates for unknown heads {unknown}; heads are {list(EVAL_HEADS)}")
        return value
