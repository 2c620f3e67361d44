"""KServe predictor for an exported Lumos model (V1 protocol, images as base64 PNG).

    python -m lumos.serving.server --export_uri s3://lumos/runs/r1/export/t2i --model_name lumos

`load()` downloads the export (`lumos export` output) through `Storage`, opens the onnxruntime
sessions (TensorRT > CUDA > CPU, as available) and builds the frozen encoders the export recorded
(T5 for text, DINO for images, the VAE encoder for the heads that condition on a latent): their
weights must be reachable at the recorded paths (local or s3://, with the usual S3 environment).

Requests, `POST /v1/models/<name>:predict`:

    t2i:         {"instances": [{"prompt": "a red circle", "seed": 0, "steps": 20, "guidance_scale": 4.5}]}
    i2i:         {"instances": [{"image_b64": "<PNG/JPEG base64>", "seed": 0}]}
    novel_view:  {"instances": [{"image_b64": "...", "cameras": [[0, 20, 2.5], [90, 20, 2.5], ...]}]}
                 cameras: (azimuth_deg, elevation_deg, radius) per view, view 0 = the input view;
                 default: views evenly spaced in azimuth around the input view's camera
    video:       {"instances": [{"image_b64": "<first frame>"}]}

Response: {"predictions": [{"image_b64": "<PNG>", "seed": 0}]} (multi-frame heads: "images_b64",
one PNG per frame). A bad request gets HTTP 400 with {"error": "<what was wrong>"}, an image above
MAX_IMAGE_PIXELS among them. Request images are converted as ingest converted the training
images (EXIF orientation, 16-bit to 8-bit, transparency on the ingest background).
An instance's image depends only on its own fields (its seed draws its noise), not on the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import io
import warnings
from typing import TYPE_CHECKING, Any

import kserve
import numpy as np
from kserve.errors import InvalidInput
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from lumos.data.rgb import DEFAULT_BACKGROUND, to_rgb
from lumos.serving.onnx_pipeline import OnnxPipeline, served_encoders

if TYPE_CHECKING:
    from lumos.encoders import FrozenEncoders

MAX_INSTANCES = 16  # per request: bounds the work one request can ask for
MAX_IMAGE_BYTES = 16 << 20
# Width x height limit, checked from the header before decoding. The model sees the image
# center-cropped to its pixel grid (at most 1024 px a side), so larger images only cost decode
# time and memory (48 MB as RGB at the limit, x16 instances per request): 4096 x 4096 admits
# 12 MP camera photos and rejects a tiny PNG that decodes to gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
# Transparent pixels are composited on the background ingest used for the training images. The
# export does not record it (a checkpoint names its dataset, not its ingest settings), so this is
# IngestConfig.background's default: a dataset ingested with another background needs it here too.
INGEST_BACKGROUND = DEFAULT_BACKGROUND


class Instance(BaseModel):
    """One V1 instance. Which of prompt / image_b64 is required depends on the head."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = None
    image_b64: str | None = None
    cameras: list[list[float]] | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int = Field(20, ge=1, le=200)
    guidance_scale: float = Field(4.5, ge=1.0, le=50.0)
    _image: np.ndarray | None = PrivateAttr(None)  # image_b64 decoded, uint8 (H, W, 3)


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message)


def parse_instances(payload: Any, head: str, frames: int = 1) -> list[Instance]:
    """Validate a V1 payload for `head` (images decoded, cameras checked) before any work.

    Raises kserve's InvalidInput (HTTP 400) with the reason. `frames`: views of a novel_view model.
    """
    if not isinstance(payload, dict) or not isinstance(payload.get("instances"), list):
        raise _bad('the request body must be a JSON object {"instances": [...]} (V1 protocol)')
    raw = payload["instances"]
    if not 1 <= len(raw) <= MAX_INSTANCES:
        raise _bad(f"send 1 to {MAX_INSTANCES} instances per request, got {len(raw)}")
    instances = []
    for i, item in enumerate(raw):
        try:
            inst = Instance.model_validate(item)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'instance'}: {e['msg']}"
                for e in err.errors()
            )
            raise _bad(f"instances[{i}]: {problems}") from None
        if head == "t2i":
            if not inst.prompt or not inst.prompt.strip():
                raise _bad(f"instances[{i}]: head 't2i' needs a non-empty 'prompt'")
            if inst.image_b64 is not None or inst.cameras is not None:
                raise _bad(f"instances[{i}]: head 't2i' takes a 'prompt', not an image or cameras")
        else:
            if not inst.image_b64:
                raise _bad(
                    f"instances[{i}]: head {head!r} needs 'image_b64' (a base64 PNG or JPEG)"
                )
            if inst.prompt is not None:
                raise _bad(f"instances[{i}]: head {head!r} takes an image, not a 'prompt'")
            if inst.cameras is not None and head != "novel_view":
                raise _bad(f"instances[{i}]: 'cameras' is only for head 'novel_view'")
            if inst.cameras is not None and (
                len(inst.cameras) != frames or any(len(c) != 3 for c in inst.cameras)
            ):
                raise _bad(
                    f"instances[{i}]: 'cameras' must be {frames} views of "
                    "[azimuth_deg, elevation_deg, radius] (view 0 = the input view)"
                )
            inst._image = decode_image(inst.image_b64, f"instances[{i}]")
        instances.append(inst)
    return instances


