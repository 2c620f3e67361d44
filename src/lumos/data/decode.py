"""Decode, validate and prepare one image: the per-object work of ingest (runs in worker processes).

`prepare_image(raw, recipe)` returns a `PreparedImage` (the encoded output image, its sizes and
perceptual hash) or a `Rejection` with a reason from `REJECTION_REASONS`. It never raises on bad
input: every way an object can be wrong ends in a Rejection, so ingest can account for it.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lumos.data.dedup import perceptual_hash
from lumos.data.rgb import to_rgb

# File name extensions ingest treats as images; everything else is a sidecar or rejected.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# PIL format names accepted (MPO is the multi-picture JPEG some cameras write).
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")

# Every reason an object can be rejected, with what it means (the manifest and report use the keys).
REJECTION_REASONS = {
    "empty_file": "the object has zero bytes",
    "unreadable": "the object could not be read from storage (after retries)",
    "not_an_image": "the content is not an image PIL can identify",
    "unsupported_format": "an image, but not JPEG / PNG / WebP / GIF / BMP / TIFF",
    "truncated_or_corrupt": "the image data is truncated or corrupt",
    "too_many_pixels": "width x height above max_pixels (decompression-bomb guard)",
    "too_small": "the shorter side is below min_size",
    "extreme_aspect_ratio": "long side / short side above max_aspect_ratio",
    "unsupported_mode": "a pixel mode with no faithful 8-bit RGB conversion (e.g. float)",
    "invalid_sidecar": "the .json sidecar is not a JSON object or the .txt is not UTF-8",
    "unsupported_extension": "not an image by its name, and not a sidecar of one",
    "orphan_sidecar": "a .txt / .json sidecar without an image of the same name",
}

# Ingest runs one decoding process per core: OpenCV's own threads would only contend with them.
cv2.setNumThreads(1)

# EXIF orientations that swap width and height (transpose / rotate 90 / transverse / rotate 270).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageRecipe:
    """What to make of each image (built from IngestConfig; plain data so it pickles cheaply)."""

    sizes: tuple[tuple[int, int], ...]  # output (width, height): one size, or the aspect buckets
    min_size: int  # minimum shorter side of the source, in pixels
    max_aspect_ratio: float  # long / short
    max_pixels: int
    background: tuple[int, int, int]  # RGB under transparent pixels
    image_format: str  # "jpg" or "png"
    jpeg_quality: int
    # The source must cover its output size (IngestConfig.min_size unset): with aspect buckets a
    # source above min_size may still be smaller than the bucket of its aspect ratio.
    never_upscale: bool = False


@dataclass(frozen=True)
class PreparedImage:
    data: bytes  # the encoded output image
    width: int
    height: int
    source_width: int  # after EXIF orientation
    source_height: int
    source_format: str  # PIL format name
    source_mode: str  # PIL mode before conversion
    phash: int  # 64-bit perceptual hash of the output image


@dataclass(frozen=True)
class Rejection:
    reason: str  # a key of REJECTION_REASONS
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")


def choose_size(width: int, height: int, sizes: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The output size whose aspect ratio is closest (in log space) to width / height."""
    log_aspect = math.log(width / height)
    return min(sizes, key=lambda s: abs(math.log(s[0] / s[1]) - log_aspect))


def cover_crop_box(
    width: int, height: int, target: tuple[int, int]
) -> tuple[float, float, float, float]:
    """The centred source box with the target's aspect ratio that covers as much as possible."""
    tw, th = target
    scale = max(tw / width, th / height)
    cw, ch = tw / scale, th / scale
    left, top = (width - cw) / 2, (height - ch) / 2
    return (left, top, left + cw, top + ch)


