"""A self-contained HTML evaluation report (images inlined as base64 PNG).

Kubeflow's UI shows it as an HTML artifact, so the page needs no external file, script or font.
Per head: the gate verdict and its reasons, the metrics table (each metric with its bootstrap
interval, beside the trivial baselines scored on the same items, the margin over the best of
them and what the gate asks, and the promoted model's value), and a grid of samples: the
condition (caption, input view or first frame), the generated images and the ground truth.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

# Images are shown at this width in CSS pixels (pixelated: 32 px samples stay readable).
THUMB_PX = 96


@dataclass
class SampleRow:
    """One sample of the grid. Images are uint8 (H, W, 3)."""

    condition_text: str | None = None  # caption, camera, ...
    condition_images: list[np.ndarray] = field(default_factory=list)  # input view / first frame
    generated: list[np.ndarray] = field(default_factory=list)
    truth: list[np.ndarray] = field(default_factory=list)
    note: str = ""  # e.g. the attributes measured on the generated image
    ok: bool | None = None  # colours the note: True green, False red, None neutral


@dataclass
class HeadSection:
    head: str
    metrics: Mapping[str, float]
    passed: bool
    reasons: Sequence[str]
    # metric -> `MetricSummary.to_dict()` (interval, baselines, best baseline, margin).
    comparison: Mapping[str, Mapping] = field(default_factory=dict)
    # The gated metrics: metric -> {"margin", "relative", "required" (in the metric's units),
    # "passed"} (`lumos.evaluation.gate.gate_checks`).
    gates: Mapping[str, Mapping] = field(default_factory=dict)
    baseline: Mapping[str, float] | None = None  # the promoted model's metrics
    rows: Sequence[SampleRow] = field(default_factory=list)
    description: str = ""


def png_data_uri(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) image as a data: URI."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(image: np.ndarray, title: str = "") -> str:
    return f'<img src="{png_data_uri(image)}" width="{THUMB_PX}" height="{THUMB_PX}" alt="{html.escape(title)}" title="{html.escape(title)}">'


def _fmt(value: float | None) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and math.isinf(value):
        return "&infin;"
    return f"{value:.4g}"


BASELINE_COLUMNS = ("blank", "random_train", "shuffled", "copy_input")


def _interval(pair: Sequence[float] | None) -> str:
    return "" if pair is None else f'<span class="ci">[{_fmt(pair[0])}, {_fmt(pair[1])}]</span>'


def _metrics_table(section: HeadSection) -> str:
    shown = [
        b
        for b in BASELINE_COLUMNS
        if any(b in (c.get("baselines") or {}) for c in section.comparison.values())
    ]
    rows = []
    for name in sorted(
        section.metrics, key=lambda n: (n not in section.gates, n not in section.comparison, n)
    ):
        value = float(section.metrics[name])
        c = section.comparison.get(name, {})
        baselines = c.get("baselines") or {}
        against = c.get("against") or []
        cells = []
        for b in shown:
            mark = " best" if b == c.get("best_baseline") else ("" if b in against else " ref")
            cells.append(f'<td class="base{mark}">{_fmt(baselines.get(b))}</td>')
        gate = section.gates.get(name)
        need, status = "", ""
        if gate is not None:
            need = _fmt(gate.get("required", gate.get("margin")))
            if gate.get("relative"):
                need += f' <span class="ci">({_fmt(gate.get("margin"))} x best)</span>'
            if gate.get("passed") is not None:
                status = ('<span class="ok">&#10003;</span>' if gate["passed"]
                          else '<span class="bad">&#10007;</span>')  # fmt: skip
        better = {"higher": "&uarr;", "lower": "&darr;"}.get(c.get("better", ""), "")
        base = section.baseline.get(name) if section.baseline else None
        rows.append(
            f"<tr><td>{html.escape(name)} {better}</td><td>{_fmt(value)} {_interval(c.get('interval'))}</td>"
            + "".join(cells)
            + f"<td>{_fmt(c.get('margin'))} {_interval(c.get('margin_interval'))}</td>"
            f"<td>{need}</td><td>{status}</td><td>{_fmt(base)}</td></tr>"
        )
    head = "".join(f"<th>{html.escape(b)}</th>" for b in shown)
    return (
        '<table class="metrics"><tr><th>metric</th><th>model [95% interval]</th>' + head
        + "<th>margin over best baseline [interval]</th><th>gate: lead above</th><th></th>"
        "<th>promoted model</th></tr>" + "".join(rows) + "</table>"
        '<p class="note">&uarr; higher is better, &darr; lower. Baselines in bold are the best one '
        "the model must beat; grey ones are references (for a distribution distance, real images "
        "are the floor, not a baseline). The gate reads the lower end of the margin's interval.</p>"
    )  # fmt: skip


def _sample_grid(rows: Sequence[SampleRow]) -> str:
    if not rows:
        return "<p>No samples.</p>"
    out = [
        '<table class="grid"><tr><th>#</th><th>condition</th><th>generated</th><th>ground truth</th></tr>'
    ]
    for i, row in enumerate(rows):
        cond = "".join(_img(im, "condition") for im in row.condition_images)
        if row.condition_text:
            cond += f'<div class="caption">{html.escape(row.condition_text)}</div>'
        gen = "".join(_img(im, "generated") for im in row.generated)
        if row.note:
            cls = {True: "ok", False: "bad", None: "note"}[row.ok]
            gen += f'<div class="{cls}">{html.escape(row.note)}</div>'
        truth = "".join(_img(im, "ground truth") for im in row.truth)
        out.append(f"<tr><td>{i}</td><td>{cond}</td><td>{gen}</td><td>{truth}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _section(section: HeadSection) -> str:
    verdict = "PASSED" if section.passed else "FAILED"
    cls = "pass" if section.passed else "fail"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in section.reasons)
    return (
        f'<section id="head-{html.escape(section.head)}"><h2>{html.escape(section.head)} '
        f'<span class="verdict {cls}">{verdict}</span></h2>'
        + (f"<p>{html.escape(section.description)}</p>" if section.description else "")
        + (f'<ul class="reasons">{reasons}</ul>' if reasons else "")
        + _metrics_table(section)
        + f"<h3>Samples ({len(section.rows)})</h3>"
        + _sample_grid(section.rows)
        + "</section>"
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
table.metrics td:nth-child(n+2) { font-variant-numeric: tabular-nums; }
img { image-rendering: pixelated; margin: 1px; border: 1px solid #ddd; }
.caption { max-width: 220px; font-size: 13px; margin-top: 2px; }
.verdict { padding: 2px 8px; border-radius: 4px; color: white; font-size: 14px; }
.pass { background: #2e7d32; } .fail { background: #c62828; }
.ok { color: #2e7d32; font-size: 12px; } .bad { color: #c62828; font-size: 12px; }
.note { color: #555; font-size: 12px; }
.ci { color: #777; font-size: 11px; } td.best { font-weight: 700; } td.ref { color: #999; }
dl.info { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; font-size: 13px; }
dt { font-weight: 600; }
"""


def render_report(
    sections: Sequence[HeadSection],
    title: str = "Lumos evaluation",
    info: Mapping[str, object] | None = None,
) -> str:
    """The whole page as one HTML string."""
    info_html = ""
    if info:
        items = "".join(
            f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in info.items()
        )
        info_html = f'<dl class="info">{items}</dl>'
    body = "".join(_section(s) for s in sections)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{info_html}{body}</body></html>\n"
    )