def decode_image(data: str, where: str) -> np.ndarray:
    """base64 PNG/JPEG -> uint8 (H, W, 3), converted as ingest converts training images: EXIF
    orientation applied, 16-bit mapped to 8-bit, transparency composited on INGEST_BACKGROUND."""
    from PIL import Image, ImageOps

    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"{where}: 'image_b64' is not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise _bad(f"{where}: image is {len(raw)} bytes, the limit is {MAX_IMAGE_BYTES}")
    too_large = f"the limit is {MAX_IMAGE_PIXELS} pixels (4096 x 4096): send a smaller image"
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 Mpx and refuses from 179 Mpx; our own limit is far lower.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))  # reads the header only
    except Image.DecompressionBombError as err:
        raise _bad(f"{where}: image is too large ({err}); {too_large}") from None
    except (OSError, SyntaxError) as err:  # UnidentifiedImageError is an OSError
        raise _bad(f"{where}: 'image_b64' is not a readable image ({err})") from None
    with img:
        width, height = img.size
        if width * height > MAX_IMAGE_PIXELS:
            raise _bad(
                f"{where}: image is {width} x {height} = {width * height} pixels; {too_large}"
            )
        try:
            img.load()
            rgb = to_rgb(ImageOps.exif_transpose(img), INGEST_BACKGROUND)
        except ValueError as err:  # a mode without a faithful 8-bit conversion (to_rgb)
            raise _bad(f"{where}: image mode {img.mode} is not supported ({err})") from None
        except (OSError, SyntaxError) as err:  # truncated or corrupt data
            raise _bad(f"{where}: 'image_b64' is not a readable image ({err})") from None
        return np.asarray(rgb)


def _image_of(inst: Instance) -> np.ndarray:
    assert inst._image is not None, "parse_instances decodes every image_b64"
    return inst._image


def encode_png(image: np.ndarray) -> str:
    """uint8 (H, W, 3) -> base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _fit_square(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize to size x size (bicubic): the model's pixel grid."""
    from PIL import Image, ImageOps

    fitted = ImageOps.fit(Image.fromarray(image), (size, size), Image.Resampling.BICUBIC)
    return np.asarray(fitted)


