"""The heads: model configs and feature batches -> model inputs, one training step each."""

from __future__ import annotations

import pytest
import torch
from test_lumos_dit import randomize  # zero-initialised concat channels would hide the view

from lumos.diffusion import GaussianDiffusion
from lumos.heads import HEADS, batch_to_model_inputs, head_model_config, relative_camera
from lumos.models import LumosDiT, lumos_dit_config

BASE = lumos_dit_config("tiny", input_size=8, cond_dim=16)
DIMS = dict(text_dim=12, text_tokens=6, num_views=3, num_frames=4)


def feature_batch(head: str, batch: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    if not HEADS[head].multi_frame:
        mask = torch.zeros(batch, 6, dtype=torch.bool)
        mask[:, :3] = True
        return {
            "latents": torch.randn(batch, 4, 8, 8, generator=gen).half(),
            "image_embeds": torch.randn(batch, 16, generator=gen).half(),
            "text_embeds": torch.randn(batch, 6, 12, generator=gen).half(),
            "text_mask": mask,
        }
    frames = DIMS["num_views"] if head == "novel_view" else DIMS["num_frames"]
    return {
        "latents": torch.randn(batch, frames, 4, 8, 8, generator=gen).half(),
        "image_embeds": torch.randn(batch, frames, 16, generator=gen).half(),
        "frame_index": torch.arange(frames).expand(batch, frames),
        "camera": torch.rand(batch, frames, 4, generator=gen) * 90,
    }


def test_head_configs():
    assert head_model_config(BASE, "i2i") == {**BASE, "cond_kind": "image", "cond_tokens": 1}
    t2i = head_model_config(BASE, "t2i", text_dim=4096)
    assert (t2i["cond_kind"], t2i["cond_dim"], t2i["cond_tokens"]) == ("text", 4096, 120)
    assert t2i["micro_conditions"] is True
    nv = head_model_config(BASE, "novel_view", num_views=4)
    assert (nv["num_frames"], nv["frame_embed"], nv["concat_latent_channels"]) == (4, "camera", 4)
    video = head_model_config(BASE, "video", num_frames=8)
    assert (video["num_frames"], video["frame_embed"]) == (8, "index")
    # Only the video head moves content between frames by an offset: frame attention.
    assert video["frame_attention"] is True and not nv.get("frame_attention", False)
    with pytest.raises(ValueError, match="text_dim"):
        head_model_config(BASE, "t2i")
    with pytest.raises(ValueError, match="num_views"):
        head_model_config(BASE, "novel_view")
    with pytest.raises(ValueError, match="unknown head"):
        head_model_config(BASE, "audio")


@pytest.mark.parametrize("head", sorted(HEADS))
def test_batch_to_model_inputs_trains_each_head(head):
    torch.manual_seed(0)
    model = LumosDiT(**head_model_config(BASE, head, **DIMS)).train()
    x0, kwargs = batch_to_model_inputs(head, feature_batch(head))
    assert x0.dtype == torch.float32
    losses = GaussianDiffusion().training_losses(model, x0, torch.tensor([3, 900]), kwargs)
    assert losses["loss"].shape == (2,) and torch.isfinite(losses["loss"]).all()
    losses["loss"].mean().backward()
    if head == "t2i":
        assert kwargs["cond_mask"].dtype == torch.bool
        torch.testing.assert_close(kwargs["micro_cond"], torch.tensor([[64.0, 64.0]] * 2))
    if HEADS[head].multi_frame:
        torch.testing.assert_close(kwargs["concat_latent"], x0[:, 0])


def test_missing_batch_keys_are_named():
    batch = feature_batch("t2i")
    del batch["text_mask"]
    with pytest.raises(KeyError, match="text_mask"):
        batch_to_model_inputs("t2i", batch)


def test_relative_camera_is_zero_for_view_zero_and_periodic_in_azimuth():
    camera = torch.tensor([[[30.0, 10.0, 2.5, 0.0], [120.0, 20.0, 2.0, 0.0], [390.0, 10, 2.5, 0]]])
    rel = relative_camera(camera)
    torch.testing.assert_close(rel[0, 0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(rel[0, 2], rel[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rel[0, 1, 1:3], torch.tensor([1.0, 0.0]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("head", ["novel_view", "video"])
def test_condition_dropout_drops_the_input_view_or_first_frame_too(head):
    model = randomize(LumosDiT(**head_model_config(BASE, head, **DIMS))).eval()
    x0, kwargs = batch_to_model_inputs(head, feature_batch(head))
    t = torch.tensor([10, 700])
    other_view = {**kwargs, "concat_latent": torch.randn_like(kwargs["concat_latent"])}
    other_cond = {**other_view, "cond": torch.randn_like(kwargs["cond"])}
    drop = torch.tensor([True, False])
    out = model(x0, t, **kwargs, force_drop=drop)
    # The dropped item sees neither its DINO token nor its view / frame; the kept one sees both.
    torch.testing.assert_close(model(x0, t, **other_cond, force_drop=drop)[0], out[0])
    assert not torch.allclose(model(x0, t, **other_view, force_drop=drop)[1], out[1])
    # Training's random dropout is the same operation as force_drop.
    model.cond_projector.dropout_prob = 1.0
    torch.testing.assert_close(model.train()(x0, t, **other_cond)[0], out[0])


@pytest.mark.parametrize("head", ["novel_view", "video"])
def test_guided_sampling_gives_the_unconditional_half_no_view(head):
    from lumos.diffusion.sampling import sample

    model = randomize(LumosDiT(**head_model_config(BASE, head, **DIMS)))
    x0, kwargs = batch_to_model_inputs(head, feature_batch(head))
    b, f = x0.shape[:2]
    seen: list[torch.Tensor] = []
    model.x_embedder.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    sample(model, x0.shape, kwargs, steps=3, guidance_scale=4.5, generator=torch.Generator())
    assert len(seen) == 3
    view = kwargs["concat_latent"].unsqueeze(1).expand(-1, f, -1, -1, -1).reshape(b * f, 4, 8, 8)
    for patch_input in seen:  # (2 * B * F, C + C_cat, H, W): [conditional; unconditional]
        assert patch_input.shape == (2 * b * f, 8, 8, 8)
        torch.testing.assert_close(patch_input[: b * f, 4:], view)
        assert torch.count_nonzero(patch_input[b * f :, 4:]) == 0
