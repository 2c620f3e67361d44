"""What the claim experiment measures on one checkpoint, with the evaluation stage's own parts.

    t2i = measure_t2i(cfg, checkpoint_uri, dataset_uri, paired_images)   # per guidance scale
    mf = measure_multiframe(cfg, checkpoint_uri, dataset_uri)            # novel view / video

T2I: the eval captions are sampled by `lumos.evaluation.evaluate.generate` (the pipeline's
sampler, EMA weights, fixed noise) at every guidance scale, and each image is checked against
its scene (`lumos.data.scenes.check_scene`: GenEval's colour, shape, size, position, count,
attribute binding and relation, and the held-out combinations apart). The Fréchet distance to the
eval images is computed in the evaluation's feature space (the checkpoint's own frozen image
encoder). Memorisation: each sample's nearest paired training image (RMSE of the pixels, 0-255);
a sample is a copy when it is nearer than 95% of the eval images are to their nearest paired
image (real unseen images set the scale of "near").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lumos.configs.experiment import ExperimentConfig
from lumos.data.scenes import CHECKS, Scene, check_scene, measure_scene
from lumos.errors import DatasetError


@dataclass
class T2IEval:
    """One T2I checkpoint's measurements: per guidance scale, metric -> value."""

    step: int
    metrics: dict[str, dict[str, float]]
    samples: dict[str, list[np.ndarray]] = field(default_factory=dict)  # guidance / truth
    captions: list[str] = field(default_factory=list)  # of the kept samples


def scene_accuracy(scenes: list[Scene], holdout: list[bool], images: list[np.ndarray]) -> dict:
    """Per check, the fraction of the items it applies to that pass; `overall` over every item,
    `heldout_overall` over the items with a held-out (colour, shape) combination."""
    results = [check_scene(s, measure_scene(im)) for s, im in zip(scenes, images, strict=True)]
    out: dict[str, float] = {}
    for name in (*CHECKS, "overall"):
        values = [r[name] for r in results if name in r]
        if values:
            out[name] = float(np.mean(values))
    held = [r["overall"] for r, h in zip(results, holdout, strict=True) if h]
    if held:
        out["heldout_overall"] = float(np.mean(held))
    seen = [r["overall"] for r, h in zip(results, holdout, strict=True) if not h]
    if seen:
        out["seen_overall"] = float(np.mean(seen))
    return out


def nearest_rmse(images: list[np.ndarray], pool: np.ndarray) -> np.ndarray:
    """Per image, the pixel RMSE (0-255) to its nearest image of `pool` (M, H, W, 3)."""
    p = pool.reshape(len(pool), -1).astype(np.float32)  # (M, P)
    x = np.stack(images).reshape(len(images), -1).astype(np.float32)  # (N, P)
    d2 = (x**2).sum(1, keepdims=True) - 2 * x @ p.T + (p**2).sum(1)[None]  # (N, M)
    return np.sqrt(np.clip(d2.min(1), 0, None) / p.shape[1])


def memorisation(samples: list[np.ndarray], truth: list[np.ndarray], paired: np.ndarray) -> dict:
    """Nearest-neighbour check of samples against the paired training images."""
    if len(paired) == 0:
        raise DatasetError("the memorisation check needs paired training images; there are none")
    d_samples, d_truth = nearest_rmse(samples, paired), nearest_rmse(truth, paired)
    threshold = float(np.quantile(d_truth, 0.05))
    return {
        "nn_rmse": float(np.median(d_samples)),
        "nn_rmse_eval_images": float(np.median(d_truth)),
        "copy_rate": float(np.mean(d_samples < threshold)),
    }


