"""The feature dataset: splits, per-head items and batches, a deterministic resumable order."""

from __future__ import annotations

import pytest
import torch

from lumos.training.data import (
    FeatureDataset,
    FeaturesNotFound,
    FeatureTable,
    ResumableSampler,
    load_feature_table,
)


def test_train_split_leaves_out_eval_samples(images_features):
    table = load_feature_table(images_features)
    assert len(table) == 18 and table.excluded_eval == 2
    assert all(r["meta"].get("split") != "eval" for r in table.records)
    assert len(load_feature_table(images_features, split="eval")) == 2


def test_single_image_batches(images_features):
    table = load_feature_table(images_features)
    i2i = FeatureDataset.for_head(table, "i2i")
    batch = i2i.batch([0, 5, 7])
    assert batch["latents"].shape == (3, 3, 8, 8) and batch["latents"].dtype == torch.float32
    assert batch["image_embeds"].shape == (3, 16)
    assert batch["text_embeds"].shape == (3, 6, 12) and batch["text_mask"].shape == (3, 6)
    t2i = FeatureDataset.for_head(table, "t2i")
    assert len(t2i) == 10 and all(table.records[i]["paired"] for [i] in t2i.items)
    assert t2i.batch(list(range(10)))["text_mask"].any(dim=1).all()  # every row has a caption


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
    assert batch["frame_index"].tolist() == [[0, 1, 2], [0, 1, 2]]
    first = [table.records[r]["meta"]["camera"] for r in views.items[0]]
    expected = [[c["azimuth"], c["elevation"], c["radius"], 0.0] for c in first]
    assert batch["camera"][0].tolist() == expected  # absolute: lumos.heads makes it relative


def test_short_groups_are_counted_not_silently_used(clips_features):
    table = load_feature_table(clips_features)
    clips = FeatureDataset.for_head(table, "video", num_frames=5)
    assert len(clips) == 3 and clips.skipped_groups == 0
    with pytest.raises(ValueError, match="no training items for head 'video'"):
        FeatureDataset.for_head(table, "video", num_frames=6)


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a = ResumableSampler(10, 4, seed=3)
    order = [a.next_batch() for _ in range(5)]  # 2 batches per epoch, crosses 2 epochs
    assert all(len(b) == 4 for b in order) and order[0] != order[2]
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
    table = FeatureTable(
        spec={},
        records=records,
        latents=torch.zeros(n, 3, 4, 4),
        image_embeds=torch.zeros(n, 8),
        text_embeds=None,
        text_mask=None,
        has_text=torch.zeros(n, dtype=torch.bool),
    )
    clips = FeatureDataset.for_head(table, "video", num_frames=3)
    assert clips.items == [[0, 1, 2], [1, 2, 3]] and clips.skipped_groups == 1
    with pytest.raises(ValueError, match="needs meta.camera on every view"):
        FeatureDataset.for_head(table, "novel_view", num_frames=3)
