"""Training input rate: batches of cached features out of `lumos.features`, per process.

    python bench/feature_reader.py                      # 200k images, 200 parts, batch 64
    python bench/feature_reader.py --images 1000000 --t2i-images 0 --dir /mnt/nvme/bench

Writes a featurized dataset of generated features with featurize's own writer (SD-VAE latents
4x32x32 and a 768-d DINO CLS per image, float16, parts of --per-part images), then measures:
  map          load_feature_table: the time to map every part, and the memory kept by the
               table, the head's items and the sampler's order (anonymous RSS: the page
               cache is not counted)
  i2i batch    FeatureDataset.batch for the pretraining head, in the training order
               (ResumableSampler: random rows over all parts), batches/s and images/s;
               "first pass" right after the table is mapped, "second pass" over the same batches
  t2i batch    the same for the T2I head on a smaller set whose paired tenth carries T5-XXL
               token embeddings (4096-d float16, 8 KB a token) of 8 to 64 tokens a caption
               (uniform; alt-text-like captions), stored unpadded; batches as the training
               loop assembles them: captions packed, padded to 120 on the GPU (`pad_text`)
  t2i-cpu-pad  the same dataset, each batch padded to 120 tokens here, on the CPU (about 1 MB
               a caption), as the loop did before it packed them
  t2i-padded   the same captions stored padded to 120 tokens (about 1 MB a caption), as
               features written before lumos-features/2 were: the earlier layout, same run
  novel_view   --view-objects objects of 4 views each (meta.group, meta.index, meta.camera),
               items of 4 frames: "items s" is the time to build the head's items and cameras,
               from the arrays featurize stores with each part (no json read)
  novel_view-records  the same dataset with those arrays removed from its parts, as features
               written before them: the items and cameras come from every part's json records
The target (BENCHMARKS.md): the reader delivers at least 3x the training step's images/s per
GPU; XL/2 trains at 542 img/s on an H200 (docs/benchmarks.md), so 1626 img/s per process.
Prints a table and writes bench/results/feature_reader.json (--out). A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lumos.features.format import write_feature_part, write_features_spec
from lumos.features.items import FeatureDataset
from lumos.features.table import load_feature_table
from lumos.storage import Storage
from lumos.training.sampler import ResumableSampler

RESULTS = Path(__file__).parent / "results" / "feature_reader.json"
XL2_TRAIN_IMG_S = 542.3  # Lumos-XL/2 training step on an H200 (docs/benchmarks.md)


def memory_mib() -> dict[str, float]:
    """Anonymous and file-backed resident memory of this process, MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return fields


def view_meta(row: int) -> dict:
    """Sample `row` of a views dataset: object row // 4, view row % 4, as ingest's sidecars."""
    obj, view = divmod(row, 4)
    camera = {"azimuth": 90.0 * view, "elevation": 15.0, "radius": 2.0}
    return {"group": f"objaverse-{obj:08d}", "index": view, "camera": camera}


def write_dataset(
    root: Path,
    images: int,
    per_part: int,
    text: tuple[int, int] | None,
    padded: bool = False,
    views: bool = False,
) -> str:
    """A featurized dataset of `images` generated samples (every 10th paired when `text`, with
    captions of 8 to 64 tokens; `padded` stores them in the earlier padded layout; `views`:
    4 views per object, with their sidecars' meta)."""
    features = Storage.from_uri(str(root)).child("features")
    g = torch.Generator().manual_seed(0)
    parts = []
    for p in range(math.ceil(images / per_part)):
        n = min(per_part, images - p * per_part)
        records = [
            {"key": f"img-{p:05d}-{i:05d}", "meta": view_meta(p * per_part + i) if views else {}}
            for i in range(n)
        ]
        rows = torch.arange(0, n, 10) if text else torch.zeros(0, dtype=torch.int64)
        embeds = mask = None
        if text:
            embeds = torch.randn(len(rows), *text, generator=g)
            lengths = torch.randint(8, 65, (len(rows),), generator=g)
            mask = torch.arange(text[0]) < lengths[:, None]  # (M, L) right-padded, as T5's
            embeds[~mask] = 0
        name = f"part-{p:05d}"
        write_feature_part(
            features, name, records, torch.randn(n, 4, 32, 32, generator=g),
            torch.randn(n, 768, generator=g), rows, embeds, mask,
        )  # fmt: skip
        if padded and embeds is not None and mask is not None:  # overwrite: the earlier layout
            tensors = {"rows": rows, "text_embeds": embeds.half(), "text_mask": mask}
            save_file(tensors, str(root / "features" / f"{name}.text.safetensors"))
        parts.append({"name": name, "count": n, "paired": len(rows), "eval_rows": []})
    shapes = {
        "image": [256, 256],
        "latents": [4, 32, 32],
        "image_embeds": [768],
        "text_embeds": list(text) if text else None,
    }
    write_features_spec(features, parts, shapes, {"bench": True}, None, 256, str(root))
    return str(root)


