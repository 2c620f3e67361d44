"""Weight transfer from an I2I model into each head's model, with its report."""

from __future__ import annotations

import json

import pytest
import torch

from lumos.heads import HEADS, batch_to_model_inputs, head_model_config
from lumos.models import LumosDiT, WeightTransferError, lumos_dit_config, transfer_weights

BASE = lumos_dit_config("tiny", input_size=8, cond_dim=16)
DIMS = dict(text_dim=12, text_tokens=6, num_views=3, num_frames=4)


def i2i_model() -> LumosDiT:
    torch.manual_seed(0)
    model = LumosDiT(**head_model_config(BASE, "i2i"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("head", sorted(HEADS))
def test_transfer_report_per_head(head):
    source = i2i_model()
    target = LumosDiT(**head_model_config(BASE, head, **DIMS))
    report = transfer_weights(source.state_dict(), target, HEADS[head].allowed_new)
    json.dumps(report.model_dump())  # the report goes into the checkpoint's JSON

    backbone = [
        n for n in target.state_dict() if not n.startswith(HEADS[head].allowed_new or ("~",))
    ]
    assert set(report.loaded) | set(report.partially_loaded) == set(backbone)
    for name in report.loaded:
        assert torch.equal(target.state_dict()[name], source.state_dict()[name]), name
    if head == "i2i":
        assert report.new == [] and report.dropped == [] and report.partially_loaded == []
    if head == "t2i":
        # The condition projector (and its null embedding) is re-initialised for text.
        assert "cond_projector.mlp.fc2.weight" in report.new
        assert "cond_projector.null_embedding" in report.dropped
        assert any(n.startswith("csize_embedder.") for n in report.new)
        assert any(n.startswith("ar_embedder.") for n in report.new)
    if head in ("novel_view", "video"):
        assert report.partially_loaded == ["x_embedder.weight"]
        grown = target.x_embedder.weight
        assert torch.equal(grown[:, :4], source.x_embedder.weight)
        assert torch.count_nonzero(grown[:, 4:]) == 0
        assert any(n.startswith("temporal_blocks.") for n in report.new)
        assert any(n.startswith("frame_embedder.") for n in report.new)


@pytest.mark.parametrize("head", ["novel_view", "video"])
def test_transferred_multi_frame_head_starts_as_the_i2i_model(head):
    """Zero-init temporal attention, frame embedding and concat channels: per frame = I2I."""
    source = i2i_model()
    target = LumosDiT(**head_model_config(BASE, head, **DIMS)).eval()
    transfer_weights(source.state_dict(), target, HEADS[head].allowed_new)
    frames = DIMS["num_views"] if head == "novel_view" else DIMS["num_frames"]
    batch = {
        "latents": torch.randn(2, frames, 4, 8, 8),
        "image_embeds": torch.randn(2, frames, 16),
        "frame_index": torch.arange(frames).expand(2, frames),
        "camera": torch.randn(2, frames, 4) * 30,
    }
    x0, kwargs = batch_to_model_inputs(head, batch)
    t = torch.tensor([5, 700])
    out = target(x0, t, **kwargs)
    for f in range(frames):
        torch.testing.assert_close(
            out[:, f], source(x0[:, f], t, kwargs["cond"]), rtol=1e-4, atol=1e-5
        )


def test_a_head_continued_from_its_own_checkpoint_keeps_its_conditioning():
    """T2I's next resolution stage (twice the latent size) keeps the trained text projection,
    null embedding and size embedder; only what changed shape starts afresh."""
    torch.manual_seed(0)
    stage1 = LumosDiT(**head_model_config(BASE, "t2i", **DIMS))
    with torch.no_grad():
        for p in stage1.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    stage2 = LumosDiT(**head_model_config({**BASE, "input_size": 16}, "t2i", **DIMS))
    report = transfer_weights(
        stage1.state_dict(), stage2, HEADS["t2i"].allowed_new, reinitialise=False
    )
    assert report.new == [] and report.dropped == []
    assert set(report.loaded) == set(stage2.state_dict())
    for name in ("cond_projector.null_embedding", "cond_projector.mlp.fc1.weight"):
        assert torch.equal(stage2.state_dict()[name], stage1.state_dict()[name]), name

    # Longer captions: the null embedding (one per token) no longer fits and is new; the text
    # projection's weights still load.
    longer = LumosDiT(**head_model_config(BASE, "t2i", **{**DIMS, "text_tokens": 8}))
    report = transfer_weights(
        stage1.state_dict(), longer, HEADS["t2i"].allowed_new, reinitialise=False
    )
    assert report.new == report.dropped == ["cond_projector.null_embedding"]
    assert "cond_projector.mlp.fc1.weight" in report.loaded


def test_backbone_mismatch_is_an_error_naming_the_parameters():
    source = i2i_model()
    deeper = LumosDiT(**{**BASE, "depth": 3})
    with pytest.raises(WeightTransferError, match=r"blocks\.2\.attn\.qkv\.weight"):
        transfer_weights(source.state_dict(), deeper)
    wider = LumosDiT(**{**BASE, "hidden_size": 96})
    with pytest.raises(WeightTransferError, match="shape"):
        transfer_weights(source.state_dict(), wider)
    state = source.state_dict()
    del state["blocks.0.mlp.fc1.weight"]
    with pytest.raises(WeightTransferError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        transfer_weights(state, LumosDiT(**BASE))
