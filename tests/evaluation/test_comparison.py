"""Metrics beside baselines: the best baseline per direction, paired bootstrap margins."""

from __future__ import annotations

import numpy as np
import pytest

from lumos.evaluation.comparison import FrechetMetric, MeanMetric, summarise


def test_margin_over_the_best_baseline_both_directions() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.05, 200)
    higher = MeanMetric({"model": 0.8 + noise, "blank": np.zeros(200), "shuffled": 0.5 + noise,
                         "random_train": 0.6 + noise})  # fmt: skip
    lower = MeanMetric({"model": 0.2 + noise, "blank": 1.0 + noise, "shuffled": 0.3 + noise},
                       higher_is_better=False)  # fmt: skip
    out = summarise({"acc": higher, "dist": lower}, resamples=500)
    acc, dist = out["acc"], out["dist"]
    assert acc.best_baseline == "random_train" and acc.margin == pytest.approx(0.2)
    assert dist.best_baseline == "shuffled" and dist.margin == pytest.approx(0.1)
    # The same noise in model and baseline cancels in the paired bootstrap: a tight margin.
    assert acc.margin_interval == pytest.approx((0.2, 0.2))
    lo, hi = acc.interval
    assert lo < acc.value < hi and hi - lo < 0.05
    assert acc.baselines == {"blank": 0.0, "random_train": pytest.approx(0.6 + noise.mean()),
                             "shuffled": pytest.approx(0.5 + noise.mean())}  # fmt: skip


def test_a_model_equal_to_a_baseline_has_no_margin() -> None:
    values = np.random.default_rng(1).random(64)
    out = summarise({"m": MeanMetric({"model": values, "shuffled": values})}, resamples=200)
    assert out["m"].margin == 0.0 and out["m"].margin_interval == (0.0, 0.0)


def test_noise_leaves_the_margin_interval_across_zero() -> None:
    """A model no better than its baseline, measured on few items: the interval says so."""
    rng = np.random.default_rng(2)
    m = MeanMetric({"model": rng.random(20) > 0.5, "shuffled": rng.random(20) > 0.5})
    m.values = {k: v.astype(float) for k, v in m.values.items()}
    lo, hi = summarise({"acc": m}, resamples=1000)["acc"].margin_interval
    assert lo < 0 < hi


def test_frechet_metric_is_gated_against_blank_only() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(40, 1, 6))
    metric = FrechetMetric(
        {"model": ref + rng.normal(0, 0.3, ref.shape), "blank": np.zeros_like(ref),
         "random_train": rng.normal(size=ref.shape)}, ref,
    )  # fmt: skip
    s = summarise({"fd": metric}, resamples=100)["fd"]
    assert s.against == ["blank"] and s.best_baseline == "blank"
    assert s.margin == pytest.approx(s.baselines["blank"] - s.value) and s.margin > 0
    assert s.margin_interval[0] > 0 and not s.higher_is_better


def test_metrics_on_different_items_are_refused() -> None:
    with pytest.raises(ValueError, match="different numbers of items"):
        summarise(
            {"a": MeanMetric({"model": np.zeros(3)}), "b": MeanMetric({"model": np.zeros(4)})}
        )
