"""Every sample of an ingested dataset, read back the way featurize reads it: the manifest's
shards in order, each sample's json record and RGB image (`iter_shard_samples`). The ingest tests
check what ingest wrote through it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lumos.storage import Storage
from lumos.training.featurize import iter_shard_samples


@dataclass(frozen=True)
class Sample:
    key: str
    image: np.ndarray  # (H, W, 3) uint8
    meta: dict[str, Any]  # the sample's json (docs/architecture.md, "Dataset layout")


def load_all_samples(dataset_uri: str) -> list[Sample]:
    store = Storage.from_uri(dataset_uri)
    manifest = store.read_json("manifest.json")
    return [
        Sample(key=record["key"], image=image, meta=record)
        for shard in manifest["shards"]
        for record, image in iter_shard_samples(store, shard["name"])
    ]
