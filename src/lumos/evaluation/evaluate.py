"""Evaluate a checkpoint on the eval split of its featurized dataset, write a report, gate it.

Per head (the head and the encoders come from the checkpoint's `lumos_checkpoint.json`):

- t2i: images generated from the eval captions; exact attribute accuracies (colour, shape, size,
  position, texture, all at once) against the captions' known attributes (GenEval's checks, made
  exactly on the synthetic data: `lumos.evaluation.attributes`).
- i2i: images generated from the eval images' DINO embeddings; agreement of the attributes
  measured on the generated image with those measured on the conditioning image.
- novel_view: all views generated jointly from view 0 and the cameras; PSNR / SSIM of views
  1..F-1 against the true views (the paper's metrics), beside the same scores for simply copying
  view 0 (a model must beat that to have learnt anything).
- video: frames generated from the first frame; PSNR / SSIM of frames 1..F-1 against the truth,
  and the copy-the-first-frame baseline.

Sampling: DPM-Solver++ (order 2), `sampling_steps` steps, classifier-free guidance
`guidance_scale`, from the EMA weights, with noise fixed by `seed`: the same checkpoint gives the
same metrics. Writes `metrics.json`, `samples.json`, `report.html` and `eval.json` (the
`EvalResult`) to `out_uri`.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from lumos.configs.evaluation import EVAL_HEADS, EvaluateConfig
from lumos.evaluation.attributes import ATTRIBUTES, Measurement, attribute_accuracy, measure
from lumos.evaluation.gate import decide
from lumos.evaluation.image_metrics import color_histogram_similarity, psnr, ssim
from lumos.evaluation.report import HeadSection, SampleRow, render_report

logger = logging.getLogger(__name__)

# PSNR of identical images is infinite; metrics.json and the gate get this cap instead (JSON has
# no infinity, and one perfect frame must not make a mean infinite).
PSNR_CAP = 100.0


class EvalResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    head: str
    metrics: dict[str, float]
    passed: bool
    reasons: list[str]
    num_samples: int
    report_uri: str
    metrics_uri: str
    out_uri: str
    checkpoint_uri: str
    checkpoint_step: int | None
    dataset_uri: str
    thresholds: dict[str, float]
    baseline: dict[str, float] | None
    # the registry version `baseline` was read from: promotion refuses the model if another
    # version has become current since (its regression check would be against a stale model)
    baseline_version: str | None = None


@dataclass
class _Outcome:
    """What one head's evaluation produced before gating."""

    metrics: dict[str, float]
    rows: list[SampleRow]
    per_sample: list[dict[str, Any]]
    description: str


