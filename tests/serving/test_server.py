"""The KServe predictor: through the class (as sklearnserver's test) and as a real HTTP server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from kserve.errors import InvalidInput
from local_servers import free_port
from PIL import Image

from lumos.encoders import FrozenEncoders
from lumos.export.onnx_export import ExportConfig, export
from lumos.serving.onnx_pipeline import OnnxPipeline
from lumos.serving.server import LumosModel, build_parser, parse_instances

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
    """`python -m lumos.serving.server` on a free 127.0.0.1 port; yields its base URL."""
    export_dir, _ = t2i_export
    port = free_port()
    # A file, not a pipe nobody reads: a full pipe would block the server's logging.
    log_path = Path(export_dir).parent / "server.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lumos.serving.server",
            "--export_uri",
            export_dir,
            "--model_name",
            MODEL,
            "--http_port",
            str(port),
            "--grpc_port",
            str(free_port()),
            "--enable_grpc",
            "false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/v1/models/{MODEL}", timeout=2) as resp:
                if json.load(resp).get("ready"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            log.close()
            output = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the server did not become ready on {base}:\n{output}")
        time.sleep(0.5)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


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
