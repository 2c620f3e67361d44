"""Multi-aspect training as a user runs it: ingest with aspect buckets, featurize (each size's
latents stored apart), train in batches of one size, evaluate each image at its own size."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from dataset_samples import load_all_samples
from PIL import Image

from lumos.configs.data import IngestConfig
from lumos.configs.encoders import EncodersConfig
from lumos.configs.evaluation import EvaluateConfig
from lumos.configs.training import FeaturizeConfig
from lumos.data.ingest import ingest
from lumos.encoders import FrozenEncoders
from lumos.evaluation.evaluate import evaluate
from lumos.features.items import FeatureDataset
from lumos.features.table import load_feature_table
from lumos.storage import Storage
from lumos.training.featurize import featurize
from lumos.training.train import train

SQUARE, LANDSCAPE, PORTRAIT = (32, 32), (48, 32), (32, 48)  # source (width, height)
# Images 0 and 1 are the eval split; the one portrait image is alone in its size.
SOURCE = [SQUARE, LANDSCAPE, SQUARE, LANDSCAPE, SQUARE, LANDSCAPE, SQUARE, LANDSCAPE, PORTRAIT,
          SQUARE, LANDSCAPE, SQUARE]  # fmt: skip
BUCKETS = [(16, 16), (24, 16), (16, 24)]  # output (width, height) at resolution 16
ENCODERS = EncodersConfig.tiny(max_tokens=8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("buckets")
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SOURCE):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (root / "source").mkdir(exist_ok=True)
        (root / "source" / f"img-{i:02d}.png").write_bytes(buffer.getvalue())
        sidecar = {"caption": f"picture {i}", "split": "eval" if i < 2 else "train"}
        (root / "source" / f"img-{i:02d}.json").write_text(json.dumps(sidecar))
    cfg = IngestConfig(resolution=16, aspect_buckets=BUCKETS, image_format="png",
                       near_duplicate_distance=None, paired_fraction=1.0, workers=1)  # fmt: skip
    result = ingest(cfg, str(root / "source"), str(root / "dataset"), progress=False)
    assert result.ingested == len(SOURCE)
    uri = str(root / "dataset")
    featurize(FeaturizeConfig(encoders=ENCODERS, device="cpu", progress_bar=False), uri)
    return uri


def test_featurize_stores_each_size_apart(dataset):
    features = Storage.from_uri(dataset).child("features")
    spec = features.read_json("features.json")
    assert spec["sizes"] == [
        {"image": [16, 16], "latents": [3, 16, 16], "count": 6},
        {"image": [16, 24], "latents": [3, 16, 24], "count": 5},  # landscape: h 16, w 24
        {"image": [24, 16], "latents": [3, 24, 16], "count": 1},
    ]
    # The model's base size is the nominal resolution's square.
    assert spec["shapes"]["latents"] == [3, 16, 16] and spec["latent_downsample"] == 1

    table = load_feature_table(dataset)
    assert table.latent_sizes == [(16, 16), (16, 24), (24, 16)] and len(table) == 10
    # Every row's latents are its own image's, whichever size holds it.
    images = {s.key: s.image for s in load_all_samples(dataset)}
    encoders = FrozenEncoders(ENCODERS)
    for row, record in enumerate(table.records):
        got = table.gather([row])["latents"][0].float()
        image = images[record["key"]]
        assert got.shape[-2:] == image.shape[:2] == (record["height"], record["width"])
        torch.testing.assert_close(
            got, encoders.encode_images(image[None].copy())[0], atol=2e-3, rtol=0
        )
    square, landscape = (int(np.flatnonzero(table.size_ids == i)[0]) for i in (0, 1))
    with pytest.raises(ValueError, match="cannot share a batch"):
        table.gather([square, landscape])


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
def test_compiled_training_compiles_each_size_once(dataset, tmp_path, tiny_config):
    """compile=True with two trained sizes: a static graph per size, never an eager fallback.
    With dynamo's limit at 1 and a hit made an error, the loop must raise the limit to its
    sizes (it compiled a graph per size anyway, and ran eagerly past the limit).
    (`config.patch`, not pytest's monkeypatch, whose undo deletes, which hides a torch config.)"""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        cfg = tiny_config(steps=4, batch_size=2, compile=True)
        result = train(cfg, dataset, str(tmp_path / "compiled"))
    assert result.step == 4 and math.isfinite(result.final_loss)
    assert torch._dynamo.config.recompile_limit == 8  # restored
    torch._dynamo.reset()


def test_training_batches_one_size_at_a_time(dataset, tmp_path, tiny_config):
    table = load_feature_table(dataset)
    items = FeatureDataset.for_head(table, "i2i")
    assert sorted(np.bincount(items.item_sizes()).tolist()) == [1, 4, 5]

    # Without batches of one size, the first batch mixing sizes would fail in gather.
    result = train(tiny_config(steps=6, batch_size=2), dataset, str(tmp_path / "i2i"))
    assert result.step == 6 and math.isfinite(result.final_loss)
    assert result.starved_items == 1  # the lone portrait image: reported, not silently dropped
    t2i = train(
        tiny_config(head="t2i", steps=2, batch_size=2),
        dataset,
        str(tmp_path / "t2i"),
        init_from=result.checkpoint_uri,
    )
    assert t2i.train_items == 10 and t2i.starved_items == 1 and math.isfinite(t2i.final_loss)

    # Evaluation samples each eval image (one square, one landscape) at its own size: its PSNR
    # against the true image needs the two to be the same size.
    cfg = EvaluateConfig(num_samples=2, sampling_steps=2, batch_size=2, device="cpu")
    evaluated = evaluate(cfg, result.checkpoint_uri, dataset, str(tmp_path / "eval"))
    assert evaluated.num_samples == 2 and math.isfinite(evaluated.metrics["psnr"])
    assert len(json.loads((tmp_path / "eval" / "samples.json").read_text())) == 2
