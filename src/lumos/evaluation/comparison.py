"""Every metric beside trivial baselines scored on the same items, with bootstrap intervals.

    summaries = summarise({"fd_dino": FrechetMetric(...), "psnr": MeanMetric(...)}, resamples=1000)
    summaries["psnr"].margin        # the model's lead over the best baseline it must beat

A metric is a set of *candidates* scored on the same eval items: the model and the baselines a
broken model would match (`BASELINES`). Each metric names the baselines a model must beat
(`against`), the same in every preset:
- a distribution distance (the Fréchet distance): the blank image only, since a random training
  image *is* the data distribution (it is shown beside the model as the floor a perfect model
  reaches);
- a per-item closeness to the one true output (PSNR, SSIM, the patch-token distance, the CLS
  cosine): `CLOSENESS_BASELINES`, the baselines that are images of the data (a random training
  image, the model's own outputs for other items, the input copied), not the blank image. Such a
  distance is minimised by the *mean* of the outputs the condition allows, not by a sample of
  them: where the condition leaves the output uncertain and the image is mostly background, a
  blank image is a mean-like output that beats every faithful sampler. Measured on the embedded
  clips (24 clips, the tiny preset's feature space): a sampler of the true conditional
  distribution (the same first frame, the object moving to another random end point, as the
  generator draws it) scores PSNR 19.0 dB and patch distance 0.078 against the blank image's
  20.1 dB and 0.057, while its Fréchet distance is 0.39 against the blank image's 5.19. So the
  blank image is gated by the Fréchet distance (and the attribute checks, where it scores 0),
  where a faithful model is far ahead, and still reported beside every metric;
- every other metric (the attribute checks, the CLIP score): every baseline.

Intervals are bootstrap intervals over the eval items (percentile intervals shifted by the
bootstrap's bias): items are drawn with replacement, the same draw for the model and every
baseline (a paired bootstrap), so the margin's interval says whether the lead over the best
baseline is more than the choice of items.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lumos.evaluation.frechet import frechet_distance

MODEL = "model"
# The trivial baselines, in report order:
# - blank: every output a uniform image of the eval images' median colour (the background of
#   the embedded data: what a collapsed model draws);
# - random_train: a random training image (or a training group's frames) for every item: real
#   images that ignore the condition;
# - shuffled: the model's own outputs for other eval items (a derangement; for T2I these are the
#   caption-shuffled samples): the model's image quality with the condition ignored;
# - copy_input: the input view or first frame repeated (novel view, video).
BASELINES = ("blank", "random_train", "shuffled", "copy_input")
# What a per-item closeness to the true output must beat (see the module docstring): the
# baselines that are images of the data, drawn without regard to the condition or copied from it.
CLOSENESS_BASELINES = ("random_train", "shuffled", "copy_input")


@dataclass
class MeanMetric:
    """A metric that is the mean of one value per eval item, per candidate: (N,) arrays."""

    values: dict[str, np.ndarray]
    higher_is_better: bool = True
    against: tuple[str, ...] = BASELINES
    description: str = ""

    @property
    def num_items(self) -> int:
        return len(self.values[MODEL])

    def statistic(self, candidate: str, draws: np.ndarray) -> np.ndarray:
        """The metric on each draw of item indices (R, N) -> (R,)."""
        return self.values[candidate][draws].mean(axis=1)

    def value(self, candidate: str) -> float:
        return float(np.mean(self.values[candidate]))


@dataclass
class FrechetMetric:
    """The Fréchet distance of each candidate's features to the reference (the eval images').

    features: candidate -> (N, K, D), K features per item (one image, or the generated frames);
    reference: (N, K, D), the true images of the same items."""

    features: dict[str, np.ndarray]
    reference: np.ndarray
    higher_is_better: bool = False
    against: tuple[str, ...] = ("blank",)
    description: str = ""

    @property
    def num_items(self) -> int:
        return len(self.reference)

    def _fd(self, candidate: str, items: np.ndarray) -> float:
        feats = self.features[candidate][items]  # (N, K, D)
        ref = self.reference[items]  # (N, K, D)
        return frechet_distance(feats.reshape(-1, feats.shape[-1]), ref.reshape(-1, ref.shape[-1]))

    def statistic(self, candidate: str, draws: np.ndarray) -> np.ndarray:
        return np.array([self._fd(candidate, d) for d in draws])

    def value(self, candidate: str) -> float:
        return self._fd(candidate, np.arange(self.num_items))


Metric = MeanMetric | FrechetMetric


@dataclass
class MetricSummary:
    """One metric of one evaluation: the model's value, its baselines and its margin over them."""

    name: str
    value: float
    interval: tuple[float, float]
    higher_is_better: bool
    baselines: dict[str, float] = field(default_factory=dict)
    # The baselines the model must beat, and the best of them on these items.
    against: list[str] = field(default_factory=list)
    best_baseline: str | None = None
    # The model's lead over the best baseline, positive when the model is better (for a
    # lower-is-better metric: baseline - model), with its paired bootstrap interval.
    margin: float | None = None
    margin_interval: tuple[float, float] | None = None
    description: str = ""

    @property
    def direction(self) -> Literal["higher", "lower"]:
        return "higher" if self.higher_is_better else "lower"

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "interval": list(self.interval),
            "better": self.direction,
            "baselines": self.baselines,
            "against": self.against,
            "best_baseline": self.best_baseline,
            "margin": self.margin,
            "margin_interval": None if self.margin_interval is None else list(self.margin_interval),
            "description": self.description,
        }


