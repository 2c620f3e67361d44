"""The promotion gate: margins over the best baseline at the lower end of their interval,
regression against the promoted model, ground-truth metrics on data without it, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lumos.evaluation.comparison import MeanMetric, summarise
from lumos.evaluation.gate import GateError, decide, gate_checks

GATES = {"t2i": {"clip_score": {"margin": 1.0}, "color_accuracy": {"margin": 0.1}},
         "video": {"psnr": {"margin": 0.5, "relative": True}}}  # fmt: skip


def _summaries(clip_lead: float, color_lead: float, n: int = 100):
    rng = np.random.default_rng(0)
    base = rng.normal(20.0, 1.0, n)
    color = (rng.random(n) < 0.3).astype(float)
    flips = rng.permutation(n)[: int(round(color_lead * n))]
    model_color = color.copy()
    model_color[flips[model_color[flips] == 0]] = 1.0
    return summarise(
        {"clip_score": MeanMetric({"model": base + clip_lead, "shuffled": base, "blank": base - 5}),
         "color_accuracy": MeanMetric({"model": model_color, "random_train": color, "blank": 0 * color})},
        resamples=400,
    )  # fmt: skip


def test_passes_with_a_lead_beyond_the_noise() -> None:
    assert decide("t2i", _summaries(2.0, 0.4), GATES) == (True, [], [])


def test_fails_without_the_margin_and_says_why() -> None:
    passed, reasons, _ = decide("t2i", _summaries(0.5, 0.4), GATES)
    assert not passed and len(reasons) == 1
    assert reasons[0].startswith("clip_score = ") and "best baseline (shuffled = " in reasons[0]
    assert "asks for more than 1" in reasons[0]
    checks = gate_checks("t2i", _summaries(0.5, 0.4), GATES)
    assert checks["clip_score"]["passed"] is False and checks["color_accuracy"]["passed"] is True


def test_a_model_equal_to_its_best_baseline_fails_even_with_margin_zero() -> None:
    """Margin 0 still asks the lower end of the interval to be above 0: equal to the baseline
    (on every draw of items), or worse on some items, is not a lead."""
    values = np.random.default_rng(5).normal(size=50)
    gates = {"video": {"psnr": {"margin": 0.0}}}
    s = summarise({"psnr": MeanMetric({"model": values - 0.01, "copy_input": values})})
    assert not decide("video", s, gates)[0]
    same = summarise(
        {"psnr": MeanMetric({"model": values, "copy_input": values, "blank": values - 1})}
    )
    assert same["psnr"].margin_interval == (0.0, 0.0) and not decide("video", same, gates)[0]


def test_relative_margin_scales_with_the_best_baseline() -> None:
    s = summarise(
        {"psnr": MeanMetric({"model": np.full(10, 16.0), "copy_input": np.full(10, 10.0)})}
    )
    assert decide("video", s, GATES)[0]  # needs 0.5 x 10 = 5 dB, has 6
    s = summarise(
        {"psnr": MeanMetric({"model": np.full(10, 14.0), "copy_input": np.full(10, 10.0)})}
    )
    passed, reasons, _ = decide("video", s, GATES)
    assert not passed and "asks for more than 5" in reasons[0]


def test_regression_against_the_promoted_model_in_the_metric_direction() -> None:
    s = _summaries(2.0, 0.4)
    promoted = {"clip_score": s["clip_score"].value * 1.2}
    passed, reasons, _ = decide("t2i", s, GATES, promoted, max_regression=0.05)
    assert not passed and "regressed from the promoted model" in reasons[0]
    assert decide("t2i", s, GATES, promoted, max_regression=0.5)[0]
    # Lower is better: a Fréchet distance that grew is a regression.
    fd = summarise({"fd_dino": MeanMetric({"model": np.full(8, 3.0), "blank": np.full(8, 9.0)},
                                          higher_is_better=False)})  # fmt: skip
    gates = {"i2i": {"fd_dino": {"margin": 0.0}}}
    assert decide("i2i", fd, gates, {"fd_dino": 3.5})[0]
    assert not decide("i2i", fd, gates, {"fd_dino": 2.0})[0]
    assert decide("i2i", fd, gates, {"fd_dino": math.inf})[0]


def test_ground_truth_metrics_are_notes_on_data_without_it() -> None:
    s = _summaries(2.0, 0.4)
    del s["color_accuracy"]
    reason = "the eval items carry no ground-truth attributes"
    passed, reasons, notes = decide("t2i", s, GATES, unavailable={"color_accuracy": reason})
    assert passed and reasons == [] and notes == [f"color_accuracy not gated: {reason}"]
    with pytest.raises(GateError, match="none of the gated metrics"):
        decide("t2i", {}, GATES, unavailable={"clip_score": "x", "color_accuracy": "y"})


def test_nan_missing_metric_or_head_are_clear() -> None:
    s = summarise({"psnr": MeanMetric({"model": np.full(4, np.nan), "copy_input": np.zeros(4)})})
    assert decide("video", s, GATES)[1] == ["psnr is NaN"]
    with pytest.raises(GateError, match=r"did not produce: \['color_accuracy'\]"):
        decide("t2i", {"clip_score": _summaries(2, 0)["clip_score"]}, GATES)
    with pytest.raises(GateError, match="no gates for head 'novel_view'"):
        decide("novel_view", {}, GATES)
    with pytest.raises(GateError, match="max_regression"):
        decide("video", s, GATES, max_regression=1.5)
