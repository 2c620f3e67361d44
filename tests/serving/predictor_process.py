"""A real predictor process (`python -m lumos.serving.server`) on a free 127.0.0.1 port, and a
tiny export to serve: shared by the serving tests, the rollout test and bench/serving_load.py's
smoke test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from local_servers import free_port

# The tiny-checkpoint builder lives with the export tests.
sys.path.insert(0, str(Path(__file__).parents[1] / "export"))
from tiny_checkpoints import make_checkpoint  # noqa: E402

MODEL = "lumos"


def tiny_export(root: Path, head: str) -> str:
    """A tiny pixel-space model of `head`, exported (8 x 8 images); returns the export dir."""
    from lumos.configs.export import ExportConfig
    from lumos.export.onnx_export import export

    uri, _ = make_checkpoint(root, head, vae=False)
    out = str(root / "export")
    export(ExportConfig(check_batch_sizes=[1]), uri, out)
    return out


def serve(export_dir: str, *extra_args: str, model: str = MODEL) -> Iterator[str]:
    """Run the server on `export_dir` until the generator is closed; yields its base URL once
    the model is ready (after its first sample)."""
    port = free_port()
    # A file, not a pipe nobody reads: a full pipe would block the server's logging.
    log_path = Path(export_dir).parent / f"server-{port}.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "lumos.serving.server",
            "--export_uri", export_dir,
            "--model_name", model,
            "--http_port", str(port),
            "--grpc_port", str(free_port()),
            "--enable_grpc", "false",
            *extra_args,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{base}/v1/models/{model}", timeout=2) as resp:
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
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def post(
    url: str, body: bytes | dict | list | str | None, content_type: str = "application/json"
) -> tuple[int, dict, dict[str, str]]:
    """POST `body` (JSON-encoded unless bytes); returns (status, JSON answer, headers with lower-case names)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.load(resp), {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"raw": raw.decode(errors="replace")}
        return err.code, answer, {k.lower(): v for k, v in err.headers.items()}
