"""Contract tests of the Lumos transformer for every registry size, at tiny width."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lumos.diffusion import GaussianDiffusion
from lumos.models import LUMOS_SIZES, LumosDiT, lumos_dit, lumos_dit_config
from lumos.models.lumos_dit import (
    CrossAttention,
    apply_rotary,
    get_2d_sincos_pos_embed,
    rotary_2d,
)

LATENT = 8  # latent grid of the tiny tests
COND_DIM = 16


def tiny_config(size: str, **overrides) -> dict:
    """The size's patch and head structure with a tiny width and depth."""
    heads = LUMOS_SIZES[size]["num_heads"]
    base = dict(hidden_size=heads * 8, depth=2, input_size=LATENT, cond_dim=COND_DIM)
    return lumos_dit_config(size, **{**base, **overrides})


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere: zero-initialised layers would make many checks vacuous."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def inputs(batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, LATENT, LATENT, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    cond = torch.randn(batch, COND_DIM, generator=gen)
    return x, t, cond


@pytest.mark.parametrize("size", sorted(LUMOS_SIZES))
def test_output_shape(size):
    model = LumosDiT(**tiny_config(size)).eval()
    x, t, cond = inputs()
    out = model(x, t, cond)
    assert out.shape == (2, 8, LATENT, LATENT)  # epsilon (4) + learned variance (4)


@pytest.mark.parametrize("size", sorted(LUMOS_SIZES))
def test_seeded_construction_is_deterministic(size):
    torch.manual_seed(0)
    a = LumosDiT(**tiny_config(size)).eval()
    torch.manual_seed(0)
    b = LumosDiT(**tiny_config(size)).eval()
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    randomize(a)
    randomize(b)
    x, t, cond = inputs()
    assert torch.equal(a(x, t, cond), b(x, t, cond))


@pytest.mark.parametrize("size", sorted(LUMOS_SIZES))
def test_save_load_round_trip_keeps_outputs_and_null_embedding(size, tmp_path):
    model = randomize(LumosDiT(**tiny_config(size))).eval()
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert "cond_projector.null_embedding" in saved, "the null embedding must be saved"
    assert (
        json.loads((tmp_path / "config.json").read_text())["hidden_size"]
        == model.config.hidden_size
    )

    torch.manual_seed(123)  # a different RNG state: a re-drawn null buffer would differ
    loaded = LumosDiT.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.cond_projector.null_embedding, model.cond_projector.null_embedding)
    x, t, cond = inputs()
    drop = torch.tensor([False, True])
    assert torch.equal(model(x, t, cond, force_drop=drop), loaded(x, t, cond, force_drop=drop))


@pytest.mark.parametrize("size", sorted(LUMOS_SIZES))
def test_one_training_step_is_finite(size):
    torch.manual_seed(0)
    model = LumosDiT(**tiny_config(size)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diffusion = GaussianDiffusion()
    x, _, cond = inputs(batch=4)
    t = torch.tensor([0, 10, 500, 999])
    losses = diffusion.training_losses(model, x, t, {"cond": cond})
    loss = losses["loss"].mean()
    assert torch.isfinite(loss)
    before = model.final_layer.linear.weight.detach().clone()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    opt.step()
    assert not torch.equal(before, model.final_layer.linear.weight), "the step changed nothing"


def test_xl2_parameter_count_matches_the_paper():
    """XL/2 as the authors' LumosI2I_XL_2 (DINO ViT-B/16 CLS, 768-d): 822.0M parameters.

    28 blocks x 29,218,176 (self-attention 4D^2+4D, cross-attention 4D^2+4D, MLP 8D^2+5D, the
    block's adaLN 6D^2+6D; D = 1152) = 818,108,928; condition MLP 768 -> 1152 -> 1152: 2,214,144;
    timestep MLP 256 -> 1152 -> 1152: 1,624,320; final layer (PixArt's table, 2D, plus the
    linear to 2 x 2 x 8): 39,200; patch embedding 4 -> 1152 at 2 x 2: 19,584.
    """
    with torch.device("meta"):
        model = lumos_dit("XL/2")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 822.0e6) / 822.0e6 < 0.001, f"XL/2 has {count / 1e6:.2f}M parameters"
    by_part: dict[str, int] = {}
    for name, p in model.named_parameters():
        by_part[name.split(".")[0]] = by_part.get(name.split(".")[0], 0) + p.numel()
    assert by_part == {
        "x_embedder": 19_584,
        "t_embedder": 1_624_320,
        "cond_projector": 2_214_144,
        "blocks": 818_108_928,
        "final_layer": 39_200,
    }
    assert count == 822_006_176


