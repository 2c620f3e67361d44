"""The data stage's configs: the embedded synthetic dataset and ingest of raw images.

    SynthConfig(num_images=64, num_objects=8, num_clips=8)
    IngestConfig(resolution=32, image_format="png", near_duplicate_distance=None)

Read by `lumos.data.synthetic.generate_default_dataset` and `lumos.data.ingest.ingest`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from lumos.data.decode import ImageRecipe

# RGB under transparent pixels: IngestConfig.background's default, and what the server uses
# (lumos.data.rgb.to_rgb composites alpha on it).
DEFAULT_BACKGROUND = (255, 255, 255)


class SynthConfig(BaseModel):
    """The embedded default dataset. Defaults fit the tiny local run (minutes on 2 CPU cores);
    frames_per_clip and views_per_object become the video / novel-view heads' ``num_frames``."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(
        64,
        ge=16,
        le=1024,
        description="image side in pixels (ingest resizes to the training resolution)",
    )
    num_images: int = Field(
        512, ge=0, description="single-object images with captions and attributes"
    )
    num_objects: int = Field(48, ge=0, description="multi-view objects (groups of views)")
    views_per_object: int = Field(4, ge=2, description="views per object at evenly spaced azimuths")
    elevation: float = Field(20.0, ge=-80.0, le=80.0, description="camera elevation in degrees")
    radius: float = Field(
        2.5, ge=1.6, le=10.0, description="camera distance from the object centre"
    )
    num_clips: int = Field(48, ge=0, description="clips of a moving object")
    frames_per_clip: int = Field(4, ge=2, description="frames per clip")
    eval_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of images / objects / clips marked split=eval"
    )
    seed: int = Field(
        0, ge=0, description="fixes everything generated: the same seed gives byte-identical files"
    )

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.resolution % 8:
            raise ValueError(
                f"resolution must be a multiple of 8 (stripes and latents), got {self.resolution}"
            )
        if self.num_images + self.num_objects + self.num_clips == 0:
            raise ValueError("nothing to generate: num_images, num_objects and num_clips are all 0")
        # Each clip must fit its whole path inside the image at the minimum speed. The ground truth
        # lives with the generator (which imports this module, hence the late import).
        from lumos.data.synthetic import MIN_CLIP_STEP, SIZES

        travel = MIN_CLIP_STEP * (self.frames_per_clip - 1)
        if self.num_clips and travel > 1.0 - 2 * SIZES["small"] - 0.02:
            raise ValueError(
                f"frames_per_clip={self.frames_per_clip} is too many: an object moving "
                f"{MIN_CLIP_STEP} of the image per frame leaves the image; use at most "
                f"{int((1.0 - 2 * SIZES['small'] - 0.02) / MIN_CLIP_STEP) + 1} frames"
            )
        return self


# Settings that change what ends up in the shards; an incremental run must match the dataset's.
_OUTPUT_SETTINGS = ("resolution", "aspect_buckets", "image_format", "jpeg_quality", "background")
# Settings that do not change the result (left out of the up-to-date check).
_RUNTIME_SETTINGS = ("workers", "incremental", "max_retries", "retry_backoff_s", "pushgateway_url")


class IngestConfig(BaseModel):
    """How raw images become a dataset. The defaults are the recipe for in-the-wild photos."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(256, ge=8, description="Output side in pixels (square crops)")
    aspect_buckets: list[tuple[int, int]] | None = Field(
        None,
        description="Output (width, height) sizes for multi-resolution training; each image goes "
        "to the bucket closest in aspect ratio. None: square `resolution` only",
    )
    image_format: Literal["jpg", "png"] = Field(
        "jpg", description="jpg for photos; png is lossless (tiny presets, exact colours)"
    )
    jpeg_quality: int = Field(
        95, ge=1, le=100, description="JPEG quality of the stored images (image_format jpg)"
    )
    min_size: int | None = Field(
        None,
        ge=1,
        description="Minimum shorter side of a source image; None: the output size (never upscale)",
    )
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="Long side / short side limit")
    max_pixels: int = Field(
        8192 * 8192, ge=1, description="Width x height limit: the decompression-bomb guard"
    )
    background: tuple[int, int, int] = Field(
        DEFAULT_BACKGROUND, description="RGB under transparent pixels (alpha is composited on it)"
    )
    near_duplicate_distance: int | None = Field(
        4,
        ge=0,
        le=32,
        description="Max Hamming distance of 64-bit perceptual hashes for a near duplicate; "
        "None disables near-dup detection (multi-view and video frames are alike on purpose)",
    )
    shard_max_bytes: int = Field(1_000_000_000, ge=4096, description="Target shard size (~1 GB)")
    paired_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of captioned images marked paired (T2I subset)"
    )
    seed: int = Field(0, description="Seeds the choice of the paired subset")
    workers: int | None = Field(
        None,
        ge=1,
        description="Decoding processes; None: one per usable CPU (affinity and cgroup limit); "
        "1: in-process",
    )
    incremental: bool = Field(
        False, description="Process only objects not seen by earlier runs into this dataset"
    )
    max_retries: int = Field(3, ge=0, description="Retries of a failed read (transient errors)")
    retry_backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubles each time")
    pushgateway_url: str | None = Field(None, description="Push ingest metrics here when set")

    @field_validator("aspect_buckets")
    @classmethod
    def _check_buckets(cls, buckets: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if buckets is None:
            return None
        if not buckets:
            raise ValueError("aspect_buckets must list at least one (width, height), or be None")
        for w, h in buckets:
            if w < 8 or h < 8 or w % 8 or h % 8:
                raise ValueError(
                    f"aspect bucket {w}x{h}: sides must be multiples of 8 and >= 8 "
                    "(the VAE downsamples by 8)"
                )
        return buckets

    @model_validator(mode="after")
    def _check_buckets_fit_limit(self) -> IngestConfig:
        for w, h in self.output_sizes:
            if max(w, h) / min(w, h) > self.max_aspect_ratio:
                raise ValueError(
                    f"aspect bucket {w}x{h} is beyond max_aspect_ratio={self.max_aspect_ratio}: "
                    "raise max_aspect_ratio or drop the bucket"
                )
        return self

    @property
    def output_sizes(self) -> tuple[tuple[int, int], ...]:
        if self.aspect_buckets:
            return tuple((int(w), int(h)) for w, h in self.aspect_buckets)
        return ((self.resolution, self.resolution),)

    def recipe(self) -> ImageRecipe:
        from lumos.data.decode import ImageRecipe

        sizes = self.output_sizes
        return ImageRecipe(
            sizes=sizes,
            min_size=self.min_size or min(min(s) for s in sizes),
            never_upscale=self.min_size is None,
            max_aspect_ratio=self.max_aspect_ratio,
            max_pixels=self.max_pixels,
            background=self.background,
            image_format=self.image_format,
            jpeg_quality=self.jpeg_quality,
        )

    def output_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k in _OUTPUT_SETTINGS}

    def result_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in _RUNTIME_SETTINGS}
