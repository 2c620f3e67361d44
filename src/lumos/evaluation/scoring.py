"""Each head's metrics on the eval items, for the model and for the trivial baselines alike.

    metrics = score_items(items, generated, FeatureSpace(encoders), clip=None, seed=0)
    summaries = comparison.summarise(metrics)

Metrics that work on any dataset (from the frozen networks of `lumos.evaluation.networks`):

- ``fd_dino``: the Fréchet distance between the outputs and the true images in the DINO CLS space
  (FD-DINO; lower is better). A distribution metric: gated against the blank image only.
- ``dino_similarity``: per item, the cosine of the output's and the true image's CLS (i2i: the
  conditioning image; t2i: the image the caption describes; views and frames: the true ones).
  This and the other per-item closeness metrics below (perceptual distance, PSNR, SSIM) are
  gated against the data's images (random training image, shuffled outputs, copied input), not
  the blank image, which the Fréchet distance gates (`lumos.evaluation.comparison`).
- ``perceptual_distance`` (i2i, novel_view, video): the LPIPS-like distance of patch tokens
  (lower is better).
- ``clip_score`` (t2i, when a CLIP model is configured): 100 x the cosine of CLIP's image and
  caption embeddings (CLIPScore without its clamp at 0, which real CLIP models never reach on
  captions; kept so that a random test CLIP still gives a signed, paired value).
- ``psnr``, ``ssim`` (i2i, novel_view, video): the paper's metrics against the true views and
  frames (for i2i, against the conditioning image).

On data that carries ground truth (every eval item has ``meta.attributes``, as the embedded
dataset writes them), the exact GenEval-style checks of `lumos.evaluation.attributes` as well:
``<attribute>_accuracy`` for t2i (against the caption's attributes) and ``<attribute>_agreement``
for i2i (against the conditioning image's), ``all_*`` (every attribute right) and
``object_found_rate``.

For multi-frame heads, the outputs scored are views / frames 1..F-1 (view 0 or the first frame is
the condition); an item's value is the mean over its frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lumos.configs.training import MULTI_FRAME_HEADS
from lumos.evaluation.attributes import ATTRIBUTES, Measurement, measure
from lumos.evaluation.comparison import (
    CLOSENESS_BASELINES,
    MODEL,
    FrechetMetric,
    MeanMetric,
    Metric,
)
from lumos.evaluation.image_metrics import psnr, ssim

if TYPE_CHECKING:
    from lumos.evaluation.networks import ClipScorer, FeatureSpace

# PSNR of identical images is infinite; per-item values get this cap instead (JSON has no
# infinity, and one perfect frame must not make a mean infinite).
PSNR_CAP = 100.0

Frames = list[np.ndarray]  # one item's images, uint8 (H, W, 3)


@dataclass
class EvalItems:
    """The eval items of one head and what scoring them needs besides the model's outputs.

    truth: per item, its true images (one, or the F views / frames; view 0 is the condition).
    train: per item, a random training item's images, the same number (the random baseline).
    captions: per item, the caption (t2i). attributes: per item, the true attributes, or None
    when the data carries no ground truth."""

    head: str
    truth: list[Frames]
    train: list[Frames]
    captions: list[str] | None = None
    attributes: list[dict[str, str | None]] | None = None

    def __post_init__(self) -> None:
        if not self.truth:
            raise ValueError("no eval items to score")
        if len(self.train) != len(self.truth):
            raise ValueError(f"{len(self.train)} training items for {len(self.truth)} eval items")

    @property
    def multi_frame(self) -> bool:
        return self.head in MULTI_FRAME_HEADS


@dataclass
class Scores:
    """What scoring produced: the metrics (model and baselines), values without baselines, and
    the model's per-item values (for samples.json and the report's notes)."""

    metrics: dict[str, Metric]
    extra: dict[str, float] = field(default_factory=dict)
    per_item: list[dict[str, Any]] = field(default_factory=list)
    measured: list[Measurement] | None = None


def derangement(n: int, seed: int) -> np.ndarray:
    """A random permutation of range(n) with no fixed point (one n-cycle), for n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = np.roll(order, -1)
    return perm


