"""Featurize: run the frozen encoders once per image and store the features with the dataset.

The VAE, DINO and T5 never change during training, and the SD VAE encoder alone is slower than
an XL/2 training step, so the loop reads cached features instead of images. The files and their
layout are `lumos.features.format`'s (its writer and readers together); this stage computes them.

    result = featurize(FeaturizeConfig(), "s3://lumos/datasets/images")  # -> <dataset>/features/

Text is stored unpadded: a typical caption fills a quarter of T5's 120 positions, and a padded
row of T5-XXL tokens is about 1 MB. Datasets ingested with aspect buckets hold several image
sizes; images are encoded in batches of one size, and training batches one size at a time
(PixArt's multi-aspect training; the model takes any grid and conditions T2I on the image size).

One part per shard. A part's json is written after its tensors and records the encoders and the
shard it came from, so a rerun (a retried pipeline step) skips every part already featurized with
the same encoders and redoes only the rest.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict
from tqdm.auto import tqdm

from lumos.configs.training import FeaturizeConfig
from lumos.data.shards import iter_shard_records
from lumos.errors import DatasetError, FeaturesError, NotFoundError
from lumos.features.format import (
    FEATURES_DIR,
    is_eval_record,
    write_feature_part,
    write_features_spec,
)
from lumos.storage import Storage

DATASET_FORMAT = "lumos-dataset/1"


class FeaturizeResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    features_uri: str
    num_samples: int
    num_paired: int  # samples with text embeddings
    parts: int
    parts_skipped: int  # already featurized with the same encoders
    shapes: dict[str, list[int] | None]
    sizes: list[
        dict[str, Any]
    ]  # every image size: {"image": [H, W], "latents": [C, h, w], "count"}
    images_per_second: float  # over the parts computed in this call


def featurize(
    cfg: FeaturizeConfig, dataset_uri: str, partition: dict[str, Any] | None = None
) -> FeaturizeResult:
    """Compute the features of every shard of `dataset_uri` (skipping parts already done) and
    write features.json. With `partition` (a work item of `plan_featurize`), only its shards:
    their summary goes to the features directory for `merge_featurize`, which writes
    features.json once every partition is done (a fan-out over GPU pods)."""
    from lumos.encoders import FrozenEncoders  # heavy: transformers / diffusers models

    dataset = Storage.from_uri(dataset_uri)
    manifest_bytes = _read_manifest_bytes(dataset)
    manifest = json.loads(manifest_bytes)
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    features = dataset.child(FEATURES_DIR)
    encoders_spec = cfg.encoders.model_dump(mode="json")
    shards = list(enumerate(manifest["shards"]))
    if partition is not None:
        _check_partition(partition, dataset.uri, manifest_sha256)
        shards = shards[partition["start"] : partition["stop"]]
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    encoders = None  # built on the first part that needs it: a full rerun loads no weights

    done_parts, skipped, computed_images, compute_seconds = [], 0, 0, 0.0
    for index, shard in tqdm(shards, desc="featurize", unit="shard", disable=not cfg.progress_bar):
        name = f"part-{index:05d}"
        done = _existing_part(features, name, shard, encoders_spec)
        if done is None:
            if encoders is None:
                encoders = FrozenEncoders(cfg.encoders, device=device)
            start = time.perf_counter()
            computed = _featurize_shard(encoders, cfg.batch_size, dataset, shard["name"])
            write_feature_part(features, name, shard=shard, encoders=encoders_spec, **computed)
            compute_seconds += time.perf_counter() - start
            computed_images += len(computed["records"])
            done = _existing_part(features, name, shard, encoders_spec)
            if done is None:
                raise RuntimeError(f"{name} was just written but does not read back")
        else:
            skipped += 1
        done_parts.append(done)
    summary = {
        "dataset_uri": dataset.uri,
        "manifest_sha256": manifest_sha256,
        "shards": [shards[0][0], shards[-1][0] + 1] if shards else [0, 0],
        "resolution": manifest.get("resolution"),
        "encoders": encoders_spec,
        "done": done_parts,
        "parts_skipped": skipped,
        "computed_images": computed_images,
        "compute_seconds": compute_seconds,
    }
    if partition is not None:  # merge_featurize writes features.json from the summaries
        features.write_json(_summary_key(partition), summary)
        parts, shapes, sizes = _combine(done_parts, manifest.get("resolution"), dataset.uri)
        return _result(features, parts, shapes, sizes, [summary])
    return _write_spec(features, [summary])


def plan_featurize(dataset_uri: str, num_partitions: int) -> list[dict[str, Any]]:
    """Split the dataset's shards into up to `num_partitions` contiguous ranges of about equal
    sample counts: one `featurize(..., partition=item)` each, then `merge_featurize`."""
    if num_partitions < 1:
        raise FeaturesError(f"num_partitions must be >= 1, got {num_partitions}")
    dataset = Storage.from_uri(dataset_uri)
    manifest_bytes = _read_manifest_bytes(dataset)
    shards = json.loads(manifest_bytes)["shards"]
    if not shards:
        raise DatasetError(f"{dataset.uri} has no shards: nothing to featurize")
    cumulative = np.cumsum([int(s["count"]) for s in shards])
    n = min(num_partitions, len(shards))
    # Partition i ends after the shard where the running count passes i/n of the samples.
    stops = [int(np.searchsorted(cumulative, cumulative[-1] * (i + 1) / n)) + 1 for i in range(n)]
    bounds = sorted({0, *stops[:-1], len(shards)})
    sha = hashlib.sha256(manifest_bytes).hexdigest()
    return [
        {
            "dataset_uri": dataset.uri,
            "manifest_sha256": sha,
            "index": i,
            "num_partitions": len(bounds) - 1,
            "start": start,
            "stop": stop,
        }  # fmt: skip
        for i, (start, stop) in enumerate(itertools.pairwise(bounds))
    ]


def merge_featurize(dataset_uri: str, partitions: list[dict[str, Any]]) -> FeaturizeResult:
    """Write features.json from the summaries of every partition of one `plan_featurize` (all
    must be done, made with one set of encoders from the dataset as it still is)."""
    dataset = Storage.from_uri(dataset_uri)
    manifest_sha256 = hashlib.sha256(_read_manifest_bytes(dataset)).hexdigest()
    partitions = sorted(partitions, key=lambda p: p["index"])
    expected = partitions[0]["num_partitions"] if partitions else 0
    if [p["index"] for p in partitions] != list(range(expected)) or not expected:
        raise FeaturesError(
            f"merge_featurize needs every partition of one plan_featurize call, got indices "
            f"{[p['index'] for p in partitions]} (of {expected})"
        )
    features = dataset.child(FEATURES_DIR)
    summaries = []
    for partition in partitions:
        _check_partition(partition, dataset.uri, manifest_sha256)
        key = _summary_key(partition)
        summary = features.read_json(key) if features.exists(key) else None
        # A summary left by an earlier plan (another manifest or shard range) does not count.
        this_plan = summary is not None and (
            summary["manifest_sha256"] == manifest_sha256
            and summary.get("shards") == [partition["start"], partition["stop"]]
        )
        if summary is None or not this_plan:
            raise FeaturesError(
                f"featurize partition {partition['index']} of {expected} (shards "
                f"{partition['start']}..{partition['stop'] - 1}) has not finished: "
                f"{features.key_uri(key)} is {'missing' if summary is None else 'from an earlier plan'}"
                "; run it before merging"
            )
        summaries.append(summary)
    encoders = {json.dumps(s["encoders"], sort_keys=True) for s in summaries}
    if len(encoders) != 1:
        raise FeaturesError(
            f"the partitions of {dataset.uri} were featurized with {len(encoders)} different "
            "encoder configs: run every partition with the same config"
        )
    return _write_spec(features, summaries)


def _summary_key(partition: dict[str, Any]) -> str:
    return f"partitions/{partition['index']:05d}-of-{partition['num_partitions']:05d}.json"


def _check_partition(partition: dict[str, Any], dataset_uri: str, manifest_sha256: str) -> None:
    """A work item of `plan_featurize` for this dataset, as it still is."""
    missing = {"dataset_uri", "manifest_sha256", "index", "num_partitions", "start", "stop"}
    missing -= set(partition)
    if missing:
        raise FeaturesError(
            f"not a work item of plan_featurize (lacks {sorted(missing)}): {partition}"
        )
    if partition["dataset_uri"] != dataset_uri:
        raise FeaturesError(
            f"partition of {partition['dataset_uri']} given for dataset {dataset_uri}"
        )
    if partition["manifest_sha256"] != manifest_sha256:
        raise FeaturesError(
            f"{dataset_uri} changed since its featurize plan was made (manifest sha256 "
            f"{manifest_sha256[:12]}, planned {partition['manifest_sha256'][:12]}): plan again"
        )


def _combine(
    done_parts: list[dict[str, Any]], resolution: int | None, dataset_uri: str
) -> tuple[list[dict[str, Any]], dict[str, list[int] | None], list[dict[str, Any]]]:
    """(part entries, shapes, sizes) of features.json from the parts' summaries, in order."""
    shapes: dict[str, list[int] | None] = {}
    sizes: dict[tuple[int, ...], dict[str, Any]] = {}  # latent shape -> size entry
    for done in done_parts:
        for key, shape in done["shapes"].items():
            if key in ("image", "latents"):
                continue  # per size, below
            if shape and shapes.get(key) and shapes[key] != shape:
                raise FeaturesError(
                    f"{done['part']['name']} has {key} of shape {shape}, earlier parts "
                    f"{shapes[key]}: the dataset's features are inconsistent; re-run featurize"
                )
            shapes[key] = shapes.get(key) or shape
        for size in done["sizes"]:
            entry = sizes.setdefault(tuple(size["latents"]), {**size, "count": 0})
            entry["count"] += size["count"]
    shapes.update(_base_shapes(list(sizes.values()), resolution, dataset_uri))
    ordered = sorted(sizes.values(), key=lambda e: e["latents"])
    return [done["part"] for done in done_parts], shapes, ordered