def disk_mib(root: Path) -> float:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def strip_frame_arrays(dataset: str) -> None:
    """Remove the frame arrays from every part: the layout written before featurize stored them."""
    for path in sorted(Path(dataset, "features").glob("part-*[0-9].safetensors")):
        with safe_open(str(path), framework="pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys() if k not in FRAME_ARRAYS}  # noqa: SIM118
        save_file(kept, str(path))


FRAME_ARRAYS = ("frame_group", "frame_index", "camera")


def measure(dataset: str, case: str, batch: int, batches: int) -> dict:
    head = case.split("-")[0]
    pack_text = case != "t2i-cpu-pad"  # as the training loop does (ignored without text)
    before = memory_mib()
    start = time.perf_counter()
    table = load_feature_table(dataset)
    map_s = time.perf_counter() - start
    start = time.perf_counter()
    items = FeatureDataset.for_head(table, head, num_frames=4 if head == "novel_view" else 1)
    items_s = time.perf_counter() - start
    sampler = ResumableSampler(len(items), batch, seed=0)
    after = memory_mib()  # the table, the head's items and the epoch's order
    order = [sampler.next_batch() for _ in range(batches)]
    passes = []
    for _ in range(2):
        start = time.perf_counter()
        for ids in order:
            out = items.batch(ids, pack_text=pack_text)
        seconds = time.perf_counter() - start
        passes.append(batches * batch / seconds)
    batch_mib = sum(t.numel() * t.element_size() for t in out.values()) / 2**20
    return {
        "case": case,
        "head": head,
        "samples": len(table),
        "items": len(items),
        "parts": len(table.parts),
        "map_s": map_s,
        "items_s": items_s,
        "anon_mib_kept": after["RssAnon"] - before["RssAnon"],
        "bytes_kept_per_sample": (after["RssAnon"] - before["RssAnon"]) * 2**20 / len(table),
        "batch": batch,
        "batch_mib": batch_mib,
        "img_per_s_first_pass": passes[0],
        "img_per_s_second_pass": passes[1],
        "x_target": min(passes) / (3 * XL2_TRAIN_IMG_S),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000, help="0 skips the i2i case")
    parser.add_argument("--t2i-images", type=int, default=10_000, help="0 skips the t2i case")
    parser.add_argument(
        "--view-objects", type=int, default=25_000, help="objects of 4 views; 0 skips views"
    )
    parser.add_argument("--per-part", type=int, default=1000, help="images per part (shard)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--dir", default=None, help="where to write the datasets (default: tmp)")
    parser.add_argument("--out", default=str(RESULTS), help="the JSON report's path")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lumos-bench-features-", dir=args.dir))
    results = []
    try:
        cases = [("i2i", args.images, None)] if args.images else []
        if args.t2i_images:
            cases += [
                ("t2i", args.t2i_images, (120, 4096)),
                ("t2i-padded", args.t2i_images, (120, 4096)),
            ]
        if args.view_objects:
            cases += [("novel_view", 4 * args.view_objects, None)]
        for case, images, text in cases:
            start = time.perf_counter()
            dataset = write_dataset(
                root / case, images, args.per_part, text, case.endswith("padded"),
                views=case == "novel_view",
            )  # fmt: skip
            print(f"wrote {images} {case} samples in {time.perf_counter() - start:.0f} s")
            variants = {"novel_view": ["novel_view-records"], "t2i": ["t2i-cpu-pad"]}
            for variant in [case, *variants.get(case, [])]:
                if variant == "novel_view-records":
                    strip_frame_arrays(dataset)
                # A fresh process: its memory before and after mapping is the table's alone.
                with multiprocessing.get_context("spawn").Pool(1) as pool:
                    result = pool.apply(measure, (dataset, variant, args.batch, args.batches))
                result["disk_mib"] = disk_mib(root / case)
                results.append(result)
            shutil.rmtree(root / case)  # only one dataset on disk at a time
    finally:
        shutil.rmtree(root, ignore_errors=True)

    report = {
        "benchmark": "feature_reader",
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "torch": torch.__version__,
        "target_img_per_s": 3 * XL2_TRAIN_IMG_S,
        "results": results,
    }
    print(f"\n{'case':<19}{'samples':>9}{'parts':>7}{'disk MiB':>9}{'map s':>7}{'items s':>8}"
          f"{'kept MiB':>9}{'B/sample':>9}{'batch MiB':>10}{'img/s 1st':>10}{'img/s 2nd':>10}"
          f"{'x target':>9}")  # fmt: skip
    for r in results:
        print(
            f"{r['case']:<19}{r['samples']:>9}{r['parts']:>7}{r['disk_mib']:>9.0f}"
            f"{r['map_s']:>7.2f}{r['items_s']:>8.2f}"
            f"{r['anon_mib_kept']:>9.1f}{r['bytes_kept_per_sample']:>9.1f}{r['batch_mib']:>10.2f}"
            f"{r['img_per_s_first_pass']:>10.0f}{r['img_per_s_second_pass']:>10.0f}"
            f"{r['x_target']:>9.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