def blank_image(truth: Sequence[Frames]) -> np.ndarray:
    """The uint8 colour every blank output has: the per-channel median of the true images'
    pixels (the background of the embedded data; what a collapsed model tends to draw)."""
    pixels = np.concatenate([im.reshape(-1, 3) for frames in truth for im in frames])
    return np.median(pixels, axis=0).round().astype(np.uint8)  # (3,)


def _fit(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`image` at the size of `like` (aspect buckets: items may differ in size)."""
    if image.shape == like.shape:
        return image
    h, w = like.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))


def _targets(frames: Frames, multi_frame: bool) -> Frames:
    return list(frames[1:]) if multi_frame else list(frames[:1])


def candidates(
    items: EvalItems, generated: Sequence[Frames], perm: np.ndarray | None
) -> dict[str, list[Frames]]:
    """Per candidate (the model and each baseline this head has), per item, the scored images,
    each at its true image's size."""
    mf = items.multi_frame
    truth = [_targets(t, mf) for t in items.truth]
    colour = blank_image(truth)
    out = {
        MODEL: [_targets(g, mf) for g in generated],
        "blank": [[np.broadcast_to(colour, t.shape).copy() for t in ts] for ts in truth],
        "random_train": [
            [_fit(x, t) for x, t in zip(_targets(r, mf), ts, strict=True)]
            for r, ts in zip(items.train, truth, strict=True)
        ],
    }
    if perm is not None:
        out["shuffled"] = [
            [_fit(x, t) for x, t in zip(out[MODEL][j], ts, strict=True)]
            for j, ts in zip(perm, truth, strict=True)
        ]
    if mf:
        out["copy_input"] = [
            [_fit(t[0], x) for x in ts] for t, ts in zip(items.truth, truth, strict=True)
        ]
    return out


def score_items(
    items: EvalItems,
    generated: Sequence[Frames],
    space: FeatureSpace,
    clip: ClipScorer | None = None,
    seed: int = 0,
) -> Scores:
    """Every metric of the head, for the model's outputs `generated` (per item, as `truth`) and
    for each baseline, on the same items."""
    n = len(items.truth)
    if len(generated) != n:
        raise ValueError(f"{len(generated)} generated items for {n} eval items")
    mf = items.multi_frame
    perm = derangement(n, seed) if n >= 2 else None
    cands = candidates(items, generated, perm)
    truth = [_targets(t, mf) for t in items.truth]
    per_item: list[dict[str, Any]] = [{} for _ in range(n)]
    metrics: dict[str, Metric] = {}

    # DINO CLS features (N, K, D) per candidate; the shuffled baseline reuses the model's.
    feats = {name: _cls(space, c) for name, c in cands.items() if name != "shuffled"}
    ref = _cls(space, truth)
    if perm is not None:
        feats["shuffled"] = feats[MODEL][perm]
    metrics["fd_dino"] = FrechetMetric(
        {k: v for k, v in feats.items() if k != "shuffled"}, ref,
        description="Fréchet distance to the true images in the DINO CLS space",
    )  # fmt: skip
    # Per-item closeness to the truth: gated against the data's images, not the blank image
    # (a mean-like output; `lumos.evaluation.comparison` says why).
    metrics["dino_similarity"] = MeanMetric(
        {k: _cosine(v, ref).mean(1) for k, v in feats.items()},
        against=CLOSENESS_BASELINES,
        description="cosine of the DINO CLS of output and truth, per item",
    )
    if items.head != "t2i":
        metrics["perceptual_distance"] = MeanMetric(
            {k: _pairwise(space.perceptual_distance, c, truth) for k, c in cands.items()},
            higher_is_better=False,
            against=CLOSENESS_BASELINES,
            description="LPIPS-like distance of DINO patch tokens to the truth",
        )
    if items.head != "t2i":
        metrics["psnr"] = MeanMetric(
            {k: _per_item(lambda a, b: min(psnr(a, b), PSNR_CAP), c, truth) for k, c in cands.items()},
            against=CLOSENESS_BASELINES,
            description="PSNR (dB) against the true image(s)",
        )  # fmt: skip
        metrics["ssim"] = MeanMetric(
            {k: _per_item(ssim, c, truth) for k, c in cands.items()},
            against=CLOSENESS_BASELINES,
            description="SSIM against the true image(s)",
        )
    if items.head == "t2i" and clip is not None:
        if items.captions is None:
            raise ValueError("t2i items need their captions")
        text = clip.text_embeds(items.captions)  # (N, E)
        embeds = {
            k: clip.image_embeds([c[0] for c in v]) for k, v in cands.items() if k != "shuffled"
        }
        if perm is not None:
            embeds["shuffled"] = embeds[MODEL][perm]
        metrics["clip_score"] = MeanMetric(
            {k: 100.0 * (e * text).sum(-1) for k, e in embeds.items()},
            description="CLIP alignment of output and caption, 100 x cosine",
        )  # fmt: skip
    scores = Scores(metrics, per_item=per_item)
    if items.attributes is not None and items.head in ("t2i", "i2i"):
        _score_attributes(items, cands, perm, scores)
    for name, metric in metrics.items():
        if isinstance(metric, MeanMetric):
            for i, v in enumerate(metric.values[MODEL]):
                per_item[i][name] = float(v)
    return scores


def _score_attributes(
    items: EvalItems, cands: dict[str, list[Frames]], perm: np.ndarray | None, scores: Scores
) -> None:
    """The exact attribute checks: model, blank, random image, shuffled outputs vs the truth."""
    expected = items.attributes or []
    suffix = "accuracy" if items.head == "t2i" else "agreement"
    measured = {k: [measure(c[0]) for c in v] for k, v in cands.items() if k != "shuffled"}
    if perm is not None:
        measured["shuffled"] = [measured[MODEL][j] for j in perm]
    right = {
        k: {a: np.array([m.found and m.attributes[a] == e.get(a) for m, e in zip(ms, expected, strict=True)])
            for a in ATTRIBUTES}
        for k, ms in measured.items()
    }  # fmt: skip
    what = "the caption's" if items.head == "t2i" else "the conditioning image's"
    for a in ATTRIBUTES:
        scores.metrics[f"{a}_{suffix}"] = MeanMetric(
            {k: r[a].astype(np.float64) for k, r in right.items()},
            description=f"{a} measured on the output equals {what}",
        )
    scores.metrics[f"all_{suffix}"] = MeanMetric(
        {k: np.logical_and.reduce([r[a] for a in ATTRIBUTES]).astype(np.float64) for k, r in right.items()},
        description="every attribute right",
    )  # fmt: skip
    scores.metrics["object_found_rate"] = MeanMetric(
        {k: np.array([m.found for m in ms], dtype=np.float64) for k, ms in measured.items()},
        against=("blank",),
        description="an object was found on the output",
    )
    reference = [measure(t[0]) for t in items.truth]
    scores.extra["reference_all_accuracy"] = float(
        np.mean([m.found and all(m.attributes[a] == e.get(a) for a in ATTRIBUTES)
                 for m, e in zip(reference, expected, strict=True)])
    )  # fmt: skip
    scores.measured = measured[MODEL]


def _cls(space: FeatureSpace, per_item: list[Frames]) -> np.ndarray:
    """(N, K, D) CLS features of K images per item."""
    k = len(per_item[0])
    flat = [im for frames in per_item for im in frames]
    return space.cls(flat).reshape(len(per_item), k, -1)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis: (..., D), (..., D) -> (...)."""
    na = np.linalg.norm(a, axis=-1).clip(1e-12)
    nb = np.linalg.norm(b, axis=-1).clip(1e-12)
    return (a * b).sum(-1) / (na * nb)


def _pairwise(fn, cand: list[Frames], truth: list[Frames]) -> np.ndarray:
    """A batched pair metric (images, images) -> (M,), averaged per item: (N,)."""
    k = len(truth[0])
    flat_c = [im for frames in cand for im in frames]
    flat_t = [im for frames in truth for im in frames]
    return np.asarray(fn(flat_c, flat_t)).reshape(len(truth), k).mean(1)


def _per_item(fn, cand: list[Frames], truth: list[Frames]) -> np.ndarray:
    """A pair metric (image, image) -> float, averaged per item: (N,)."""
    return np.array(
        [np.mean([fn(c, t) for c, t in zip(cs, ts, strict=True)]) for cs, ts in zip(cand, truth, strict=True)]
    )  # fmt: skip