def evaluate(
    cfg: EvaluateConfig,
    checkpoint_uri: str,
    dataset_uri: str,
    out_uri: str,
    baseline: dict[str, float] | None = None,
    baseline_version: str | None = None,
) -> EvalResult:
    """Evaluate the checkpoint (or a run's latest checkpoint) on the eval split of `dataset_uri`.

    `baseline`: the promoted model's metrics for the same head; the gate fails a model that
    regresses more than `cfg.max_regression` below it. `baseline_version`: its registry version,
    recorded so that promotion can check it is still the current model.
    """
    from lumos.checkpoints import load_checkpoint
    from lumos.configs.encoders import EncodersConfig
    from lumos.encoders import FrozenEncoders
    from lumos.features.table import load_feature_table
    from lumos.storage import Storage

    device = _device(cfg.device)
    ckpt = load_checkpoint(checkpoint_uri, device=device, raw=False)
    head = ckpt.meta.get("head")
    if head not in EVAL_HEADS:
        raise ValueError(f"checkpoint {ckpt.uri} has head {head!r}; expected one of {EVAL_HEADS}")
    if head not in cfg.thresholds:
        raise ValueError(
            f"evaluate.thresholds has no entry for head {head!r}: the gate needs at least one "
            f"threshold per evaluated head (configured: {sorted(cfg.thresholds)})"
        )
    encoders = FrozenEncoders(
        EncodersConfig.model_validate(_encoders_spec(ckpt.meta, ckpt.uri)), device=device
    )
    table = load_feature_table(dataset_uri, split="eval")
    items = _eval_items(table, head, ckpt.ema_model, cfg.num_samples)
    truth = _read_images(dataset_uri, {table.records[r]["key"] for item in items for r in item})
    logger.info(
        "evaluating %s (%s) on %d eval items of %s", ckpt.uri, head, len(items), dataset_uri
    )

    generated = _generate(cfg, ckpt.ema_model, encoders, table, head, items, device)
    true_images = [[truth[table.records[r]["key"]] for r in item] for item in items]
    if head == "t2i":
        outcome = _score_t2i(table, items, generated, true_images, cfg.report_samples)
    elif head == "i2i":
        outcome = _score_i2i(generated, true_images, cfg.report_samples)
    else:
        outcome = _score_frames(head, table, items, generated, true_images, cfg.report_samples)

    passed, reasons = decide(head, outcome.metrics, cfg.thresholds, baseline, cfg.max_regression)
    store = Storage.from_uri(out_uri)
    section = HeadSection(
        head=head,
        metrics=outcome.metrics,
        passed=passed,
        reasons=reasons,
        thresholds=cfg.thresholds[head],
        baseline=baseline,
        rows=outcome.rows,
        description=outcome.description,
    )
    info = {
        "checkpoint": ckpt.uri,
        "step": ckpt.meta.get("step"),
        "dataset": dataset_uri,
        "eval items": len(items),
        "sampling": f"DPM-Solver++ {cfg.sampling_steps} steps, guidance {cfg.guidance_scale}, seed {cfg.seed}",
        "max regression": f"{cfg.max_regression:.0%}",
    }
    store.write_bytes(
        "report.html", render_report([section], f"Lumos evaluation: {head}", info).encode()
    )
    store.write_json(
        "metrics.json",
        {"head": head, "metrics": outcome.metrics, "passed": passed, "reasons": reasons,
         "thresholds": cfg.thresholds[head], "baseline": baseline, "num_samples": len(items),
         "checkpoint_uri": ckpt.uri, "step": ckpt.meta.get("step")},
    )  # fmt: skip
    store.write_json("samples.json", outcome.per_sample)
    result = EvalResult(
        head=head,
        metrics=outcome.metrics,
        passed=passed,
        reasons=reasons,
        num_samples=len(items),
        report_uri=store.key_uri("report.html"),
        metrics_uri=store.key_uri("metrics.json"),
        out_uri=store.uri,
        checkpoint_uri=ckpt.uri,
        checkpoint_step=ckpt.meta.get("step"),
        dataset_uri=dataset_uri,
        thresholds=cfg.thresholds[head],
        baseline=baseline,
        baseline_version=baseline_version,
    )
    store.write_json("eval.json", result.model_dump(mode="json"))
    return result


# ---------------------------------------------------------------------------------------------
# Inputs


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"evaluate.device={name!r} but no CUDA device is available; use 'auto' or 'cpu'"
        )
    return torch.device(name)


def _encoders_spec(meta: dict[str, Any], uri: str) -> dict[str, Any]:
    spec = meta.get("encoders")
    if not isinstance(spec, dict):
        raise ValueError(
            f"{uri}/lumos_checkpoint.json has no 'encoders' config: cannot decode samples"
        )
    return spec.get("config", spec)


def _eval_items(table, head: str, model, num_samples: int) -> list[list[int]]:
    """Rows of the eval table per item: one row (single-image heads) or the first `num_frames`
    frames of a group (multi-frame heads: view 0 / the first frame is the condition)."""
    from lumos.features.items import FeatureDataset

    if head == "t2i":
        # Every captioned eval image, paired or not: the caption is embedded at evaluation time
        # by the checkpoint's own text encoder, so the eval set does not shrink to the paired
        # subset that featurize embedded for training.
        # Lazily: the first num_samples read only the first parts' records, not all of them.
        captioned = list(
            itertools.islice(([i] for i, r in enumerate(table.records) if _caption(r)), num_samples)
        )
        if not captioned:
            raise ValueError(
                "t2i evaluation needs captioned eval samples; the eval split has none "
                "(the embedded dataset's images carry captions in their sidecars)"
            )
        return captioned
    num_frames = int(getattr(model.config, "num_frames", 1) or 1)
    dataset = FeatureDataset.for_head(table, head, num_frames=num_frames)
    items: list[list[int]] = []
    seen: set[int] = set()
    for item in dataset.items:
        if dataset.groups is not None:
            group = int(dataset.groups[item[0]])
            if group in seen:  # one window per group: the one starting at its first frame
                continue
            seen.add(group)
        items.append(list(item))
        if len(items) == num_samples:
            break
    return items


