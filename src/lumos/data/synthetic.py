"""The embedded default dataset: simple objects whose attributes are known exactly.

Generated deterministically at run time (no binaries in git), in the raw source layout that
ingest reads from any source (docs/architecture.md, "Raw source layout"):

- ``images/img-00042.png`` + ``.json``: one object (colour, shape, size, position, texture) on a
  plain background, with an exact caption ("a large red striped circle at the top left").
- ``views/obj-0007-v03.png`` + ``.json``: a box with distinctly coloured faces, rendered by a small
  numpy rasteriser (perspective projection, back-face culling, painter's order) from cameras at
  known azimuths on a circle of fixed elevation and radius.
- ``clips/clip-0003-f02.png`` + ``.json``: an object drifting right at a constant
  ``MIN_CLIP_STEP`` of the image per frame, as if the camera panned.

Every sidecar carries ``"split": "train" | "eval"``; about ``eval_fraction`` of the images, objects
and clips are ``eval``, so evaluation has ground truth (attributes, true views, true frames) that
training never saw. The same seed gives byte-identical files.

The constants below (palette, background, sizes, positions, stripe period) are the ground truth
that ``lumos.evaluation.attributes`` measures generated images against.
"""

from __future__ import annotations

import io
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from lumos.configs.data import SynthConfig

# ---------------------------------------------------------------------------------------------
# Ground truth of the object images. Colours are far apart in RGB (and from the background) so a
# nearest-colour vote stays exact after resizing to 32 px and under the noise of a generated image.
BACKGROUND: tuple[int, int, int] = (235, 235, 235)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (45, 175, 65),
    "blue": (45, 75, 220),
    "yellow": (235, 200, 35),
    "magenta": (205, 55, 205),
    "cyan": (40, 195, 205),
}
# Stripes alternate the object colour with this fraction of it (a darker shade of the same hue).
STRIPE_SHADE = 0.5
# Stripes are horizontal bands, STRIPE_BANDS dark + STRIPE_BANDS light over the image height.
STRIPE_BANDS = 8
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Half the object's extent, as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.12, "large": 0.22}
# Centres of the 2x2 grid cells, (x, y) as fractions of the image side (y grows downwards).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
TEXTURES: tuple[str, ...] = ("plain", "striped")
# The object's centre moves at most this much from its cell centre (fraction of the image side),
# so every object stays inside its cell.
POSITION_JITTER = 0.025
# Shapes are rendered at SUPERSAMPLE x the resolution and box-filtered down (anti-aliased edges).
SUPERSAMPLE = 4
# Clips: the object moves this far per frame (fraction of the image side), so every frame differs
# from the one before even after resizing to a quarter of the resolution.
MIN_CLIP_STEP = 0.08


class SynthResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    out_uri: str
    num_files: int = Field(description="PNG files written (each has a JSON sidecar)")
    counts: dict[str, int] = Field(description="PNG files per folder: images, views, clips")
    groups: dict[str, int] = Field(description="multi-view objects and clips")
    eval_counts: dict[str, int] = Field(description="images / objects / clips marked split=eval")
    config: SynthConfig


# ---------------------------------------------------------------------------------------------
# Object images


@dataclass(frozen=True)
class ObjectSpec:
    """One object in an image: its attributes and exact centre (fractions of the image side)."""

    color: str
    shape: str
    size: str
    position: str
    texture: str
    center: tuple[float, float]

    @property
    def attributes(self) -> dict[str, str]:
        return {
            "color": self.color,
            "shape": self.shape,
            "size": self.size,
            "position": self.position,
            "texture": self.texture,
        }


def caption_for(attributes: dict[str, str]) -> str:
    """The exact caption of an object image: 'a large red striped circle at the top left'."""
    texture = "striped " if attributes["texture"] == "striped" else ""
    return (
        f"a {attributes['size']} {attributes['color']} {texture}{attributes['shape']} "
        f"at the {attributes['position']}"
    )


