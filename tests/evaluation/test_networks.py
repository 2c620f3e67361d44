"""The measuring networks: a tiny seeded DINO-architecture ViT, a tiny CLIP loaded from disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_clip import save_tiny_clip

from lumos.configs.encoders import EncodersConfig
from lumos.data.synthetic import ObjectSpec, render_objects
from lumos.encoders import FrozenEncoders
from lumos.evaluation.networks import ClipScorer, FeatureSpace


def _shape(color: str, position: str, size: int = 32) -> np.ndarray:
    cell = {"top left": (0.25, 0.25), "bottom right": (0.75, 0.75)}[position]
    return render_objects([ObjectSpec(color, "circle", "large", position, "plain", cell)], size)


@pytest.fixture(scope="module")
def space() -> FeatureSpace:
    return FeatureSpace(FrozenEncoders(EncodersConfig.tiny()), batch_size=3)


def test_cls_features_are_deterministic_and_tell_images_apart(space: FeatureSpace) -> None:
    images = [_shape("red", "top left"), _shape("blue", "top left"), _shape("red", "top left")]
    feats = space.cls(images)
    assert feats.shape == (3, 32) and feats.dtype == np.float64
    assert np.allclose(feats[0], feats[2]) and not np.allclose(feats[0], feats[1])
    # Images of any size, one batch: each is resized and cropped on its own.
    assert np.allclose(
        space.cls([np.asarray(images[0]), _shape("red", "top left", 64)])[0], feats[0]
    )


def test_perceptual_distance(space: FeatureSpace) -> None:
    red_tl, red_br, blue_tl = (
        _shape("red", "top left"),
        _shape("red", "bottom right"),
        _shape("blue", "top left"),
    )
    d = space.perceptual_distance(
        [red_tl, red_tl, red_tl, red_tl], [red_tl, red_br, blue_tl, red_tl * 0]
    )
    assert d[0] == pytest.approx(0.0, abs=1e-9)
    assert (d[1:] > 0.01).all() and (d <= 4.0).all()
    with pytest.raises(ValueError, match="3 images against 2"):
        space.perceptual_distance([red_tl] * 3, [red_tl] * 2)


def test_clip_scorer_loads_from_a_directory(tmp_path: Path) -> None:
    path = save_tiny_clip(tmp_path / "clip")
    clip = ClipScorer.load(str(path))
    images = [_shape("red", "top left"), _shape("blue", "bottom right", 48)]
    captions = ["a red circle", "a blue circle at the bottom right " * 20]  # cut at 77 tokens
    scores = clip.score(images, captions)
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 100.0)
    img, txt = clip.image_embeds(images), clip.text_embeds(captions)
    assert np.allclose(np.linalg.norm(img, axis=1), 1.0) and np.allclose(
        np.linalg.norm(txt, axis=1), 1.0
    )
    assert np.allclose(scores, 100 * (img * txt).sum(1))
    # Same weights, same scores.
    assert np.allclose(ClipScorer.load(str(path)).score(images, captions), scores)


def test_missing_clip_weights_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist: put a CLIP model"):
        ClipScorer.load(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScorer.load(str(tmp_path / "empty"))
