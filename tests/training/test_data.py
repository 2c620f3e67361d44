"""The feature dataset: splits, per-head items and batches, a deterministic resumable order,
parts memory-mapped from the dataset or from a local cache of the object store's files."""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _group_records, write_features
from safetensors import safe_open
from safetensors.torch import save

from lumos.features.cache import FeaturesChanged
from lumos.features.format import FeaturesNotFound
from lumos.features.items import FeatureDataset
from lumos.features.table import FeatureTable, load_feature_table, node_parts, pad_text
from lumos.storage import S3Storage, Storage
from lumos.training.sampler import ResumableSampler


def test_train_split_leaves_out_eval_samples(images_features):
    table = load_feature_table(images_features)
    assert len(table) == 18 and table.excluded_eval == 2
    assert all(r["meta"].get("split") != "eval" for r in table.records)
    assert len(load_feature_table(images_features, split="eval")) == 2


def test_single_image_batches(images_features):
    table = load_feature_table(images_features)
    i2i = FeatureDataset.for_head(table, "i2i")
    batch = i2i.batch([0, 5, 7])
    assert sorted(batch) == ["image_embeds", "latents"]  # pretraining reads no text
    assert batch["latents"].shape == (3, 3, 8, 8) and batch["latents"].dtype == torch.float16
    assert batch["image_embeds"].shape == (3, 16)
    t2i = FeatureDataset.for_head(table, "t2i")
    assert len(t2i) == 10 and all(table.records[i]["paired"] for [i] in t2i.items)
    text = t2i.batch(list(range(10)))
    assert sorted(text) == ["latents", "text_embeds", "text_mask"]
    assert text["text_embeds"].shape == (10, 6, 12) and text["text_mask"].any(dim=1).all()


def _part_rows(dataset: str, part: str, tensor: str) -> torch.Tensor:
    with safe_open(str(Path(dataset) / "features" / f"{part}.safetensors"), "pt") as f:
        return f.get_tensor(tensor)


def test_gather_reads_the_right_rows_across_parts_and_splits(images_features):
    table = load_feature_table(images_features)
    # Table rows skip the eval samples (3 and 11): row 3 is sample 4, row 10 is sample 12,
    # the third row of part 1 (samples 10..19, sample 11 excluded).
    assert [table.records[r]["key"] for r in (2, 3, 10, -1)] == [
        "img-0002", "img-0004", "img-0012", "img-0019"
    ]  # fmt: skip
    got = table.gather([[10, 3], [2, 10]], text=True)
    assert got["latents"].shape == (2, 2, 3, 8, 8) and got["text_embeds"].shape == (2, 2, 6, 12)
    part0, part1 = (_part_rows(images_features, f"part-0000{p}", "latents") for p in (0, 1))
    assert torch.equal(got["latents"][0, 0], part1[2]) and torch.equal(
        got["latents"][0, 1], part0[4]
    )
    assert torch.equal(got["latents"][1, 1], got["latents"][0, 0])
    # Sample 12 is captioned (its text row in part 1 is 1: samples 10, 12, ...), sample 4 too.
    # Captions are stored unpadded; a batch pads them with zeros and masks the padding.
    with safe_open(str(Path(images_features) / "features/part-00001.text.safetensors"), "pt") as f:
        start, end = f.get_tensor("text_offsets")[1:3].tolist()
        tokens = f.get_tensor("text_tokens")[start:end]
    n = end - start
    assert n == 3  # the conftest's lengths: part 1, text row 1 -> 1 + (1 + 1) % 6
    assert torch.equal(got["text_embeds"][0, 0, :n], tokens)
    assert not got["text_embeds"][0, 0, n:].any()
    assert got["text_mask"][0, 0].tolist() == [True] * n + [False] * (6 - n)
    assert got["text_mask"][0].any(dim=1).all()
    with pytest.raises(IndexError, match="out of range for 18 samples"):
        table.gather([18])


