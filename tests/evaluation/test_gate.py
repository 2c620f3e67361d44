"""The promotion gate: thresholds, regression against the promoted model, clear errors."""

from __future__ import annotations

import math

import pytest

from lumos.evaluation.gate import GateError, decide

THRESHOLDS = {"t2i": {"color_accuracy": 0.5, "position_accuracy": 0.5}, "video": {"psnr": 20.0}}


def test_passes_above_thresholds() -> None:
    assert decide(
        "t2i", {"color_accuracy": 0.9, "position_accuracy": 0.5, "size_accuracy": 0.0}, THRESHOLDS
    ) == (True, [])


def test_fails_below_a_threshold() -> None:
    passed, reasons = decide("t2i", {"color_accuracy": 0.4, "position_accuracy": 0.8}, THRESHOLDS)
    assert not passed
    assert reasons == ["color_accuracy = 0.4 is below the threshold 0.5"]


def test_fails_on_regression_against_the_promoted_model() -> None:
    metrics = {"color_accuracy": 0.80, "position_accuracy": 0.95}
    baseline = {"color_accuracy": 0.90, "position_accuracy": 0.96}
    passed, reasons = decide("t2i", metrics, THRESHOLDS, baseline, max_regression=0.05)
    assert not passed
    assert len(reasons) == 1 and "color_accuracy" in reasons[0] and "regressed" in reasons[0]
    # Within the allowed regression, or better than the baseline: passes.
    assert decide("t2i", metrics, THRESHOLDS, baseline, max_regression=0.15)[0]
    assert decide("t2i", {"color_accuracy": 0.95, "position_accuracy": 0.99}, THRESHOLDS, baseline)[
        0
    ]


def test_nan_and_infinite_values() -> None:
    assert decide("video", {"psnr": math.inf}, THRESHOLDS) == (True, [])
    passed, reasons = decide("video", {"psnr": math.nan}, THRESHOLDS)
    assert not passed and reasons == ["psnr is NaN"]
    assert not decide("video", {"psnr": 25.0}, THRESHOLDS, {"psnr": math.inf})[0]


def test_missing_metric_or_head_is_a_clear_error() -> None:
    with pytest.raises(GateError, match=r"did not produce: \['position_accuracy'\]"):
        decide("t2i", {"color_accuracy": 0.9}, THRESHOLDS)
    with pytest.raises(GateError, match="no thresholds for head 'novel_view'"):
        decide("novel_view", {"psnr": 30.0}, THRESHOLDS)
    with pytest.raises(GateError, match="max_regression"):
        decide("video", {"psnr": 30.0}, THRESHOLDS, max_regression=1.5)
