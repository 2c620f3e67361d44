"""Tiny featurized datasets written in the contract layout, for the training tests.

The features are written by featurize's own writer, so the loop reads exactly what featurize
produces; the values are small structured random tensors (the loop only needs them to be
deterministic), which keeps these tests independent of the encoders' weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import TINY_CONFIG

from lumos.configs.training import TrainConfig
from lumos.features.format import write_feature_part, write_features_spec
from lumos.storage import Storage

LATENT = (3, 8, 8)  # pixel-space latents of 8x8 images
EMBED_DIM = 16
TEXT_TOKENS, TEXT_DIM = 6, 12


# A model small enough that a training step takes milliseconds on a CPU.


class Artifact:
    """A KFP artifact as a step function sees it: a local path and metadata."""

    def __init__(self, path: Path, metadata: dict | None = None) -> None:
        self.path = str(path)
        self.metadata = metadata or {}


def write_features(root: Path, records: list[dict], parts: int, paired: bool) -> str:
    """Write `records` as `parts` feature parts under root/features; returns the dataset URI."""
    g = torch.Generator().manual_seed(len(records))
    n = len(records)
    latents = torch.randn(n, *LATENT, generator=g) * 0.5
    embeds = torch.randn(n, EMBED_DIM, generator=g)
    features = Storage.from_uri(str(root)).child("features")
    per_part = math.ceil(n / parts)
    summary = []
    for p in range(parts):
        lo, hi = p * per_part, min(n, (p + 1) * per_part)
        recs = records[lo:hi]
        rows = [i for i, r in enumerate(recs) if paired and r.get("paired")]
        text = mask = None
        if rows:
            text = torch.randn(len(rows), TEXT_TOKENS, TEXT_DIM, generator=g)
            lengths = 1 + (torch.arange(len(rows)) + p) % TEXT_TOKENS  # 1..6 of 6 tokens
            mask = torch.arange(TEXT_TOKENS) < lengths[:, None]  # right-padded, as T5's
        write_feature_part(
            features,
            f"part-{p:05d}",
            recs,
            latents[lo:hi],
            embeds[lo:hi],
            torch.tensor(rows, dtype=torch.int64),
            text,
            mask,
        )
        summary.append({"name": f"part-{p:05d}", "count": len(recs), "paired": len(rows)})
    shapes = {
        "image": list(LATENT[1:]),
        "latents": list(LATENT),
        "image_embeds": [EMBED_DIM],
        "text_embeds": [TEXT_TOKENS, TEXT_DIM] if paired else None,
    }
    write_features_spec(
        features,
        summary,
        shapes,
        encoders={"vae": {"kind": "pixel"}},
        manifest_sha256="0" * 64,
        resolution=LATENT[-1],
        dataset_uri=str(root),
    )
    return str(root)


@pytest.fixture(scope="session")
def images_features(tmp_path_factory: pytest.TempPathFactory) -> str:
    """20 images in 2 parts, every other one captioned; 2 of them in the eval split."""
    return write_features(tmp_path_factory.mktemp("images"), image_records(), parts=2, paired=True)


def image_records() -> list[dict]:
    """20 images, every other one captioned; 2 of them (3 and 11) in the eval split."""
    records = []
    for i in range(20):
        meta = {"split": "eval"} if i in (3, 11) else {}
        records.append(
            {
                "key": f"img-{i:04d}",
                "source_key": f"img-{i:04d}.png",
                "width": 8,
                "height": 8,
                "meta": meta,
                "caption": f"caption {i}" if i % 2 == 0 else None,
                "paired": i % 2 == 0,
            }
        )
    return records


def _group_records(kind: str, groups: int, frames: int) -> list[dict]:
    records = []
    for g in range(groups):
        for f in reversed(range(frames)):  # unsorted on purpose: the loader sorts by meta.index
            meta = {"group": f"{kind}-{g:04d}", "index": f}
            if kind == "obj":
                meta["camera"] = {"azimuth": 45.0 * f, "elevation": 10.0 + f, "radius": 2.5}
            if g == groups - 1:
                meta["split"] = "eval"
            records.append(
                {
                    "key": f"{kind}-{g:04d}-{f:02d}",
                    "source_key": "",
                    "width": 8,
                    "height": 8,
                    "meta": meta,
                    "caption": None,
                    "paired": False,
                }
            )
    return records


@pytest.fixture(scope="session")
def views_features(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_features(tmp_path_factory.mktemp("views"), _group_records("obj", 4, 5), 2, False)


@pytest.fixture(scope="session")
def clips_features(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_features(tmp_path_factory.mktemp("clips"), _group_records("clip", 4, 5), 1, False)


@pytest.fixture()
def tiny_config():
    """A factory of tiny CPU training configs: `tiny_config(steps=3, head="t2i")`."""

    def make(**overrides) -> TrainConfig:
        return TrainConfig(**{**TINY_CONFIG, "batch_size": 4, "checkpoint_every": 100, **overrides})

    return make