def test_packed_captions_pad_to_the_padded_batch(images_features):
    """The training loop's batches carry captions packed (padded on the device by `pad_text`):
    only the tokens are copied, and padding them gives exactly the padded batch."""
    table = load_feature_table(images_features)
    rows = [[10, 3, 1], [2, 10, 5]]  # captioned and uncaptioned rows, one twice, two dims
    padded = table.gather(rows, text=True)
    packed = table.gather(rows, text=True, pack_text=True)
    assert "text_embeds" not in packed and packed["text_mask"].shape == (2, 3, 6)
    assert packed["text_tokens"].shape == (int(padded["text_mask"].sum()), 12)
    assert packed["text_index"].shape == (len(packed["text_tokens"]),)
    got = pad_text(packed)
    assert sorted(got) == sorted(padded)
    for key, value in padded.items():
        assert torch.equal(got[key], value), key
    assert pad_text(padded) is padded  # nothing packed: unchanged

    t2i = FeatureDataset.for_head(table, "t2i")
    batch = t2i.batch([0, 4, 9], pack_text=True)
    assert sorted(batch) == ["latents", "text_index", "text_mask", "text_tokens"]
    expected = t2i.batch([0, 4, 9])
    assert all(torch.equal(pad_text(batch)[k], v) for k, v in expected.items())
    # A head without text ignores the flag.
    assert sorted(FeatureDataset.for_head(table, "i2i").batch([0], pack_text=True)) == [
        "image_embeds", "latents"
    ]  # fmt: skip


def test_a_node_maps_only_its_own_parts(images_features):
    """What a node of a run with shard_features_by_node reads: parts node, node + nodes, ..."""
    assert node_parts(5, 0, 2) == [0, 2, 4] and node_parts(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="2 parts for 3 nodes, and each node needs at least one"):
        node_parts(2, 0, 3)
    table = load_feature_table(images_features, part_ids=[1])
    assert len(table) == 9 and table.records[0]["key"] == "img-0010"  # sample 11 is eval
    mapped = Path("/proc/self/maps").read_text()
    assert str(Path(images_features) / "features" / "part-00001.safetensors") in mapped
    with pytest.raises(ValueError, match=r"parts \[2\] are not among the 2 parts"):
        load_feature_table(images_features, part_ids=[2])


def test_parts_are_memory_mapped_not_read(images_features):
    table = load_feature_table(images_features)
    mapped = Path("/proc/self/maps").read_text()
    for name in ("part-00000.safetensors", "part-00001.safetensors", "part-00001.text.safetensors"):
        assert str(Path(images_features) / "features" / name) in mapped, name
    assert len(table.parts) == 2


def test_object_store_features_are_cached_locally_once(
    images_features, s3_bucket, tmp_path, monkeypatch
):
    monkeypatch.setenv("LUMOS_FEATURE_CACHE", str(tmp_path / "cache"))
    store = Storage.from_uri(f"s3://{s3_bucket}/ds")
    store.upload_dir(images_features)
    local = load_feature_table(images_features)
    table = load_feature_table(store.uri)
    assert len(table) == len(local) and table.excluded_eval == local.excluded_eval
    rows = np.arange(len(table))
    for key, value in table.gather(rows, text=True).items():
        assert torch.equal(value, local.gather(rows, text=True)[key]), key
    cached = sorted((tmp_path / "cache").rglob("*"))
    files = [p for p in cached if p.is_file() and not p.name.startswith(".")]  # not the locks
    assert len(files) == 2 * 2 + 2  # per part: tensors, json; text tensors of both parts
    stamps = {p: p.stat().st_mtime_ns for p in files}
    load_feature_table(store.uri)  # a second run downloads nothing
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    # A part rewritten in the store (new encoders, say) is fetched again, not served stale.
    other = torch.zeros_like(_part_rows(images_features, "part-00000", "latents"))
    embeds = _part_rows(images_features, "part-00000", "image_embeds")
    store.child("features").write_bytes(
        "part-00000.safetensors", save({"latents": other, "image_embeds": embeds.clone()})
    )
    again = load_feature_table(store.uri)
    assert not again.gather([0])["latents"].any() and table.gather([0])["latents"].any()


