"""Ingest throughput: full ingest against decode-only on the same images, in the same run.

    python bench/ingest_throughput.py    # 400 generated JPEGs per corpus (CORPORA); 256 px output
    python bench/ingest_throughput.py --images 2000 --corpora mixed --workers 1 2 4

Each measurement reports wall-clock images/s and images per CPU-second (the process's and its
worker processes' user + system time): the per-core figure, which stays meaningful on a shared,
busy machine where wall-clock rates swing with other load. Best of --repeat rounds, the
measurements interleaved; "x decode-only" is the median of the per-round ratios.

Measures:
  decode-only      read + full PIL decode to RGB (the baseline the issue asks us to compare with)
  prepare (draft)  lumos.data.decode.prepare_image alone, in-process: decode with JPEG
                   reduce-on-decode, orient, convert, resize + crop, pHash, encode
  prepare (no draft)  the same with a full decode (what the draft saves)
  full ingest      lumos.data.ingest.ingest end to end (listing, reading, dedup, shards, report,
                   manifest) with 1, 2, ... decoding processes; "main process" and "main
                   thread" ms/img are their own CPU time per image: with decoding processes
                   the main thread's is the serial part that bounds one node's rate
Prints a table and writes bench/results/ingest_throughput.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from PIL.JpegImagePlugin import JpegImageFile

from lumos.configs.data import IngestConfig
from lumos.data.decode import ImageRecipe, prepare_image
from lumos.data.ingest import ingest

RESULTS = Path(__file__).parent / "results" / "ingest_throughput.json"


# Source sizes (width, height) per corpus. "2x" and "4x" are exact multiples of the 256 px output
# (reduce-on-decode lands on it: no resampling pass); "mixed" cycles through common camera and web
# sizes, landscape and portrait, where a resampling pass follows the reduced decode, as for most
# images in the wild.
CORPORA: dict[str, list[tuple[int, int]]] = {
    "2x": [(512, 512)],
    "4x": [(1024, 1024)],
    "mixed": [
        (640, 480),
        (800, 600),
        (1024, 768),
        (1280, 720),
        (500, 375),
        (1200, 800),
        (768, 1024),
        (1600, 1200),
        (1080, 1080),
        (720, 1280),
    ],  # fmt: skip
}


def photo_like(seed: int, width: int, height: int) -> bytes:
    """A JPEG with photo-like statistics: gradients, shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = (
        rng.uniform(0, 255, 3) * x[..., None]
        + rng.uniform(0, 255, 3) * y[..., None]
        + rng.uniform(-60, 60, 3) * np.sin(x[..., None] * rng.uniform(2, 12))
    )
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    side = min(width, height)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(side // 16, side // 3, 2)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            (x0, y0, x0 + w, y0 + h), fill=color
        )
    noise = rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    pixels = np.asarray(img, dtype=np.int16) + noise
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Measurement:
    workers: int
    images_per_s: float  # wall clock
    images_per_cpu_s: float  # per core: images / (CPU seconds of this process and its children)
    # CPU ms per image of this (the main) process, reader threads included.
    main_process_cpu_ms_per_image: float
    # CPU ms per image of the main thread alone, which takes every result in order, deduplicates
    # and writes. With decoding processes this is the serial part (the reader threads run beside
    # it, their reads and hashing outside the GIL): one node cannot ingest faster than
    # 1000 / main_thread_cpu_ms_per_image images/s.
    main_thread_cpu_ms_per_image: float
    per_core_vs_decode_only: float  # median over rounds of (images per CPU-second) / baseline's


@dataclass
class Round:
    images_per_s: float
    images_per_cpu_s: float
    process_ms: float  # main process CPU ms per image
    thread_ms: float  # main thread CPU ms per image


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process, and of its finished children."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def run_once(work: Callable[[], int]) -> Round:
    """One call of `work` (which returns an image count). Decoding processes are joined before
    ingest returns, so their time is in the children's."""
    (own0, children0), thread0, wall0 = cpu_seconds(), time.thread_time(), time.perf_counter()
    n = work()
    wall, thread = time.perf_counter() - wall0, time.thread_time() - thread0
    own1, children1 = cpu_seconds()
    own, children = own1 - own0, children1 - children0
    return Round(n / wall, n / max(own + children, 1e-9), own / n * 1e3, thread / n * 1e3)


BASELINE = "decode-only (full decode)"


