"""Tiny checkpoints exported once per session (each export takes a few seconds on CPU)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from tiny_checkpoints import make_checkpoint

from lumos.configs.encoders import EncodersConfig
from lumos.configs.export import ExportConfig
from lumos.export.onnx_export import ExportResult, export


@dataclass
class Exported:
    checkpoint_uri: str
    encoders: EncodersConfig
    export_dir: str
    result: ExportResult


def _export(
    tmp_path_factory: pytest.TempPathFactory, head: str, vae: bool, **model_overrides
) -> Exported:
    root = tmp_path_factory.mktemp(f"export-{head}")
    uri, encoders = make_checkpoint(root, head, vae=vae, **model_overrides)
    out = str(root / "export")
    return Exported(uri, encoders, out, export(ExportConfig(), uri, out))


@pytest.fixture(scope="session")
def t2i_vae_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """T2I head over a tiny SD-style VAE: denoiser and decoder graphs."""
    return _export(tmp_path_factory, "t2i", vae=True)


@pytest.fixture(scope="session")
def i2i_pixel_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """I2I head in pixel space: no decoder to export."""
    return _export(tmp_path_factory, "i2i", vae=False)


@pytest.fixture(scope="session")
def novel_view_pixel_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Novel-view head (3 views, camera embedding, concatenated input-view latent), pixel space."""
    return _export(tmp_path_factory, "novel_view", vae=False)


@pytest.fixture(scope="session")
def video_v_pixel_export(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """Video head (3 frames, frame attention, first-frame latent) predicting v, pixel space."""
    return _export(tmp_path_factory, "video", vae=False, prediction_type="v_prediction")
