"""The loss curve of a few tiny steps per head, pinned: a refactor of the loop must not move it.

The values were recorded before `train()` was split into setup functions (issue 15), and again
when the model took PixArt's final layer and size embedders and the CLS normalisation moved before
the null replacement (issue 18, a change of the model), and the video case once more when the
video head took frame attention (a new layer; its first step, where the new layer's output is
still zero, kept its loss): the same seed, data and config must give the same losses. Tolerance covers the last bits a CPU of another instruction set may round
differently, far below what any change to the loop's order of operations (seeding, data order,
EMA, clipping, accumulation) moves them.
"""

from __future__ import annotations

import os

import pytest

from lumos.training.train import train

# (fixture, TrainConfig overrides) -> the losses of steps 1..4
CASES = {
    "i2i-accum": ("images_features", {"grad_accum": 2}),
    "i2i-bf16-weights": ("images_features", {"mixed_precision": "bf16-weights", "grad_clip": 0.05}),
    "t2i": ("images_features", {"head": "t2i", "init": "scratch"}),
    "novel_view": ("views_features", {"head": "novel_view", "num_frames": 3, "init": "scratch"}),
    "video": ("clips_features", {"head": "video", "num_frames": 2, "init": "scratch"}),
}

PINNED: dict[str, list[float]] = {
    "i2i-accum": [
        1.0406498908996582,
        0.9800618886947632,
        0.9694449305534363,
        0.9984872341156006,
    ],
    "i2i-bf16-weights": [
        1.0371837615966797,
        1.0405945777893066,
        0.9985814690589905,
        0.9374660849571228,
    ],
    "novel_view": [
        1.0263054370880127,
        0.9612847566604614,
        1.012488842010498,
        1.0620719194412231,
    ],
    "t2i": [
        1.0371837615966797,
        1.0406858921051025,
        0.9985101819038391,
        0.9369065165519714,
    ],
    "video": [
        1.0272226333618164,
        0.9610198736190796,
        0.9520778059959412,
        0.9950796365737915,
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_losses_of_four_tiny_steps_are_pinned(case, request, tmp_path, tiny_config):
    fixture, overrides = CASES[case]
    dataset = request.getfixturevalue(fixture)
    result = train(tiny_config(steps=4, **overrides), dataset, str(tmp_path / "run"))
    losses = [loss for _, loss in result.losses]
    if os.environ.get("LUMOS_PRINT_PINNED"):
        print(f"PINNED {case!r}: {[float.hex(x) for x in losses]} {losses}")
    assert [step for step, _ in result.losses] == [1, 2, 3, 4]
    assert losses == pytest.approx(PINNED[case], rel=1e-5, abs=1e-8)
