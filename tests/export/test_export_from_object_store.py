"""Export of a checkpoint in the object store: export.json names the checkpoint, not the local
copy the weights were read from, and an export killed earlier leaves nothing behind once the
next one ran (its temporary directory is removed by `lumos.tempdirs`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tiny_checkpoints import make_checkpoint

from lumos.configs.export import ExportConfig
from lumos.export.onnx_export import export, read_export
from lumos.storage import Storage

# What a killed export leaves: its temporary directory, made as export makes it, then SIGKILL.
KILLED_EXPORT = (
    "import os, signal\n"
    "from lumos.tempdirs import OwnedTemporaryDirectory\n"
    "tmp = OwnedTemporaryDirectory('lumos-export-')\n"
    "open(os.path.join(tmp.name, 'model.onnx.data'), 'wb').write(b'x' * 4096)\n"
    "os.kill(os.getpid(), signal.SIGKILL)\n"
)


def test_an_s3_checkpoints_export_names_it_and_leaves_no_temporary_files(
    s3_bucket, tmp_path, monkeypatch
):
    local_uri, _ = make_checkpoint(tmp_path, "i2i", vae=False)
    checkpoint = f"s3://{s3_bucket}/runs/r1/ckpt-i2i"
    Storage.from_uri(checkpoint).upload_dir(local_uri)
    temp = tmp_path / "tmp"
    temp.mkdir()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_EXPORT], env={**os.environ, "TMPDIR": str(temp)}
    )
    assert killed.returncode == -signal.SIGKILL
    left = sorted(p.name for p in temp.iterdir())  # the directory and its lock file
    assert len(left) == 2 and left[0].startswith("lumos-export-") and left[1] == f"{left[0]}.owner"

    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr("tempfile.tempdir", None)
    cfg = ExportConfig(dynamic_batch=False, check_batch_sizes=[1])
    export(cfg, checkpoint, str(tmp_path / "export"))

    meta = read_export(str(tmp_path / "export"))
    assert meta["checkpoint"]["uri"] == checkpoint
    assert meta["model_config"]["_name_or_path"] == f"{checkpoint}/transformer_ema"
    # The killed export's directory is gone, and this export's own (and the checkpoint's copy).
    assert [p.name for p in temp.iterdir() if p.name.startswith("lumos-")] == []


def test_a_local_checkpoints_export_names_its_directory(i2i_pixel_export):
    meta = read_export(i2i_pixel_export.export_dir)
    name = meta["model_config"]["_name_or_path"]
    assert name == f"{i2i_pixel_export.checkpoint_uri}/transformer_ema"
    assert Path(name, "config.json").is_file()
