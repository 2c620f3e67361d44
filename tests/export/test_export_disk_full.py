"""An export onto a full disk: a real tmpfs of a few KiB (tests/small_disk.py), for the export's
output directory and for its temporary directory."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from tiny_checkpoints import make_checkpoint

from lumos.configs.export import ExportConfig
from lumos.export.onnx_export import EXPORT_JSON, export, read_export
from lumos.storage import DiskFull, ObjectNotFound

sys.path.insert(0, str(Path(__file__).parents[1]))
from small_disk import small_disk  # noqa: E402

CONFIG = ExportConfig(dynamic_batch=False, check_batch_sizes=[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt"), "i2i", vae=False)[0]


def test_an_export_onto_a_full_disk_fails_clearly_and_is_never_read(checkpoint, tmp_path):
    with small_disk(tmp_path / "disk", 16 * 1024) as disk:
        out = disk.path / "export"
        with pytest.raises(DiskFull, match=rf"writing {out}/\S+: \S+ \S+ needed, .* free"):
            export(CONFIG, checkpoint, str(out))
        # export.json goes last: without it nothing reads the graphs that did fit.
        assert not (out / EXPORT_JSON).exists()
        assert not [p for p in out.rglob("*") if ".lumos-tmp-" in p.name]
        with pytest.raises(ObjectNotFound, match=EXPORT_JSON):
            read_export(str(out))

        disk.resize(64 * 1024 * 1024)  # room again: the same export completes
        assert export(CONFIG, checkpoint, str(out)).files
        assert read_export(str(out))["head"] == "i2i"


def test_a_full_temporary_disk_names_it(checkpoint, tmp_path, monkeypatch):
    with small_disk(tmp_path / "tmp", 16 * 1024) as disk:
        monkeypatch.setattr(tempfile, "tempdir", str(disk.path))  # what TMPDIR sets
        with pytest.raises(DiskFull, match=rf"writing {disk.path}/lumos-export-\S+: at least "):
            export(CONFIG, checkpoint, str(tmp_path / "export"))
        assert list(disk.path.iterdir()) == []  # the temporary directory went with the error
    assert not (tmp_path / "export").exists()