def test_final_layer_is_pixarts_table_plus_timestep_embedding():
    model = randomize(LumosDiT(**tiny_config("tiny"))).eval()
    final = model.final_layer
    d = model.config.hidden_size
    assert [n for n, _ in final.named_parameters()] == [
        "scale_shift_table",
        "linear.weight",
        "linear.bias",
    ]
    x = torch.randn(2, 5, d)
    c = torch.randn(2, d)
    shift = final.scale_shift_table[0] + c  # (2, D): row 0 shifts, row 1 scales
    scale = final.scale_shift_table[1] + c
    normed = torch.nn.functional.layer_norm(x, (d,), eps=1e-6)
    expected = final.linear(normed * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(final(x, c), expected)
    # Initialised as PixArt: table ~ N(0, 1/D), output projection zero.
    torch.manual_seed(0)
    wide = LumosDiT(**tiny_config("tiny", hidden_size=512, num_heads=8))
    table = wide.final_layer.scale_shift_table
    assert table.shape == (2, 512)
    assert abs(table.std().item() - 512**-0.5) < 0.1 * 512**-0.5
    assert torch.count_nonzero(wide.final_layer.linear.weight) == 0


def test_size_and_aspect_embedders_are_pixart_ms():
    cfg = tiny_config(
        "tiny", hidden_size=48, cond_kind="text", cond_tokens=5, micro_conditions=True
    )
    model = randomize(LumosDiT(**cfg)).eval()
    third = 48 // 3
    assert model.csize_embedder.mlp[0].weight.shape == (third, 256)
    assert model.ar_embedder.mlp[2].weight.shape == (third, third)
    size = torch.tensor([[64.0, 96.0]])
    # csize embeds height and width separately (2 x D/3), the aspect ratio h / w once (D/3).
    emb_h = model.csize_embedder(size[:, :1])
    emb_w = model.csize_embedder(size[:, 1:])
    torch.testing.assert_close(model.csize_embedder(size), torch.cat([emb_h, emb_w], dim=1))
    assert model.csize_embedder(size).shape == (1, 2 * third)
    # The model adds [csize(h, w), ar(h / w)] to the timestep embedding: a block sees exactly it.
    seen = {}
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.update(c=args[1]))
    x, t, _ = inputs(batch=1)
    model(x, t, torch.randn(1, 5, COND_DIM), micro_cond=size)
    expected = model.t_embedder(t) + torch.cat(
        [emb_h, emb_w, model.ar_embedder(torch.tensor([[64.0 / 96.0]]))], dim=1
    )
    torch.testing.assert_close(seen["c"], expected)
    # The authors' initialisation: N(0, 0.02) weights, so the sizes matter from the first step.
    fresh = LumosDiT(**cfg)
    assert 0.01 < fresh.ar_embedder.mlp[2].weight.std().item() < 0.03