class LumosModel(kserve.Model):
    """An exported Lumos model behind KServe's V1 protocol: conditions in, base64 PNGs out."""

    def __init__(self, name: str, export_uri: str, local_dir: str | None = None):
        super().__init__(name)
        self.export_uri = export_uri
        self.local_dir = local_dir
        self._pipeline: OnnxPipeline | None = None
        self._encoders: FrozenEncoders | None = None
        self.ready = False

    @property
    def pipeline(self) -> OnnxPipeline:
        if self._pipeline is None:
            raise RuntimeError(f"model {self.name} is not loaded: call load() first")
        return self._pipeline

    @property
    def encoders(self) -> FrozenEncoders:
        if self._encoders is None:
            raise RuntimeError(f"model {self.name} is not loaded: call load() first")
        return self._encoders

    def load(self) -> bool:
        from lumos.encoders import FrozenEncoders
        from lumos.export.onnx_export import encoders_config

        self._pipeline = OnnxPipeline.from_uri(self.export_uri, self.local_dir)
        self._encoders = FrozenEncoders(encoders_config(self._pipeline.meta["encoders"]))
        # Load the encoders this head needs now: missing weights fail the start, not a request.
        parts = served_encoders(self._pipeline.meta)
        if "text_encoder" in parts:
            _ = self.encoders.text_dim
        if "image_encoder" in parts:
            _ = self.encoders.image_embed_dim
        if "vae" in parts:
            _ = self.encoders.latent_channels
        self.ready = True
        return self.ready

    @property
    def head(self) -> str:
        return self.pipeline.head

    @property
    def pixel_size(self) -> int:
        """Side of the generated images in pixels."""
        graphs = self.pipeline.meta["graphs"]
        if "decoder" in graphs:
            return int(graphs["decoder"]["outputs"][0]["shape"][-1])
        return int(self.pipeline.model_config["input_size"])  # pixel space

    async def predict(
        self,
        payload: dict,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict:
        if not self.ready:
            raise RuntimeError(f"model {self.name} is not loaded")
        # Decoding images and sampling are seconds of CPU/GPU work: both run off the event loop
        # so health checks answer. InvalidInput raised in the executor still becomes HTTP 400.
        loop = asyncio.get_running_loop()
        instances = await loop.run_in_executor(
            None, parse_instances, payload, self.head, self.pipeline.num_frames
        )
        predictions = await loop.run_in_executor(None, self.generate, instances)
        return {"predictions": predictions}

    # ------------------------------------------------------------------ the work

    def conditions(self, instances: list[Instance]) -> dict[str, np.ndarray]:
        """The denoiser's condition inputs for a batch of validated instances."""
        import torch

        from lumos.heads import relative_camera

        names = self.pipeline.condition_names
        if self.head == "t2i":
            emb, mask = self.encoders.embed_texts([str(inst.prompt) for inst in instances])
            size = float(self.pixel_size)
            inputs = {"cond": emb.numpy(), "cond_mask": mask.numpy()}
            if "micro_cond" in names:
                inputs["micro_cond"] = np.full((len(instances), 2), size, np.float32)
            return inputs
        images = np.stack(
            [_fit_square(_image_of(inst), self.pixel_size) for inst in instances]
        )  # (B, S, S, 3)
        inputs = {"cond": self.encoders.embed_images(images).numpy()}
        if "concat_latent" in names:
            inputs["concat_latent"] = self.encoders.encode_images(images).numpy()
        if "frame_cond" in names:
            frames = self.pipeline.num_frames
            if self.head == "novel_view":
                cams = np.stack([self._cameras(inst, frames) for inst in instances])
                rel = relative_camera(torch.from_numpy(cams))  # (B, F, 4)
                inputs["frame_cond"] = rel.numpy()
            else:
                inputs["frame_cond"] = np.tile(np.arange(frames, dtype=np.int64), (len(images), 1))
        return inputs

    @staticmethod
    def _cameras(inst: Instance, frames: int) -> np.ndarray:
        """(F, 4) absolute cameras (azimuth_deg, elevation_deg, radius, 0); view 0 is the input."""
        if inst.cameras is None:
            # Default: views evenly spaced in azimuth, same elevation and radius as the input.
            azimuths = np.arange(frames) * (360.0 / frames)
            return np.stack(
                [azimuths, np.full(frames, 20.0), np.full(frames, 2.5), np.zeros(frames)], axis=1
            ).astype(np.float32)
        out = np.zeros((frames, 4), np.float32)
        out[:, :3] = np.asarray(inst.cameras, np.float32)
        return out

    def generate(self, instances: list[Instance]) -> list[dict]:
        """Images for validated instances; instances sharing steps and guidance run as one batch."""
        import torch

        pipe = self.pipeline
        results: list[dict | None] = [None] * len(instances)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, inst in enumerate(instances):
            groups.setdefault((inst.steps, inst.guidance_scale), []).append(i)
        for (steps, guidance), idx in groups.items():
            batch = [instances[i] for i in idx]
            # Each instance draws its own noise from its seed: same seed, same image, any batch.
            noise = np.concatenate(
                [
                    torch.randn(
                        (1, *pipe.latent_shape), generator=torch.Generator().manual_seed(b.seed)
                    ).numpy()
                    for b in batch
                ]
            )
            images = pipe(
                self.conditions(batch), steps=steps, guidance_scale=guidance, noise=noise
            )  # (B, [F,] H, W, 3) uint8
            for i, inst, image in zip(idx, batch, images, strict=True):
                if image.ndim == 4:
                    results[i] = {"images_b64": [encode_png(f) for f in image], "seed": inst.seed}
                else:
                    results[i] = {"image_b64": encode_png(image), "seed": inst.seed}
        return results  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """KServe's own server arguments (ports, workers, --model_name, ...) plus --export_uri."""
    parser = argparse.ArgumentParser(
        parents=[kserve.model_server.parser], description="Serve an exported Lumos model."
    )
    parser.add_argument(
        "--export_uri", required=True, help="output of `lumos export` (local dir or s3:// prefix)"
    )
    parser.add_argument(
        "--local_dir", default=None, help="where to download the export (default: a temp dir)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args, _ = build_parser().parse_known_args(argv)
    model = LumosModel(args.model_name, args.export_uri, local_dir=args.local_dir)
    model.load()
    kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        enable_grpc=args.enable_grpc,
    ).start([model])


if __name__ == "__main__":
    main()
