"""The training reader: samples streamed from a dataset's shards (local disk or S3).

    for sample in iter_samples("s3://lumos/datasets/images", shuffle_buffer=1000, seed=0,
                               rank=rank, world_size=world_size):
        sample.image  # (H, W, 3) uint8
        sample.meta   # the sample's json: key, source_key, width, height, meta, caption, paired, ...

Ranks split the data by shard when there are at least as many shards as ranks, else by sample.
A shuffle buffer mixes samples across shards. `start` resumes a rank's stream exactly: the first
`start` samples of the same (seeded) order are skipped without decoding their images.
`ShardDataset` wraps this for a torch DataLoader, splitting further by DataLoader worker.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from lumos.data.manifest import DATASET_FORMAT, MANIFEST
from lumos.data.shards import iter_shard_records
from lumos.storage import Storage

_IMAGE_EXTENSIONS = ("jpg", "png", "jpeg", "webp")


class DatasetNotFound(FileNotFoundError):
    """No complete dataset at the URI (its manifest is missing)."""


@dataclass(frozen=True)
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    meta: dict[str, Any]  # the sample's json (see docs/architecture.md, "Dataset layout")


def read_dataset_manifest(dataset_uri: str) -> tuple[Storage, dict]:
    store = Storage.from_uri(dataset_uri)
    if not store.exists(MANIFEST):
        raise DatasetNotFound(
            f"no complete dataset at {store.uri} (manifest.json missing): run ingest first"
        )
    manifest = store.read_json(MANIFEST)
    if manifest.get("format") != DATASET_FORMAT:
        raise ValueError(
            f"{store.uri}/manifest.json has format {manifest.get('format')!r}, "
            f"expected {DATASET_FORMAT!r}: is this a lumos dataset?"
        )
    return store, manifest


def _rank_records(
    store: Storage, shards: list[dict], rank: int, world_size: int
) -> Iterator[tuple[str, dict[str, bytes]]]:
    if len(shards) >= world_size:  # whole shards per rank: each rank reads only its own
        for j, shard in enumerate(shards):
            if j % world_size == rank:
                yield from iter_shard_records(store, shard["name"])
        return
    i = 0  # fewer shards than ranks: every rank reads all, keeps every world_size-th sample
    for shard in shards:
        for record in iter_shard_records(store, shard["name"]):
            if i % world_size == rank:
                yield record
            i += 1


def _shuffled(items: Iterator[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Streaming shuffle: each item waits in a buffer of `buffer_size` and leaves at random."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def decode_record(key: str, files: dict[str, bytes]) -> Sample:
    image_ext = next((ext for ext in _IMAGE_EXTENSIONS if ext in files), None)
    if image_ext is None or "json" not in files:
        raise ValueError(
            f"sample {key!r} lacks its image or json (has {sorted(files)}): re-run ingest"
        )
    with Image.open(io.BytesIO(files[image_ext])) as img:
        image = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return Sample(key=key, image=image, meta=json.loads(files["json"]))


def _stream(
    dataset_uri: str,
    *,
    shuffle_buffer: int,
    seed: int,
    rank: int,
    world_size: int,
    start: int,
    epoch: int,
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A rank's records in their final (shuffled) order, from position `start`."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    store, manifest = read_dataset_manifest(dataset_uri)
    # Seeded by (seed, epoch, rank): the same order on every resume, a new one every epoch.
    rng = random.Random(f"{seed}:{epoch}:{rank}")
    records = _shuffled(
        _rank_records(store, manifest["shards"], rank, world_size), shuffle_buffer, rng
    )
    for position, record in enumerate(records):
        if position >= start:  # skipped records are never decoded: resuming costs only reads
            yield record


def iter_samples(
    dataset_uri: str,
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    epoch: int = 0,
) -> Iterator[Sample]:
    """One pass over this rank's samples; `start` samples of the pass are skipped (resume)."""
    for key, files in _stream(
        dataset_uri,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        rank=rank,
        world_size=world_size,
        start=start,
        epoch=epoch,
    ):
        yield decode_record(key, files)


def load_all_samples(dataset_uri: str) -> list[Sample]:
    """Every sample, in shard order (for small datasets: evaluation sets, tests)."""
    return list(iter_samples(dataset_uri))


class ShardDataset(torch.utils.data.IterableDataset):
    """A DataLoader-ready view of a rank's stream, with a resumable position.

    DataLoader workers take whole batches in turn (worker w yields blocks w, w + W, ... of
    `batch_size` samples), which is the order the DataLoader returns them in: the samples consumed
    after n batches are exactly the first n * batch_size of the rank's stream. So the position to
    resume from is the number of samples the training loop consumed this epoch:

        ds.load_state_dict({"epoch": epoch, "position": steps_this_epoch * batch_size})

    Iterated in the main process (num_workers=0), `state_dict()` tracks the position itself.
    A completed pass moves on to the next epoch (new shuffle order).
    """

    def __init__(
        self,
        dataset_uri: str,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        read_dataset_manifest(dataset_uri)  # fail now, not inside a worker, when it is missing
        self.dataset_uri = dataset_uri
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        records = _stream(
            self.dataset_uri,
            shuffle_buffer=self.shuffle_buffer,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            start=self.position,
            epoch=self.epoch,
        )
        for i, (key, files) in enumerate(records):
            if (i // self.batch_size) % num_workers == worker:
                sample = decode_record(key, files)
                if info is None:
                    self.position += 1
                yield sample
        if info is None:
            self.set_epoch(self.epoch + 1)


def collate_samples(samples: list[Sample]) -> dict[str, Any]:
    """DataLoader collate_fn: images stacked as uint8 (B, H, W, 3) (same size within a batch)."""
    return {
        "keys": [s.key for s in samples],
        "images": torch.from_numpy(np.stack([s.image for s in samples])),  # (B, H, W, 3)
        "meta": [s.meta for s in samples],
    }