def test_a_width_not_divisible_by_three_leaves_its_last_channels_without_sizes():
    cfg = tiny_config(
        "tiny", hidden_size=32, cond_kind="text", cond_tokens=5, micro_conditions=True
    )
    model = randomize(LumosDiT(**cfg)).eval()
    seen = {}
    model.blocks[0].register_forward_hook(lambda mod, args, out: seen.update(c=args[1]))
    x, t, _ = inputs()
    text = torch.randn(2, 5, COND_DIM)
    model(x, t, text, micro_cond=torch.tensor([[64.0, 64.0], [32.0, 96.0]]))
    c = seen["c"]
    torch.testing.assert_close(c[:, 30:], model.t_embedder(t)[:, 30:])  # 32 - 3 * 10 = 2 left
    assert not torch.allclose(c[:, :30], model.t_embedder(t)[:, :30])


def test_single_token_shortcut_equals_general_attention():
    torch.manual_seed(0)
    attn = randomize(CrossAttention(32, 4))
    x = torch.randn(3, 10, 32)
    c = torch.randn(3, 1, 32)
    general = attn.forward_general(x, c)
    shortcut = attn(x, c)  # takes the shortcut: one token, no mask
    torch.testing.assert_close(shortcut, general, rtol=1e-5, atol=1e-6)


def test_text_condition_ignores_padding_tokens():
    cfg = tiny_config("tiny", cond_kind="text", cond_tokens=5, micro_conditions=True)
    model = randomize(LumosDiT(**cfg)).eval()
    x, t, _ = inputs()
    text = torch.randn(2, 5, COND_DIM)
    mask = torch.tensor([[True, True, True, False, False]] * 2)
    micro = torch.tensor([[64.0, 64.0], [64.0, 96.0]])
    out = model(x, t, text, mask, micro_cond=micro)
    changed = text.clone()
    changed[:, 3:] = torch.randn(2, 2, COND_DIM)
    torch.testing.assert_close(model(x, t, changed, mask, micro_cond=micro), out)
    assert not torch.allclose(model(x, t, text, mask, micro_cond=micro.flip(1)), out)


def test_force_drop_replaces_the_condition_with_the_null_embedding():
    model = randomize(LumosDiT(**tiny_config("tiny"))).eval()
    x, t, cond = inputs()
    drop = torch.tensor([True, True])
    a = model(x, t, cond, force_drop=drop)
    b = model(x, t, torch.randn_like(cond), force_drop=drop)
    assert torch.equal(a, b)
    assert not torch.allclose(model(x, t, cond), a)


def test_condition_dropout_only_in_training():
    model = randomize(LumosDiT(**tiny_config("tiny", cond_dropout_prob=1.0)))
    x, t, cond = inputs()
    null = model.eval()(x, t, cond, force_drop=torch.tensor([True, True]))
    torch.testing.assert_close(model.train()(x, t, cond), null)
    assert not torch.allclose(model.eval()(x, t, cond), null)


@pytest.mark.parametrize("frame_attention", [False, True])
def test_multi_frame_at_init_equals_the_single_frame_model_per_frame(frame_attention):
    single = randomize(LumosDiT(**tiny_config("tiny"))).eval()
    multi = LumosDiT(
        **tiny_config("tiny", num_frames=3, frame_embed="index", frame_attention=frame_attention)
    ).eval()
    assert (multi.frame_blocks is not None) == frame_attention
    state = multi.state_dict()
    # Temporal and frame attention and the frame embedder keep their zero-initialised outputs.
    state.update(single.state_dict())
    multi.load_state_dict(state)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, LATENT, LATENT, generator=gen)
    _, t, cond = inputs()
    frames = torch.arange(3).expand(2, 3)
    out = multi(x, t, cond, frame_cond=frames)
    assert out.shape == (2, 3, 8, LATENT, LATENT)
    for f in range(3):
        torch.testing.assert_close(out[:, f], single(x[:, f], t, cond), rtol=1e-4, atol=1e-5)


