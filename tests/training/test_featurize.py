"""Featurize on a tiny dataset in the contract layout (tar shards + manifest), tiny encoders."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors

from lumos.configs.encoders import EncodersConfig
from lumos.configs.training import FeaturizeConfig
from lumos.data.shards import ShardWriter
from lumos.encoders import FrozenEncoders
from lumos.features.format import pack_text
from lumos.features.items import FeatureDataset
from lumos.features.table import load_feature_table
from lumos.storage import LocalStorage, Storage
from lumos.training.featurize import featurize, merge_featurize, plan_featurize
from lumos.training.train import train

SIZE = 16


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_dataset(uri: str, count: int = 10, per_shard: int = 4) -> str:
    """`count` images in shards of `per_shard`, every third one captioned and paired."""
    store = Storage.from_uri(uri)
    writer = ShardWriter(store, first_index=0, max_bytes=per_shard * 2 * (1024 + 2048))
    for i in range(count):
        paired = i % 3 == 0
        sample = {
            "key": f"img-{i:04d}",
            "source_key": f"img-{i:04d}.png",
            "width": SIZE,
            "height": SIZE,
            "meta": {"split": "eval"} if i == 1 else {},
            # Long captions fill the tiny encoder's 8 tokens, short ones ("pic 3") are padded.
            "caption": (f"a picture number {i}" if i % 2 == 0 else f"pic {i}") if paired else None,
            "paired": paired,
        }
        writer.add(sample["key"], "png", _png(i), sample)
    shards = [s.to_json() for s in writer.close()]
    store.write_json(
        "manifest.json",
        {
            "format": "lumos-dataset/1",
            "resolution": SIZE,
            "shards": shards,
            "counts": {"samples": count},
        },
    )
    return store.uri


@pytest.fixture()
def dataset(tmp_path) -> str:
    return write_dataset(str(tmp_path / "dataset"))


def tiny_featurize_config() -> FeaturizeConfig:
    return FeaturizeConfig(
        encoders=EncodersConfig.tiny(max_tokens=8), batch_size=3, device="cpu", progress_bar=False
    )


def test_featurize_writes_the_contract_layout(dataset):
    cfg = tiny_featurize_config()
    result = featurize(cfg, dataset)

    features = Storage.from_uri(dataset).child("features")
    spec = features.read_json("features.json")
    assert spec["format"] == "lumos-features/2"
    assert spec["encoders"] == cfg.encoders.model_dump(mode="json")
    assert spec["counts"] == {"samples": 10, "paired": 4}
    assert spec["shapes"]["latents"] == [3, SIZE, SIZE] and spec["latent_downsample"] == 1
    assert result.parts == len(spec["parts"]) >= 2 and result.parts_skipped == 0

    # The cached features are exactly what the encoders give for the shard's images.
    part = features.read_json("part-00000.json")
    tensors = load_safetensors(features.read_bytes("part-00000.safetensors"))
    assert (
        tensors["latents"].dtype == torch.float16 and tensors["image_embeds"].dtype == torch.float16
    )
    first = np.array(Image.open(io.BytesIO(_png(int(part["keys"][0].split("-")[1])))))[None]
    encoders = FrozenEncoders(cfg.encoders)
    torch.testing.assert_close(
        tensors["latents"][:1].float(), encoders.encode_images(first), atol=2e-3, rtol=0
    )
    torch.testing.assert_close(
        tensors["image_embeds"][:1].float(), encoders.embed_images(first), atol=5e-3, rtol=1e-3
    )
    text = load_safetensors(features.read_bytes("part-00000.text.safetensors"))
    paired_rows = [i for i, m in enumerate(part["meta"]) if m["paired"]]
    assert text["rows"].tolist() == paired_rows
    # Stored unpadded: each caption's tokens before T5's padding, concatenated.
    embeds, mask = encoders.embed_texts([part["meta"][i]["caption"] for i in paired_rows])
    assert spec["shapes"]["text_embeds"] == [8, embeds.shape[-1]]
    lengths = mask.sum(dim=1)
    assert lengths.tolist() == [8, 6, 8]  # "a picture number 0" is cut to 8; "pic 3" + EOS: 6
    assert text["text_offsets"].tolist() == [0, 8, 14, 22]
    torch.testing.assert_close(text["text_tokens"].float(), embeds[mask], atol=5e-3, rtol=1e-3)


def test_featurize_skips_parts_done_with_the_same_encoders(dataset):
    cfg = tiny_featurize_config()
    featurize(cfg, dataset)
    features = Storage.from_uri(dataset).child("features")
    before = features.read_bytes("part-00001.safetensors")
    features.delete("part-00001.json")  # as if the job died while writing part 1

    again = featurize(cfg, dataset)
    assert again.parts_skipped == again.parts - 1
    assert features.read_bytes("part-00001.safetensors") == before  # deterministic encoders

    other = cfg.model_copy(update={"encoders": EncodersConfig.tiny(seed=1, max_tokens=8)})
    assert featurize(other, dataset).parts_skipped == 0  # other encoders: everything again
    assert (
        json.loads(features.read_bytes("features.json"))["encoders"]["image_encoder"]["seed"] == 1
    )


def test_a_part_cut_off_while_rewritten_is_not_skipped(dataset, monkeypatch):
    """Featurizing again with other encoders, killed after a part's tensors but before its
    json: a rerun with the first encoders must redo that part, not keep the other tensors."""
    cfg = tiny_featurize_config()
    featurize(cfg, dataset)
    features = Storage.from_uri(dataset).child("features")
    first = features.read_bytes("part-00000.safetensors")
    other = cfg.model_copy(update={"encoders": EncodersConfig.tiny(seed=1, max_tokens=8)})
    real = LocalStorage.write_json

    def killed_at_part_0_json(self, key, *args, **kwargs):
        if key == "part-00000.json":
            raise KeyboardInterrupt("killed")
        return real(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStorage, "write_json", killed_at_part_0_json)
    with pytest.raises(KeyboardInterrupt):
        featurize(other, dataset)
    monkeypatch.undo()
    assert features.read_bytes("part-00000.safetensors") != first  # the other encoders' tensors
    again = featurize(cfg, dataset)
    assert again.parts_skipped == again.parts - 1  # part 0 is done again
    assert features.read_bytes("part-00000.safetensors") == first


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset at .*manifest.json is missing"):
        featurize(tiny_featurize_config(), str(tmp_path / "nothing"))


def test_training_reads_what_featurize_wrote(dataset, tmp_path, tiny_config):
    featurize(tiny_featurize_config(), dataset)
    spec = Storage.from_uri(dataset).child("features").read_json("features.json")
    assert [p["eval_rows"] for p in spec["parts"]][0] == [1]  # listed: no records to read
    table = load_feature_table(dataset)
    assert len(table) == 9 and table.excluded_eval == 1  # img-0001 is in the eval split
    assert table.records[1]["key"] == "img-0002"  # the records still read on demand
    t2i = FeatureDataset.for_head(table, "t2i")
    assert len(t2i) == 4 and t2i.batch([0, 1])["text_embeds"].shape == (2, 8, 32)

    result = train(tiny_config(steps=2, batch_size=2), dataset, str(tmp_path / "i2i"))
    assert result.step == 2 and result.train_items == 9


def test_featurize_and_train_in_the_object_store(s3_bucket, tiny_config):
    dataset = write_dataset(f"s3://{s3_bucket}/datasets/images", count=6, per_shard=3)
    result = featurize(tiny_featurize_config(), dataset)
    assert result.features_uri == f"{dataset}/features" and result.num_samples == 6

    trained = train(tiny_config(steps=1, batch_size=2), dataset, f"s3://{s3_bucket}/runs/i2i")
    assert trained.checkpoint_uri == f"s3://{s3_bucket}/runs/i2i/step-0000001"


def test_captions_must_be_right_padded():
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    tokens, offsets = pack_text(embeds, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))
    assert offsets.tolist() == [0, 2, 5] and torch.equal(
        tokens, torch.cat([embeds[0, :2], embeds[1, :3]])
    )
    with pytest.raises(ValueError, match="text row 1's padding mask is not right-padded"):
        pack_text(embeds, torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]]))


def test_fan_out_over_shard_ranges_then_merge_matches_one_call(tmp_path):
    one = write_dataset(str(tmp_path / "one"), per_shard=1)  # 10 images, 5 shards of 2
    fanned = write_dataset(str(tmp_path / "fanned"), per_shard=1)
    cfg = tiny_featurize_config()
    single = featurize(cfg, one)

    assert [(p["start"], p["stop"]) for p in plan_featurize(fanned, 9)] == [
        (i, i + 1) for i in range(5)
    ]  # at most one partition per shard
    plan = plan_featurize(fanned, 2)
    assert [(p["start"], p["stop"], p["num_partitions"]) for p in plan] == [(0, 3, 2), (3, 5, 2)]
    with pytest.raises(ValueError, match=r"partition 0 of 2 \(shards 0..2\) has not finished"):
        merge_featurize(fanned, plan)
    results = [featurize(cfg, fanned, partition=p) for p in reversed(plan)]
    assert [r.num_samples for r in results] == [4, 6] and [r.parts for r in results] == [2, 3]
    merged = merge_featurize(fanned, list(reversed(plan)))

    specs = [
        Storage.from_uri(uri).child("features").read_json("features.json") for uri in (one, fanned)
    ]
    for key in (
        "parts",
        "counts",
        "shapes",
        "sizes",
        "encoders",
        "latent_downsample",
        "resolution",
    ):
        assert specs[0][key] == specs[1][key], key
    assert merged.num_samples == single.num_samples == 10 and merged.parts == single.parts == 5
    a, b = load_feature_table(one), load_feature_table(fanned)
    rows = list(range(len(a)))
    for key, value in a.gather(rows, text=True).items():
        assert torch.equal(value, b.gather(rows, text=True)[key]), key

    # Partial or stale plans are clear errors.
    with pytest.raises(ValueError, match="every partition of one plan_featurize call"):
        merge_featurize(fanned, plan[1:])
    write_dataset(fanned, count=11, per_shard=1)  # the dataset changes after the plan was made
    with pytest.raises(ValueError, match="changed since its featurize plan was made"):
        featurize(cfg, fanned, partition=plan[0])
    # A new plan's partitions have the old ones' names: their old summaries do not count.
    replan = plan_featurize(fanned, 2)
    with pytest.raises(ValueError, match="partition 0 of 2 .* has not finished: .* earlier plan"):
        merge_featurize(fanned, replan)
    for partition in replan:
        featurize(cfg, fanned, partition=partition)
    assert merge_featurize(fanned, replan).num_samples == 11
