"""A full disk while training: a real tmpfs of a few hundred KiB (tests/small_disk.py), so the
ENOSPC comes from the kernel, raised wherever torch, safetensors or Python happen to write."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lumos.checkpoints import latest_checkpoint, list_checkpoints
from lumos.storage import DiskFull, Storage
from lumos.training.train import train

sys.path.insert(0, str(Path(__file__).parents[1]))
from small_disk import small_disk  # noqa: E402


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_a_checkpoint_on_a_full_disk_fails_clearly_keeps_the_previous_and_resumes(
    images_features, tiny_config, tmp_path
):
    cfg = tiny_config(steps=4, checkpoint_every=2)
    full = train(cfg, images_features, str(tmp_path / "full"))
    one_step = _du(tmp_path / "full" / "step-0000002")

    with small_disk(tmp_path / "disk", int(one_step * 1.5)) as disk:
        out = str(disk.path / "ck")
        with pytest.raises(DiskFull) as info:
            train(cfg, images_features, out)
        message = str(info.value)
        assert "no space left on device writing" in message and out in message
        assert "needed" in message and "free on the filesystem" in message
        # The step that did not fit is not a checkpoint; the one before it is the latest.
        assert [step for step, _ in list_checkpoints(out)] == [2]
        assert latest_checkpoint(out) == f"{out}/step-0000002"
        assert Storage.from_uri(out).remove_staging() == ()  # nothing staged is left behind

        disk.resize(one_step * 10)  # room again: the rerun resumes from step 2
        again = train(cfg, images_features, out)
    assert again.resumed_from == f"{out}/step-0000002"
    want = dict(full.losses)
    assert {s: pytest.approx(want[s], rel=1e-6) for s, _ in again.losses} == dict(again.losses)


def test_the_feature_cache_on_a_full_disk_fails_clearly_and_keeps_no_partial_file(
    images_features, s3_bucket, tiny_config, tmp_path, monkeypatch
):
    """Features in the object store are downloaded to the node's cache; a cache too small for
    them fails naming the file and its size, and holds no half file a later run would read."""
    dataset = f"s3://{s3_bucket}/images"
    Storage.from_uri(dataset).upload_dir(Path(images_features) / "features", "features")
    biggest = max(o.size for o in Storage.from_uri(dataset).list("features/"))
    with small_disk(tmp_path / "cache", biggest // 2) as disk:
        monkeypatch.setenv("LUMOS_FEATURE_CACHE", str(disk.path))
        with pytest.raises(DiskFull, match=rf"writing {disk.path}/.*: .* needed, .* free"):
            train(tiny_config(steps=1), dataset, str(tmp_path / "ck"))
        cached = [p for p in disk.path.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
        for path in cached:  # whatever is there is whole (a temporary name is never read)
            key = path.name.split("-", 1)[1]
            if ".lumos-tmp-" not in path.name:
                assert path.read_bytes() == Storage.from_uri(dataset).read_bytes(f"features/{key}")
        assert not [p for p in cached if ".lumos-tmp-" in p.name]

        disk.resize(biggest * 20)
        assert train(tiny_config(steps=1), dataset, str(tmp_path / "ck")).step == 1
