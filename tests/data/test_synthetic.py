"""The embedded default dataset: layout, sidecars, determinism, complete groups, splits."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from lumos.configs.data import SynthConfig
from lumos.data.synthetic import (
    BACKGROUND,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    caption_for,
    generate_default_dataset,
)

SMALL = SynthConfig(
    num_images=24,
    num_objects=5,
    views_per_object=3,
    num_clips=4,
    frames_per_clip=3,
    eval_fraction=0.2,
    seed=7,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("synth")
    result = generate_default_dataset(SMALL, str(root))
    return root, result


def test_layout_and_counts(small_dataset) -> None:
    root, result = small_dataset
    files = _files(root)
    pngs = [k for k in files if k.endswith(".png")]
    assert {k.split("/")[0] for k in files} == {"images", "views", "clips"}
    assert len(pngs) == 24 + 5 * 3 + 4 * 3 == result.num_files
    assert result.counts == {"images": 24, "views": 15, "clips": 12}
    # Every PNG has its sidecar and nothing else is written.
    assert sorted(files) == sorted([k for p in pngs for k in (p, p[:-4] + ".json")])
    assert "views/obj-0004-v02.png" in files and "clips/clip-0003-f02.png" in files
    for key in pngs:
        image = Image.open(io.BytesIO(files[key]))
        assert image.mode == "RGB" and image.size == (64, 64)


def test_image_sidecars_are_exact(small_dataset) -> None:
    root, _ = small_dataset
    for side in sorted((root / "images").glob("*.json")):
        meta = json.loads(side.read_text())
        attrs = meta["attributes"]
        assert attrs["color"] in PALETTE and attrs["shape"] in SHAPES and attrs["size"] in SIZES
        assert attrs["position"] in POSITIONS and attrs["texture"] in TEXTURES
        assert meta["caption"] == caption_for(attrs)
        assert meta["split"] in ("train", "eval")
        # The object's dominant colour really is the named palette colour.
        image = np.asarray(Image.open(side.with_suffix(".png")))
        fg = np.abs(image.astype(int) - BACKGROUND).sum(-1) > 150
        counts = {
            name: int(np.sum(np.abs(image[fg].astype(int) - rgb).sum(-1) < 30))
            for name, rgb in PALETTE.items()
        }
        assert max(counts, key=counts.get) == attrs["color"], side.name


def test_caption_template() -> None:
    attrs = {
        "color": "red",
        "shape": "circle",
        "size": "large",
        "position": "top left",
        "texture": "striped",
    }
    assert caption_for(attrs) == "a large red striped circle at the top left"
    assert (
        caption_for({**attrs, "texture": "plain", "size": "small"})
        == "a small red circle at the top left"
    )


def test_groups_complete_with_cameras_and_one_split(small_dataset) -> None:
    root, result = small_dataset
    groups: dict[str, list[dict]] = {}
    for side in sorted((root / "views").glob("*.json")) + sorted((root / "clips").glob("*.json")):
        meta = json.loads(side.read_text())
        groups.setdefault(meta["group"], []).append(meta)
    assert len(groups) == 5 + 4
    for name, metas in groups.items():
        n = 3
        assert sorted(m["index"] for m in metas) == list(range(n)), name
        assert len({m["split"] for m in metas}) == 1, f"{name} is split across train and eval"
        if name.startswith("obj-"):
            azimuths = sorted(m["camera"]["azimuth"] for m in metas)
            assert azimuths == [0.0, 120.0, 240.0]
            assert all(
                m["camera"]["elevation"] == 20.0 and m["camera"]["radius"] == 2.5 for m in metas
            )
    # About eval_fraction of each part is eval, never all of it.
    assert result.eval_counts == {"images": 5, "objects": 1, "clips": 1}


def test_frames_and_views_all_differ(small_dataset) -> None:
    root, _ = small_dataset
    for folder in ("views", "clips"):
        pngs = sorted((root / folder).glob("*.png"))
        by_group: dict[str, list[np.ndarray]] = {}
        for p in pngs:
            by_group.setdefault(p.stem.rsplit("-", 1)[0], []).append(
                np.asarray(Image.open(p)).astype(int)
            )
        for group, frames in by_group.items():
            for a, b in zip(frames, frames[1:], strict=False):
                assert np.abs(a - b).mean() > 1.0, f"{group}: consecutive images are the same"


def test_same_seed_is_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    cfg = SynthConfig(
        num_images=6, num_objects=2, views_per_object=2, num_clips=2, frames_per_clip=2, seed=3
    )
    generate_default_dataset(cfg, str(tmp_path / "a"))
    generate_default_dataset(cfg, str(tmp_path / "b"))
    generate_default_dataset(cfg.model_copy(update={"seed": 4}), str(tmp_path / "c"))
    a, b, c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_refuses_to_mix_with_existing_files(tmp_path: Path) -> None:
    cfg = SynthConfig(num_images=2, num_objects=0, num_clips=0)
    generate_default_dataset(cfg, str(tmp_path))
    with pytest.raises(FileExistsError, match="empty location"):
        generate_default_dataset(cfg, str(tmp_path))


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError, match="extra"):
        SynthConfig(num_imgs=3)
    with pytest.raises(ValidationError, match="multiple of 8"):
        SynthConfig(resolution=60)
    with pytest.raises(ValidationError, match="too many"):
        SynthConfig(frames_per_clip=40)


def test_writes_to_s3(s3_bucket: str) -> None:
    from lumos.storage import Storage

    cfg = SynthConfig(
        num_images=3, num_objects=1, views_per_object=2, num_clips=1, frames_per_clip=2
    )
    result = generate_default_dataset(cfg, f"s3://{s3_bucket}/raw")
    keys = [info.key for info in Storage.from_uri(f"s3://{s3_bucket}/raw").list()]
    assert len(keys) == 2 * result.num_files == 2 * (3 + 2 + 2)
    assert "views/obj-0000-v01.json" in keys
