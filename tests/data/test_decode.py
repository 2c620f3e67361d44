"""prepare_image: every format and mode becomes the right 8-bit RGB pixels; bad input is rejected."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ingest_corpus import bad_inputs, encode, good_images, png_bomb, scene
from PIL import Image

from lumos.configs.data import IngestConfig
from lumos.data.decode import (
    PreparedImage,
    Rejection,
    cover_crop_box,
    prepare_image,
    resize_cover,
)
from lumos.data.dedup import DedupIndex, DuplicateMatch, hamming_distance, perceptual_hash

RECIPE = IngestConfig(resolution=32, image_format="png").recipe()


def reference(img: Image.Image, size=(32, 32)) -> np.ndarray:
    """What a correct pipeline makes of an RGB image: cover-resize and centre-crop."""
    box = cover_crop_box(img.width, img.height, size)
    out = img.convert("RGB").resize(size, Image.Resampling.BICUBIC, box=box)
    return np.asarray(out, dtype=np.float64)


def decoded(result: PreparedImage | Rejection) -> np.ndarray:
    assert isinstance(result, PreparedImage), result
    return np.asarray(Image.open(io.BytesIO(result.data)).convert("RGB"), dtype=np.float64)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.mark.parametrize("key", sorted(good_images()))
def test_every_supported_format_and_mode_is_prepared(key):
    result = prepare_image(good_images()[key], RECIPE)
    assert isinstance(result, PreparedImage), result
    assert (result.width, result.height) == (32, 32)
    assert decoded(result).shape == (32, 32, 3)


# Rejections decided from the file name (before any decoding) are tested through ingest.
BY_CONTENT = [
    k for k, (_, r) in bad_inputs().items() if r not in ("unsupported_extension", "orphan_sidecar")
]


@pytest.mark.parametrize("key", sorted(BY_CONTENT))
def test_bad_input_is_rejected_with_its_reason(key):
    data, reason = bad_inputs()[key]
    result = prepare_image(data, RECIPE)
    assert isinstance(result, Rejection) and result.reason == reason, result


def test_alpha_is_composited_on_the_background():
    img = scene(10).convert("RGBA")
    img.putalpha(128)
    for background in [(255, 255, 255), (0, 0, 0)]:
        recipe = IngestConfig(resolution=32, image_format="png", background=background).recipe()
        out = decoded(prepare_image(encode(img, "PNG"), recipe))
        expected = reference(scene(10)) * (128 / 255) + np.array(background) * (127 / 255)
        assert mean_abs(out, expected) < 2.0


def test_16_bit_and_cmyk_keep_their_colours():
    gray = scene(13).convert("L")
    gray16 = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)
    out = decoded(prepare_image(encode(gray16, "PNG"), RECIPE))
    assert mean_abs(out, reference(gray)) < 1.5  # PIL's own convert would give all white

    cmyk = encode(scene(12).convert("CMYK"), "JPEG", quality=95)
    assert mean_abs(decoded(prepare_image(cmyk, RECIPE)), reference(scene(12))) < 8.0


def test_exif_orientation_is_applied():
    upright = scene(15, (64, 48))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 48x64 on disk
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    result = prepare_image(encode(stored, "JPEG", quality=95, exif=exif), RECIPE)
    assert (result.source_width, result.source_height) == (64, 48)
    assert mean_abs(decoded(result), reference(upright)) < 8.0
    assert mean_abs(decoded(result), reference(stored)) > 20.0


def test_gif_uses_the_first_frame():
    first, second = scene(4).convert("P"), scene(5).convert("P")
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second])
    out = decoded(prepare_image(buf.getvalue(), RECIPE))
    assert mean_abs(out, reference(first.convert("RGB"))) < mean_abs(out, reference(second))


def test_jpeg_reduce_on_decode_matches_a_full_decode():
    big = scene(40, (800, 600))
    data = encode(big, "JPEG", quality=95)
    full = Image.open(io.BytesIO(data)).convert("RGB")
    out = decoded(prepare_image(data, RECIPE))
    assert mean_abs(out, reference(full)) < 3.0


@pytest.mark.parametrize(
    "size,target",
    [((300, 200), (64, 64)), ((97, 61), (48, 32)), ((61, 97), (32, 48)), ((40, 30), (64, 64))],
)
def test_cover_resize_matches_a_bicubic_reference(size, target):
    """OpenCV's area averaging (shrinking, also by non-integer factors) and bicubic (enlarging)
    give what Pillow's antialiased bicubic gives, centre crop included."""
    img = scene(44, size)
    out = np.asarray(resize_cover(img, target), dtype=np.float64)
    assert out.shape == (target[1], target[0], 3)
    assert mean_abs(out, reference(img, target)) < 3.0


