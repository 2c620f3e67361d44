"""The frozen encoders with tiny configs; the SD-VAE path with a tiny AutoencoderKL saved here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from lumos.configs.encoders import EncodersConfig, VAEConfig
from lumos.encoders import FrozenEncoders


def images(n: int = 2, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny() -> FrozenEncoders:
    return FrozenEncoders.from_config(EncodersConfig.tiny(seed=0))


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> str:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),  # two levels: 2x downsampling
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return str(path)


def test_pixel_latents_round_trip(tiny):
    x = images()
    latents = tiny.encode_images(x)
    assert latents.shape == (2, 3, 48, 64) and latents.dtype == torch.float32
    assert latents.min() >= -1 and latents.max() <= 1
    assert (tiny.latent_channels, tiny.latent_downsample) == (3, 1)
    assert np.array_equal(tiny.decode_latents(latents), x)
    assert np.array_equal(tiny.encode_images(torch.from_numpy(x)), latents)


def test_tiny_image_encoder_is_deterministic_from_its_seed(tiny):
    x = images()
    emb = tiny.embed_images(x)
    assert emb.shape == (2, tiny.image_embed_dim) and torch.isfinite(emb).all()
    again = FrozenEncoders.from_config(EncodersConfig.tiny(seed=0)).embed_images(x)
    assert torch.equal(emb, again)
    other = FrozenEncoders.from_config(EncodersConfig.tiny(seed=1)).embed_images(x)
    assert not torch.allclose(emb, other)
    assert not any(p.requires_grad for p in tiny.image_encoder.parameters()), "must be frozen"
    # Different inputs give different embeddings (the CLS depends on the image).
    assert not torch.allclose(emb[0], emb[1])


def test_tiny_text_encoder_pads_to_max_tokens_with_a_mask(tiny):
    emb, mask = tiny.embed_texts(["a small red circle at the top left", "hi"])
    assert emb.shape == (2, 120, tiny.text_dim) and mask.shape == (2, 120)
    assert mask.dtype == torch.bool
    # ByT5: one token per byte plus the end-of-sequence token.
    assert mask.sum(1).tolist() == [len("a small red circle at the top left") + 1, 3]
    long_emb, long_mask = tiny.embed_texts(["x" * 500])
    assert long_mask.all() and long_emb.shape[1] == 120
    with pytest.raises(TypeError):
        tiny.embed_texts("not a list")


def test_bad_images_fail_loudly(tiny):
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode_images(images().astype(np.float32))


def test_missing_weights_name_the_path_and_what_belongs_there(tmp_path):
    enc = FrozenEncoders.from_config(EncodersConfig())
    with pytest.raises(FileNotFoundError, match=r"vae\.path is not set"):
        enc.encode_images(images())
    with pytest.raises(FileNotFoundError, match="DINO ViT-B/16"):
        enc.embed_images(images())
    with pytest.raises(FileNotFoundError, match="T5"):
        enc.embed_texts(["a"])
    missing = tmp_path / "no-such-dir"
    enc = FrozenEncoders.from_config(EncodersConfig(vae=VAEConfig(path=str(missing))))
    with pytest.raises(FileNotFoundError, match=str(missing)):
        enc.encode_images(images())


def test_config_is_strict():
    with pytest.raises(pydantic.ValidationError):
        EncodersConfig(vae={"kind": "sd-vae", "scaling": 0.2})
    with pytest.raises(pydantic.ValidationError, match="pixel"):
        VAEConfig(kind="pixel", path="/x")
    cfg = EncodersConfig.tiny()
    assert EncodersConfig.model_validate(cfg.model_dump()) == cfg


def test_sd_vae_path_encodes_scaled_latents_and_decodes(tiny_vae_dir):
    enc = FrozenEncoders.from_config(EncodersConfig(vae=VAEConfig(path=tiny_vae_dir)))
    x = images(h=32, w=48)
    latents = enc.encode_images(x)
    assert (enc.latent_channels, enc.latent_downsample) == (4, 2)
    assert latents.shape == (2, 4, 16, 24)
    raw = enc.vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1)
    torch.testing.assert_close(latents, raw.latent_dist.mode() * 0.18215)
    decoded = enc.decode_latents(latents)
    assert decoded.shape == x.shape and decoded.dtype == np.uint8
    with pytest.raises(ValueError, match="multiple"):
        enc.encode_images(images(h=33, w=48))


def test_weights_load_from_the_object_store(tiny_vae_dir, s3_bucket, tmp_path):
    from lumos.storage import Storage

    uri = f"s3://{s3_bucket}/weights/sd-vae"
    Storage.from_uri(uri).upload_dir(tiny_vae_dir)
    cfg = EncodersConfig(vae=VAEConfig(path=uri), cache_dir=str(tmp_path / "cache"))
    from_store = FrozenEncoders.from_config(cfg)
    local = FrozenEncoders.from_config(EncodersConfig(vae=VAEConfig(path=tiny_vae_dir)))
    x = images(h=32, w=32)
    torch.testing.assert_close(from_store.encode_images(x), local.encode_images(x))


def loaded_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_from_configs_match_the_loaded_encoders(tiny, tiny_vae_dir, s3_bucket):
    """`parameter_count` (promotion's memory check) builds each encoder on the meta device from
    its config alone; it must count what FrozenEncoders actually loads. The VAE's weights are
    also read from the object store, where only config.json is fetched."""
    from transformers import T5Config, T5EncoderModel

    from lumos.encoders.sizes import parameter_bytes, parameter_count
    from lumos.storage import Storage

    cfg = EncodersConfig.tiny(seed=0)
    assert parameter_count(cfg, "text_encoder") == loaded_parameters(tiny._text[1])
    assert parameter_count(cfg, "image_encoder") == loaded_parameters(tiny.image_encoder)
    assert parameter_count(cfg, "vae") == 0  # pixel space

    uri = f"s3://{s3_bucket}/weights/sizes-vae"
    Storage.from_uri(uri).write_bytes(
        "config.json", (Path(tiny_vae_dir) / "config.json").read_bytes()
    )
    vae_cfg = EncodersConfig(vae=VAEConfig(path=uri), dtype="bfloat16")
    vae = FrozenEncoders.from_config(EncodersConfig(vae=VAEConfig(path=tiny_vae_dir))).vae
    assert parameter_count(vae_cfg, "vae") == loaded_parameters(vae)
    assert parameter_bytes(vae_cfg, "vae") == 2 * loaded_parameters(vae)

    # A text encoder given by path, in the layout with a text_encoder/ subfolder.
    t5 = T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=3,
                  feed_forward_proj="gated-gelu")  # fmt: skip
    root = Path(tiny_vae_dir).parent / "sizes-t5"
    t5.save_pretrained(root / "text_encoder")
    text_cfg = EncodersConfig.model_validate({"text_encoder": {"path": str(root)}})
    assert parameter_count(text_cfg, "text_encoder") == loaded_parameters(T5EncoderModel(t5))
    with pytest.raises(FileNotFoundError, match="no config.json under"):
        parameter_count(EncodersConfig.model_validate({"image_encoder": {"path": str(root)}}),
                        "image_encoder")  # fmt: skip
