"""The KServe predictor: through the class (as sklearnserver's test) and as a real HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import subprocess
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kserve.errors import InvalidInput
from PIL import Image, ImageOps
from predictor_process import serve

from lumos.configs.export import ExportConfig
from lumos.encoders import FrozenEncoders
from lumos.export.onnx_export import export
from lumos.serving.onnx_pipeline import OnnxPipeline
from lumos.serving.server import (
    MAX_IMAGE_PIXELS,
    LumosModel,
    build_parser,
    decode_image,
    parse_instances,
)

# The tiny-checkpoint builder lives with the export tests.
sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
from tiny_checkpoints import make_checkpoint  # noqa: E402

MODEL = "lumos"


def _png(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert img.format == "PNG"
        return np.asarray(img)


@pytest.fixture(scope="module")
def t2i_export(tmp_path_factory: pytest.TempPathFactory):
    """A tiny pixel-space T2I model, exported (8 x 8 images)."""
    root = tmp_path_factory.mktemp("serve-t2i")
    uri, encoders = make_checkpoint(root, "t2i", vae=False)
    out = str(root / "export")
    export(ExportConfig(check_batch_sizes=[1]), uri, out)
    return out, encoders


@pytest.fixture(scope="module")
def server(t2i_export):
    """The T2I model behind a real HTTP server; yields its base URL."""
    yield from _serve(t2i_export[0])


@pytest.fixture(scope="module")
def i2i_server(tmp_path_factory: pytest.TempPathFactory):
    """A tiny pixel-space I2I model (image requests) behind a real HTTP server."""
    root = tmp_path_factory.mktemp("serve-i2i")
    uri, _ = make_checkpoint(root, "i2i", vae=False)
    export(ExportConfig(check_batch_sizes=[1]), uri, str(root / "export"))
    yield from _serve(str(root / "export"))


def _serve(export_dir: str) -> Iterator[str]:
    """`python -m lumos.serving.server` on a free 127.0.0.1 port; yields its base URL."""
    yield from serve(export_dir)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_predict_over_http_returns_the_pipelines_images(server, t2i_export):
    body = {
        "instances": [
            {"prompt": "a small red circle", "seed": 3, "steps": 4, "guidance_scale": 4.5},
            {"prompt": "two blue squares", "seed": 4, "steps": 4},
        ]
    }
    status, out = _post(f"{server}/v1/models/{MODEL}:predict", body)
    assert status == 200, out
    images = [_png(p["image_b64"]) for p in out["predictions"]]
    assert [p["seed"] for p in out["predictions"]] == [3, 4]
    assert all(img.shape == (8, 8, 3) and img.dtype == np.uint8 for img in images)

    # The same image as the pipeline computes in this process from the same prompt and seed.
    export_dir, encoders_cfg = t2i_export
    emb, mask = FrozenEncoders(encoders_cfg).embed_texts(["a small red circle"])
    expected = OnnxPipeline(export_dir)(
        {"cond": emb.numpy(), "cond_mask": mask.numpy(), "micro_cond": np.full((1, 2), 8.0)},
        steps=4,
        guidance_scale=4.5,
        seed=3,
    )[0]
    assert np.abs(images[0].astype(int) - expected.astype(int)).max() <= 1


def test_bad_requests_get_400_with_the_reason(server):
    url = f"{server}/v1/models/{MODEL}:predict"
    status, out = _post(url, {"instances": [{"seed": 1}]})
    assert status == 400 and "needs a non-empty 'prompt'" in out["error"]
    status, out = _post(url, {"instances": [{"prompt": "x", "stepz": 3}]})
    assert status == 400 and "stepz" in out["error"]
    status, out = _post(url, {"instances": [{"prompt": "x", "steps": 0}]})
    assert status == 400 and "steps" in out["error"]
    status, out = _post(url, {"instances": []})
    assert status == 400 and "1 to 16 instances" in out["error"]
    status, out = _post(url, {"instances": [{"prompt": "x" * 5000}]})
    assert status == 400 and "prompt" in out["error"] and "4000" in out["error"]
    status, out = _post(url, {"instances": [{"prompt": 42}]})
    assert status == 400 and "prompt" in out["error"]
    status, out = _post(url, {"instances": [{"prompt": "x", "guidance_scale": "high"}]})
    assert status == 400 and "guidance_scale" in out["error"]


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with one row of pixel data: a few hundred
    bytes that PIL opens as a huge image (a decompression bomb, as far as the header goes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    row = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def test_images_above_the_pixel_limit_get_400_over_http(i2i_server):
    url = f"{i2i_server}/v1/models/{MODEL}:predict"
    # Just above the limit and fully decodable (a 4097 x 4097 black PNG of ~16 kB).
    buf = io.BytesIO()
    Image.new("L", (4097, 4097)).save(buf, format="PNG")
    over = base64.b64encode(buf.getvalue()).decode()
    status, out = _post(url, {"instances": [{"image_b64": over}]})
    assert status == 400, out
    assert f"4097 x 4097 = 16785409 pixels; the limit is {MAX_IMAGE_PIXELS}" in out["error"]
    # Beyond PIL's own bomb limit (20000 x 20000): PIL raises DecompressionBombError.
    bomb = base64.b64encode(_png_header_only(20000, 20000)).decode()
    status, out = _post(url, {"instances": [{"image_b64": bomb}]})
    assert status == 400, out
    assert "image is too large" in out["error"] and str(MAX_IMAGE_PIXELS) in out["error"]
    # A small image still works on the same server.
    small = base64.b64encode(_png_bytes()).decode()
    status, out = _post(url, {"instances": [{"image_b64": small, "steps": 2}]})
    assert status == 200 and _png(out["predictions"][0]["image_b64"]).shape == (8, 8, 3)


def test_request_images_are_converted_as_ingest_converts_them():
    """Transparency composited on ingest's white background, EXIF orientation applied, 16-bit
    grayscale mapped to 8 bits (PIL's convert("RGB") would give black, sideways, white)."""
    rgba = np.zeros((8, 8, 4), np.uint8)  # transparent, stored RGB black
    rgba[2:6, 2:6] = (255, 0, 0, 255)  # an opaque red square
    decoded = decode_image(_b64(Image.fromarray(rgba, "RGBA"), "PNG"), "x")
    assert decoded[0, 0].tolist() == [255, 255, 255] and decoded[3, 3].tolist() == [255, 0, 0]

    stored = Image.new("RGB", (8, 4), (0, 0, 255))  # stored 8 wide, 4 high
    exif = stored.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    decoded = decode_image(_b64(stored, "JPEG", exif=exif.tobytes()), "x")
    raw = base64.b64decode(_b64(stored, "JPEG", exif=exif.tobytes()))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(raw))))
    assert decoded.shape == upright.shape == (8, 4, 3)

    gray16 = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert decode_image(_b64(gray16, "PNG"), "x")[0, 0].tolist() == [128, 128, 128]


