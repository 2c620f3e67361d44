"""KServe predictor for an exported Lumos model: V1 and V2 (Open Inference Protocol) requests.

    python -m lumos.serving.server --export_uri s3://lumos/runs/r1/export/t2i --model_name lumos

`load()` downloads the export (`lumos export` output) through `Storage` (in a cluster KServe's
storage initializer has already put it in /mnt/models), opens the onnxruntime sessions
(TensorRT > CUDA > CPU, as available) and builds the frozen encoders the export recorded (T5 for
text, DINO for images, the VAE encoder for the heads that condition on a latent) on the GPU when
there is one (`--device auto`; in bfloat16 there, `--encoder_dtype auto`). Their weights are read
at the recorded paths; s3:// weights are downloaded once into $LUMOS_CACHE_DIR (a volume in the
cluster). The model is ready only after a first sample succeeded (finite output).

V1, `POST /v1/models/<name>:predict`:

    t2i:         {"instances": [{"prompt": "a red circle", "seed": 0, "steps": 20, "guidance_scale": 4.5}]}
    i2i:         {"instances": [{"image_b64": "<PNG/JPEG base64>", "seed": 0}]}
    novel_view:  {"instances": [{"image_b64": "...", "cameras": [[0, 20, 2.5], [90, 20, 2.5], ...]}]}
                 cameras: (azimuth_deg, elevation_deg, radius) per view, view 0 = the input view;
                 default: views evenly spaced in azimuth around the input view's camera
    video:       {"instances": [{"image_b64": "<first frame>"}]}

Response: {"predictions": [{"image_b64": "<PNG>", "seed": 0}]} (multi-frame heads: "images_b64",
one PNG per frame).

V2, `POST /v2/models/<name>/infer`: one tensor per instance field, batch first (V2_INPUTS):

    {"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [2], "data": ["a cat", "a dog"]},
                {"name": "seed", "datatype": "INT64", "shape": [2], "data": [0, 1]}]}

Response outputs: "image_b64" (BYTES, [B] or [B, F] for multi-frame heads) and "seed" (INT64 [B]).
Both protocols go through the same validation: a bad request gets HTTP 400 with {"error": "<what
was wrong>"} (V2 bodies that are not an inference request at all: FastAPI's 422), never a 5xx.
Request images are converted as ingest converted the training images (EXIF orientation, 16-bit to
8-bit, transparency on the ingest background).

Requests from concurrent clients are batched (`--max_batch_size` instances, waiting at most
`--max_batch_wait_ms` for more); past `--max_queue` queued instances a request gets HTTP 429 with
Retry-After at once. An instance's image depends only on its own fields (its seed draws its
noise), not on the batch. Metrics: lumos.serving.metrics, at /metrics.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import math
import time
import warnings
from typing import TYPE_CHECKING, Annotated, Any

import kserve
import numpy as np
from kserve.errors import InferenceError, InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from lumos.configs.data import DEFAULT_BACKGROUND
from lumos.data.rgb import to_rgb
from lumos.serving.batching import MicroBatcher, Overloaded
from lumos.serving.metrics import PREDICTOR_METRICS
from lumos.serving.onnx_pipeline import OnnxPipeline, served_encoders, to_uint8

if TYPE_CHECKING:
    from lumos.encoders import FrozenEncoders

MAX_INSTANCES = 16  # per request: bounds the work one request can ask for
MAX_IMAGE_BYTES = 16 << 20
MAX_PROMPT_CHARS = 4000  # far beyond what the text encoder's tokens hold; bounds tokenizer work
# Width x height limit, checked from the header before decoding. The model sees the image
# center-cropped to its pixel grid (at most 1024 px a side), so larger images only cost decode
# time and memory (48 MB as RGB at the limit, x16 instances per request): 4096 x 4096 admits
# 12 MP camera photos and rejects a tiny PNG that decodes to gigabytes.
MAX_IMAGE_PIXELS = 4096 * 4096
# Transparent pixels are composited on the background ingest used for the training images. The
# export does not record it (a checkpoint names its dataset, not its ingest settings), so this is
# IngestConfig.background's default: a dataset ingested with another background needs it here too.
INGEST_BACKGROUND = DEFAULT_BACKGROUND


FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class Instance(BaseModel):
    """One instance (a V1 instance, or one row of the V2 tensors). Which of prompt / image_b64 is
    required depends on the head. Strict: a string where a number belongs is an error, not parsed."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    image_b64: str | None = None
    cameras: list[list[FiniteFloat]] | None = None
    seed: int = Field(0, ge=0, lt=2**63)
    steps: int = Field(20, ge=1, le=200)
    guidance_scale: float = Field(4.5, ge=1.0, le=50.0, allow_inf_nan=False)
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
    return validate_instances(raw, head, frames)


