"""The claim experiment's report: one Markdown file with its tables, curves and sample grids.

    write_report(results, Path("runs/claim/report"))   # -> report.md, curves-*.png, grid-*.png

Every number is a mean over the seeds with its spread (the sample standard deviation, "sd"; a
single seed has none). matplotlib is not a dependency of the project, so the curves are drawn with
Pillow (`line_chart`) and also given as tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

T2I_COLUMNS = ("overall", "color", "shape", "size", "position", "count", "binding", "relation",
               "seen_overall", "heldout_overall", "fd")  # fmt: skip
MF_COLUMNS = ("psnr", "ssim", "perceptual_distance", "fd_dino")
ARM_COLOURS = {"A": (31, 119, 180), "B": (255, 127, 14), "C": (44, 160, 44), "D": (214, 39, 40)}


def mean_sd(values: list[float]) -> str:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return "-"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"


def _final(results: dict[str, Any], arm: str, guidance: str, name: str) -> list[float]:
    out = []
    for seed in results["seeds"].values():
        metrics = seed["t2i"][arm][-1]["metrics"].get(guidance, {})
        if name in metrics:
            out.append(float(metrics[name]))
    return out


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, path: Path) -> None:
    """A small line chart (Pillow): one line per series, a legend, min/max labels on the axes."""
    w, h, pad = 480, 300, 44
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    points = [p for pts in series.values() for p in pts]
    if not points:
        img.save(path)
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - x0) / (x1 - x0) * (w - 2 * pad),
                h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad))  # fmt: skip

    draw.rectangle([pad, pad, w - pad, h - pad], outline=(0, 0, 0))
    draw.text((pad, 8), title, fill=(0, 0, 0))
    draw.text((pad, h - pad + 6), f"step {x0:g}", fill=(0, 0, 0))
    draw.text((w - pad - 60, h - pad + 6), f"{x1:g}", fill=(0, 0, 0))
    draw.text((4, h - pad - 10), f"{y0:.3g}", fill=(0, 0, 0))
    draw.text((4, pad), f"{y1:.3g}", fill=(0, 0, 0))
    for i, (name, pts) in enumerate(series.items()):
        colour = ARM_COLOURS.get(name, (100, 100, 100))
        coords = [at(x, y) for x, y in sorted(pts)]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.text((w - pad + 6, pad + 14 * i), name, fill=colour)
    img.save(path)


def _grid(rows: list[tuple[str, np.ndarray]], path: Path, scale: int = 2) -> None:
    """Rows of images (label, (K, H, W, 3)) into one PNG, each image scaled up `scale` times."""
    k, h, w = rows[0][1].shape[:3]
    label_w, gap = 28, 2
    img = Image.new(
        "RGB", (label_w + k * (w * scale + gap), len(rows) * (h * scale + gap)), "white"
    )
    draw = ImageDraw.Draw(img)
    for r, (label, images) in enumerate(rows):
        top = r * (h * scale + gap)
        draw.text((4, top + h * scale // 2 - 6), label, fill=(0, 0, 0))
        for c, im in enumerate(images):
            tile = Image.fromarray(im).resize((w * scale, h * scale), Image.Resampling.NEAREST)
            img.paste(tile, (label_w + c * (w * scale + gap), top))
    img.save(path)


def merge_runs(run_dirs: list[Path], out: Path) -> Path:
    """One report over several runs of the same preset with different seeds (`--set seeds=[1]`
    run as separate processes or on separate machines): their seeds side by side, the first run's
    data, encoder and reference; the sample grids are the first seed's."""
    import json
    import shutil

    from lumos.configs.experiment import ExperimentConfigError

    runs = [json.loads((d / "report" / "results.json").read_text()) for d in run_dirs]
    merged = runs[0] | {"seeds": {}, "timings_s": {}, "merged_from": [str(d) for d in run_dirs]}
    for d, run in zip(run_dirs, runs, strict=True):
        if run["config"] | {"seeds": []} != runs[0]["config"] | {"seeds": []}:
            raise ExperimentConfigError(
                f"{d} ran another config than {run_dirs[0]}: not one experiment"
            )
        overlap = set(merged["seeds"]) & set(run["seeds"])
        if overlap:
            raise ExperimentConfigError(f"seed(s) {sorted(overlap)} appear in more than one run")
        merged["seeds"].update(run["seeds"])
        merged["timings_s"].update({f"{k} ({d.name})": v for k, v in run["timings_s"].items()})
        samples = d / "report" / "samples"
        if samples.is_dir():
            (out / "samples").mkdir(parents=True, exist_ok=True)
            for f in samples.glob("*.npz"):
                shutil.copy2(f, out / "samples" / f.name)
    merged["seeds"] = dict(sorted(merged["seeds"].items(), key=lambda kv: int(kv[0])))
    merged["config"]["seeds"] = [int(k) for k in merged["seeds"]]
    path = write_report(merged, out)
    (out / "results.json").write_text(json.dumps(merged | {"report": str(path)}, indent=1))
    return path


