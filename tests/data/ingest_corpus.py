"""Generated raw corpora for the ingest tests (a helper module, imported by the tests): good images of every format and mode, and every
kind of bad input ingest must account for."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def scene(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A structured random image (shapes on a gradient): distinct seeds give distinct pHashes."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 1, w)[None, :, None] * rng.integers(0, 255, 3)[None, None, :]
    base = base + np.linspace(0, 1, h)[:, None, None] * rng.integers(0, 255, 3)[None, None, :]
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, w - 8)), int(rng.integers(0, h - 8))
        x1, y1 = x0 + int(rng.integers(6, w // 2)), y0 + int(rng.integers(6, h // 2))
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        else:
            draw.ellipse((x0, y0, x1, y1), fill=color)
    return img


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(side: int = 9_000) -> bytes:
    """A tiny file whose header claims side x side pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1) * 4)  # a few rows; PIL must never try to decode it
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def good_images() -> dict[str, bytes]:
    """Every accepted format and mode, each a distinct scene."""
    files: dict[str, bytes] = {}
    files["good/jpeg.jpg"] = encode(scene(1), "JPEG", quality=92)
    files["good/png.png"] = encode(scene(2), "PNG")
    files["good/webp.webp"] = encode(scene(3), "WEBP", lossless=True)
    frames = [scene(4), scene(5)]
    gif = io.BytesIO()
    frames[0].convert("P").save(gif, "GIF", save_all=True, append_images=[frames[1].convert("P")])
    files["good/anim.gif"] = gif.getvalue()
    files["good/bmp.bmp"] = encode(scene(6), "BMP")
    files["good/tiff.tif"] = encode(scene(7), "TIFF")
    files["modes/gray.png"] = encode(scene(8).convert("L"), "PNG")
    la = scene(9).convert("LA")
    files["modes/gray_alpha.png"] = encode(la, "PNG")
    rgba = scene(10).convert("RGBA")
    rgba.putalpha(128)
    files["modes/rgba.png"] = encode(rgba, "PNG")
    pal = scene(11).convert("P")
    files["modes/palette.png"] = encode(pal, "PNG", transparency=0)
    files["modes/cmyk.jpg"] = encode(scene(12).convert("CMYK"), "JPEG", quality=92)
    gray16 = (np.asarray(scene(13).convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    files["modes/gray16.png"] = encode(Image.fromarray(gray16), "PNG")
    files["modes/rgb16.png"] = png_rgb16(np.asarray(scene(14), dtype=np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    files["good/rotated.jpg"] = encode(scene(15, (48, 64)), "JPEG", quality=92, exif=exif)
    return files


def bad_inputs() -> dict[str, tuple[bytes, str]]:
    """Source key -> (content, expected rejection reason)."""
    jpeg = encode(scene(20, (128, 96)), "JPEG", quality=90)
    corrupt = bytearray(encode(scene(21), "PNG"))
    mid = len(corrupt) // 2
    corrupt[mid : mid + 64] = np.random.default_rng(0).bytes(64)  # image data scrambled
    return {
        "bad/empty.jpg": (b"", "empty_file"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated_or_corrupt"),
        "bad/corrupt.png": (bytes(corrupt), "truncated_or_corrupt"),
        "bad/text.png": (b"this is not a png at all\n" * 10, "not_an_image"),
        "bad/tiny.png": (encode(scene(22, (16, 16)), "PNG"), "too_small"),
        "bad/panorama.png": (encode(scene(23, (256, 40)), "PNG"), "extreme_aspect_ratio"),
        "bad/bomb.png": (png_bomb(), "too_many_pixels"),
        "bad/icon.png": (encode(scene(24, (64, 64)), "ICO"), "unsupported_format"),
        "bad/float.tif": (
            encode(Image.fromarray(np.ones((48, 64), np.float32)), "TIFF"),
            "unsupported_mode",
        ),
        "bad/notes.md": (b"# notes\n", "unsupported_extension"),
        "bad/orphan.json": (b'{"caption": "nobody"}', "orphan_sidecar"),
    }


def build_corpus() -> dict[str, bytes]:
    """The whole raw corpus: source key -> bytes (sidecars included)."""
    files = dict(good_images())
    for key, (data, _) in bad_inputs().items():
        files[key] = data
    # Sidecars: a caption file, a JSON with attributes, and an invalid JSON sidecar.
    files["good/jpeg.txt"] = b"a photo with shapes\n"
    files["good/png.json"] = json.dumps(
        {"caption": "shapes on a gradient", "attributes": {"color": "red"}, "split": "eval"}
    ).encode()
    files["bad/badside.png"] = encode(scene(30), "PNG")
    files["bad/badside.json"] = b"{not json"
    # Duplicates: the same bytes twice, and a re-encoded copy of another image.
    files["later/copy_of_png.png"] = files["good/png.png"]
    files["later/reencoded.jpg"] = encode(scene(1), "JPEG", quality=75)
    return files


CORPUS_REJECTIONS = {k: reason for k, (_, reason) in bad_inputs().items()} | {
    "bad/badside.png": "invalid_sidecar"
}


def write_local(files: dict[str, bytes], root: Path) -> Path:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_report(dataset: Path | str, manifest: dict) -> list[dict]:
    from lumos.storage import Storage

    store = Storage.from_uri(str(dataset))
    rows = []
    for line in store.read_bytes(manifest["runs"][-1]["report"]).decode().splitlines():
        rows.append(json.loads(line))
    return rows