def validate_instances(raw: list[Any], head: str, frames: int = 1) -> list[Instance]:
    """Validate instance dicts (from V1 `instances` or V2 tensors) for `head`; see parse_instances."""
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

    if len(data) > (MAX_IMAGE_BYTES + 2) // 3 * 4 + 4:  # before decoding it
        raise _bad(
            f"{where}: image_b64 is {len(data)} characters, the limit is {MAX_IMAGE_BYTES} bytes"
        )
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
    if inst._image is None:
        raise RuntimeError("an instance of an image head reached the model without its image")
    return inst._image


# V2 (Open Inference Protocol) inputs: tensor name -> (datatypes accepted, dimensions after batch).
# BYTES tensors hold strings; the numbers may come in any integer / float datatype of the kind.
_INTS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")
_FLOATS = ("FP32", "FP64")
V2_INPUTS: dict[str, tuple[tuple[str, ...], int]] = {
    "prompt": (("BYTES",), 0),
    "image_b64": (("BYTES",), 0),
    "seed": (_INTS, 0),
    "steps": (_INTS, 0),
    "guidance_scale": (_FLOATS + _INTS, 0),
    "cameras": (_FLOATS + _INTS, 2),  # (B, F, 3)
}


def _flatten(data: Any, where: str) -> list[Any]:
    out: list[Any] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _v2_value(value: Any, datatype: str, where: str) -> Any:
    if datatype == "BYTES":
        if isinstance(value, bytes):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                raise _bad(f"{where}: BYTES element is not UTF-8 text") from None
        if not isinstance(value, str):
            raise _bad(f"{where}: BYTES data must be strings, got {type(value).__name__}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{where}: {datatype} data must be numbers, got {type(value).__name__}")
    if datatype in _INTS:
        if isinstance(value, float):
            raise _bad(f"{where}: {datatype} data must be integers, got {value!r}")
        return value
    if not math.isfinite(value):
        raise _bad(f"{where}: {datatype} data must be finite, got {value!r}")
    return float(value)