def _b64(img: Image.Image, fmt: str, **save_args) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return base64.b64encode(buf.getvalue()).decode()


def test_model_class_loads_and_predicts(t2i_export):
    export_dir, _ = t2i_export
    model = LumosModel(MODEL, export_dir)
    assert model.load() and model.ready and model.head == "t2i"
    body = {"instances": [{"prompt": "a ring", "seed": 9, "steps": 3}]}
    first = asyncio.run(model.predict(body))
    # The seed alone decides the noise: alone or in a batch, the same instance gives the same image.
    batched = asyncio.run(
        model.predict(
            {"instances": [{"prompt": "other", "seed": 1, "steps": 3}, *body["instances"]]}
        )
    )
    assert first["predictions"][0] == batched["predictions"][1]
    assert _png(first["predictions"][0]["image_b64"]).shape == (8, 8, 3)


def test_parse_instances_for_image_heads():
    png = base64.b64encode(_png_bytes()).decode()
    (inst,) = parse_instances({"instances": [{"image_b64": png, "seed": 2}]}, "i2i")
    assert inst._image.shape == (4, 6, 3)
    with pytest.raises(InvalidInput, match="needs 'image_b64'"):
        parse_instances({"instances": [{"prompt": "a cat"}]}, "video")
    with pytest.raises(InvalidInput, match="not valid base64"):
        parse_instances({"instances": [{"image_b64": "***"}]}, "i2i")
    with pytest.raises(InvalidInput, match="not a readable image"):
        parse_instances({"instances": [{"image_b64": base64.b64encode(b"abc").decode()}]}, "i2i")
    with pytest.raises(InvalidInput, match="'cameras' must be 3 views"):
        parse_instances(
            {"instances": [{"image_b64": png, "cameras": [[0, 0, 1]]}]}, "novel_view", 3
        )
    with pytest.raises(InvalidInput, match="V1 protocol"):
        parse_instances({"inputs": []}, "i2i")