def test_processes_of_a_node_download_each_object_once(
    images_features, s3_bucket, tmp_path, monkeypatch
):
    """Concurrent loaders (the ranks of one node) share one download per object. Threads stand
    in for processes: flock locks conflict between separate opens in one process too."""
    monkeypatch.setenv("LUMOS_FEATURE_CACHE", str(tmp_path / "cache"))
    store = Storage.from_uri(f"s3://{s3_bucket}/ds")
    store.upload_dir(images_features)
    downloads: list[str] = []
    real = S3Storage.download_file

    def slow_download(self, key, local_path, if_version=None):
        downloads.append(key)
        time.sleep(0.05)  # widen the window in which another loader could start the same one
        real(self, key, local_path, if_version)

    monkeypatch.setattr(S3Storage, "download_file", slow_download)
    with ThreadPoolExecutor(3) as pool:
        tables = list(pool.map(lambda _: load_feature_table(store.uri), range(3)))
    assert sorted(downloads) == sorted(set(downloads)) and len(downloads) == 6
    assert all(torch.equal(t.gather([0, 9])["latents"], tables[0].gather([0, 9])["latents"])
               for t in tables)  # fmt: skip
    leftovers = [p.name for p in (tmp_path / "cache").rglob("*") if "tmp" in p.name]
    assert not leftovers


def test_features_rewritten_while_a_run_loads_them_are_an_error(
    images_features, s3_bucket, tmp_path, monkeypatch
):
    """A part's records are fetched when first asked for: if the dataset was re-featurized
    since the table was loaded, the new file must not be cached under the old version's name
    (and mixed with the old tensors)."""
    monkeypatch.setenv("LUMOS_FEATURE_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "ds"
    shutil.copytree(images_features, local)
    list_eval_rows(local)  # the records are then read lazily
    store = Storage.from_uri(f"s3://{s3_bucket}/ds")
    store.upload_dir(local)
    table = load_feature_table(store.uri)
    features = store.child("features")
    part = features.read_json("part-00000.json")
    part["meta"] = [{**record, "key": f"new-{record['key']}"} for record in part["meta"]]
    features.write_json("part-00000.json", part)
    with pytest.raises(FeaturesChanged, match="changed while this run was loading"):
        table.records[0]
    assert load_feature_table(store.uri).records[0]["key"] == part["meta"][0]["key"]


def list_eval_rows(dataset: str | Path) -> None:
    """List each part's eval rows in features.json, as featurize does."""
    features = Storage.from_uri(str(dataset)).child("features")
    spec = features.read_json("features.json")
    for entry in spec["parts"]:
        records = features.read_json(f"{entry['name']}.json")["meta"]
        entry["eval_rows"] = [i for i, r in enumerate(records) if r["meta"].get("split") == "eval"]
    features.write_json("features.json", spec)


def list_eval_rows_and_drop_records(dataset: str | Path) -> None:
    """List each part's eval rows in features.json, as featurize does, then delete the parts'
    json records: any later read of a record fails."""
    list_eval_rows(dataset)
    features = Storage.from_uri(str(dataset)).child("features")
    for entry in features.read_json("features.json")["parts"]:
        features.delete(f"{entry['name']}.json")


def test_listed_eval_rows_split_without_reading_the_records(images_features, tmp_path):
    """featurize lists each part's eval rows in features.json: loading reads no part json."""
    copy = tmp_path / "ds"
    shutil.copytree(images_features, copy)
    list_eval_rows_and_drop_records(copy)
    table, legacy = load_feature_table(str(copy)), load_feature_table(images_features)
    assert len(table) == len(legacy) == 18 and table.excluded_eval == 2
    assert torch.equal(table.gather(range(18))["latents"], legacy.gather(range(18))["latents"])
    assert len(load_feature_table(str(copy), split="eval")) == 2
    with pytest.raises(FeaturesNotFound, match="part-00000.json"):
        table.records[0]  # records are read on demand, and these are gone


def _write_padded_text(part: Path, flip_first: bool = False) -> None:
    """Rewrite an unpadded text part in the padded layout of lumos-features/1."""
    with safe_open(str(part), "pt") as f:
        rows, offsets, tokens = (f.get_tensor(n) for n in ("rows", "text_offsets", "text_tokens"))
    embeds = torch.zeros(len(rows), 6, tokens.shape[1], dtype=torch.float16)
    mask = torch.zeros(len(rows), 6, dtype=torch.bool)
    for m, (start, end) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)):
        embeds[m, : end - start], mask[m, : end - start] = tokens[start:end], True
    if flip_first:
        mask[0] = mask[0].flip(0)  # left-padded
    part.write_bytes(save({"rows": rows, "text_embeds": embeds, "text_mask": mask}))


