"""Exact, detector-free measurement of an object image's attributes.

GenEval checks colour, position and presence of objects with detectors; on the embedded dataset
(`lumos.data.synthetic`) the ground truth is known and the background is a known plain colour, so
the same checks can be made exactly on the pixels:

- foreground: pixels far from the background colour; the largest 4-connected blob is the object
  (speckles of a generated image are ignored);
- colour: majority vote of the object's pixels, each matched to the nearest palette colour or its
  darker stripe shade;
- texture: the fraction of the object's pixels nearest to a darker stripe shade;
- position: the object's centroid, in the 2x2 grid of the dataset;
- size: the larger side of the object's bounding box, relative to the image side;
- shape: the fill ratio of the bounding box (square 1.0, circle pi/4 = 0.785, triangle 0.5), from
  the soft coverage of the pixels (partly covered edge pixels count in part), exact enough at 32 px.

Works on uint8 (H, W, 3) images at the training resolution (32 px and up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lumos.data.synthetic import BACKGROUND, PALETTE, POSITIONS, SIZES, STRIPE_SHADE

ATTRIBUTES = ("color", "shape", "size", "position", "texture")
# A pixel belongs to the foreground when its RGB distance from the background exceeds this; the
# palette colours are all about 200 or more away, so this keeps pixels more than ~40 % covered.
FOREGROUND_DISTANCE = 80.0
# An image whose object covers less than this fraction of the pixels has no object.
MIN_OBJECT_FRACTION = 0.004
# Striped when at least this fraction of the object is nearer a dark shade than a full colour.
STRIPED_DARK_FRACTION = 0.15
# Size threshold: the midpoint of the small and large extents (twice the half-size).
SIZE_THRESHOLD = SIZES["small"] + SIZES["large"]
# Fill-ratio thresholds between triangle (0.5), circle (0.785) and square (1.0).
# Measured on the dataset at 32 px: triangles 0.54-0.67, circles 0.73-0.83, squares 0.95-1.0.
TRIANGLE_MAX_FILL = 0.70
CIRCLE_MAX_FILL = 0.89

_NAMES = list(PALETTE)
# Reference colours: every palette colour, then its stripe shade: (2K, 3).
_REFS = np.array(
    [PALETTE[n] for n in _NAMES] + [np.array(PALETTE[n]) * STRIPE_SHADE for n in _NAMES],
    dtype=np.float64,
)


@dataclass(frozen=True)
class Measurement:
    """What was measured on one image. Attribute fields are None when no object was found."""

    found: bool
    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None
    texture: str | None = None
    area_fraction: float = 0.0
    fill_ratio: float = 0.0
    extent: float = 0.0
    centroid: tuple[float, float] = (0.0, 0.0)
    dark_fraction: float = 0.0

    @property
    def attributes(self) -> dict[str, str | None]:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)


def foreground_mask(image: np.ndarray, background: Sequence[int] = BACKGROUND) -> np.ndarray:
    """Boolean (H, W): pixels far from the background colour."""
    _check_image(image)
    diff = image.astype(np.float64) - np.asarray(background, dtype=np.float64)
    return np.sqrt((diff**2).sum(-1)) > FOREGROUND_DISTANCE


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (empty mask -> empty)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_size else np.zeros_like(mask)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by one pixel (8-neighbourhood)."""
    padded = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def measure(image: np.ndarray, background: Sequence[int] = BACKGROUND) -> Measurement:
    """Measure the attributes of the single object in a uint8 (H, W, 3) image."""
    h, w = image.shape[:2]
    obj = largest_component(foreground_mask(image, background))
    area = int(obj.sum())
    if area < max(1, MIN_OBJECT_FRACTION * h * w):
        return Measurement(found=False, area_fraction=area / (h * w))

    # Colour and texture: every object pixel votes for its nearest reference colour.
    pixels = image[obj].astype(np.float64)  # (A, 3)
    nearest = np.argmin(((pixels[:, None, :] - _REFS[None]) ** 2).sum(-1), axis=1)  # (A,)
    k = len(_NAMES)
    votes = np.bincount(nearest % k, minlength=k)
    color = _NAMES[int(np.argmax(votes))]
    dark_fraction = float(np.mean(nearest >= k))
    texture = "striped" if dark_fraction >= STRIPED_DARK_FRACTION else "plain"

    # Soft coverage of each pixel near the object: its distance from the background relative to
    # the object colour's (partly covered edge pixels count in part; stripes count as covered).
    region = _dilate(obj)
    diff = image.astype(np.float64) - np.asarray(background, dtype=np.float64)
    full = np.linalg.norm(np.asarray(PALETTE[color], dtype=np.float64) - background)
    alpha = np.where(region, np.clip(np.sqrt((diff**2).sum(-1)) / full, 0.0, 1.0), 0.0)  # (H, W)

    # Position: the coverage-weighted centroid, in the dataset's 2x2 grid.
    yy, xx = np.mgrid[0:h, 0:w]
    soft_area = float(alpha.sum())
    cx = float((alpha * (xx + 0.5)).sum() / soft_area / w)
    cy = float((alpha * (yy + 0.5)).sum() / soft_area / h)
    position = min(
        POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2
    )

    # Size and shape from the soft bounding box: its width is the sum over columns of the
    # largest coverage in the column (exact for an axis-aligned square), likewise its height.
    bw, bh = float(alpha.max(axis=0).sum()), float(alpha.max(axis=1).sum())
    extent = max(bw / w, bh / h)
    size = "large" if extent >= SIZE_THRESHOLD else "small"
    fill = soft_area / (bw * bh)
    if fill < TRIANGLE_MAX_FILL:
        shape = "triangle"
    elif fill < CIRCLE_MAX_FILL:
        shape = "circle"
    else:
        shape = "square"
    return Measurement(
        found=True,
        color=color,
        shape=shape,
        size=size,
        position=position,
        texture=texture,
        area_fraction=area / (h * w),
        fill_ratio=float(fill),
        extent=float(extent),
        centroid=(float(cx), float(cy)),
        dark_fraction=dark_fraction,
    )


def attribute_accuracy(
    measured: Sequence[Measurement], expected: Sequence[dict[str, str | None]]
) -> dict[str, float]:
    """Per-attribute accuracy (``color_accuracy``, ...), ``all_accuracy`` (every attribute right)
    and ``object_found_rate``. ``expected`` holds the true attributes (or, for I2I agreement, the
    attributes measured on the conditioning image). An image without an object is wrong."""
    if len(measured) != len(expected):
        raise ValueError(
            f"{len(measured)} measurements but {len(expected)} expected attribute sets"
        )
    if not measured:
        raise ValueError("no images to score")
    out: dict[str, float] = {}
    all_right = np.ones(len(measured), dtype=bool)
    for name in ATTRIBUTES:
        right = np.array(
            [
                m.found and e.get(name) is not None and m.attributes[name] == e[name]
                for m, e in zip(measured, expected, strict=True)
            ]
        )
        out[f"{name}_accuracy"] = float(right.mean())
        all_right &= right
    out["all_accuracy"] = float(all_right.mean())
    out["object_found_rate"] = float(np.mean([m.found for m in measured]))
    return out


def _check_image(image: np.ndarray) -> None:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        got = getattr(image, "dtype", type(image)), getattr(image, "shape", None)
        raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {got[0]} with shape {got[1]}")