def _read_images(dataset_uri: str, keys: set[str]) -> dict[str, np.ndarray]:
    """The dataset's own images (the ground truth, at the training resolution) for `keys`."""
    from lumos.data.shards import iter_shard_records
    from lumos.storage import Storage

    store = Storage.from_uri(dataset_uri)
    manifest = store.read_json("manifest.json")
    found: dict[str, np.ndarray] = {}
    for shard in manifest["shards"]:
        for _, files in iter_shard_records(store, shard["name"]):
            record = json.loads(files["json"])
            if record["key"] not in keys:
                continue
            data = next((files[e] for e in ("png", "jpg", "jpeg", "webp") if e in files), None)
            if data is None:
                raise ValueError(
                    f"sample {record['key']!r} of {dataset_uri} has no image in its shard"
                )
            with Image.open(io.BytesIO(data)) as img:
                found[record["key"]] = np.asarray(img.convert("RGB"), dtype=np.uint8)
        if len(found) == len(keys):
            break
    missing = sorted(keys - set(found))
    if missing:
        raise ValueError(
            f"{len(missing)} eval samples have features but no image in the shards of {dataset_uri} "
            f"(first: {missing[0]!r}): the features are stale; re-run featurize"
        )
    return found


def _generate(cfg, model, encoders, table, head, items, device) -> list[list[np.ndarray]]:
    """Sample every item with the EMA model; uint8 images per item (one, or one per frame)."""
    import torch

    from lumos.diffusion.sampling import sample
    from lumos.features.items import FeatureDataset
    from lumos.heads import batch_to_model_inputs

    dataset = FeatureDataset(table=table, head=head, num_frames=len(items[0]), items=items)
    # Batches of one image size (aspect buckets), in item order within each size.
    sizes = dataset.item_sizes()
    by_size = [list(range(len(items)))] if sizes is None else [
        np.flatnonzero(sizes == s).tolist() for s in np.unique(sizes)
    ]  # fmt: skip
    batches = [
        ids[i : i + cfg.batch_size] for ids in by_size for i in range(0, len(ids), cfg.batch_size)
    ]
    out: list[list[np.ndarray]] = [[] for _ in items]
    for b, ids in enumerate(batches):
        if head == "t2i":
            rows = [items[i][0] for i in ids]
            text_embeds, text_mask = encoders.embed_texts(
                [_caption(table.records[r]) for r in rows]
            )
            batch = {"latents": table.gather(rows)["latents"], "text_embeds": text_embeds,
                     "text_mask": text_mask}  # fmt: skip
        else:
            batch = dataset.batch(ids)
        batch = {k: v.to(device) for k, v in batch.items()}
        x0, kwargs = batch_to_model_inputs(head, batch, encoders.latent_downsample)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
        noise = torch.randn(tuple(x0.shape), generator=generator)
        latents = sample(
            model, tuple(x0.shape), kwargs, steps=cfg.sampling_steps,
            guidance_scale=cfg.guidance_scale, noise=noise, device=device,
            clip_x0=encoders.latent_range,
        )  # fmt: skip  # (B, [F,] C, h, w)
        frames = latents.shape[1] if latents.ndim == 5 else 1
        images = encoders.decode_latents(latents.reshape(-1, *latents.shape[-3:]))  # (B*F, H, W, 3)
        for i, item in enumerate(ids):
            out[item] = list(images[i * frames : (i + 1) * frames])
    return out


# ---------------------------------------------------------------------------------------------
# Scores


def _score_t2i(table, items, generated, true_images, report_samples: int) -> _Outcome:
    records = [table.records[item[0]] for item in items]
    given = [(r.get("meta") or {}).get("attributes") for r in records]
    if any(e is None for e in given):
        missing = next(r["key"] for r, e in zip(records, given, strict=True) if e is None)
        raise ValueError(
            f"t2i evaluation needs the true attributes of every eval caption (meta.attributes, as "
            f"the embedded dataset writes them); sample {missing!r} has none"
        )
    expected: list[dict[str, str | None]] = [dict(e) for e in given if e is not None]
    measured = [measure(g[0]) for g in generated]
    metrics = attribute_accuracy(measured, expected)
    # The same measurement on the true images bounds what a perfect model could score.
    reference = attribute_accuracy([measure(t[0]) for t in true_images], expected)
    metrics["reference_all_accuracy"] = reference["all_accuracy"]
    metrics["color_histogram_similarity"] = color_histogram_similarity(
        [g[0] for g in generated], [t[0] for t in true_images]
    )
    rows: list[SampleRow] = []
    per_sample: list[dict[str, Any]] = []
    for record, exp, m, gen, true in zip(
        records, expected, measured, generated, true_images, strict=True
    ):
        right = [a for a in ATTRIBUTES if m.attributes[a] == exp[a]]
        per_sample.append({"key": record["key"], "caption": _caption(record), "expected": exp,
                           "measured": m.to_dict(), "correct": right})  # fmt: skip
        if len(rows) < report_samples:
            rows.append(SampleRow(condition_text=_caption(record), generated=gen, truth=true,
                                  note=_describe(m), ok=len(right) == len(ATTRIBUTES)))  # fmt: skip
    desc = ("Images generated from eval captions; attributes measured exactly on the pixels "
            "(reference_all_accuracy: the same measurement on the true images).")  # fmt: skip
    return _Outcome(metrics, rows, per_sample, desc)


