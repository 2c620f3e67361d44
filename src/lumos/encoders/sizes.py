"""How many parameters a frozen encoder has, from its config alone: `config.json` under its path
(local or s3://), or its tiny config. The model is built on the meta device, so no weights are
read or allocated. Promotion uses it to check that a serving pod's memory holds the encoders the
served head loads, before the pod is OOM-killed on the cluster.

    parameter_count(encoders_cfg, "text_encoder")   # 4_762_310_656 for T5 v1.1-XXL's encoder
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch

from lumos.errors import NotFoundError

if TYPE_CHECKING:
    from transformers import T5Config

    from lumos.configs.encoders import EncodersConfig, TinyT5Config

Part = Literal["text_encoder", "image_encoder", "vae"]
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def tiny_t5_config(tiny: TinyT5Config) -> T5Config:
    """The test-size T5 v1.1 encoder's config (with the byte-level ByT5 tokenizer's vocabulary)."""
    from transformers import ByT5Tokenizer, T5Config

    vocab = len(ByT5Tokenizer())
    return T5Config(vocab_size=vocab, feed_forward_proj="gated-gelu", **tiny.model_dump())


def _config_json(path: str | None, part: Part, subfolder: str | None) -> dict[str, Any]:
    """The config.json of the weights at `path` (in `subfolder` when the layout has one)."""
    from lumos.storage import Storage

    if path is None:
        raise NotFoundError(f"encoders.{part}.path is not set: the encoder has no weights")
    store = Storage.from_uri(path)
    for key in ([f"{subfolder}/config.json"] if subfolder else []) + ["config.json"]:
        if store.exists(key):
            return store.read_json(key)
    raise NotFoundError(f"no config.json under {path} (encoders.{part}.path)")


def _count(build: Callable[[], torch.nn.Module]) -> int:
    with torch.device("meta"):
        model = build()
    return sum(p.numel() for p in model.parameters())


def parameter_count(cfg: EncodersConfig, part: Part) -> int:
    """Parameters of one encoder of `cfg`, as FrozenEncoders builds it (0 for pixel space)."""
    if part == "vae":
        if cfg.vae.kind == "pixel":
            return 0
        from diffusers import AutoencoderKL

        vae_config = _config_json(cfg.vae.path, part, "vae")
        return _count(lambda: AutoencoderKL.from_config(vae_config))
    if part == "image_encoder":
        from transformers import ViTConfig, ViTModel

        image = cfg.image_encoder
        vit = (
            ViTConfig(**image.tiny.model_dump())
            if image.tiny is not None
            else ViTConfig.from_dict(_config_json(image.path, part, None))
        )
        return _count(lambda: ViTModel(vit, add_pooling_layer=False))
    from transformers import T5Config, T5EncoderModel

    text = cfg.text_encoder
    t5 = (
        tiny_t5_config(text.tiny)
        if text.tiny is not None
        else T5Config.from_dict(_config_json(text.path, part, "text_encoder"))
    )
    return _count(lambda: T5EncoderModel(t5))


def parameter_bytes(cfg: EncodersConfig, part: Part) -> int:
    """Bytes of one encoder's weights in the dtype FrozenEncoders loads it in (`cfg.dtype`)."""
    return parameter_count(cfg, part) * DTYPE_BYTES[cfg.dtype]
