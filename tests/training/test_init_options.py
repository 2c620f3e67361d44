"""How a fine-tune starts: from the I2I prior, from scratch (`init: scratch`), or from the
authors' released prior through `lumos convert`."""

from __future__ import annotations

import pytest
import torch
from authors_lumos import random_state
from tiny import TINY_MODEL

from lumos.checkpoints import load_checkpoint
from lumos.cli import main
from lumos.config import ConfigError
from lumos.models.convert import convert_checkpoint
from lumos.training.train import train


def test_t2i_from_scratch_trains_without_a_prior(images_features, tmp_path, tiny_config):
    result = train(tiny_config(head="t2i", init="scratch", steps=3), images_features, str(tmp_path))
    assert [step for step, _ in result.losses] == [1, 2, 3]
    meta = load_checkpoint(str(tmp_path), raw=False).meta
    assert meta["train_config"]["init"] == "scratch"
    assert meta["parent"] is None and meta["transfer_report"] is None


def test_scratch_with_an_init_checkpoint_is_a_config_error(images_features, tmp_path, tiny_config):
    prior = train(tiny_config(steps=0), images_features, str(tmp_path / "i2i"))
    with pytest.raises(ConfigError, match="init is 'scratch'"):
        train(
            tiny_config(head="t2i", init="scratch"),
            images_features,
            str(tmp_path / "t2i"),
            init_from=prior.checkpoint_uri,
        )


def test_prior_without_an_init_checkpoint_is_a_config_error(images_features, tmp_path, tiny_config):
    # No silent fallback to fresh weights: init: prior (the default) needs its checkpoint.
    with pytest.raises(ConfigError, match="init is 'prior' but no checkpoint"):
        train(tiny_config(head="t2i", steps=1), images_features, str(tmp_path / "t2i"))
    assert not (tmp_path / "t2i").exists() or not any((tmp_path / "t2i").iterdir())


def test_cli_finetune_from_scratch_and_its_missing_init(images_features, tmp_path, capsys):
    small = [
        "--set", "finetune.t2i.steps=2", "--set", "finetune.t2i.batch_size=4",
        "--set", "finetune.t2i.log_every=1", "--set", "finetune.t2i.checkpoint_every=2",
    ]  # fmt: skip
    out = str(tmp_path / "t2i")
    main(["finetune", "--head", "t2i", "--dataset", images_features, "--from-scratch",
          "--out", out, *small])  # fmt: skip
    assert load_checkpoint(out, raw=False).meta["train_config"]["init"] == "scratch"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--head", "t2i", "--dataset", images_features, "--out", out, *small])
    assert exit_.value.code == 2
    assert "give --init URI" in capsys.readouterr().err


def test_finetune_starts_from_the_authors_converted_prior(views_features, tmp_path, tiny_config):
    # The authors' LumosI2I layout at the tiny test width (features: 3 channels, 8x8, 16-d CLS).
    d = TINY_MODEL["hidden_size"]
    state = random_state(
        "lumos-i2i", depth=TINY_MODEL["depth"], hidden=d, patch=2, in_ch=3, cond_dim=16, grid=4
    )
    torch.save(state, tmp_path / "Lumos_I2I.pth")
    prior = str(tmp_path / "converted")
    convert_checkpoint(
        "lumos-i2i", str(tmp_path / "Lumos_I2I.pth"), prior, num_heads=TINY_MODEL["num_heads"]
    )
    cfg = tiny_config(head="novel_view", num_frames=3, steps=0)
    result = train(cfg, views_features, str(tmp_path / "nv"), init_from=prior)
    report = load_checkpoint(result.checkpoint_uri, raw=False).meta["transfer_report"]
    assert report["source_head"] == "i2i"
    assert "blocks.0.attn.qkv.weight" in report["loaded"]
    assert report["partially_loaded"] == ["x_embedder.weight"]  # grown by the view's channels
    model = load_checkpoint(result.checkpoint_uri, raw=False).ema_model
    assert torch.equal(model.blocks[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])
    assert torch.equal(model.final_layer.scale_shift_table, state["final_layer.scale_shift_table"])