def _score_i2i(generated, true_images, report_samples: int) -> _Outcome:
    cond = [measure(t[0]) for t in true_images]
    measured = [measure(g[0]) for g in generated]
    acc = attribute_accuracy(measured, [c.attributes for c in cond])
    metrics = {
        k.replace("_accuracy", "_agreement"): v for k, v in acc.items() if k != "object_found_rate"
    }
    metrics["object_found_rate"] = acc["object_found_rate"]
    metrics["psnr"] = _mean_psnr(
        [(g[0], t[0]) for g, t in zip(generated, true_images, strict=True)]
    )
    metrics["color_histogram_similarity"] = color_histogram_similarity(
        [g[0] for g in generated], [t[0] for t in true_images]
    )
    rows: list[SampleRow] = []
    per_sample: list[dict[str, Any]] = []
    for c, m, gen, true in zip(cond, measured, generated, true_images, strict=True):
        same = [a for a in ATTRIBUTES if m.found and m.attributes[a] == c.attributes[a]]
        per_sample.append({"condition": c.to_dict(), "measured": m.to_dict(), "agree": same})
        if len(rows) < report_samples:
            rows.append(SampleRow(condition_images=true, generated=gen, note=_describe(m),
                                  ok=len(same) == len(ATTRIBUTES)))  # fmt: skip
    desc = ("Images generated from the DINO embedding of each eval image; attribute agreement "
            "between the conditioning image and the generated one.")  # fmt: skip
    return _Outcome(metrics, rows, per_sample, desc)


def _score_frames(head, table, items, generated, true_images, report_samples: int) -> _Outcome:
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    copies: list[tuple[np.ndarray, np.ndarray]] = []
    rows: list[SampleRow] = []
    per_sample: list[dict[str, Any]] = []
    for item, gen, true in zip(items, generated, true_images, strict=True):
        record = table.records[item[0]]
        pairs += list(zip(gen[1:], true[1:], strict=True))
        copies += [(true[0], t) for t in true[1:]]
        per_sample.append({"group": record["meta"]["group"], "keys": [table.records[r]["key"] for r in item],
                           "psnr": [_capped(psnr(g, t)) for g, t in zip(gen[1:], true[1:], strict=True)],
                           "ssim": [ssim(g, t) for g, t in zip(gen[1:], true[1:], strict=True)]})  # fmt: skip
        if len(rows) < report_samples:
            text = record["meta"]["group"]
            if head == "novel_view":
                cams = [table.records[r]["meta"]["camera"] for r in item]
                text += ": azimuths " + ", ".join(f"{c['azimuth']:g}" for c in cams)
            rows.append(SampleRow(condition_text=text, condition_images=[true[0]], generated=gen[1:],
                                  truth=true[1:], note=f"PSNR {np.mean(per_sample[-1]['psnr']):.2f} dB"))  # fmt: skip
    metrics = {
        "psnr": _mean_psnr(pairs),
        "ssim": float(np.mean([ssim(g, t) for g, t in pairs])),
        "psnr_copy_input": _mean_psnr(copies),
        "ssim_copy_input": float(np.mean([ssim(c, t) for c, t in copies])),
    }
    what = (
        "views 1..F-1 from view 0 and the cameras"
        if head == "novel_view"
        else "frames 1..F-1 from the first frame"
    )
    desc = (f"{what[0].upper()}{what[1:]}: PSNR / SSIM against the truth; *_copy_input: the same scores "
            "for repeating the input, the bar a model has to clear.")  # fmt: skip
    return _Outcome(metrics, rows, per_sample, desc)


def _capped(value: float) -> float:
    return min(value, PSNR_CAP)


def _mean_psnr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    return float(np.mean([_capped(psnr(a, b)) for a, b in pairs])) if pairs else math.nan


def _caption(record: dict[str, Any]) -> str:
    return record.get("caption") or (record.get("meta") or {}).get("caption") or ""


def _describe(m: Measurement) -> str:
    if not m.found:
        return "no object found"
    return " ".join(str(m.attributes[a]) for a in ("size", "color", "texture", "shape", "position"))