def _pixel_grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an n x n grid as fractions of the side: (x, y), each (n, n)."""
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    return np.meshgrid(c, c, indexing="xy")


def shape_mask(shape: str, center: tuple[float, float], half: float, n: int) -> np.ndarray:
    """Boolean (n, n) coverage of a shape with the given centre and half-extent (image fractions)."""
    x, y = _pixel_grid(n)
    cx, cy = center
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":
        # Apex up at (cx, cy - half), base from (cx - half, cy + half) to (cx + half, cy + half):
        # the half-width grows linearly from 0 at the apex to `half` at the base.
        t = (y - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(x - cx) <= half * t)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _downsample(canvas: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter a float (N, N, 3) canvas by an integer factor and round to uint8."""
    n = canvas.shape[0] // factor
    out = canvas.reshape(n, factor, n, factor, 3).mean(axis=(1, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_objects(objects: list[ObjectSpec], resolution: int, background=BACKGROUND) -> np.ndarray:
    """Render objects (in order, later ones on top) into a uint8 (H, W, 3) image."""
    n = resolution * SUPERSAMPLE
    canvas = np.empty((n, n, 3), dtype=np.float64)
    canvas[:] = background
    _, y = _pixel_grid(n)
    dark_band = (np.floor(y * 2 * STRIPE_BANDS).astype(np.int64) % 2) == 1  # (n, n)
    for obj in objects:
        mask = shape_mask(obj.shape, obj.center, SIZES[obj.size], n)
        color = np.asarray(PALETTE[obj.color], dtype=np.float64)
        canvas[mask] = color
        if obj.texture == "striped":
            canvas[mask & dark_band] = color * STRIPE_SHADE
        elif obj.texture != "plain":
            raise ValueError(f"unknown texture {obj.texture!r}; expected one of {TEXTURES}")
    return _downsample(canvas, SUPERSAMPLE)


def _image_specs(cfg: SynthConfig, rng: np.random.Generator) -> list[ObjectSpec]:
    """Balanced attributes: cycle through every combination, each pass in a fresh random order."""
    combos = list(itertools.product(PALETTE, SHAPES, SIZES, POSITIONS, TEXTURES))
    specs: list[ObjectSpec] = []
    while len(specs) < cfg.num_images:
        for i in rng.permutation(len(combos)):
            if len(specs) == cfg.num_images:
                break
            color, shape, size, position, texture = combos[i]
            jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
            cx, cy = POSITIONS[position]
            specs.append(ObjectSpec(color, shape, size, position, texture, (cx + jx, cy + jy)))
    return specs


# ---------------------------------------------------------------------------------------------
# Multi-view boxes

# The six faces of the unit box: outward normal and the four corners (counter-clockwise seen
# from outside), as indices into the 8 corners (+-1, +-1, +-1).
_CORNERS = np.array(list(itertools.product((-1.0, 1.0), repeat=3)))  # (8, 3): x, y, z
_FACES = (
    ((1, 0, 0), (4, 6, 7, 5)),
    ((-1, 0, 0), (0, 1, 3, 2)),
    ((0, 1, 0), (2, 3, 7, 6)),
    ((0, -1, 0), (0, 4, 5, 1)),
    ((0, 0, 1), (1, 5, 7, 3)),
    ((0, 0, -1), (0, 2, 6, 4)),
)
# World light direction for simple Lambert shading (the same for every view of an object).
_LIGHT = np.array([0.4, 0.8, 0.45]) / np.linalg.norm([0.4, 0.8, 0.45])
# Focal length in units of the half image width (a field of view of about 64 degrees).
_FOCAL = 1.6


@dataclass(frozen=True)
class BoxSpec:
    half_extents: tuple[float, float, float]
    yaw: float  # degrees, rotation of the box about the vertical axis
    face_colors: tuple[str, ...]  # six palette names, one per face of _FACES


def camera_pose(azimuth: float, elevation: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Camera centre (3,) and world-to-camera rotation (3, 3) (rows: right, up, forward) for a
    camera on a sphere around the origin looking at it; y is up, azimuth 0 looks along -z."""
    a, e = math.radians(azimuth), math.radians(elevation)
    center = radius * np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    forward = -center / np.linalg.norm(center)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return center, np.stack([right, up, forward])


def _fill_convex(poly: np.ndarray, n: int) -> np.ndarray:
    """Boolean (n, n) mask of the pixels inside a convex polygon given in pixel units (K, 2)."""
    c = np.arange(n, dtype=np.float64) + 0.5
    x, y = np.meshgrid(c, c, indexing="xy")
    # Make the winding consistent, then keep pixels on the inner side of every edge.
    area = np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1])
    if area < 0:
        poly = poly[::-1]
    inside = np.ones((n, n), dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        inside &= (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) >= 0
    return inside


def render_box(
    box: BoxSpec, azimuth: float, elevation: float, radius: float, resolution: int
) -> np.ndarray:
    """Rasterise a box with coloured faces seen from a camera: perspective projection, back-face
    culling, painter's order (far faces first), Lambert shading; uint8 (H, W, 3)."""
    n = resolution * SUPERSAMPLE
    canvas = np.empty((n, n, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    yaw = math.radians(box.yaw)
    rot = np.array(
        [[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]]
    )
    corners = (_CORNERS * np.asarray(box.half_extents)) @ rot.T  # (8, 3) world
    cam_center, world_to_cam = camera_pose(azimuth, elevation, radius)
    cam = (corners - cam_center) @ world_to_cam.T  # (8, 3): right, up, forward (depth)
    if np.any(cam[:, 2] <= 0.1):
        raise ValueError(f"camera radius {radius} is inside or too close to the box")
    # Image plane: x right, y down, in pixels.
    px = (
        np.stack([cam[:, 0] / cam[:, 2], -cam[:, 1] / cam[:, 2]], axis=1) * _FOCAL
    )  # (8, 2) in [-1, 1]
    px = (px * 0.5 + 0.5) * n
    visible = []
    for (normal, idx), color in zip(_FACES, box.face_colors, strict=True):
        world_normal = rot @ np.asarray(normal, dtype=np.float64)
        face_center = corners[list(idx)].mean(axis=0)
        if world_normal @ (cam_center - face_center) <= 0:  # back face: culled
            continue
        depth = float(((face_center - cam_center) @ world_to_cam.T)[2])
        shade = 0.55 + 0.45 * max(0.0, float(world_normal @ _LIGHT))
        visible.append((depth, idx, np.asarray(PALETTE[color], dtype=np.float64) * shade))
    for _, idx, rgb in sorted(visible, key=lambda v: -v[0]):  # painter's order: far to near
        canvas[_fill_convex(px[list(idx)], n)] = rgb
    return _downsample(canvas, SUPERSAMPLE)


def _box_specs(cfg: SynthConfig, rng: np.random.Generator) -> list[BoxSpec]:
    names = list(PALETTE)
    specs = []
    for _ in range(cfg.num_objects):
        half = tuple(float(v) for v in rng.uniform(0.45, 0.65, size=3))
        yaw = float(rng.uniform(0.0, 90.0))
        colors = tuple(names[i] for i in rng.permutation(len(names)))
        specs.append(BoxSpec(half, yaw, colors))  # type: ignore[arg-type]
    return specs


def view_azimuths(views_per_object: int) -> list[float]:
    """Evenly spaced azimuths in degrees, view 0 at 0."""
    return [360.0 * i / views_per_object for i in range(views_per_object)]


# ---------------------------------------------------------------------------------------------
# Clips of moving objects


@dataclass(frozen=True)
class ClipSpec:
    color: str
    shape: str
    size: str
    texture: str
    start: tuple[float, float]  # object centre at frame 0 (image fractions)
    velocity: tuple[float, float]  # per frame (image fractions)

    def center(self, frame: int) -> tuple[float, float]:
        return (self.start[0] + self.velocity[0] * frame, self.start[1] + self.velocity[1] * frame)


def _clip_specs(cfg: SynthConfig, rng: np.random.Generator) -> list[ClipSpec]:
    specs = []
    steps = cfg.frames_per_clip - 1
    for _ in range(cfg.num_clips):
        color = list(PALETTE)[rng.integers(len(PALETTE))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        size = "small"
        lo, hi = SIZES[size] + 0.01, 1.0 - SIZES[size] - 0.01
        # The object drifts right at MIN_CLIP_STEP per frame (a camera panning), starting where
        # its whole path stays inside the image: the first frame says where it goes, so a video
        # model can learn the motion (with end points drawn at random, no model could beat the
        # first frame copied on per-item closeness: tests/evaluation/test_faithful_sampler.py).
        # The same offset in every clip is what the video head's relative (rotary) frame attention
        # can learn at the local run's size; clips that crossed to the mirrored side (a speed
        # that depends on the start) were not learnt there (docs/benchmarks.md).
        start = np.array([rng.uniform(lo, hi - MIN_CLIP_STEP * steps), rng.uniform(lo, hi)])
        velocity = (MIN_CLIP_STEP, 0.0)
        specs.append(
            ClipSpec(
                color,
                shape,
                size,
                texture,
                (float(start[0]), float(start[1])),
                (float(velocity[0]), float(velocity[1])),
            )
        )
    return specs


def render_clip_frame(clip: ClipSpec, frame: int, resolution: int) -> np.ndarray:
    obj = ObjectSpec(clip.color, clip.shape, clip.size, "", clip.texture, clip.center(frame))
    return render_objects([obj], resolution)


# ---------------------------------------------------------------------------------------------
# Writing


def png_bytes(image: np.ndarray) -> bytes:
    """Encode a uint8 (H, W, 3) array as PNG (deterministic: no timestamps in the file)."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode()


def _eval_set(count: int, fraction: float, rng: np.random.Generator) -> set[int]:
    """Indices marked eval: round(fraction * count), at least one when fraction > 0 and count > 1."""
    if count == 0 or fraction == 0:
        return set()
    k = min(count - 1, max(1, round(fraction * count))) if count > 1 else 0
    return {int(i) for i in rng.permutation(count)[:k]}


def iter_default_dataset(cfg: SynthConfig) -> Iterator[tuple[str, np.ndarray, dict]]:
    """Yield (key without extension, uint8 image, sidecar) for every file of the dataset."""
    # Independent streams per part, so changing one count leaves the other parts unchanged.
    seeds = np.random.SeedSequence(cfg.seed).spawn(3)
    rng_img, rng_obj, rng_clip = (np.random.default_rng(s) for s in seeds)

    images = _image_specs(cfg, rng_img)
    eval_images = _eval_set(len(images), cfg.eval_fraction, rng_img)
    for i, spec in enumerate(images):
        sidecar: dict[str, Any] = {
            "caption": caption_for(spec.attributes),
            "attributes": spec.attributes,
            "center": [round(spec.center[0], 6), round(spec.center[1], 6)],
            "split": "eval" if i in eval_images else "train",
        }
        yield f"images/img-{i:05d}", render_objects([spec], cfg.resolution), sidecar

    boxes = _box_specs(cfg, rng_obj)
    eval_boxes = _eval_set(len(boxes), cfg.eval_fraction, rng_obj)
    azimuths = view_azimuths(cfg.views_per_object)
    for g, box in enumerate(boxes):
        group = f"obj-{g:04d}"
        for v, azimuth in enumerate(azimuths):
            sidecar = {
                "group": group,
                "index": v,
                "camera": {"azimuth": azimuth, "elevation": cfg.elevation, "radius": cfg.radius},
                "object": {
                    "half_extents": [round(h, 6) for h in box.half_extents],
                    "yaw": round(box.yaw, 6),
                    "face_colors": list(box.face_colors),
                },
                "split": "eval" if g in eval_boxes else "train",
            }
            image = render_box(box, azimuth, cfg.elevation, cfg.radius, cfg.resolution)
            yield f"views/{group}-v{v:02d}", image, sidecar

    clips = _clip_specs(cfg, rng_clip)
    eval_clips = _eval_set(len(clips), cfg.eval_fraction, rng_clip)
    for c, clip in enumerate(clips):
        group = f"clip-{c:04d}"
        for f in range(cfg.frames_per_clip):
            sidecar = {
                "group": group,
                "index": f,
                "object": {
                    "color": clip.color,
                    "shape": clip.shape,
                    "size": clip.size,
                    "texture": clip.texture,
                    "center": [round(v, 6) for v in clip.center(f)],
                    "velocity": [round(v, 6) for v in clip.velocity],
                },
                "split": "eval" if c in eval_clips else "train",
            }
            yield f"clips/{group}-f{f:02d}", render_clip_frame(clip, f, cfg.resolution), sidecar


def generate_default_dataset(cfg: SynthConfig, out_uri: str) -> SynthResult:
    """Write the embedded default dataset to ``out_uri`` (a local directory or s3://bucket/prefix)
    in the raw source layout: ``images/``, ``views/``, ``clips/`` PNGs with JSON sidecars."""
    from lumos.storage import Storage

    store = Storage.from_uri(out_uri)
    existing = [info.key for info in store.list()]
    clash = [k for k in existing if k.split("/", 1)[0] in ("images", "views", "clips")]
    if clash:
        raise FileExistsError(
            f"{store.uri} already holds {len(clash)} files under images/, views/ or clips/ "
            f"(e.g. {clash[0]}); write the synthetic dataset to an empty location"
        )
    counts = {"images": 0, "views": 0, "clips": 0}
    evals = {"images": 0, "objects": 0, "clips": 0}
    eval_groups: set[str] = set()
    for key, image, sidecar in iter_default_dataset(cfg):
        store.write_bytes(f"{key}.png", png_bytes(image))
        store.write_bytes(f"{key}.json", _json_bytes(sidecar))
        folder = key.split("/", 1)[0]
        counts[folder] += 1
        if sidecar["split"] == "eval":
            if folder == "images":
                evals["images"] += 1
            elif sidecar["group"] not in eval_groups:
                eval_groups.add(sidecar["group"])
                evals["objects" if folder == "views" else "clips"] += 1
    return SynthResult(
        out_uri=store.uri,
        num_files=sum(counts.values()),
        counts=counts,
        groups={"objects": cfg.num_objects, "clips": cfg.num_clips},
        eval_counts=evals,
        config=cfg,
    )