def resize_cover(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Scale an 8-bit RGB image to cover `target` (width, height) and centre-crop to it.

    Shrinking by a factor f: Pillow's k x k box reduction for the whole part k of f (only when
    reduce-on-decode could not do it, e.g. a large PNG), then the rest (a factor below 2) as
    scikit-image's `resize(anti_aliasing=True)` does it: a Gaussian low-pass of sigma (f - 1) / 2
    source pixels and bilinear sampling, with OpenCV's vectorised kernels: faster than OpenCV's
    area averaging and Pillow's antialiased bicubic, and close to a Lanczos resize (figures:
    bench/resize.py, docs/benchmarks.md). Enlarging (only when `min_size` is
    set below the output size) is bicubic. The crop box is rounded to whole source pixels.
    """
    left, top, right, bottom = (round(v) for v in cover_crop_box(img.width, img.height, target))
    whole = math.floor((right - left) / target[0])
    if whole >= 2:
        width, height = (right - left) // whole, (bottom - top) // whole
        img = img.reduce(whole, box=(left, top, left + width * whole, top + height * whole))
        left, top, right, bottom = 0, 0, width, height
    pixels = np.asarray(img)[top:bottom, left:right]
    factor = (right - left) / target[0]
    if factor <= 1:
        return Image.fromarray(cv2.resize(pixels, target, interpolation=cv2.INTER_CUBIC), "RGB")
    sigma = (factor - 1) / 2
    blurred = cv2.GaussianBlur(pixels, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return Image.fromarray(cv2.resize(blurred, target, interpolation=cv2.INTER_LINEAR), "RGB")


def encode_image(img: Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if image_format == "jpg":
        img.save(buf, "JPEG", quality=jpeg_quality)
    elif image_format == "png":
        img.save(buf, "PNG", compress_level=6)
    else:
        raise ValueError(f"unknown image_format {image_format!r}: use 'jpg' or 'png'")
    return buf.getvalue()


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    width, height = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a broken EXIF block: orientation unknown, assume upright
        orientation = 1
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def prepare_image(raw: bytes, recipe: ImageRecipe) -> PreparedImage | Rejection:
    """Validate, decode, orient, convert, resize + centre-crop, hash and encode one image."""
    if not raw:
        return Rejection("empty_file")
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; PIL's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError as err:
        return Rejection("too_many_pixels", str(err))
    except UnidentifiedImageError:
        return Rejection("not_an_image", "PIL cannot identify the content")
    except Exception as err:
        return Rejection("truncated_or_corrupt", f"{type(err).__name__}: {err}")

    if img.format == "PNG":
        # PIL's decoder does not check the PNG chunk CRCs; verify() does (cheaply, no decoding).
        try:
            img.verify()
            img = Image.open(io.BytesIO(raw))
        except Exception as err:
            return Rejection("truncated_or_corrupt", f"{type(err).__name__}: {err}")
    if img.format not in SUPPORTED_FORMATS:
        return Rejection("unsupported_format", f"format {img.format}")
    if img.mode == "F":
        return Rejection("unsupported_mode", "floating-point pixels have no defined 8-bit range")
    width, height = _oriented_size(img)
    if width * height > recipe.max_pixels:
        return Rejection("too_many_pixels", f"{width}x{height} > {recipe.max_pixels} pixels")
    if min(width, height) < recipe.min_size:
        return Rejection("too_small", f"{width}x{height}, shorter side < {recipe.min_size}")
    if max(width, height) / min(width, height) > recipe.max_aspect_ratio:
        return Rejection(
            "extreme_aspect_ratio", f"{width}x{height} beyond {recipe.max_aspect_ratio}:1"
        )
    target = choose_size(width, height, recipe.sizes)
    if recipe.never_upscale and (width < target[0] or height < target[1]):
        return Rejection(
            "too_small", f"{width}x{height}, smaller than its output size {target[0]}x{target[1]}"
        )
    source_mode, source_format = img.mode, img.format

    try:
        if img.format in ("JPEG", "MPO"):
            # Reduce-on-decode: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT, never below the
            # size the cover-resize needs, so most of a large photo is never decoded at all.
            scale = max(target[0] / width, target[1] / height)
            need = (math.ceil(width * scale), math.ceil(height * scale))
            if (img.size[0], img.size[1]) != (width, height):  # EXIF will swap the axes
                need = (need[1], need[0])
            img.draft(img.mode if img.mode in ("RGB", "L") else None, need)
        img.seek(0)  # first frame of an animation
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy for upright images
    except Exception as err:  # OSError for truncated data, SyntaxError / struct.error for corrupt
        return Rejection("truncated_or_corrupt", f"{type(err).__name__}: {err}")
    try:
        rgb = to_rgb(img, recipe.background)
    except ValueError as err:
        return Rejection("unsupported_mode", f"mode {source_mode}: {err}")
    # Already the output size (e.g. after reduce-on-decode): no resampling pass.
    out = rgb if rgb.size == target else resize_cover(rgb, target)

    return PreparedImage(
        data=encode_image(out, recipe.image_format, recipe.jpeg_quality),
        width=out.width,
        height=out.height,
        source_width=width,
        source_height=height,
        source_format=source_format,
        source_mode=source_mode,
        phash=perceptual_hash(out),
    )
