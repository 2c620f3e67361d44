"""Load on running predictors: latency percentiles, images/s and errors at rising concurrency.

    python bench/serving_load.py --tiny                          # CPU: tiny exports, own servers
    python bench/serving_load.py \\
        --target t2i=http://lumos-t2i.lumos.example.com/lumos-t2i \\
        --target i2i=http://lumos-i2i.lumos.example.com/lumos-i2i  # predictors in a cluster

Each level runs `concurrency` clients (1, 4, 16, 64 by default) that send V1 requests (one
instance each) back to back until the level has sent --requests-per-client x concurrency
requests. The requests follow a fixed mix of heads (MIX, cycled in order, so every level sends
the same mix): t2i prompts, and the image heads' fixed 64 x 64 input image. A target is
`head=<base URL>/<model name>`. --tiny builds tiny pixel-space exports of the mix's heads
(tests/export/tiny_checkpoints.py) and starts one `python -m lumos.serving.server` per head on
127.0.0.1 with the batching flags given here.

Per level it prints p50/p95/p99 latency of the successful requests, images/s (successful
instances over the level's wall time), and the errors by kind (HTTP 429/503 overload, other
HTTP errors, connection errors); writes everything to bench/results/serving_load.json (--out).
A benchmark, not a test: figures go to docs/benchmarks.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "serving_load.json"
MIX = ("t2i", "t2i", "i2i", "t2i", "novel_view", "t2i", "i2i", "t2i")  # 5 : 2 : 1
PROMPTS = ("a red circle", "two blue squares", "a green triangle on white", "a yellow ring")


def _input_png() -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def request_body(head: str, i: int, steps: int, image_b64: str) -> dict[str, Any]:
    if head == "t2i":
        instance: dict[str, Any] = {"prompt": PROMPTS[i % len(PROMPTS)]}
    else:
        instance = {"image_b64": image_b64}
    return {"instances": [{**instance, "seed": i, "steps": steps}]}


def send(url: str, body: dict[str, Any], timeout: float) -> tuple[str, float]:
    """('ok' | 'overloaded' | 'http <code>' | 'connection', seconds)."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            outcome = "ok"
    except urllib.error.HTTPError as err:
        err.read()
        outcome = "overloaded" if err.code in (429, 503) else f"http {err.code}"
    except OSError:
        outcome = "connection"
    return outcome, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(
    targets: dict[str, str], concurrency: int, total: int, steps: int, timeout: float
) -> dict[str, Any]:
    image_b64 = _input_png()
    counter = iter(range(total))
    lock = threading.Lock()
    latencies: list[float] = []
    by_head: dict[str, list[float]] = {h: [] for h in targets}
    errors: dict[str, int] = {}

    def client() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            head = MIX[i % len(MIX)]
            outcome, seconds = send(
                f"{targets[head]}:predict", request_body(head, i, steps, image_b64), timeout
            )
            with lock:
                if outcome == "ok":
                    latencies.append(seconds)
                    by_head[head].append(seconds)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(concurrency):
            pool.submit(client)
    wall = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": total,
        "ok": len(latencies),
        "errors": errors,
        "wall_s": wall,
        "images_per_s": len(latencies) / wall,
        "p50_s": percentile(latencies, 0.50),
        "p95_s": percentile(latencies, 0.95),
        "p99_s": percentile(latencies, 0.99),
        "mean_s": statistics.fmean(latencies) if latencies else None,
        "p50_by_head_s": {h: percentile(v, 0.5) for h, v in by_head.items()},
    }


def start_tiny_servers(stack: ExitStack, args: argparse.Namespace) -> dict[str, str]:
    """Tiny exports of the mix's heads, each behind its own server process."""
    repo = Path(__file__).resolve().parents[1]
    sys.path[:0] = [str(repo / "tests"), str(repo / "tests" / "serving")]
    from predictor_process import serve, tiny_export

    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="serving-load-")))
    targets = {}
    for head in sorted(set(MIX)):
        export_dir = tiny_export(root / head, head)
        server = serve(
            export_dir,
            f"--max_batch_size={args.max_batch_size}",
            f"--max_batch_wait_ms={args.max_batch_wait_ms}",
            f"--max_queue={args.max_queue}",
            model=f"lumos-{head.replace('_', '-')}",
        )
        base = next(server)
        stack.callback(server.close)
        targets[head] = f"{base}/v1/models/lumos-{head.replace('_', '-')}"
    return targets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", default=[], metavar="HEAD=URL/MODEL")
    parser.add_argument("--tiny", action="store_true", help="serve tiny exports on 127.0.0.1")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--max-batch-size", type=int, default=8, help="--tiny servers")
    parser.add_argument("--max-batch-wait-ms", type=float, default=10.0, help="--tiny servers")
    parser.add_argument("--max-queue", type=int, default=64, help="--tiny servers")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        if args.tiny:
            targets = start_tiny_servers(stack, args)
        else:
            targets = dict(t.split("=", 1) for t in args.target)
            targets = {h: f"{u.rstrip('/').rsplit('/', 1)[0]}/v1/models/"
                          f"{u.rstrip('/').rsplit('/', 1)[1]}" for h, u in targets.items()}  # fmt: skip
        missing = sorted(set(MIX) - set(targets))
        if missing:
            parser.error(f"no --target for the mix's heads {missing} (or use --tiny)")
        levels = []
        for concurrency in args.concurrency:
            total = concurrency * args.requests_per_client
            levels.append(run_level(targets, concurrency, total, args.steps, args.timeout))
            lv = levels[-1]
            print(
                f"concurrency {concurrency:3d}: p50 {lv['p50_s'] or 0:.3f} s  "
                f"p95 {lv['p95_s'] or 0:.3f} s  p99 {lv['p99_s'] or 0:.3f} s  "
                f"{lv['images_per_s']:.1f} images/s  ok {lv['ok']}/{total}  "
                f"errors {lv['errors'] or 'none'}",
                flush=True,
            )
    result = {
        "benchmark": "serving_load",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },  # fmt: skip
        "mix": list(MIX),
        "steps": args.steps,
        "tiny": args.tiny,
        "batching": {
            "max_batch_size": args.max_batch_size,
            "max_batch_wait_ms": args.max_batch_wait_ms,
            "max_queue": args.max_queue,
        }
        if args.tiny
        else None,  # fmt: skip
        "levels": levels,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