def _write_spec(features: Storage, summaries: list[dict[str, Any]]) -> FeaturizeResult:
    """features.json from the summaries of all shards (one call, or every partition's)."""
    first = summaries[0]
    done = [part for summary in summaries for part in summary["done"]]
    parts, shapes, sizes = _combine(done, first["resolution"], first["dataset_uri"])
    write_features_spec(
        features,
        parts=parts,
        shapes=shapes,
        encoders=first["encoders"],
        manifest_sha256=first["manifest_sha256"],
        resolution=first["resolution"],
        dataset_uri=first["dataset_uri"],
        sizes=sizes,
    )
    return _result(features, parts, shapes, sizes, summaries)


def _result(
    features: Storage,
    parts: list[dict[str, Any]],
    shapes: dict[str, list[int] | None],
    sizes: list[dict[str, Any]],
    summaries: list[dict[str, Any]],
) -> FeaturizeResult:
    images = sum(s["computed_images"] for s in summaries)
    seconds = sum(s["compute_seconds"] for s in summaries)
    return FeaturizeResult(
        features_uri=features.uri,
        num_samples=sum(p["count"] for p in parts),
        num_paired=sum(p["paired"] for p in parts),
        parts=len(parts),
        parts_skipped=sum(s["parts_skipped"] for s in summaries),
        shapes=shapes,
        sizes=sizes,
        images_per_second=images / seconds if seconds else 0.0,  # per GPU, over computed parts
    )


