"""The shard reader: order, shuffle, rank and worker split, exact resume."""

from __future__ import annotations

import pytest
import torch
from ingest_corpus import encode, scene, write_local

from lumos.configs.data import IngestConfig
from lumos.data.ingest import ingest
from lumos.data.reader import ShardDataset, collate_samples, iter_samples, load_all_samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reader")
    files = {f"img/{i:03d}.png": encode(scene(100 + i), "PNG") for i in range(30)}
    source = write_local(files, root / "raw")
    cfg = IngestConfig(
        resolution=32,
        image_format="png",
        workers=1,
        shard_max_bytes=16_000,
        near_duplicate_distance=None,
    )
    result = ingest(cfg, str(source), str(root / "ds"), progress=False)
    assert result.ingested == 30 and result.num_shards >= 4
    return result.dataset_uri


def keys(samples) -> list[str]:
    return [s.key for s in samples]


def test_plain_order_and_contents(dataset):
    samples = load_all_samples(dataset)
    assert keys(samples) == [f"img__{i:03d}" for i in range(30)]
    assert samples[0].image.dtype.name == "uint8" and samples[0].image.shape == (32, 32, 3)
    assert samples[0].meta["source_key"] == "img/000.png"


def test_shuffle_is_seeded_and_complete(dataset):
    a = keys(iter_samples(dataset, shuffle_buffer=8, seed=1))
    assert a == keys(iter_samples(dataset, shuffle_buffer=8, seed=1))
    assert a != keys(iter_samples(dataset, shuffle_buffer=8, seed=2))
    assert a != keys(load_all_samples(dataset)) and sorted(a) == keys(load_all_samples(dataset))
    assert a != keys(iter_samples(dataset, shuffle_buffer=8, seed=1, epoch=1))


@pytest.mark.parametrize("world_size", [2, 3, 64])  # 64 > shards: split by sample instead
def test_ranks_split_the_data_disjointly(dataset, world_size):
    parts = [keys(iter_samples(dataset, rank=r, world_size=world_size)) for r in range(world_size)]
    flat = [k for part in parts for k in part]
    assert sorted(flat) == keys(load_all_samples(dataset)) and len(flat) == len(set(flat))


def test_resume_continues_exactly(dataset):
    full = keys(iter_samples(dataset, shuffle_buffer=10, seed=3, rank=1, world_size=2))
    resumed = keys(iter_samples(dataset, shuffle_buffer=10, seed=3, rank=1, world_size=2, start=6))
    assert resumed == full[6:]


def test_dataloader_workers_keep_the_stream_order_and_resume(dataset):
    stream = keys(iter_samples(dataset, shuffle_buffer=10, seed=4))
    ds = ShardDataset(dataset, shuffle_buffer=10, seed=4, batch_size=4)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=collate_samples
    )
    batches = list(loader)
    assert [k for b in batches for k in b["keys"]] == stream
    assert batches[0]["images"].shape == (4, 32, 32, 3)

    ds.load_state_dict({"epoch": 0, "position": 2 * 4})  # two batches were consumed
    assert [k for b in loader for k in b["keys"]] == stream[8:]

    in_process = ShardDataset(dataset, shuffle_buffer=10, seed=4)
    it = iter(in_process)
    first = [next(it).key for _ in range(5)]
    state = in_process.state_dict()
    assert state == {"epoch": 0, "position": 5}
    again = ShardDataset(dataset, shuffle_buffer=10, seed=4)
    again.load_state_dict(state)
    assert first + [s.key for s in again] == stream
    assert again.state_dict() == {"epoch": 1, "position": 0}  # a finished pass moves on
