"""Scoring one head's outputs and its baselines on the same items (tiny seeded ViT)."""

from __future__ import annotations

import numpy as np
import pytest

from lumos.configs.encoders import EncodersConfig
from lumos.data.synthetic import POSITIONS, ObjectSpec, render_objects
from lumos.encoders import FrozenEncoders
from lumos.evaluation.comparison import summarise
from lumos.evaluation.networks import FeatureSpace
from lumos.evaluation.scoring import EvalItems, blank_image, derangement, score_items

COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")


def _image(color: str, position: str, shape: str = "circle") -> np.ndarray:
    spec = ObjectSpec(color, shape, "large", position, "plain", POSITIONS[position])
    return render_objects([spec], 32)


@pytest.fixture(scope="module")
def space() -> FeatureSpace:
    return FeatureSpace(FrozenEncoders(EncodersConfig.tiny()), batch_size=16)


def _t2i_items(n: int = 24) -> EvalItems:
    rng = np.random.default_rng(0)
    specs = [(COLORS[i % 6], list(POSITIONS)[i % 4]) for i in rng.permutation(n)]
    truth = [[_image(c, p)] for c, p in specs]
    train = [
        [_image(COLORS[(i + 2) % 6], list(POSITIONS)[(i + 1) % 4], "square")] for i in range(n)
    ]
    attrs = [{"color": c, "shape": "circle", "size": "large", "position": p, "texture": "plain"}
             for c, p in specs]  # fmt: skip
    return EvalItems("t2i", truth, train, captions=[f"a {c} circle at the {p}" for c, p in specs],
                     attributes=attrs)  # fmt: skip


def test_derangement_moves_every_item() -> None:
    for n in (2, 3, 10):
        perm = derangement(n, seed=n)
        assert sorted(perm) == list(range(n)) and (perm != np.arange(n)).all()


def test_a_model_that_draws_the_truth_beats_every_baseline(space: FeatureSpace) -> None:
    items = _t2i_items()
    scores = score_items(items, [list(t) for t in items.truth], space)
    s = summarise(scores.metrics, resamples=200)
    assert s["color_accuracy"].value == 1.0 and s["position_accuracy"].value == 1.0
    assert scores.extra["reference_all_accuracy"] == 1.0
    assert s["color_accuracy"].baselines["blank"] == 0.0  # a blank image has no object
    # The model's own outputs for other captions (caption-shuffled) score what chance gives.
    assert s["color_accuracy"].baselines["shuffled"] < 0.5
    assert s["color_accuracy"].margin_interval[0] > 0.3
    assert s["dino_similarity"].value == pytest.approx(1.0) and s["dino_similarity"].margin > 0
    assert s["fd_dino"].value == pytest.approx(0.0, abs=1e-6)
    assert set(s["fd_dino"].baselines) == {"blank", "random_train"}


def test_blank_outputs_score_as_the_blank_baseline(space: FeatureSpace) -> None:
    items = _t2i_items()
    colour = blank_image(items.truth)
    assert tuple(colour) == (235, 235, 235)  # the embedded data's background
    blank = [[np.broadcast_to(colour, t[0].shape).copy()] for t in items.truth]
    s = summarise(score_items(items, blank, space).metrics, resamples=100)
    for name in ("fd_dino", "dino_similarity", "color_accuracy"):
        assert s[name].value == pytest.approx(s[name].baselines["blank"]), name
    for name in ("fd_dino", "color_accuracy"):  # what gates the blank image
        assert s[name].margin_interval[0] <= 0, name
    # A per-item closeness is shown beside the blank image but not gated against it (a blank
    # image is mean-like: closer to the truth than faithful samples; test_faithful_sampler.py).
    assert s["dino_similarity"].against == ["random_train", "shuffled"]


def test_multi_frame_items_score_frames_after_the_first(space: FeatureSpace) -> None:
    """Views 1..F-1 are scored; copying view 0 is a baseline; items may differ in size."""
    rng = np.random.default_rng(1)
    frames = [[_image(c, p) for p in POSITIONS] for c in COLORS[:4]]
    frames[1] = [np.asarray(im).repeat(2, 0).repeat(2, 1) for im in frames[1]]  # 64 px item
    train = [[rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(4)] for _ in frames]
    items = EvalItems("video", frames, train)
    scores = score_items(items, [list(f) for f in frames], space)
    s = summarise(scores.metrics, resamples=100)
    assert s["psnr"].value == 100.0 and s["ssim"].value == pytest.approx(1.0)
    assert set(s["psnr"].baselines) == {"blank", "random_train", "shuffled", "copy_input"}
    assert s["perceptual_distance"].value == pytest.approx(0.0, abs=1e-9)
    assert s["perceptual_distance"].margin > 0 and not s["perceptual_distance"].higher_is_better
    assert len(scores.per_item) == 4 and scores.per_item[0]["psnr"] == 100.0


def test_mismatched_inputs_are_clear_errors(space: FeatureSpace) -> None:
    items = _t2i_items(4)
    with pytest.raises(ValueError, match="3 generated items for 4 eval items"):
        score_items(items, [list(t) for t in items.truth][:3], space)
    with pytest.raises(ValueError, match="1 training items for 2 eval items"):
        EvalItems("i2i", items.truth[:2], items.train[:1])
