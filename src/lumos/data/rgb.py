"""8-bit RGB from any supported image mode: how ingest converts training images, and how the
model server converts request images the same way (no OpenCV here: the serving image lacks it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Convert any supported mode to 8-bit RGB; alpha is composited on `background`.

    Raises ValueError for modes without a faithful conversion (the caller rejects the image).
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16"):
        # 16-bit grayscale: keep the high byte (PIL's convert would clip everything above 255 to white).
        pixels = np.asarray(img).astype(np.uint16) >> 8
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if mode == "I":
        # 32-bit integer grayscale, as PIL holds 16-bit sources: scale the 16-bit range to 8 bits.
        pixels = np.clip(np.asarray(img), 0, 65535).astype(np.uint32) >> 8
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        raise ValueError("floating-point pixels have no defined 8-bit range")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    # L, 1, P without transparency, CMYK (PIL undoes Adobe's inverted CMYK when decoding), YCbCr.
    return img.convert("RGB")