def test_aspect_buckets_and_size_limits():
    cfg = IngestConfig(aspect_buckets=[(32, 32), (64, 32), (32, 64)], image_format="png")
    wide = prepare_image(encode(scene(41, (200, 96)), "PNG"), cfg.recipe())
    tall = prepare_image(encode(scene(42, (96, 200)), "PNG"), cfg.recipe())
    assert (wide.width, wide.height) == (64, 32) and (tall.width, tall.height) == (32, 64)
    # min_size defaults to the output size: never upscale.
    assert prepare_image(encode(scene(43, (31, 40)), "PNG"), RECIPE).reason == "too_small"
    # With buckets too: a 40x40 source passes the smallest bucket side (32) but its bucket is
    # 32x32; a 60x40 one goes to 64x32, which it does not cover.
    assert prepare_image(encode(scene(44, (40, 40)), "PNG"), cfg.recipe()).width == 32
    too_small = prepare_image(encode(scene(45, (60, 40)), "PNG"), cfg.recipe())
    assert too_small.reason == "too_small" and "output size 64x32" in too_small.detail
    explicit = cfg.model_copy(update={"min_size": 32}).recipe()  # an explicit minimum may upscale
    assert prepare_image(encode(scene(45, (60, 40)), "PNG"), explicit).width == 64
    # PIL's own decompression-bomb error is reported the same way as ours.
    assert prepare_image(png_bomb(40_000), RECIPE).reason == "too_many_pixels"
    with pytest.raises(ValueError, match="multiples of 8"):
        IngestConfig(aspect_buckets=[(30, 32)])
    with pytest.raises(ValueError, match="extra"):
        IngestConfig(resolutoin=64)


def test_perceptual_hash_separates_distinct_and_matches_near_copies():
    a, b = scene(1, (128, 96)), scene(2, (128, 96))
    ha, hb = perceptual_hash(a), perceptual_hash(b)
    near = Image.open(io.BytesIO(encode(a.resize((120, 90)), "JPEG", quality=70)))
    assert hamming_distance(ha, perceptual_hash(near)) <= 4
    assert hamming_distance(ha, hb) > 12


def test_dedup_index_finds_exactly_the_hashes_within_distance(tmp_path):
    rng = np.random.default_rng(0)
    stored = [int(x) for x in rng.integers(0, 2**63, 300, dtype=np.int64)]
    index = DedupIndex(near_distance=5)
    for i, h in enumerate(stored):
        index.add(f"k{i}", bytes([i % 256]) * 32, h)
    for trial in range(200):
        base = stored[trial % len(stored)]
        flips = rng.choice(64, size=int(rng.integers(0, 9)), replace=False)
        query = base
        for bit in flips:
            query ^= 1 << int(bit)
        brute = min(
            ((hamming_distance(query, h), i) for i, h in enumerate(stored)), default=(99, -1)
        )
        match = index.find_near(query)
        if brute[0] <= 5:
            assert match is not None and (match.distance, match.key) == (brute[0], f"k{brute[1]}")
        else:
            assert match is None
    # Saved and loaded back (as runs do for later incremental runs), full 64-bit hashes included.
    index.add("top-bit", b"\xff" * 32, 2**64 - 1)
    path = tmp_path / "index.jsonl.gz"
    index.export(path, start=0)
    clone = DedupIndex(near_distance=5)
    with open(path, "rb") as stream:
        clone.load(stream, path.name)
    assert len(clone) == len(stored) + 1 and "k7" in clone and "k-missing" not in clone
    assert clone.find_near(stored[7]).key == "k7"
    assert clone.find_exact(bytes([7]) * 32).key == "k7"
    assert clone.find_near(2**64 - 2) == DuplicateMatch("top-bit", "near", 1)


def test_dedup_index_loads_the_npz_index_of_earlier_datasets():
    # Datasets written before the index moved to disk saved it as .npz; incremental runs into
    # them still load it.
    buf = io.BytesIO()
    np.savez(
        buf,
        keys=np.array(["a", "b"], dtype=np.str_),
        digests=np.array([b"\x01" * 32, b"\x02" * 32], dtype="S32"),
        phashes=np.array([2**64 - 1, 5], dtype=np.uint64),
    )
    index = DedupIndex(near_distance=4)
    index.load(io.BytesIO(buf.getvalue()), "index/dedup-old.npz")
    assert len(index) == 2 and "b" in index
    assert index.find_exact(b"\x02" * 32) == DuplicateMatch("b", "exact", 0)
    assert index.find_near(2**64 - 1) == DuplicateMatch("a", "near", 0)
