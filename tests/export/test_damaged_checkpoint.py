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


def test_weights_of_another_model_layout_are_a_checkpoint_error(tmp_path: Path) -> None:
    """A checkpoint written before the final layer became PixArt's: diffusers loads it with a
    warning and the table left on the meta device (an obscure error at the first use)."""
    from safetensors.torch import load_file, save_file

    uri, _ = make_checkpoint(tmp_path, "i2i", vae=False)
    [weights] = Path(uri, "transformer").glob("*.safetensors")
    tensors = load_file(weights)
    table = tensors.pop("final_layer.scale_shift_table")  # (2, D)
    d = table.shape[1]
    tensors["final_layer.adaLN_modulation.1.weight"] = table.new_zeros(2 * d, d)
    tensors["final_layer.adaLN_modulation.1.bias"] = table.new_zeros(2 * d)
    save_file(tensors, weights)
    load_checkpoint(uri, raw=False)  # the EMA weights are intact
    with pytest.raises(CheckpointError, match="another layout") as caught:
        load_checkpoint(uri)
    message = str(caught.value)
    assert "final_layer.scale_shift_table" in message and "adaLN_modulation" in message
    assert uri in message and "\n" not in message