def test_padded_text_of_earlier_features_reads_the_same(images_features, tmp_path):
    """Features written before captions were stored unpadded (lumos-features/1) still load."""
    copy = tmp_path / "ds"
    shutil.copytree(images_features, copy)
    parts = sorted((copy / "features").glob("*.text.safetensors"))
    for part in parts:
        _write_padded_text(part)
    padded, packed = load_feature_table(str(copy)), load_feature_table(images_features)
    rows = np.arange(len(packed))
    for key, value in padded.gather(rows, text=True).items():
        assert torch.equal(value, packed.gather(rows, text=True)[key]), key

    # A left-padded mask cannot be read as a caption's first tokens: a clear error.
    shutil.copy(Path(images_features) / "features" / parts[0].name, parts[0])
    _write_padded_text(parts[0], flip_first=True)
    with pytest.raises(ValueError, match="caption rows, offsets and tokens do not match"):
        load_feature_table(str(copy))


def test_missing_part_file_is_a_clear_error(images_features, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(images_features, copy)
    os.remove(copy / "features/part-00001.safetensors")
    with pytest.raises(FeaturesNotFound, match="part-00001.safetensors: re-run `lumos featurize`"):
        load_feature_table(str(copy))


def test_views_are_grouped_sorted_and_carry_their_cameras(views_features):
    table = load_feature_table(views_features)
    views = FeatureDataset.for_head(table, "novel_view", num_frames=3)
    assert len(views) == 3 * 3  # 3 training objects x windows of 3 out of 5 views
    for item in views.items:
        metas = [table.records[r]["meta"] for r in item]
        assert len({m["group"] for m in metas}) == 1
        indices = [m["index"] for m in metas]
        assert indices == list(range(indices[0], indices[0] + 3))
    batch = views.batch([0, 4])
    assert batch["latents"].shape == (2, 3, 3, 8, 8) and batch["image_embeds"].shape == (2, 3, 16)
    assert sorted(batch) == ["camera", "image_embeds", "latents"]  # HeadSpec.batch_keys
    first = [table.records[r]["meta"]["camera"] for r in views.items[0]]
    expected = [[c["azimuth"], c["elevation"], c["radius"], 0.0] for c in first]
    assert batch["camera"][0].tolist() == expected  # absolute: lumos.heads makes it relative


def _strip_frame_tensors(features: Path) -> None:
    """Rewrite every part without its frame arrays, as featurize wrote parts before them."""
    for path in features.glob("part-*[0-9].safetensors"):
        with safe_open(str(path), framework="pt") as f:
            kept = {k: f.get_tensor(k) for k in f.keys() if k not in FRAME_KEYS}  # noqa: SIM118
        path.write_bytes(save(kept))


FRAME_KEYS = ("frame_group", "frame_index", "camera")


@pytest.mark.parametrize("head", ["novel_view", "video"])
def test_multi_frame_items_come_from_stored_arrays_without_reading_records(tmp_path, head):
    """Featurize stores each part's groups, frame indices and cameras as arrays, so the items of
    a views / clips dataset are built without its json records (gigabytes at Objaverse scale).
    They must equal the items built from the records (parts written before the arrays existed),
    with groups spanning parts and frames stored out of order."""
    records = _group_records("obj", 5, 4)  # 5 objects x 4 views; the last one is eval
    ds = write_features(tmp_path / "arrays", records, parts=3, paired=False)  # groups span parts
    with safe_open(f"{ds}/features/part-00000.safetensors", framework="pt") as f:
        assert set(FRAME_KEYS) <= set(f.keys())
    legacy = Path(shutil.copytree(ds, tmp_path / "legacy"))
    _strip_frame_tensors(legacy / "features")
    list_eval_rows_and_drop_records(ds)

    from_arrays = FeatureDataset.for_head(load_feature_table(ds), head, num_frames=3)
    from_records = FeatureDataset.for_head(load_feature_table(str(legacy)), head, num_frames=3)
    assert from_arrays.items.tolist() == from_records.items.tolist()
    assert len(from_arrays) == 4 * 2 and from_arrays.skipped_groups == 0  # 4 objects x 2 windows
    batch, expected = from_arrays.batch([0, 5]), from_records.batch([0, 5])
    assert sorted(batch) == sorted(expected)
    for key in batch:
        torch.testing.assert_close(batch[key], expected[key])
    table = load_feature_table(str(legacy))
    for item in from_records.items:  # one object per item, its frames in order
        metas = [table.records[r]["meta"] for r in item]
        assert len({m["group"] for m in metas}) == 1
        assert [m["index"] for m in metas] == list(range(metas[0]["index"], metas[0]["index"] + 3))


def test_frames_without_valid_sidecars_fall_back_to_records_and_name_the_sample(tmp_path):
    """A part whose records lack meta.group, or hold a malformed camera, stores no frame arrays:
    the reader then reads its records, and the error names the sample."""
    records = _group_records("obj", 2, 3)
    records[1]["meta"].pop("group")
    ds = write_features(tmp_path / "nogroup", records, parts=1, paired=False)
    with safe_open(f"{ds}/features/part-00000.safetensors", framework="pt") as f:
        assert "frame_group" not in f.keys()  # noqa: SIM118
    with pytest.raises(ValueError, match="'obj-0000-01' has no meta.group / meta.index"):
        FeatureDataset.for_head(load_feature_table(ds), "video", num_frames=2)

    records = _group_records("obj", 2, 3)
    records[2]["meta"]["index"] = "first"
    ds = write_features(tmp_path / "badindex", records, parts=1, paired=False)
    with pytest.raises(ValueError, match="'obj-0000-00' has meta.index 'first': it must be an"):
        FeatureDataset.for_head(load_feature_table(ds), "video", num_frames=2)

    records = _group_records("obj", 2, 3)
    records[1]["meta"]["camera"] = {"azimuth": "left", "elevation": 0, "radius": 2}
    ds = write_features(tmp_path / "badcam", records, parts=1, paired=False)
    with safe_open(f"{ds}/features/part-00000.safetensors", framework="pt") as f:
        assert "camera" not in f.keys() and "frame_group" in f.keys()  # noqa: SIM118
    with pytest.raises(ValueError, match="meta.camera must hold the numbers.*'left'"):
        FeatureDataset.for_head(load_feature_table(ds, split="all"), "novel_view", num_frames=2)


def test_frame_arrays_of_the_wrong_length_are_a_clear_error(views_features, tmp_path):
    copy = Path(shutil.copytree(views_features, tmp_path / "ds"))
    path = copy / "features" / "part-00000.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["frame_index"] = tensors["frame_index"][:-1]
    path.write_bytes(save(tensors))
    with pytest.raises(ValueError, match="frame_index has 9 rows for 10 samples"):
        load_feature_table(str(copy))


def test_short_groups_are_counted_not_silently_used(clips_features):
    table = load_feature_table(clips_features)
    clips = FeatureDataset.for_head(table, "video", num_frames=5)
    assert len(clips) == 3 and clips.skipped_groups == 0
    batch = clips.batch([0, 2])
    assert sorted(batch) == ["frame_index", "image_embeds", "latents"]
    assert batch["frame_index"].tolist() == [list(range(5))] * 2
    assert batch["latents"].shape == (2, 5, 3, 8, 8)
    with pytest.raises(ValueError, match="no training items for head 'video'"):
        FeatureDataset.for_head(table, "video", num_frames=6)


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a = ResumableSampler(10, 4, seed=3)
    order = [a.next_batch() for _ in range(5)]  # 2 batches per epoch, crosses 2 epochs
    assert all(len(b) == 4 for b in order) and order[0] != order[2]
    # Pinned: numpy's permutation of the item range, as every checkpoint's data position assumes.
    assert order[0] == np.random.default_rng([3, 0]).permutation(10)[:4].tolist()
    assert len(set(order[0] + order[1])) == 8  # no item twice within an epoch

    b = ResumableSampler(10, 4, seed=3)
    b.next_batch(), b.next_batch(), b.next_batch()
    resumed = ResumableSampler(10, 4, seed=3)
    resumed.load_state_dict(b.state_dict())
    assert [resumed.next_batch() for _ in range(2)] == order[3:5]

    ranks = [ResumableSampler(10, 4, seed=3, rank=r, world_size=2).next_batch() for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == sorted(order[0])  # the processes split one global batch
    with pytest.raises(ValueError, match="cannot resume the data order"):
        ResumableSampler(10, 2, seed=3).load_state_dict(b.state_dict())


def test_missing_features_is_a_clear_error(tmp_path):
    with pytest.raises(FeaturesNotFound, match="run `lumos featurize`"):
        load_feature_table(str(tmp_path))


def test_groups_shorter_than_num_frames_are_counted():
    records = [
        {"key": f"c{g}-{f}", "meta": {"group": f"c{g}", "index": f}}
        for g, frames in ((0, 4), (1, 2))
        for f in range(frames)
    ]
    n = len(records)
    table = FeatureTable.in_memory(records, torch.zeros(n, 3, 4, 4), torch.zeros(n, 8))
    clips = FeatureDataset.for_head(table, "video", num_frames=3)
    assert clips.items.tolist() == [[0, 1, 2], [1, 2, 3]] and clips.skipped_groups == 1
    with pytest.raises(ValueError, match="needs meta.camera on every view"):
        FeatureDataset.for_head(table, "novel_view", num_frames=3)


def test_sampler_groups_batch_one_image_size_each_and_resume_exactly():
    groups = np.array([0, 1, 0, 1, 0, 1, 2, 0, 1, 0], dtype=np.uint8)  # 5, 4 and 1 items
    a = ResumableSampler(10, 2, seed=1, groups=groups)
    assert a.batches_per_epoch == 2 + 2 and a.starved_items == 1  # group 2 never fills a batch
    epoch = [a.next_batch() for _ in range(4)]
    assert all(len(set(groups[b].tolist())) == 1 for b in epoch)  # one size per batch
    taken = sorted(i for b in epoch for i in b)
    assert 6 not in taken and len(set(taken)) == 8  # every full batch of groups 0 and 1, once
    assert [a.next_batch() for _ in range(4)] != epoch  # the next epoch: another order

    b = ResumableSampler(10, 2, seed=1, groups=groups)
    b.next_batch(), b.next_batch(), b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))  # as a checkpoint stores it
    resumed = ResumableSampler(10, 2, seed=1, groups=groups)
    resumed.load_state_dict(state)
    uninterrupted = ResumableSampler(10, 2, seed=1, groups=groups)
    order = [uninterrupted.next_batch() for _ in range(6)]  # crosses into the second epoch
    assert order[:4] == epoch and [resumed.next_batch() for _ in range(3)] == order[3:]
    with pytest.raises(ValueError, match="items per image size"):
        ResumableSampler(10, 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="in any image size"):
        ResumableSampler(3, 2, seed=1, groups=np.array([0, 1, 2]))