def _read_manifest_bytes(dataset: Storage) -> bytes:
    if not dataset.exists("manifest.json"):
        raise NotFoundError(
            f"no dataset at {dataset.uri}: manifest.json is missing (ingest writes it last, so "
            "the dataset is absent or its ingest did not finish); run `lumos ingest` first"
        )
    data = dataset.read_bytes("manifest.json")
    fmt = json.loads(data).get("format")
    if fmt != DATASET_FORMAT:
        raise DatasetError(
            f"{dataset.uri}/manifest.json has format {fmt!r}, expected {DATASET_FORMAT!r}"
        )
    return data


def iter_shard_samples(dataset: Storage, name: str) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """Stream one shard's samples: (per-sample json record, RGB uint8 (H, W, 3) image)."""
    for key, files in iter_shard_records(dataset, name):
        image_ext = next((e for e in ("png", "jpg", "jpeg", "webp") if e in files), None)
        if "json" not in files or image_ext is None:
            raise DatasetError(
                f"shard {dataset.key_uri(f'shards/{name}')}: sample {key!r} lacks its image or "
                f"json (has {sorted(files)}); re-run ingest"
            )
        with Image.open(io.BytesIO(files[image_ext])) as img:
            yield json.loads(files["json"]), np.array(img.convert("RGB"), dtype=np.uint8)


