"""Ingest's cover-resize against the usual alternatives: speed and distance from a Lanczos resize.

    python bench/resize.py

For each source size (what reduce-on-decode leaves of common photo sizes: a factor below 2, and
one large PNG-like source that no decoder reduces), times one 256 px cover-resize + centre crop:
  lumos         lumos.data.decode.resize_cover (box reduction, Gaussian low-pass, bilinear)
  pil-bicubic   Pillow's antialiased bicubic (reducing_gap 3), what ingest used before
  cv2-area      OpenCV's area averaging
and the mean absolute difference (grey levels, 0-255) of each from Pillow's Lanczos resize.
Prints a table and writes bench/results/resize.json. A benchmark, not a test.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from ingest_throughput import photo_like  # noqa: E402

from lumos.data.decode import cover_crop_box, resize_cover  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "resize.json"
TARGET = (256, 256)
SOURCES = [(300, 300), (360, 360), (450, 300), (500, 500), (640, 360), (3000, 2000)]


def cv2_area(img: Image.Image) -> Image.Image:
    left, top, right, bottom = (round(v) for v in cover_crop_box(*img.size, TARGET))
    pixels = np.asarray(img)[top:bottom, left:right]
    return Image.fromarray(cv2.resize(pixels, TARGET, interpolation=cv2.INTER_AREA))


def pil_bicubic(img: Image.Image) -> Image.Image:
    box = cover_crop_box(*img.size, TARGET)
    return img.resize(TARGET, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


METHODS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "lumos": lambda img: resize_cover(img, TARGET),
    "pil-bicubic": pil_bicubic,
    "cv2-area": cv2_area,
}


def cpu_ms(fn: Callable[[], object], repeat: int) -> float:
    """Best of 3 rounds of the mean CPU time of `repeat` calls, in ms."""
    fn()
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(repeat):
            fn()
        best = min(best, (time.process_time() - start) / repeat)
    return best * 1e3


def main() -> None:
    cv2.setNumThreads(1)
    rows = []
    print(f"{'source':>10s} {'method':>12s} {'ms':>8s} {'vs Lanczos':>11s}")
    for width, height in SOURCES:
        img = Image.open(io.BytesIO(photo_like(0, width, height))).convert("RGB")
        lanczos = img.resize(
            TARGET, Image.Resampling.LANCZOS, box=cover_crop_box(*img.size, TARGET)
        )
        reference = np.asarray(lanczos, dtype=np.float64)
        repeat = 10 if width * height > 10**6 else 50
        for name, method in METHODS.items():
            out = np.asarray(method(img), dtype=np.float64)
            row = {
                "source": f"{width}x{height}",
                "method": name,
                "ms": cpu_ms(lambda m=method, i=img: m(i), repeat),
                "mean_abs_vs_lanczos": float(np.abs(out - reference).mean()),
            }
            rows.append(row)
            print(
                f"{row['source']:>10s} {name:>12s} {row['ms']:8.3f} "
                f"{row['mean_abs_vs_lanczos']:11.2f}"
            )
    summary = {
        "target": list(TARGET),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "pillow": Image.__version__,
        "opencv": cv2.__version__,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    main()