def test_rotary_scores_depend_on_the_offset_only():
    # The point of the frame attention's rotary positions: one query vector scores the keys by
    # their offset from the query's token, wherever the query is ("k steps to the left").
    cos, sin = rotary_2d(6, 6, 16, base_size=6, scale=1.0)
    gen = torch.Generator().manual_seed(0)
    q_vec, k_vec = torch.randn(2, 16, generator=gen)
    q = apply_rotary(q_vec.expand(1, 1, 36, 16), cos, sin)[0, 0]  # (36, 16)
    k = apply_rotary(k_vec.expand(1, 1, 36, 16), cos, sin)[0, 0]  # (36, 16)
    scores = (q @ k.T).reshape(6, 6, 6, 6)  # (query row, query col, key row, key col)
    for dr, dc in [(0, 0), (0, 2), (1, -1), (-3, 2)]:
        along = [
            scores[r, c, r + dr, c + dc]
            for r in range(6)
            for c in range(6)
            if 0 <= r + dr < 6 and 0 <= c + dc < 6
        ]
        torch.testing.assert_close(torch.stack(along), along[0].expand(len(along)))
    # ... and turning a query turns the offset it prefers: not a constant score.
    assert scores[0, 0].std() > 0.1
    # Norms are kept (a rotation), so the scale of the attention logits is unchanged.
    torch.testing.assert_close(q.norm(dim=-1), q_vec.norm().expand(36))


def test_other_resolutions_and_aspect_ratios():
    model = randomize(LumosDiT(**tiny_config("tiny"))).eval()
    x = torch.randn(2, 4, 8, 12)
    _, t, cond = inputs()
    assert model(x, t, cond).shape == (2, 8, 8, 12)


@pytest.mark.parametrize(
    "grid_h, grid_w, base, scale", [(16, 16, 16, 1.0), (64, 64, 64, 2.0), (12, 20, 16, 1.0)]
)
def test_position_embedding_is_pixarts(grid_h, grid_w, base, scale):
    # diffusers' PixArt/DiT table (column coordinate in the first half): the same positions mean
    # DiT/PixArt weights see the embedding they were trained with.
    from diffusers.models.embeddings import get_2d_sincos_pos_embed as reference

    ours = get_2d_sincos_pos_embed(64, grid_h, grid_w, base, scale)[0]
    theirs = reference(
        64, (grid_h, grid_w), base_size=base, interpolation_scale=scale, output_type="pt"
    )
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-6)


def test_condition_projector_init_is_pixarts_unless_asked_for_xavier():
    pixart = LumosDiT(**tiny_config("tiny", hidden_size=64, cond_dim=256))
    xavier = LumosDiT(**tiny_config("tiny", hidden_size=64, cond_dim=256, cond_init_std=None))
    fc1 = pixart.cond_projector.mlp.fc1.weight
    assert abs(fc1.std().item() - 0.02) < 0.002
    # xavier-uniform: std = sqrt(2 / (fan_in + fan_out)) = sqrt(2 / 320)
    fc1 = xavier.cond_projector.mlp.fc1.weight
    assert abs(fc1.std().item() - (2 / 320) ** 0.5) < 0.01
    assert xavier.config.cond_init_std is None  # saved with the model
    with pytest.raises(ValueError, match="cond_init_std"):
        LumosDiT(**tiny_config("tiny", cond_init_std=0.0))


def test_bad_configs_and_inputs_fail_loudly():
    with pytest.raises(ValueError, match="unknown Lumos size"):
        lumos_dit_config("XXL/2")
    with pytest.raises(ValueError, match="unknown LumosDiT config keys"):
        lumos_dit_config("tiny", widht=3)
    with pytest.raises(ValueError, match="cond_kind"):
        LumosDiT(**tiny_config("tiny", cond_kind="audio"))
    with pytest.raises(ValueError, match="num_frames"):
        LumosDiT(**tiny_config("tiny", frame_embed="index"))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        LumosDiT(**tiny_config("tiny", prediction_type="sample"))
    with pytest.raises(ValueError, match="frame_attention needs num_frames"):
        LumosDiT(**tiny_config("tiny", frame_attention=True))
    model = LumosDiT(**tiny_config("tiny"))
    x, t, cond = inputs()
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, None], t, cond)