def measure_interleaved(
    works: dict[str, tuple[int, Callable[[], int]]], repeat: int
) -> dict[str, Measurement]:
    """Run every measurement once per round, `repeat` rounds (the baseline first in each), and
    keep each one's best rates. Each ratio to the baseline is the median over rounds of the
    ratio within a round: the machine's speed drifts between rounds more than within one."""
    runs: dict[str, list[Round]] = {name: [] for name in works}
    for _ in range(repeat):
        for name, (_, work) in works.items():
            runs[name].append(run_once(work))
    baseline = [r.images_per_cpu_s for r in runs[BASELINE]]
    return {
        name: Measurement(
            workers,
            max(r.images_per_s for r in runs[name]),
            max(r.images_per_cpu_s for r in runs[name]),
            min(r.process_ms for r in runs[name]),
            min(r.thread_ms for r in runs[name]),
            statistics.median(
                r.images_per_cpu_s / b for r, b in zip(runs[name], baseline, strict=True)
            ),
        )
        for name, (workers, _) in works.items()
    }


def decode_only(datas: list[bytes]) -> int:
    for data in datas:
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB")
    return len(datas)


def prepare_all(datas: list[bytes], recipe: ImageRecipe, draft: bool) -> int:
    original_draft = JpegImageFile.draft
    if not draft:  # disable reduce-on-decode for this comparison only
        JpegImageFile.draft = lambda self, mode, size: None  # type: ignore[method-assign]
    try:
        for data in datas:
            prepare_image(data, recipe)
    finally:
        JpegImageFile.draft = original_draft  # type: ignore[method-assign]
    return len(datas)


def measure_corpus(args: argparse.Namespace, corpus: str) -> dict:
    """Every measurement on `args.images` generated JPEGs of the corpus's sizes; prints and
    returns a table."""
    sizes = CORPORA[corpus]
    with tempfile.TemporaryDirectory(prefix="lumos-bench-") as tmp:
        source = Path(tmp) / "raw"
        source.mkdir()
        for i in range(args.images):
            (source / f"img-{i:06d}.jpg").write_bytes(photo_like(i, *sizes[i % len(sizes)]))
        datas = [p.read_bytes() for p in sorted(source.iterdir())]
        source_mb = sum(len(d) for d in datas) / 1e6
        cfg = IngestConfig(resolution=args.resolution, near_duplicate_distance=4)
        recipe = cfg.recipe()
        datasets: list[str] = []

        def full_ingest(workers: int) -> int:
            datasets.append(str(Path(tmp) / f"ds-{len(datasets)}"))
            run_cfg = cfg.model_copy(update={"workers": workers})
            result = ingest(run_cfg, str(source), datasets[-1], progress=False)
            assert result.ingested == args.images, result
            return result.ingested

        decode_only(datas[:20])  # warm up PIL's plugins
        load_before = os.getloadavg()[0]
        works: dict[str, tuple[int, Callable[[], int]]] = {
            BASELINE: (1, lambda: decode_only(datas)),
            "prepare_image, JPEG draft": (1, lambda: prepare_all(datas, recipe, True)),
            "prepare_image, no draft": (1, lambda: prepare_all(datas, recipe, False)),
        }
        for workers in args.workers:
            works[f"full ingest, {workers} worker(s)"] = (workers, lambda w=workers: full_ingest(w))
        rows = measure_interleaved(works, args.repeat)
        load_after = os.getloadavg()[0]

    print(
        f"\n{corpus}: {args.images} JPEGs {', '.join(f'{w}x{h}' for w, h in sizes)} "
        f"({source_mb:.1f} MB) -> {args.resolution} px; "
        f"{os.cpu_count()} CPU cores; best of {args.repeat}; "
        f"load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(
        f"{'measurement':36s} {'workers':>7s} {'img/s wall':>11s} {'img/s/core':>11s} "
        f"{'x decode-only':>14s} {'main process ms/img':>20s} {'main thread ms/img':>19s}"
    )
    for name, row in rows.items():
        print(
            f"{name:36s} {row.workers:7d} {row.images_per_s:11.1f} {row.images_per_cpu_s:11.1f} "
            f"{row.per_core_vs_decode_only:14.2f} {row.main_process_cpu_ms_per_image:20.3f} "
            f"{row.main_thread_cpu_ms_per_image:19.3f}"
        )
    return {
        "images": args.images,
        "source_sizes": [f"{w}x{h}" for w, h in sizes],
        "source_mb": round(source_mb, 2),
        "load_average": [round(load_before, 2), round(load_after, 2)],
        "rows": {name: asdict(row) for name, row in rows.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=400, help="images per source size")
    parser.add_argument("--corpora", nargs="+", choices=sorted(CORPORA), default=list(CORPORA))
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=5, help="best of N interleaved rounds")
    args = parser.parse_args()

    summary = {
        "resolution": args.resolution,
        "cpu_cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "repeat": args.repeat,
        "corpora": {corpus: measure_corpus(args, corpus) for corpus in args.corpora},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