@torch.no_grad()
def _featurize_shard(encoders: Any, batch_size: int, dataset: Storage, name: str) -> dict[str, Any]:
    """Encode a shard batch by batch as it streams in: a 1 GB shard decodes to several GB."""
    records: list[dict[str, Any]] = []
    latents: list[torch.Tensor | None] = []  # per row: (C, h, w)
    embeds: list[torch.Tensor | None] = []  # per row: (D,)
    # Images wait for an encoder batch with others of their size (aspect buckets): (row, image)
    pending: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}
    image_sizes: set[tuple[int, ...]] = set()  # (H, W, 3)

    def encode(size: tuple[int, ...]) -> None:
        rows, images = zip(*pending.pop(size), strict=True)
        batch = np.stack(images)  # (B, H, W, 3) uint8
        batch_latents = encoders.encode_images(batch).to("cpu", torch.float16)  # (B, C, h, w)
        batch_embeds = encoders.embed_images(batch).to("cpu", torch.float16)  # (B, D)
        for i, row in enumerate(rows):
            latents[row], embeds[row] = batch_latents[i], batch_embeds[i]

    for record, image in iter_shard_samples(dataset, name):
        row = len(records)
        records.append(record)
        latents.append(None)
        embeds.append(None)
        image_sizes.add(image.shape)
        pending.setdefault(image.shape, []).append((row, image))
        if len(pending[image.shape]) == batch_size:
            encode(image.shape)
    for size in list(pending):
        encode(size)
    if not records:
        raise DatasetError(f"shard {name} of {dataset.uri} is empty")
    # Text only for captioned pairs: T2I fine-tuning uses them, the other heads never do.
    rows = [i for i, r in enumerate(records) if r.get("paired") and r.get("caption")]
    text_embeds = text_mask = None
    if rows:
        chunks, masks = [], []
        for start in range(0, len(rows), batch_size):
            captions = [records[i]["caption"] for i in rows[start : start + batch_size]]
            emb, mask = encoders.embed_texts(captions)  # (M, L, Dt), (M, L)
            chunks.append(emb.to("cpu", torch.float16))
            masks.append(mask.to("cpu", torch.bool))
        text_embeds, text_mask = torch.cat(chunks), torch.cat(masks)
    return {
        "records": records,
        # (H, W) pixels of a one-size shard; with several, the records give each size's
        "image_size": list(next(iter(image_sizes))[:2]) if len(image_sizes) == 1 else None,
        "latents": latents,  # one (C, h, w) per row: write_feature_part groups them by size
        "image_embeds": torch.stack(embeds),  # type: ignore[arg-type]
        "text_rows": torch.tensor(rows, dtype=torch.int64),
        "text_embeds": text_embeds,
        "text_mask": text_mask,
    }


def _existing_part(
    features: Storage, name: str, shard: dict[str, Any], encoders: dict[str, Any]
) -> dict[str, Any] | None:
    """The summary of a complete part made from this shard with these encoders, else None."""
    if not features.exists(f"{name}.json"):
        return None
    part = features.read_json(f"{name}.json")
    same_shard = part.get("shard") == shard  # name, count and bytes from the manifest
    if not same_shard or part.get("encoders") != encoders:
        return None
    return {
        "part": {
            "name": name,
            "shard": shard.get("name"),
            "count": part["count"],
            "paired": part["paired"],
            # Lets training split the samples without reading every part's records.
            "eval_rows": [i for i, r in enumerate(part["meta"]) if is_eval_record(r)],
        },
        "shapes": part["shapes"],
        # Parts written before sizes were listed hold one size.
        "sizes": part.get("sizes")
        or [
            {
                "image": part["shapes"]["image"],
                "latents": part["shapes"]["latents"],
                "count": part["count"],
            }
        ],  # fmt: skip
    }


def _base_shapes(
    sizes: list[dict[str, Any]], resolution: int | None, dataset_uri: str
) -> dict[str, list[int]]:
    """The dataset's image and latent shapes: its one size, or with several (aspect buckets), the
    square at its nominal resolution, which the model's position embedding is scaled to."""
    if len(sizes) == 1:
        return {"image": sizes[0]["image"], "latents": sizes[0]["latents"]}
    channels = {s["latents"][0] for s in sizes}
    downsample = {s["image"][0] // s["latents"][1] for s in sizes}
    if len(channels) != 1 or len(downsample) != 1:
        raise FeaturesError(
            f"the parts of {dataset_uri} were encoded differently (latent channels {channels}, "
            f"downsampling {downsample}): re-run featurize"
        )
    if resolution is None:
        raise FeaturesError(
            f"{dataset_uri} holds several image sizes but its manifest gives no resolution: the "
            "model's base size; re-ingest it"
        )
    f = downsample.pop()
    return {
        "image": [resolution, resolution],
        "latents": [channels.pop(), resolution // f, resolution // f],
    }
