"""Time and memory of `lumos convert` on a full-size file in the authors' layout (XL/2).

    python bench/convert_checkpoint.py                       # Lumos-I2I XL/2 (3.3 GB file)
    python bench/convert_checkpoint.py --source lumos-t2i    # Lumos-T2I XL/2 at 1024 px

Writes a file with the released checkpoint's names and shapes (random values: the conversion
does not depend on them; the layout is tests/authors_lumos.py, the conversion tests' reference),
runs `lumos convert` on it in a child process, and reports the wall time, the child's peak
resident memory and the checkpoint's size on disk. Needs about 4x the file's size in free disk
and 2x in memory. Prints one JSON line and writes bench/results/convert_checkpoint.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def authors_layout():
    """tests/authors_lumos.py, loaded by path (the tests directory is not a package)."""
    spec = importlib.util.spec_from_file_location("authors_lumos", ROOT / "tests/authors_lumos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="lumos-i2i", choices=["lumos-i2i", "lumos-t2i"])
    parser.add_argument(
        "--workdir", help="where the file and the checkpoint go (default: a tmp dir)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench/results/convert_checkpoint.json"))
    args = parser.parse_args()

    from lumos.models.convert import SOURCES

    spec = SOURCES[args.source]
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        state = authors_layout().random_state(
            args.source,
            scale=spec.pos_embed_scale,
            hidden=1152,
            grid=spec.input_size // 2,  # XL/2: patch 2
        )
        source = Path(tmp) / "released.pth"
        torch.save(state, source)
        file_bytes = source.stat().st_size
        del state

        output = Path(tmp) / "checkpoint"
        cmd = [sys.executable, "-m", "lumos.cli", "convert", "--from", args.source,
               "--checkpoint", str(source), "--output", str(output)]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        meta = json.loads(done.stdout)
        checkpoint_bytes = sum(f.stat().st_size for f in output.rglob("*") if f.is_file())

    result = {
        "source": args.source,
        "num_parameters": meta["num_parameters"],
        "tensors": meta["converted_from"]["tensors"],
        "file_gb": round(file_bytes / 1e9, 2),
        "seconds": round(seconds, 1),
        "peak_rss_gb": round(peak_kib * 1024 / 1e9, 2),
        "checkpoint_gb": round(checkpoint_bytes / 1e9, 2),
        "machine": " ".join(
            x
            for x in (
                platform.machine(),
                platform.processor(),
                f"{torch.get_num_threads()} threads",
            )
            if x
        ),
    }
    print(json.dumps(result))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