def instances_from_v2(request: InferRequest) -> list[dict[str, Any]]:
    """V2 input tensors -> one instance dict per batch row (then validated as V1 instances)."""
    columns: dict[str, list[Any]] = {}
    batch: int | None = None
    if not request.inputs:
        raise _bad("the V2 request has no inputs: send one tensor per field, e.g. 'prompt'")
    for tensor in request.inputs:
        name, datatype, shape = tensor.name, str(tensor.datatype).upper(), tensor.shape
        where = f"input {name!r}"
        if name not in V2_INPUTS:
            raise _bad(f"{where} is not an input of this model; inputs: {', '.join(V2_INPUTS)}")
        if name in columns:
            raise _bad(f"{where} is given twice")
        datatypes, extra_dims = V2_INPUTS[name]
        if datatype not in datatypes:
            raise _bad(f"{where}: datatype {datatype} is not accepted; use one of {datatypes}")
        if (
            not isinstance(shape, list)
            or len(shape) != 1 + extra_dims
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise _bad(
                f"{where}: shape {shape} must be {1 + extra_dims} non-negative dimensions "
                f"(batch first{', then views and 3 camera values' if extra_dims else ''})"
            )
        if extra_dims and shape[2] != 3:
            raise _bad(
                f"{where}: shape {shape}: each camera is [azimuth_deg, elevation_deg, radius]"
            )
        if batch is not None and shape[0] != batch:
            raise _bad(f"{where}: batch size {shape[0]} differs from the other inputs' {batch}")
        batch = shape[0]
        if not 1 <= batch <= MAX_INSTANCES:
            raise _bad(f"send 1 to {MAX_INSTANCES} instances per request, got {batch}")
        data = tensor.data
        if isinstance(data, np.ndarray):
            data = data.tolist()
        if not isinstance(data, list):
            raise _bad(f"{where}: data must be a list")
        flat = _flatten(data, where)
        if len(flat) != math.prod(shape):
            raise _bad(
                f"{where}: shape {shape} holds {math.prod(shape)} values, data has {len(flat)}"
            )
        values = [_v2_value(v, datatype, where) for v in flat]
        if extra_dims:
            views = shape[1]
            columns[name] = [
                [values[(b * views + v) * 3 : (b * views + v) * 3 + 3] for v in range(views)]
                for b in range(batch)
            ]
        else:
            columns[name] = values
    if batch is None:
        raise _bad("the V2 request has no inputs")
    return [{name: col[b] for name, col in columns.items()} for b in range(batch)]


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
    """An exported Lumos model behind KServe's V1 and V2 protocols: conditions in, PNGs out."""

    def __init__(
        self,
        name: str,
        export_uri: str,
        local_dir: str | None = None,
        *,
        device: str = "auto",
        encoder_dtype: str = "auto",
        max_batch_size: int = 8,
        max_batch_wait_ms: float = 10.0,
        max_queue: int = 64,
    ):
        super().__init__(name)
        self.export_uri = export_uri
        self.local_dir = local_dir
        self.device = device
        self.encoder_dtype = encoder_dtype
        self._pipeline: OnnxPipeline | None = None
        self._encoders: FrozenEncoders | None = None
        self.batcher = MicroBatcher(
            self._generate_or_errors,
            max_batch=max_batch_size,
            max_wait_s=max_batch_wait_ms / 1000.0,
            max_queue=max_queue,
            name=name,
        )
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

    def _encoder_placement(self) -> tuple[str, str | None]:
        """(device, dtype override) of the frozen encoders: the GPU when there is one, where T5
        runs in bfloat16 (its float32 XXL encoder alone is 17.7 GiB)."""
        import torch

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.encoder_dtype != "auto":
            return device, self.encoder_dtype
        return device, ("bfloat16" if device.startswith("cuda") else None)

    def load(self) -> bool:
        from lumos.encoders import FrozenEncoders
        from lumos.export.onnx_export import encoders_config

        self._pipeline = OnnxPipeline.from_uri(self.export_uri, self.local_dir)
        cfg = encoders_config(self._pipeline.meta["encoders"])
        device, dtype = self._encoder_placement()
        if dtype is not None:
            cfg = cfg.model_copy(update={"dtype": dtype})
        self._encoders = FrozenEncoders(cfg, device)
        # Load the encoders this head needs now: missing weights fail the start, not a request.
        parts = served_encoders(self._pipeline.meta)
        if "text_encoder" in parts:
            _ = self.encoders.text_dim
        if "image_encoder" in parts:
            _ = self.encoders.image_embed_dim
        if "vae" in parts:
            _ = self.encoders.latent_channels
        # Ready only once a first sample came out right: a model that loads but cannot generate
        # (missing encoder files, NaN weights, a broken graph) never takes traffic.
        (first,) = self._generate_or_errors([self._first_sample_instance()])
        if isinstance(first, Exception):
            raise RuntimeError(f"model {self.name}: the first sample failed: {first}") from first
        self.ready = True
        return self.ready

    def _first_sample_instance(self) -> Instance:
        if self.head == "t2i":
            return Instance(prompt="a red circle on a white background", steps=2)
        inst = Instance(image_b64="", steps=2)
        inst._image = np.full((self.pixel_size, self.pixel_size, 3), 128, np.uint8)
        return inst

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
        payload: dict | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        if not self.ready:
            raise RuntimeError(f"model {self.name} is not loaded")
        v2 = isinstance(payload, InferRequest)
        metrics = PREDICTOR_METRICS
        metrics.requests.labels(model=self.name, protocol="v2" if v2 else "v1").inc()
        start = time.monotonic()
        try:
            # Validation decodes the images: milliseconds per image, done here so that a bad
            # request is refused before it takes a place in the queue.
            if v2:
                instances = validate_instances(
                    instances_from_v2(payload), self.head, self.pipeline.num_frames
                )
            elif isinstance(payload, dict):
                instances = parse_instances(payload, self.head, self.pipeline.num_frames)
            else:
                raise _bad(
                    "the request body must be JSON (Content-Type: application/json): "
                    '{"instances": [...]} (V1) or an inference request (V2)'
                )
            results = await self.batcher.submit(instances)
        except InvalidInput:
            metrics.errors.labels(model=self.name, reason="invalid_input").inc()
            raise
        except Overloaded:
            metrics.errors.labels(model=self.name, reason="overloaded").inc()
            raise
        except Exception:
            metrics.errors.labels(model=self.name, reason="internal").inc()
            raise
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            metrics.errors.labels(model=self.name, reason="bad_output").inc()
            raise InferenceError(str(failed[0]))
        metrics.latency.labels(model=self.name).observe(time.monotonic() - start)
        if not v2:
            return {"predictions": results}
        return self._v2_response(payload, results)

    def _v2_response(self, request: InferRequest, results: list[dict]) -> InferResponse:
        if "images_b64" in results[0]:
            images = [r["images_b64"] for r in results]
            shape = [len(images), len(images[0])]
        else:
            images = [r["image_b64"] for r in results]
            shape = [len(images)]
        outputs = [
            InferOutput("image_b64", shape, "BYTES", images),
            InferOutput("seed", [len(results)], "INT64", [r["seed"] for r in results]),
        ]
        return InferResponse(
            response_id=request.id or "", model_name=self.name, infer_outputs=outputs
        )

    # ------------------------------------------------------------------ the work

    def conditions(self, instances: list[Instance]) -> dict[str, np.ndarray]:
        """The denoiser's condition inputs for a batch of validated instances."""
        import torch

        from lumos.heads import relative_camera

        def host(x: torch.Tensor) -> np.ndarray:  # encoders may run on the GPU, in bf16
            return x.detach().float().cpu().numpy() if x.is_floating_point() else x.cpu().numpy()

        names = self.pipeline.condition_names
        if self.head == "t2i":
            emb, mask = self.encoders.embed_texts([str(inst.prompt) for inst in instances])
            size = float(self.pixel_size)
            inputs = {"cond": host(emb), "cond_mask": host(mask)}
            if "micro_cond" in names:
                inputs["micro_cond"] = np.full((len(instances), 2), size, np.float32)
            return inputs
        images = np.stack(
            [_fit_square(_image_of(inst), self.pixel_size) for inst in instances]
        )  # (B, S, S, 3)
        inputs = {"cond": host(self.encoders.embed_images(images))}
        if "concat_latent" in names:
            inputs["concat_latent"] = host(self.encoders.encode_images(images))
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
        """Images for validated instances; raises if any instance's output fails the check."""
        results = self._generate_or_errors(instances)
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results  # type: ignore[return-value]

    def _generate_or_errors(self, instances: list[Instance]) -> list[dict | Exception]:
        """Per instance: its images, or the error of an output that failed the check (non-finite
        values). Instances sharing steps and guidance run as one batch. Blank images (one colour)
        are returned but counted (lumos_serving_bad_outputs_total{reason="blank"})."""
        import torch

        pipe = self.pipeline
        metrics = PREDICTOR_METRICS
        results: list[dict | Exception | None] = [None] * len(instances)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, inst in enumerate(instances):
            groups.setdefault((inst.steps, inst.guidance_scale), []).append(i)
        for (steps, guidance), idx in groups.items():
            batch = [instances[i] for i in idx]
            metrics.batch_size.labels(model=self.name)  # the series exists before the first batch
            # Each instance draws its own noise from its seed: same seed, same image, any batch.
            noise = np.concatenate(
                [
                    torch.randn(
                        (1, *pipe.latent_shape), generator=torch.Generator().manual_seed(b.seed)
                    ).numpy()
                    for b in batch
                ]
            )
            latents = pipe.sample_latents(
                self.conditions(batch), steps=steps, guidance_scale=guidance, noise=noise
            )
            decoded = pipe.decode(latents)  # (B, [F,] 3, H, W) floats
            for i, inst, values in zip(idx, batch, decoded, strict=True):
                if not np.isfinite(values).all():
                    metrics.bad_outputs.labels(model=self.name, reason="non_finite").inc()
                    results[i] = InferenceError(
                        f"the model produced non-finite values for seed {inst.seed}: "
                        "its output failed the check"
                    )
                    continue
                image = to_uint8(values)  # ([F,] H, W, 3) uint8
                if image.max() == image.min():
                    metrics.bad_outputs.labels(model=self.name, reason="blank").inc()
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
    parser.add_argument(
        "--device",
        default="auto",
        help="the frozen encoders' device: auto (cuda if any), cpu, cuda",
    )
    parser.add_argument(
        "--encoder_dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="the frozen encoders' dtype; auto: bfloat16 on a GPU, the export's dtype on CPU",
    )
    parser.add_argument(
        "--max_batch_size", type=int, default=8, help="instances per model call (micro-batching)"
    )
    parser.add_argument(
        "--max_batch_wait_ms",
        type=float,
        default=10.0,
        help="how long the first request of a batch waits for others",
    )
    parser.add_argument(
        "--max_queue",
        type=int,
        default=64,
        help="queued instances beyond which requests get 429 with Retry-After",
    )
    return parser


def _validation_error_answer(request: Any, exc: Any) -> Any:
    """FastAPI's 422 for a V2 body that is not an inference request, with the reasons but without
    echoing the input: FastAPI's own answer echoes it and fails (HTTP 500) on an infinite float."""
    from fastapi.responses import JSONResponse

    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}"
        for e in exc.errors()
    )
    return JSONResponse(
        status_code=422, content={"error": f"not a V2 inference request: {problems}"}
    )


