"""What a step shows in the KFP UI: scalar metrics (`dsl.Metrics`), Markdown and HTML artifacts.

    log_metrics(metrics, {"ingested": 120.0})            # a dsl.Output[dsl.Metrics]
    write_text(report, ingest_markdown(results))         # a dsl.Output[dsl.Markdown]
    write_text(curve, loss_curve_html("t2i", losses))    # a dsl.Output[dsl.HTML]

The HTML is self-contained (an inline SVG, no script or external file), as KFP's UI shows an HTML
artifact in a sandboxed frame.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Protocol


class MetricsArtifact(Protocol):
    def log_metric(self, metric: str, value: float) -> None: ...


class FileArtifact(Protocol):
    path: str


def log_metrics(metrics: MetricsArtifact | None, values: dict[str, float]) -> None:
    if metrics is None:
        return
    for name, value in values.items():
        metrics.log_metric(name, float(value))


def write_text(artifact: FileArtifact | None, text: str) -> None:
    if artifact is None:
        return
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(text)


def ingest_counts(kind: str, result: dict[str, Any]) -> dict[str, float]:
    """One ingest's counts as metrics, `<kind>_<count>`; rejections also by reason."""
    keys = ("listed", "ingested", "previously_seen", "changed", "duplicate", "rejected", "paired")
    values = {f"{kind}_{k}": float(result.get(k, 0) or 0) for k in keys}
    for reason, n in sorted((result.get("rejected_by_reason") or {}).items()):
        values[f"{kind}_rejected_{reason}"] = float(n)
    return values


def ingest_markdown(results: dict[str, dict[str, Any]], new: dict[str, int]) -> str:
    """A table of what each ingest did, and why objects were rejected."""
    lines = [
        "## Ingest",
        "",
        "| source | listed | new | previously seen | changed | duplicate | rejected |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind, r in results.items():
        if r.get("no_source"):
            lines.append(f"| {kind} | no source | | | | | |")
            continue
        lines.append(
            f"| {kind} | {r.get('listed', 0)} | {new[kind]} | {r.get('previously_seen', 0)} | "
            f"{r.get('changed', 0)} | {r.get('duplicate', 0)} | {r.get('rejected', 0)} |"
        )
    reasons = {
        (kind, reason): n
        for kind, r in results.items()
        for reason, n in (r.get("rejected_by_reason") or {}).items()
    }
    if reasons:
        lines += [
            "",
            "### Rejected, by reason",
            "",
            "| source | reason | objects |",
            "|---|---|---|",
        ]
        lines += [f"| {kind} | {reason} | {n} |" for (kind, reason), n in sorted(reasons.items())]
    total = sum(new.values())
    lines += ["", f"**{total} new items**" + ("" if total else ": nothing to train on, skipped")]
    return "\n".join(lines) + "\n"


def loss_curve_html(head: str, losses: list[tuple[int, float]], throughput: float | None) -> str:
    """The training loss over steps as an inline SVG line chart."""
    title = f"{html.escape(head)}: training loss"
    rate = f"{throughput:.1f} images/s" if throughput else ""
    if not losses:
        return (
            f"<html><body><h3>{title}</h3><p>no steps logged in this run. {rate}</p></body></html>"
        )
    width, height, pad = 640, 320, 40
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    s0, s1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
    v0, v1 = min(values), max(values) if max(values) > min(values) else min(values) + 1e-9
    points = " ".join(
        f"{pad + (s - s0) / (s1 - s0) * (width - 2 * pad):.1f},"
        f"{height - pad - (v - v0) / (v1 - v0) * (height - 2 * pad):.1f}"
        for s, v in losses
    )
    return (
        f"<html><body><h3>{title}</h3>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">'
        f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{points}"/>'
        f'<text x="{pad}" y="{pad - 10}" font-size="12">loss {v1:.4g}</text>'
        f'<text x="{pad}" y="{height - 10}" font-size="12">step {s0} .. {s1}; '
        f"last loss {values[-1]:.4g} (min {v0:.4g})</text></svg>"
        f"<p>{rate}</p></body></html>"
    )


def promotion_markdown(result: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """What promotion decided for a head that passed its gate, and on what evidence."""
    head = result["head"]
    if result["promoted"]:
        previous = result.get("previous_version") or "none"
        lines = [
            f"## {head}: promoted version {result['version']} (previously {previous})",
            "",
            f"- serving from `{result.get('model_uri')}` as InferenceService "
            f"`{result.get('inference_service_name')}`",
            f"- registry record `{result.get('record_uri')}`",
        ]
    else:
        lines = [f"## {head}: not promoted", ""]
        lines += [f"- {reason}" for reason in result.get("reasons", [])]
    lines += [f"- warning: {w}" for w in result.get("warnings", [])]
    metrics = evaluation.get("metrics") or {}
    if metrics:
        lines += ["", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {float(value):.4g} |" for name, value in sorted(metrics.items())]
    gate = evaluation.get("reasons") or []
    if gate:
        lines += ["", "Gate notes:"] + [f"- {reason}" for reason in gate]
    return "\n".join(lines) + "\n"