def test_parser_extends_kserves_own():
    args, _ = build_parser().parse_known_args(
        ["--export_uri", "s3://b/export", "--http_port", "9000", "--model_name", "m"]
    )
    assert (args.export_uri, args.http_port, args.model_name) == ("s3://b/export", 9000, "m")
    assert hasattr(args, "workers") and hasattr(args, "grpc_port")


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_server_does_not_import_opencv():
    """The serving image has no OpenCV (docker/requirements-serve.txt): the server must convert
    images with ingest's conversion (lumos.data.rgb) without importing ingest's cv2 code."""
    code = "import sys, lumos.serving.server; print('cv2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_v2_prompt_tensor_gives_the_v1_image(server):
    """The Open Inference Protocol for the text head: a BYTES prompt tensor, same image as V1."""
    v2 = {
        "inputs": [
            {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a small red circle"]},
            {"name": "seed", "datatype": "INT64", "shape": [1], "data": [3]},
            {"name": "steps", "datatype": "INT32", "shape": [1], "data": [4]},
            {"name": "guidance_scale", "datatype": "FP32", "shape": [1], "data": [4.5]},
        ]
    }
    status, out = _post(f"{server}/v2/models/{MODEL}/infer", v2)
    assert status == 200, out
    outputs = {o["name"]: o for o in out["outputs"]}
    assert outputs["image_b64"]["datatype"] == "BYTES" and outputs["image_b64"]["shape"] == [1]
    body = {"instances": [{"prompt": "a small red circle", "seed": 3, "steps": 4}]}
    _, v1 = _post(f"{server}/v1/models/{MODEL}:predict", body)
    assert outputs["image_b64"]["data"][0] == v1["predictions"][0]["image_b64"]
    status, out = _post(f"{server}/v2/models/{MODEL}/infer", {"inputs": [v2["inputs"][1]]})
    assert status == 400 and "needs a non-empty 'prompt'" in out["error"]


def test_encoders_go_to_the_gpu_in_bfloat16_when_there_is_one():
    """--device auto: the GPU if torch sees one, where T5 runs in bfloat16 (its XXL encoder is
    17.7 GiB in float32); on CPU the export's own dtype. --encoder_dtype overrides."""
    import torch

    auto = LumosModel(MODEL, "/unused")._encoder_placement()
    assert auto == (("cuda", "bfloat16") if torch.cuda.is_available() else ("cpu", None))
    assert LumosModel(MODEL, "/unused", device="cuda")._encoder_placement() == ("cuda", "bfloat16")
    pinned = LumosModel(MODEL, "/unused", device="cuda", encoder_dtype="float32")
    assert pinned._encoder_placement() == ("cuda", "float32")
    args, _ = build_parser().parse_known_args(["--export_uri", "/m", "--encoder_dtype", "float16"])
    assert (args.device, args.encoder_dtype) == ("auto", "float16")