def bootstrap_draws(num_items: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N) item indices drawn with replacement, fixed by `seed`."""
    if num_items < 1:
        raise ValueError("no eval items to bootstrap")
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_items, size=(resamples, num_items))


def _interval(samples: np.ndarray, estimate: float, confidence: float) -> tuple[float, float]:
    """The percentile interval of the bootstrap `samples`, shifted by their bias (their mean
    minus the estimate). A mean is unbiased and is not moved; a Fréchet distance of a resample
    (with repeated items, so less spread) is biased upwards, and unshifted its interval can lie
    above the estimate itself."""
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    bias = float(np.mean(samples)) - estimate
    return float(lo) - bias, float(hi) - bias


def summarise_metric(
    name: str, metric: Metric, draws: np.ndarray, confidence: float = 0.95
) -> MetricSummary:
    """The model's value and interval, every baseline's value, and the margin over the best of
    the baselines in `metric.against` that this head has (with its paired interval)."""
    sign = 1.0 if metric.higher_is_better else -1.0
    present = [b for b in BASELINES if b in _candidates(metric)]
    model_draws = metric.statistic(MODEL, draws)  # (R,)
    summary = MetricSummary(
        name=name,
        value=metric.value(MODEL),
        interval=_interval(model_draws, metric.value(MODEL), confidence),
        higher_is_better=metric.higher_is_better,
        baselines={b: metric.value(b) for b in present},
        against=[b for b in present if b in metric.against],
        description=metric.description,
    )
    if summary.against:
        # The best baseline on the full set of items; per draw, the best on that draw.
        best = max(summary.against, key=lambda b: sign * summary.baselines[b])
        summary.best_baseline = best
        summary.margin = sign * (summary.value - summary.baselines[best])
        per_draw = np.stack([metric.statistic(b, draws) for b in summary.against])  # (B, R)
        best_per_draw = per_draw.max(0) if sign > 0 else per_draw.min(0)  # (R,)
        summary.margin_interval = _interval(
            sign * (model_draws - best_per_draw), summary.margin, confidence
        )
    return summary


def _candidates(metric: Metric) -> dict[str, Any]:
    return metric.values if isinstance(metric, MeanMetric) else metric.features


def summarise(
    metrics: dict[str, Metric], resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, MetricSummary]:
    """Summaries of metrics over the same eval items (one shared bootstrap draw)."""
    if not metrics:
        return {}
    sizes = {name: m.num_items for name, m in metrics.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"metrics were scored on different numbers of items: {sizes}")
    draws = bootstrap_draws(next(iter(sizes.values())), resamples, seed)
    return {name: summarise_metric(name, m, draws, confidence) for name, m in metrics.items()}