def write_report(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    cfg = results["config"]
    arms: dict[str, str] = results["arms"]
    guidances = [f"{g:g}" for g in cfg["guidance_scales"]]
    seeds = list(results["seeds"])
    lines = [
        f"# Lumos claim experiment: preset `{cfg['name']}`",
        "",
        f"Seeds {', '.join(seeds)}; every value is the mean over the seeds ± their sample "
        "standard deviation (sd). Produced by `lumos experiment claim`; the machine and command "
        "are recorded in docs/experiments.md.",
        "",
        "## Arms",
        "",
        "| arm | what | dataset | steps (T2I) | total steps incl. prior |",
        "| --- | --- | --- | ---: | ---: |",
    ]
    first = next(iter(results["seeds"].values()))
    for arm, what in arms.items():
        run = first["runs"][arm]
        data = "100% pairs" if arm == "A" else f"{cfg['paired_fraction']:.0%} pairs"
        lines.append(f"| {arm} | {what} | {data} | {run['steps']} | {run['total_steps']} |")
    counts = results["data"]
    lines += [
        "",
        f"Data: {counts['pairs_all']['ingested']} scene images ({counts['pairs_all']['paired']} "
        f"captioned pairs for arm A, {counts['pairs_few']['paired']} for B-D; the rest, and every "
        "image with a held-out (colour, shape) combination, are the unlabeled pool the I2I prior "
        f"and the encoder learn from). Generated: `{counts['generated']}`.",
        "",
        "## The condition encoder",
        "",
        "Linear-probe accuracy of the frozen encoder's CLS token (the I2I condition), on the "
        "training images, a quarter held out (colour, shape, size, cell: single-object scenes; "
        "count: every scene).",
        "",
        "| encoder | " + " | ".join(results["encoder"]["probes"]["ssl"]) + " |",
        "| --- |" + " ---: |" * len(results["encoder"]["probes"]["ssl"]),
    ]
    for name, probe in results["encoder"]["probes"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in probe.values()) + " |")
    lines += [
        "",
        f"Training of the SSL encoder: `{results['encoder']['training']}`; arms conditioned on: "
        f"**{results['encoder']['condition']}**.",
        "",
        "## T2I at the last step: GenEval-style accuracy per attribute and Fréchet distance",
        "",
    ]
    ref = results.get("reference", {})
    for g in guidances:
        lines += [
            f"Guidance {g}:",
            "",
            "| arm | " + " | ".join(T2I_COLUMNS) + " |",
            "| --- |" + " ---: |" * len(T2I_COLUMNS),
        ]
        for arm in arms:
            cells = [mean_sd(_final(results, arm, g, c)) for c in T2I_COLUMNS]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    if ref:
        lines += [
            f"Reference on the same {ref['eval_items']} eval items ({ref['heldout_items']} with a "
            "held-out combination): the checks on the true images (the checks' own accuracy, the "
            "ceiling), on a random training image (chance) and on a blank image.",
            "",
            "| reference | " + " | ".join(T2I_COLUMNS) + " |",
            "| --- |" + " ---: |" * len(T2I_COLUMNS),
        ]
        for name in ("true_images", "random_train_image", "blank_image"):
            row = ref[name]
            cells = [f"{row[c]:.3f}" if c in row else "-" for c in T2I_COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    g_last = guidances[-1]
    lines += [
        f"## Memorisation (guidance {g_last}, last step)",
        "",
        "Pixel RMSE (0-255) from each sample to its nearest paired training image; copy rate: "
        "samples nearer than 95% of the real eval images are to theirs.",
        "",
        "| arm | median NN RMSE of samples | median NN RMSE of eval images | copy rate |",
        "| --- | ---: | ---: | ---: |",
    ]
    for arm in arms:
        cells = [mean_sd(_final(results, arm, g_last, c))
                 for c in ("nn_rmse", "nn_rmse_eval_images", "copy_rate")]  # fmt: skip
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Curves over training steps (mean over seeds)", ""]
    for g in guidances:
        for metric in ("overall", "fd"):
            series: dict[str, list[tuple[float, float]]] = {}
            for arm in arms:
                by_step: dict[int, list[float]] = {}
                for seed in results["seeds"].values():
                    for point in seed["t2i"][arm]:
                        value = point["metrics"].get(g, {}).get(metric)
                        if value is not None:
                            by_step.setdefault(int(point["step"]), []).append(float(value))
                series[arm] = [(s, float(np.mean(v))) for s, v in sorted(by_step.items())]
            name = f"curve-{metric}-g{g}.png"
            line_chart(series, f"{metric} at guidance {g} (mean over seeds)", out / name)
            lines += [f"![{metric} at guidance {g}]({name})", "",
                      f"| arm | {metric} at guidance {g}: (step, value) ... |", "| --- | --- |"]  # fmt: skip
            for arm, pts in series.items():
                lines.append(f"| {arm} | " + ", ".join(f"({s}, {v:.3f})" for s, v in pts) + " |")
            lines.append("")
    lines += [
        "## Second claim: novel views and video from the I2I prior vs from arm A's T2I model",
        "",
        "Same steps, same data; the T2I prior is arm A's model with a fresh image-condition "
        "projector (its text projector cannot take an image). copy_input repeats the input "
        "view / first frame (the bar to clear).",
        "",
        "| head | prior | " + " | ".join(MF_COLUMNS) + " | psnr of copy_input |",
        "| --- | --- |" + " ---: |" * (len(MF_COLUMNS) + 1),
    ]
    for key in first["multiframe"]:
        head, prior = key.split(":")
        vals = [mean_sd([s["multiframe"][key].get(c) for s in results["seeds"].values()])
                for c in (*MF_COLUMNS, "psnr:copy_input")]  # fmt: skip
        lines.append(f"| {head} | {prior} | " + " | ".join(vals) + " |")
    lines += ["", "## Samples (first seed, last step)", ""]
    seed0 = seeds[0]
    samples_dir = out / "samples"
    loaded = {}
    for arm in arms:
        path = samples_dir / f"seed-{seed0}-{arm}.npz"
        if path.exists():
            loaded[arm] = np.load(path)
    if loaded:
        any_arm = next(iter(loaded.values()))
        captions = [str(c) for c in any_arm["captions"]]
        for g in guidances:
            rows = [("true", any_arm["truth"])] + [(arm, d[g]) for arm, d in loaded.items()]
            name = f"grid-g{g}.png"
            _grid(rows, out / name)
            lines += [
                f"Guidance {g} (rows: true image, then arms A-D):",
                "",
                f"![grid]({name})",
                "",
            ]
        lines += ["Captions, left to right: " + "; ".join(f"({i + 1}) {c}" for i, c in
                                                         enumerate(captions)), ""]  # fmt: skip
    timings = results.get("timings_s", {})
    lines += ["## Time", "", "| stage | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
