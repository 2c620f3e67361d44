"""The promotion gate: a pure decision from metrics, thresholds and the promoted model's metrics.

Every gated metric is "higher is better" (accuracies, agreement rates, PSNR, SSIM). A head passes
when each of its gated metrics reaches its minimum and, when a promoted model exists, none of them
fell more than `max_regression` (relative) below the promoted model's value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


class GateError(ValueError):
    """The gate cannot decide: a threshold names a metric the evaluation did not produce, etc."""


def decide(
    head: str,
    metrics: Mapping[str, float],
    thresholds: Mapping[str, Mapping[str, float]],
    baseline_metrics: Mapping[str, float] | None = None,
    max_regression: float = 0.05,
) -> tuple[bool, list[str]]:
    """(passed, reasons): reasons lists every failed check, empty when the head passed.

    thresholds: per head, metric name -> minimum value (``{"t2i": {"color_accuracy": 0.5}}``).
    baseline_metrics: the promoted model's metrics for this head (None: nothing promoted yet).
    max_regression: the largest allowed relative drop below the baseline (0.05 = 5 %).
    """
    if head not in thresholds:
        raise GateError(
            f"no thresholds for head {head!r} (thresholds exist for {sorted(thresholds)}); "
            f"add evaluate.thresholds.{head} to the configuration"
        )
    if not 0.0 <= max_regression < 1.0:
        raise GateError(f"max_regression must be in [0, 1), got {max_regression}")
    gated = thresholds[head]
    if not gated:
        raise GateError(f"evaluate.thresholds.{head} is empty: gate at least one metric")
    missing = sorted(set(gated) - set(metrics))
    if missing:
        raise GateError(
            f"head {head!r}: thresholds name metrics the evaluation did not produce: {missing}; "
            f"it produced {sorted(metrics)}"
        )

    reasons: list[str] = []
    for name, minimum in sorted(gated.items()):
        value = float(metrics[name])
        if math.isnan(value):
            reasons.append(f"{name} is NaN")
            continue
        if value < minimum:
            reasons.append(f"{name} = {value:.4g} is below the threshold {minimum:.4g}")
        if baseline_metrics is None or name not in baseline_metrics:
            continue
        base = float(baseline_metrics[name])
        if math.isnan(base):
            continue
        floor = base - abs(base) * max_regression if math.isfinite(base) else base
        if value < floor:
            reasons.append(
                f"{name} = {value:.4g} regressed from the promoted model's {base:.4g} "
                f"(more than {max_regression:.0%} lower)"
            )
    return not reasons, reasons