def _install_validation_error_answer() -> None:
    """Add `_validation_error_answer` to the app KServe's RESTServer builds at start (KServe has
    no hook for extra exception handlers)."""
    from fastapi.exceptions import RequestValidationError
    from kserve.protocol.rest.server import RESTServer

    original = RESTServer._add_exception_handlers
    if getattr(original, "lumos_installed", False):
        return

    def add_exception_handlers(self: Any, app: Any) -> None:
        original(self, app)
        app.add_exception_handler(RequestValidationError, _validation_error_answer)

    add_exception_handlers.lumos_installed = True  # type: ignore[attr-defined]
    RestServer: Any = RESTServer
    RestServer._add_exception_handlers = add_exception_handlers


def main(argv: list[str] | None = None) -> None:
    args, _ = build_parser().parse_known_args(argv)
    _install_validation_error_answer()
    model = LumosModel(
        args.model_name,
        args.export_uri,
        local_dir=args.local_dir,
        device=args.device,
        encoder_dtype=args.encoder_dtype,
        max_batch_size=args.max_batch_size,
        max_batch_wait_ms=args.max_batch_wait_ms,
        max_queue=args.max_queue,
    )
    model.load()
    kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        enable_grpc=args.enable_grpc,
    ).start([model])


if __name__ == "__main__":
    main()