def _eval_set(cfg: ExperimentConfig, checkpoint_uri: str, dataset_uri: str):
    from lumos.evaluation.evaluate import prepare

    es = prepare(cfg.evaluate, checkpoint_uri, dataset_uri)
    records = [es.table.records[item[0]] for item in es.rows]
    metas = [r.get("meta") or {} for r in records]
    if not all(isinstance(m.get("scene"), dict) for m in metas):
        raise DatasetError(f"the eval items of {dataset_uri} carry no meta.scene: not scene data")
    scenes = [Scene.from_dict(m["scene"]) for m in metas]
    holdout = [bool(m.get("holdout")) for m in metas]
    return es, scenes, holdout


def reference_t2i(cfg: ExperimentConfig, checkpoint_uri: str, dataset_uri: str) -> dict[str, Any]:
    """What no model can beat and what any model should: the checks on the true eval images (the
    checks' own accuracy) and on random training images (chance); the Fréchet distance of a random
    training image and of a blank image."""
    from lumos.evaluation.evaluate import blank_outputs
    from lumos.evaluation.frechet import frechet_distance

    es, scenes, holdout = _eval_set(cfg, checkpoint_uri, dataset_uri)
    truth = [t[0] for t in es.items.truth]
    train = [t[0] for t in es.items.train]
    blank = [b[0] for b in blank_outputs(es)]
    ref = es.space.cls(truth)
    return {
        "eval_items": len(truth),
        "heldout_items": int(sum(holdout)),
        "true_images": scene_accuracy(scenes, holdout, truth),
        "random_train_image": scene_accuracy(scenes, holdout, train)
        | {"fd": frechet_distance(es.space.cls(train), ref)},
        "blank_image": scene_accuracy(scenes, holdout, blank)
        | {"fd": frechet_distance(es.space.cls(blank), ref)},
    }


def measure_t2i(
    cfg: ExperimentConfig,
    checkpoint_uri: str,
    dataset_uri: str,
    paired: np.ndarray | None,
    step: int,
    keep_samples: int = 0,
) -> T2IEval:
    """Sample the eval captions at every guidance scale and measure; `paired` (the arm's paired
    training images, (M, H, W, 3)) adds the memorisation check."""
    from lumos.evaluation.evaluate import generate
    from lumos.evaluation.frechet import frechet_distance

    es, scenes, holdout = _eval_set(cfg, checkpoint_uri, dataset_uri)
    truth = [t[0] for t in es.items.truth]
    ref = es.space.cls(truth)
    out = T2IEval(step=step, metrics={})
    for g in cfg.guidance_scales:
        sampling = cfg.evaluate.model_copy(update={"guidance_scale": g})
        images = [frames[0] for frames in generate(sampling, es)]
        metrics = scene_accuracy(scenes, holdout, images)
        metrics["fd"] = frechet_distance(es.space.cls(images), ref)
        if paired is not None:
            metrics |= memorisation(images, truth, paired)
        out.metrics[f"{g:g}"] = metrics
        if keep_samples:
            out.samples[f"{g:g}"] = images[:keep_samples]
    if keep_samples:
        out.samples["truth"] = truth[:keep_samples]
        out.captions = [s.caption() for s in scenes[:keep_samples]]
    return out


def measure_multiframe(cfg: ExperimentConfig, checkpoint_uri: str, dataset_uri: str) -> dict:
    """A novel-view or video checkpoint on its eval groups: the evaluation's own metrics (PSNR,
    SSIM, perceptual distance, Fréchet distance) and the copy-the-input baseline's."""
    from lumos.evaluation.evaluate import generate, judge, prepare

    es = prepare(cfg.evaluate, checkpoint_uri, dataset_uri)
    verdict = judge(cfg.evaluate, es, generate(cfg.evaluate, es))
    out: dict[str, float] = {"eval_groups": float(len(es.rows))}
    for name in ("psnr", "ssim", "perceptual_distance", "fd_dino"):
        s = verdict.summaries.get(name)
        if s is None:
            continue
        out[name] = s.value
        for baseline in ("copy_input", "blank"):
            if baseline in s.baselines:
                out[f"{name}:{baseline}"] = s.baselines[baseline]
    return out
