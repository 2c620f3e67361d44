"""The scene generator, its checks, the SSL encoder and the linear probe, on tiny inputs."""

from __future__ import annotations

import numpy as np
import pytest

from lumos.configs.encoders import EncodersConfig, ImageEncoderConfig
from lumos.configs.experiment import (
    ExperimentConfig,
    ExperimentConfigError,
    SceneConfig,
    SSLEncoderConfig,
)
from lumos.data.scenes import (
    BACKGROUND,
    Scene,
    SceneObject,
    check_scene,
    holdout_combinations,
    iter_scenes,
    measure_scene,
    render_scene,
)
from lumos.encoders import FrozenEncoders
from lumos.encoders.ssl import linear_probe, train_ssl_encoder


def test_scenes_are_deterministic_and_hold_combinations_out() -> None:
    cfg = SceneConfig(num_images=120, holdout_combinations=4, seed=3)
    a, b = list(iter_scenes(cfg)), list(iter_scenes(cfg))
    assert all(
        np.array_equal(x.image, y.image) and x.caption == y.caption
        for x, y in zip(a, b, strict=True)
    )
    held = set(holdout_combinations(4, 3))
    for s in a:
        has_held = bool(s.scene.combinations() & held)
        assert s.holdout == has_held
        # A held-out combination is never captioned for training; eval items always are.
        assert (s.caption is None) == (has_held and s.split == "train")
    assert {s.scene.kind for s in a} == {"single", "count", "relation"}


def test_the_checks_pass_the_true_image_and_fail_a_blank_one() -> None:
    scenes = [s for s in iter_scenes(SceneConfig(num_images=200, seed=1))]
    passed = [check_scene(s.scene, measure_scene(s.image))["overall"] for s in scenes]
    assert np.mean(passed) > 0.8  # the checks' own accuracy on true images (reported as such)
    blank = np.full_like(scenes[0].image, BACKGROUND)
    assert not any(check_scene(s.scene, measure_scene(blank))["overall"] for s in scenes)


def test_a_relation_is_read_from_the_pixels() -> None:
    a = SceneObject("red", "square", "large", "left")
    b = SceneObject("blue", "circle", "large", "right")
    left_of = Scene("relation", (a, b), "to the left of")
    right_of = Scene("relation", (a, b), "to the right of")
    image = render_scene(left_of, 32, [(0.0, 0.0), (0.0, 0.0)])
    blobs = measure_scene(image)
    assert check_scene(left_of, blobs) == {"binding": True, "relation": True, "overall": True}
    assert check_scene(right_of, blobs)["relation"] is False
    three = Scene("count", tuple(SceneObject("green", "triangle", "medium", p)
                                 for p in ("top left", "center", "bottom right")))  # fmt: skip
    img3 = render_scene(three, 32, [(0.0, 0.0)] * 3)
    assert check_scene(three, measure_scene(img3))["count"]
    two = Scene("count", three.objects[:2])
    assert not check_scene(two, measure_scene(img3))["count"]


def test_ssl_encoder_loads_like_dino_and_the_probe_separates(tmp_path) -> None:
    images = np.stack([s.image for s in iter_scenes(SceneConfig(num_images=40))])
    cfg = SSLEncoderConfig(steps=3, batch_size=8, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32, patch_size=8)  # fmt: skip
    result = train_ssl_encoder(cfg, images, tmp_path / "vit")
    assert result.steps == 3 and result.final_loss is not None
    enc = FrozenEncoders(
        EncodersConfig(vae={"kind": "pixel"},
                       image_encoder=ImageEncoderConfig(path=str(tmp_path / "vit"), image_size=32))
    )  # fmt: skip
    assert tuple(enc.embed_images(images[:4]).shape) == (4, 16)
    rng = np.random.default_rng(0)
    labels = [str(i % 3) for i in range(90)]
    separable = np.eye(3)[[int(v) for v in labels]] * 5 + rng.normal(size=(90, 3)) * 0.1
    assert linear_probe(separable, {"y": labels})["y"] == 1.0
    noise = rng.normal(size=(90, 3))
    assert linear_probe(noise, {"y": labels})["y"] < 0.8


def test_presets_validate_and_a_bad_name_is_one_error() -> None:
    for name in ("experiment-micro", "experiment-cpu", "experiment-gpu"):
        cfg = ExperimentConfig.from_preset(name, {"steps": {"t2i": 7}})
        assert cfg.steps.t2i == 7 and cfg.name == name
    with pytest.raises(ExperimentConfigError, match="unknown experiment preset"):
        ExperimentConfig.from_preset("experiment-tpu")
