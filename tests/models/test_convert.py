"""`lumos convert`: the authors' Lumos-I2I / Lumos-T2I state dicts load strictly into ours.

The source state dicts (`authors_lumos`) have the authors' parameter names and shapes, at XL/2 on
the meta device and at a tiny width with random values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from authors_lumos import authors_forward, authors_shapes, random_state

from lumos.checkpoints import load_checkpoint
from lumos.models.convert import (
    CheckpointConversionError,
    convert_checkpoint,
    convert_state_dict,
    map_state_dict,
)

TINY_I2I = dict(depth=2, hidden=48, patch=2, in_ch=4, cond_dim=16, grid=4)
TINY_T2I = dict(depth=2, hidden=48, patch=2, in_ch=4, cond_dim=12, tokens=6, grid=4)


@pytest.mark.parametrize("source", ["lumos-i2i", "lumos-t2i"])
def test_the_released_xl2_layouts_map_onto_ours_with_nothing_left_over(source):
    state = {k: torch.empty(s, device="meta") for k, s in authors_shapes(source).items()}
    config, converted = map_state_dict(source, state)
    assert (config["depth"], config["hidden_size"], config["num_heads"]) == (28, 1152, 16)
    with torch.device("meta"):
        from lumos.models import LumosDiT

        ours = LumosDiT(**config).state_dict()
    assert set(converted) == set(ours)  # every tensor of ours filled ...
    assert len(converted) == len(state) - 1  # ... by every source tensor but the fixed pos_embed
    params = sum(v.numel() for k, v in converted.items() if k != "cond_projector.null_embedding")
    if source == "lumos-i2i":
        assert (config["input_size"], config["pos_embed_scale"]) == (32, 1.0)
        assert params == 822_006_176  # the paper's 822.0M
    else:
        assert (config["input_size"], config["pos_embed_scale"]) == (128, 2.0)
        assert (config["cond_kind"], config["cond_dim"], config["cond_tokens"]) == (
            "text",
            4096,
            120,
        )
        assert config["micro_conditions"] is True


@pytest.mark.parametrize(
    "source, dims, scale", [("lumos-i2i", TINY_I2I, 1.0), ("lumos-t2i", TINY_T2I, 2.0)]
)
def test_conversion_copies_every_weight_under_our_name(source, dims, scale):
    state = random_state(source, scale=scale, **dims)
    model = convert_state_dict(source, state, num_heads=4)
    ours = model.state_dict()
    renamed = {
        "x_embedder.proj.weight": "x_embedder.weight",
        "y_embedder.y_proj.fc1.weight": "cond_projector.mlp.fc1.weight",
        "y_embedder.y_proj.fc2.bias": "cond_projector.mlp.fc2.bias",
        "blocks.1.cross_attn.q_linear.weight": "blocks.1.cross_attn.q.weight",
        "blocks.0.cross_attn.kv_linear.bias": "blocks.0.cross_attn.kv.bias",
        "blocks.1.attn.qkv.weight": "blocks.1.attn.qkv.weight",
        "final_layer.scale_shift_table": "final_layer.scale_shift_table",
        "t_embedder.mlp.2.weight": "t_embedder.mlp.2.weight",
    }
    if source == "lumos-t2i":
        renamed["csize_embedder.mlp.0.weight"] = "csize_embedder.mlp.0.weight"
        renamed["ar_embedder.mlp.2.bias"] = "ar_embedder.mlp.2.bias"
    for theirs, name in renamed.items():
        assert torch.equal(ours[name], state[theirs]), name
    null = ours["cond_projector.null_embedding"]
    assert torch.equal(null[0], state["y_embedder.y_embedding"].reshape(null.shape[1:]))
    # Every value of the source is somewhere in ours (nothing replaced by a fresh init).
    total = sum(v.numel() for k, v in state.items() if k != "pos_embed")
    assert total == sum(v.numel() for v in ours.values())
    assert sum(v.sum().item() for k, v in state.items() if k != "pos_embed") == pytest.approx(
        sum(v.sum().item() for v in ours.values()), rel=1e-5
    )


@pytest.mark.parametrize(
    "source, dims, scale", [("lumos-i2i", TINY_I2I, 1.0), ("lumos-t2i", TINY_T2I, 2.0)]
)
def test_the_converted_model_computes_what_the_authors_model_computes(source, dims, scale):
    state = random_state(source, scale=scale, **dims)
    state = {k: v if k == "pos_embed" else v * 0.3 for k, v in state.items()}  # tame activations
    model = convert_state_dict(source, state, num_heads=4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([17, 901])
    null = state["y_embedder.y_embedding"][None].expand(2, -1, -1)  # their `null_y`
    with torch.no_grad():
        if source == "lumos-i2i":
            cls = torch.randn(2, 16, generator=gen)
            theirs = authors_forward(state, 4, x, t, F.normalize(cls, dim=-1)[:, None])
            torch.testing.assert_close(model(x, t, cls), theirs, rtol=1e-3, atol=1e-4)
            uncond = model(x, t, cls, force_drop=torch.tensor([True, True]))
            torch.testing.assert_close(
                uncond, authors_forward(state, 4, x, t, null), rtol=1e-3, atol=1e-4
            )
            return
        text = torch.randn(2, 6, 12, generator=gen)
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
        hw = torch.tensor([[48.0, 64.0], [64.0, 32.0]])
        ratio = hw[:, :1] / hw[:, 1:]  # their data_info["aspect_ratio"]: h / w
        ours = model(x, t, text, mask, micro_cond=hw)
        theirs = authors_forward(state, 4, x, t, text, mask, img_hw=hw, aspect_ratio=ratio)
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)


def test_the_null_condition_is_the_authors_y_embedding_used_as_it_is():
    """The authors normalise the CLS outside the model and replace it by y_embedding unchanged."""
    state = random_state("lumos-i2i", **TINY_I2I)
    state["y_embedder.y_embedding"] *= 3.0  # far from unit norm: a re-normalised null differs
    model = convert_state_dict("lumos-i2i", state, num_heads=4)
    cond = torch.randn(2, 16)
    tokens, _ = model.cond_projector(cond, None, torch.tensor([True, False]))
    fc1, fc2 = state["y_embedder.y_proj.fc1.weight"], state["y_embedder.y_proj.fc2.weight"]
    b1, b2 = state["y_embedder.y_proj.fc1.bias"], state["y_embedder.y_proj.fc2.bias"]

    def y_proj(v):
        return torch.nn.functional.gelu(v @ fc1.T + b1, approximate="tanh") @ fc2.T + b2

    torch.testing.assert_close(tokens[0, 0], y_proj(state["y_embedder.y_embedding"][0]))
    normed = torch.nn.functional.normalize(cond[1], dim=0)
    torch.testing.assert_close(tokens[1, 0], y_proj(normed))


def test_anything_left_over_missing_or_misshapen_is_one_error_naming_it():
    state = random_state("lumos-i2i", **TINY_I2I)
    extra = {**state, "y_embedder.extra_token": torch.zeros(3)}
    with pytest.raises(
        CheckpointConversionError, match="left over in the source: y_embedder.extra"
    ):
        convert_state_dict("lumos-i2i", extra, num_heads=4)
    missing = {k: v for k, v in state.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(
        CheckpointConversionError, match="missing from the source: blocks.1.mlp.fc2"
    ):
        convert_state_dict("lumos-i2i", missing, num_heads=4)
    bad = {**state, "blocks.0.cross_attn.kv_linear.bias": torch.zeros(95)}
    with pytest.raises(
        CheckpointConversionError, match="shape differs: blocks.0.cross_attn.kv_lin"
    ):
        convert_state_dict("lumos-i2i", bad, num_heads=4)
    moved = {**state, "pos_embed": state["pos_embed"] * 2}
    with pytest.raises(CheckpointConversionError, match="pos_embed"):
        convert_state_dict("lumos-i2i", moved, num_heads=4)
    with pytest.raises(CheckpointConversionError, match="no Lumos size"):
        convert_state_dict("lumos-i2i", state)  # width 48, depth 2: the heads are unknown
    t2i_keys = random_state("lumos-t2i", **TINY_T2I)
    with pytest.raises(CheckpointConversionError, match="left over in the source: ar_embedder"):
        convert_state_dict("lumos-i2i", t2i_keys, num_heads=4)  # the wrong --from
    with pytest.raises(CheckpointConversionError) as err:
        convert_state_dict("lumos-i2i", {**extra, **missing, **bad}, num_heads=4)
    assert "\n" not in str(err.value)  # one line, whatever is wrong


def test_convert_checkpoint_writes_a_checkpoint_finetune_can_start_from(tmp_path):
    state = random_state("lumos-i2i", **TINY_I2I)
    path = tmp_path / "Lumos_I2I.pth"
    torch.save(state, path)
    meta = convert_checkpoint("lumos-i2i", str(path), str(tmp_path / "ckpt"), num_heads=4)
    assert meta["head"] == "i2i" and meta["converted_from"]["tensors"] == len(state)
    ckpt = load_checkpoint(str(tmp_path / "ckpt"))
    assert ckpt.meta["head"] == "i2i"
    assert torch.equal(ckpt.ema_model.blocks[1].attn.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(ckpt.model.x_embedder.weight, state["x_embedder.proj.weight"])
    # A PixArt-style training file (weights under "state_dict") converts the same.
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "train.pth")
    convert_checkpoint("lumos-i2i", str(tmp_path / "train.pth"), str(tmp_path / "c2"), num_heads=4)
    with pytest.raises(CheckpointConversionError, match="no source checkpoint"):
        convert_checkpoint("lumos-i2i", str(tmp_path / "absent.pth"), str(tmp_path / "c3"))


def test_a_source_in_an_object_store_converts_as_a_local_file(tmp_path, s3_bucket):
    from safetensors.torch import save_file

    from lumos.storage import Storage

    state = random_state("lumos-i2i", **TINY_I2I)
    store = Storage.from_uri(f"s3://{s3_bucket}/released")
    torch.save(state, tmp_path / "Lumos_I2I.pth")
    save_file(state, tmp_path / "Lumos_I2I.safetensors")
    for name in ("Lumos_I2I.pth", "Lumos_I2I.safetensors"):
        store.upload_file(tmp_path / name, name)
        meta = convert_checkpoint(
            "lumos-i2i", store.key_uri(name), str(tmp_path / f"ckpt-{name}"), num_heads=4
        )
        assert meta["converted_from"]["tensors"] == len(state)
        ckpt = load_checkpoint(str(tmp_path / f"ckpt-{name}"))
        assert torch.equal(ckpt.model.x_embedder.weight, state["x_embedder.proj.weight"])
