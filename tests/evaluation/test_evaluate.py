"""evaluate end to end on tiny untrained checkpoints: the embedded dataset, ingested and
featurized by the real stages; every head runs, scores its metrics beside the baselines, writes
its files and fails the gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_clip import save_tiny_clip

from lumos.configs.data import IngestConfig, SynthConfig
from lumos.configs.encoders import EncodersConfig
from lumos.configs.evaluation import EvaluateConfig, MetricGate
from lumos.configs.training import FeaturizeConfig, TrainConfig
from lumos.data.ingest import ingest
from lumos.data.synthetic import generate_default_dataset
from lumos.evaluation.evaluate import EvalResult, evaluate
from lumos.training.featurize import featurize
from lumos.training.train import train

HEAD_DATA = {"i2i": "images", "t2i": "images", "novel_view": "views", "video": "clips"}
TINY_MODEL = {"depth": 1, "hidden_size": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def eval_config(tmp_path_factory: pytest.TempPathFactory) -> EvaluateConfig:
    """The default gates (the paper recipe's), with a tiny CLIP for the T2I CLIP score."""
    clip = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")
    return EvaluateConfig(num_samples=3, sampling_steps=2, batch_size=4, device="cpu",
                          report_samples=2, bootstrap_resamples=100, clip_path=str(clip))  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """head -> (untrained checkpoint URI, dataset URI)."""
    root = tmp_path_factory.mktemp("eval")
    synth = SynthConfig(resolution=32, num_images=16, num_objects=8, views_per_object=3,
                        num_clips=8, frames_per_clip=3, eval_fraction=0.25)  # fmt: skip
    generate_default_dataset(synth, str(root / "source"))
    # The synthetic images are alike on purpose: no near-duplicate detection; every caption paired.
    ingest_cfg = IngestConfig(resolution=16, image_format="png", near_duplicate_distance=None,
                              paired_fraction=1.0, workers=1)  # fmt: skip
    encoders = EncodersConfig.tiny(max_tokens=16)
    for kind in ("images", "views", "clips"):
        ingest(ingest_cfg, str(root / "source" / kind), str(root / kind), progress=False)
        featurize(
            FeaturizeConfig(encoders=encoders, device="cpu", progress_bar=False), str(root / kind)
        )
    out = {}
    for head, kind in HEAD_DATA.items():
        frames = {"num_frames": 3} if kind != "images" else {}
        # Untrained heads: fresh weights (init: scratch), no prior.
        init = "prior" if head == "i2i" else "scratch"
        cfg = TrainConfig(head=head, model_size="tiny", model_overrides=TINY_MODEL, steps=0, init=init,
                          batch_size=2, mixed_precision="no", compile=False, progress_bar=False, **frames)  # fmt: skip
        result = train(cfg, str(root / kind), str(root / "ckpt" / head))
        out[head] = (result.checkpoint_uri, str(root / kind))
    return out


@pytest.mark.parametrize("head", list(HEAD_DATA))
def test_untrained_checkpoint_fails_beside_its_baselines(
    checkpoints, eval_config: EvaluateConfig, tmp_path: Path, head: str
) -> None:
    ckpt, dataset = checkpoints[head]
    result = evaluate(eval_config, ckpt, dataset, str(tmp_path))
    assert result.head == head
    # 16 images / 8 groups with eval_fraction 0.25: 4 eval images (3 used), 2 eval groups.
    assert result.num_samples == (2 if head in ("novel_view", "video") else 3)
    assert not result.passed and result.reasons
    for name in ("metrics.json", "report.html", "eval.json", "samples.json"):
        assert (tmp_path / name).is_file(), name
    assert EvalResult.model_validate_json((tmp_path / "eval.json").read_text()) == result
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["metrics"] == result.metrics and written["comparison"] == result.comparison

    # Every metric beside the baselines of its head, with intervals and a margin.
    baselines = {"blank", "random_train", "shuffled"} | (
        {"copy_input"} if head in ("novel_view", "video") else set()
    )
    expected = {"fd_dino", "dino_similarity"} | (
        {"clip_score", "color_accuracy", "all_accuracy"} if head == "t2i"
        else {"perceptual_distance", "psnr", "ssim"}
    )  # fmt: skip
    assert expected <= set(result.comparison)
    for name, c in result.comparison.items():
        lo, hi = c["interval"]
        assert lo <= c["value"] <= hi, name
        if name == "fd_dino":  # a distribution distance: real images are no baseline for it
            assert c["against"] == ["blank"] and c["better"] == "lower"
            assert set(c["baselines"]) == baselines - {"shuffled"}
        elif name in ("dino_similarity", "perceptual_distance", "psnr", "ssim"):
            # closeness to the one true output: the blank image is a mean-like output, shown
            # beside the model but not gated against (the Fréchet distance gates it)
            assert set(c["baselines"]) == baselines, name
            assert set(c["against"]) == baselines - {"blank"}, name
        elif name != "object_found_rate":
            assert set(c["baselines"]) == set(c["against"]) == baselines, name
        assert c["margin"] is not None and c["margin_interval"][0] <= c["margin"]
    # Every gated metric is in the report's gate table, with what it asked for.
    assert set(result.gates) == set(eval_config.gates[head])
    page = (tmp_path / "report.html").read_text()
    assert "FAILED" in page and "data:image/png;base64," in page
    assert "margin over best baseline" in page and "random_train" in page
    if head == "t2i":
        assert result.metrics["all_accuracy"] < 0.5
        # The measurement itself is exact on the true images at the training resolution.
        assert result.metrics["reference_all_accuracy"] == 1.0
        assert "a " in page and " at the " in page  # captions shown as conditions
    elif head == "i2i":
        assert result.metrics["all_agreement"] < 0.5
    else:
        c = result.comparison["psnr"]
        assert c["value"] < c["baselines"]["copy_input"] and c["margin"] < 0


def test_same_seed_same_metrics_and_promoted_model_regression(
    checkpoints, eval_config: EvaluateConfig, tmp_path: Path
) -> None:
    ckpt, dataset = checkpoints["video"]
    first = evaluate(eval_config, ckpt, dataset, str(tmp_path / "a"))
    again = evaluate(
        eval_config,
        ckpt,
        dataset,
        str(tmp_path / "b"),
        baseline={"psnr": first.metrics["psnr"] * 2},
    )
    assert again.metrics == first.metrics and again.comparison == first.comparison
    assert not any("regressed" in r for r in first.reasons)
    assert any("psnr" in r and "regressed from the promoted model" in r for r in again.reasons)


def test_a_gate_that_needs_clip_without_a_clip_model_is_refused(
    checkpoints, tmp_path: Path
) -> None:
    from lumos.evaluation.gate import GateError

    ckpt, dataset = checkpoints["t2i"]
    with pytest.raises(GateError, match="evaluate.clip_path is not set"):
        evaluate(EvaluateConfig(device="cpu"), ckpt, dataset, str(tmp_path))


def test_config_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        EvaluateConfig(num_sample=3)
    with pytest.raises(ValueError, match="unknown heads"):
        EvaluateConfig(gates={"t2v": {"psnr": 1.0}})
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        EvaluateConfig(gates={"video": {"psnr": -1.0}})
    # A number is short for a margin.
    assert EvaluateConfig(gates={"video": {"psnr": 0.5}}).gates["video"]["psnr"] == MetricGate(
        margin=0.5
    )


def test_t2i_eval_items_read_only_the_parts_they_need() -> None:
    """The first captioned eval samples come from the first parts: later parts' records (json
    that can be gigabytes at the paper's scale) are never read."""
    import numpy as np
    import torch

    from lumos.evaluation.evaluate import _eval_items
    from lumos.features.format import FeaturePart
    from lumos.features.table import FeatureTable

    def unread() -> list[dict]:
        raise AssertionError("a later part's records were read")

    first = [{"key": f"a{i}", "caption": f"caption {i}" if i % 2 else None} for i in range(6)]
    parts = [
        FeaturePart([torch.zeros(6, 3, 4, 4)], torch.zeros(6, 8), lambda: first),
        FeaturePart([torch.zeros(6, 3, 4, 4)], torch.zeros(6, 8), unread),
    ]
    table = FeatureTable(
        spec={}, parts=parts, part_starts=np.array([0, 6, 12]),
        local_rows=np.tile(np.arange(6, dtype=np.int32), 2), has_text=np.zeros(12, dtype=bool),
    )  # fmt: skip
    assert _eval_items(table, "t2i", model=None, num_samples=3) == [[1], [3], [5]]
