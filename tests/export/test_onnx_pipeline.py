"""The onnxruntime sampling pipeline reproduces the PyTorch sampling path on the same noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lumos.checkpoints import load_checkpoint
from lumos.diffusion.sampling import sample
from lumos.encoders import FrozenEncoders
from lumos.heads import relative_camera
from lumos.serving.onnx_pipeline import OnnxPipeline

# Per-call graph differences are ~1e-6 (fp32). An untrained model's samples are large (|x| ~ 500:
# DPM-Solver++ divides by alpha_t ~ 0.006 at t = 999), so the bound is relative to their size:
# max |onnx - torch| <= 1e-4 + 1e-5 * max |torch| (measured ~5e-7 relative).
LATENT_ATOL, LATENT_RTOL = 1e-4, 1e-5


def _compare(exported, inputs: dict[str, torch.Tensor], batch: int, seed: int = 0):
    pipe = OnnxPipeline(exported.export_dir)
    ema = load_checkpoint(exported.checkpoint_uri, raw=False).ema_model
    onnx_latents = pipe.sample_latents(
        {k: v.numpy() for k, v in inputs.items()}, steps=20, guidance_scale=4.5, seed=seed
    )
    torch_latents = sample(
        ema,
        (batch, *pipe.latent_shape),
        inputs,
        steps=20,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(seed),
        clip_x0=pipe.latent_range,
    ).numpy()
    assert onnx_latents.shape == torch_latents.shape
    assert np.abs(torch_latents).max() > 0.1, "a trivial (all-zero) sample compares nothing"
    diff = np.abs(onnx_latents - torch_latents).max()
    bound = LATENT_ATOL + LATENT_RTOL * np.abs(torch_latents).max()
    assert diff <= bound, f"ONNX vs PyTorch sampling: max |diff| {diff:.2e} > {bound:.2e}"
    return pipe, onnx_latents, torch_latents


def test_t2i_pipeline_matches_pytorch_and_decodes_with_the_exported_vae(t2i_vae_export):
    encoders = FrozenEncoders(t2i_vae_export.encoders)
    emb, mask = encoders.embed_texts(["a small red circle", "two blue squares at the top"])
    micro = torch.full((2, 2), 16.0)
    pipe, onnx_latents, torch_latents = _compare(
        t2i_vae_export, {"cond": emb, "cond_mask": mask, "micro_cond": micro}, batch=2
    )
    images = pipe(
        {"cond": emb.numpy(), "cond_mask": mask.numpy(), "micro_cond": micro.numpy()}, seed=0
    )
    expected = encoders.decode_latents(torch.from_numpy(torch_latents))  # (2, 16, 16, 3) uint8
    assert images.shape == expected.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_i2i_pixel_pipeline_matches_pytorch(i2i_pixel_export):
    encoders = FrozenEncoders(i2i_pixel_export.encoders)
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    cond = encoders.embed_images(images)
    pipe, _, torch_latents = _compare(i2i_pixel_export, {"cond": cond}, batch=3, seed=7)
    out = pipe({"cond": cond.numpy()}, seed=7)
    expected = encoders.decode_latents(torch.from_numpy(torch_latents))
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1


def test_novel_view_pipeline_matches_pytorch(novel_view_pixel_export):
    encoders = FrozenEncoders(novel_view_pixel_export.encoders)
    view = np.random.default_rng(1).integers(0, 256, (1, 8, 8, 3), dtype=np.uint8)
    camera = torch.tensor(
        [[[0.0, 20.0, 2.5, 0.0], [90.0, 20.0, 2.5, 0.0], [180.0, 20.0, 2.5, 0.0]]]
    )
    inputs = {
        "cond": encoders.embed_images(view),
        "frame_cond": relative_camera(camera),
        "concat_latent": encoders.encode_images(view),
    }
    pipe, onnx_latents, _ = _compare(novel_view_pixel_export, inputs, batch=1)
    assert onnx_latents.shape == (1, 3, 3, 8, 8)


def test_video_v_prediction_pipeline_matches_pytorch(video_v_pixel_export):
    # The export records what the model outputs; the pipeline's solver must read it as v too.
    encoders = FrozenEncoders(video_v_pixel_export.encoders)
    frame = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    inputs = {
        "cond": encoders.embed_images(frame),
        "frame_cond": torch.arange(3).expand(2, 3).clone(),
        "concat_latent": encoders.encode_images(frame),
    }
    pipe, onnx_latents, _ = _compare(video_v_pixel_export, inputs, batch=2)
    assert pipe.meta["diffusion"]["prediction"] == "v_prediction"
    assert pipe.meta["model_config"]["frame_attention"] is True
    assert onnx_latents.shape == (2, 3, 3, 8, 8)


def test_pipeline_rejects_wrong_inputs(i2i_pixel_export):
    pipe = OnnxPipeline(i2i_pixel_export.export_dir)
    with pytest.raises(ValueError, match=r"needs inputs \['cond'\]"):
        pipe.sample_latents({"cond": np.zeros((1, 32)), "cond_mask": np.ones((1, 8), bool)})
    with pytest.raises(ValueError, match=r"'cond' must have shape \(1, 32\)"):
        pipe.sample_latents({"cond": np.zeros((1, 16))})


def test_pipeline_loads_an_export_from_s3(i2i_pixel_export, s3_bucket, tmp_path):
    from lumos.storage import Storage

    uri = f"s3://{s3_bucket}/exports/i2i"
    Storage.from_uri(uri).upload_dir(i2i_pixel_export.export_dir)
    remote = OnnxPipeline.from_uri(uri, local_dir=tmp_path / "dl")
    local = OnnxPipeline(i2i_pixel_export.export_dir)
    cond = {"cond": np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32)}
    np.testing.assert_array_equal(
        remote.sample_latents(cond, steps=3, seed=1), local.sample_latents(cond, steps=3, seed=1)
    )
    with pytest.raises(FileNotFoundError, match="no export.json"):
        OnnxPipeline.from_uri(f"s3://{s3_bucket}/exports/missing", local_dir=tmp_path / "x")
