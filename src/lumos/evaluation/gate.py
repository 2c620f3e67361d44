"""The promotion gate: a pure decision from each metric's margin over its baselines.

    passed, reasons, notes = decide("t2i", summaries, gates, promoted={"clip_score": 27.0})

A gated metric passes when the model beats the best of the trivial baselines it is compared with
(`lumos.evaluation.comparison`) by more than the gate's margin *at the lower end of the margin's
bootstrap interval*: a lead that the choice of eval items could erase does not count, so a model
that ignores its condition (whose metric equals a baseline's up to noise) cannot pass by luck.
A margin is in the metric's units, or a fraction of the best baseline's value (`relative`; for
the Fréchet distance, whose scale depends on the feature network). When a promoted model exists,
no gated metric may also be worse than its value by more than `max_regression` (relative).

Metrics that need ground truth (the attribute checks) are gated only on data that carries it:
`unavailable` names the gated metrics the evaluation could not compute and why, and they are
reported as notes instead of failing the gate; at least one gated metric must remain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

from lumos.errors import LumosError


class GateError(LumosError, ValueError):
    """The gate cannot decide: a gate names a metric the evaluation did not produce, etc."""


class Summary(Protocol):
    """What the gate reads of `lumos.evaluation.comparison.MetricSummary`."""

    value: float
    higher_is_better: bool
    baselines: dict[str, float]
    best_baseline: str | None
    margin: float | None
    margin_interval: tuple[float, float] | None


def required_margin(gate: Any, summary: Summary) -> float:
    """The lead the gate asks for, in the metric's units."""
    margin, relative = _gate_fields(gate)
    if not relative:
        return margin
    base = summary.baselines[summary.best_baseline] if summary.best_baseline else 0.0
    return margin * abs(base)


def _gate_fields(gate: Any) -> tuple[float, bool]:
    if isinstance(gate, Mapping):
        return float(gate.get("margin", 0.0)), bool(gate.get("relative", False))
    return float(gate.margin), bool(gate.relative)


def gate_checks(
    head: str, summaries: Mapping[str, Summary], gates: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Per gated metric of `head` that was computed: its gate (margin, relative), the lead it
    asks for in the metric's units and whether the lower end of the margin's interval has it
    (the promoted-model check aside). For the report."""
    out: dict[str, dict[str, Any]] = {}
    for name, gate in (gates.get(head) or {}).items():
        margin, relative = _gate_fields(gate)
        entry: dict[str, Any] = {"margin": margin, "relative": relative}
        s = summaries.get(name)
        if s is not None and s.margin_interval is not None and s.best_baseline is not None:
            entry["required"] = required_margin(gate, s)
            low = s.margin_interval[0]
            entry["passed"] = bool(not math.isnan(low) and low > entry["required"])
        out[name] = entry
    return out


def decide(
    head: str,
    summaries: Mapping[str, Summary],
    gates: Mapping[str, Mapping[str, Any]],
    promoted: Mapping[str, float] | None = None,
    max_regression: float = 0.05,
    unavailable: Mapping[str, str] | None = None,
) -> tuple[bool, list[str], list[str]]:
    """(passed, reasons, notes): reasons lists every failed check (empty when the head passed);
    notes the gated metrics left out and why.

    gates: per head, metric -> `MetricGate` (or a dict with `margin` and `relative`).
    promoted: the promoted model's metric values for this head (None: nothing promoted yet).
    """
    if head not in gates:
        raise GateError(
            f"no gates for head {head!r} (gates exist for {sorted(gates)}); "
            f"add evaluate.gates.{head} to the configuration"
        )
    if not 0.0 <= max_regression < 1.0:
        raise GateError(f"max_regression must be in [0, 1), got {max_regression}")
    gated = gates[head]
    if not gated:
        raise GateError(f"evaluate.gates.{head} is empty: gate at least one metric")
    unavailable = unavailable or {}
    missing = sorted(set(gated) - set(summaries) - set(unavailable))
    if missing:
        raise GateError(
            f"head {head!r}: gates name metrics the evaluation did not produce: {missing}; "
            f"it produced {sorted(summaries)}"
        )
    notes = [
        f"{name} not gated: {unavailable[name]}" for name in sorted(gated) if name in unavailable
    ]
    applicable = sorted(name for name in gated if name not in unavailable)
    if not applicable:
        raise GateError(
            f"head {head!r}: none of the gated metrics {sorted(gated)} could be computed on this "
            "data; gate a metric that works on any dataset (fd_dino, dino_similarity, ...)"
        )

    reasons: list[str] = []
    for name in applicable:
        s = summaries[name]
        if math.isnan(s.value):
            reasons.append(f"{name} is NaN")
            continue
        if s.margin is None or s.margin_interval is None or s.best_baseline is None:
            raise GateError(f"head {head!r}: {name} has no baseline to gate against")
        need = required_margin(gated[name], s)
        low = s.margin_interval[0]
        if math.isnan(low) or low <= need:
            reasons.append(
                f"{name} = {s.value:.4g} leads the best baseline ({s.best_baseline} = "
                f"{s.baselines[s.best_baseline]:.4g}) by {s.margin:.4g} (interval from "
                f"{low:.4g}); the gate asks for more than {need:.4g}"
            )
        if promoted is None or name not in promoted:
            continue
        base = float(promoted[name])
        if not math.isfinite(base):
            continue
        allowed = abs(base) * max_regression
        worse = (base - s.value) if s.higher_is_better else (s.value - base)
        if worse > allowed:
            reasons.append(
                f"{name} = {s.value:.4g} regressed from the promoted model's {base:.4g} "
                f"(more than {max_regression:.0%} worse)"
            )
    return not reasons, reasons, notes
