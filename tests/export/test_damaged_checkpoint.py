"""A checkpoint whose weight files cannot be read is a CheckpointError naming it (the CLI prints
it in one line), not diffusers' OSError."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_checkpoints import make_checkpoint

from lumos.checkpoints import load_checkpoint
from lumos.errors import CheckpointError, LumosError


def test_truncated_weights_are_a_checkpoint_error(tmp_path: Path) -> None:
    uri, _ = make_checkpoint(tmp_path, "i2i", vae=False)
    [weights] = Path(uri, "transformer_ema").glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(CheckpointError, match="cannot be read") as caught:
        load_checkpoint(uri)
    assert isinstance(caught.value, LumosError) and uri in str(caught.value)
