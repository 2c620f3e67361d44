"""Attribute measurement: exact on the dataset's own images at training resolution, chance on noise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lumos.configs.data import SynthConfig
from lumos.data.synthetic import BACKGROUND, ObjectSpec, iter_default_dataset, render_objects
from lumos.evaluation.attributes import attribute_accuracy, largest_component, measure


@pytest.fixture(scope="module")
def dataset_images() -> list[tuple[np.ndarray, dict]]:
    cfg = SynthConfig(num_images=300, num_objects=0, num_clips=0, seed=11)
    return [(img, meta["attributes"]) for _, img, meta in iter_default_dataset(cfg)]


@pytest.mark.parametrize("resolution", [64, 32])
@pytest.mark.parametrize(
    "resample", [Image.Resampling.BICUBIC, Image.Resampling.LANCZOS, Image.Resampling.BOX]
)
def test_recovers_the_attributes_of_the_dataset_images(
    dataset_images, resolution, resample
) -> None:
    measured, expected = [], []
    for img, attrs in dataset_images:
        if resolution != img.shape[0]:
            img = np.asarray(Image.fromarray(img).resize((resolution, resolution), resample))
        measured.append(measure(img))
        expected.append(attrs)
    acc = attribute_accuracy(measured, expected)
    assert acc["object_found_rate"] == 1.0
    for name in ("color", "shape", "size", "position", "texture"):
        assert acc[f"{name}_accuracy"] >= 0.99, (name, acc)


def test_noise_scores_near_chance(dataset_images) -> None:
    rng = np.random.default_rng(0)
    measured = [measure(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in dataset_images]
    acc = attribute_accuracy(measured, [a for _, a in dataset_images])
    # Chance: colour 1/6, position 1/4, shape 1/3, size and texture 1/2.
    assert acc["color_accuracy"] < 0.35
    assert acc["position_accuracy"] < 0.45
    assert acc["shape_accuracy"] < 0.55
    assert acc["all_accuracy"] < 0.05


def test_blank_image_has_no_object() -> None:
    blank = np.full((32, 32, 3), BACKGROUND, dtype=np.uint8)
    m = measure(blank)
    assert not m.found and m.color is None
    acc = attribute_accuracy(
        [m],
        [
            {
                "color": "red",
                "shape": "circle",
                "size": "small",
                "position": "top left",
                "texture": "plain",
            }
        ],
    )
    assert acc["all_accuracy"] == 0.0 and acc["object_found_rate"] == 0.0


def test_speckles_do_not_move_the_object() -> None:
    obj = ObjectSpec("blue", "square", "large", "bottom right", "plain", (0.75, 0.75))
    img = render_objects([obj], 32).copy()
    img[1, 1] = (0, 0, 0)  # an isolated dark speck in the top-left cell
    img[2, 5] = (200, 30, 30)
    m = measure(img)
    assert m.attributes == obj.attributes


def test_largest_component() -> None:
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = True
    mask[2:5, 2:5] = True
    assert largest_component(mask).sum() == 9
    assert not largest_component(np.zeros((3, 3), dtype=bool)).any()


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        measure(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no images"):
        attribute_accuracy([], [])
