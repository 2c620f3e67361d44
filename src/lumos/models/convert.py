"""`lumos convert`: the authors' released Lumos-I2I / Lumos-T2I weights as a Lumos checkpoint.

    lumos convert --from lumos-i2i --checkpoint ./Lumos_I2I.pth --output /tmp/ckpt/i2i
    lumos finetune --head novel_view --dataset URI --init /tmp/ckpt/i2i --out URI

    from lumos.models.convert import convert_checkpoint
    convert_checkpoint("lumos-t2i", "s3://models/Lumos_T2I.pth", "s3://lumos/ckpt/lumos-t2i")

The source is the state dict the authors' code loads (github.com/ant-research/lumos,
`lumos_diffusion/model/lumos/`): `LumosI2I_XL_2` (caption_channels 768, model_max_length 1: one
DINO ViT-B/16 CLS token, 256 px) and `LumosT2IMS_XL_2` (T5 v1.1-XXL, 120 tokens of 4096, 1024 px,
lewei_scale 2.0). Their models are ours parameter for parameter (per-block adaLN-Zero, ungated
cross-attention, PixArt's final layer and size embedders); only some names differ:

    theirs                                ours
    x_embedder.proj.{weight,bias}         x_embedder.{weight,bias}
    y_embedder.y_proj.fc{1,2}.*           cond_projector.mlp.fc{1,2}.*
    y_embedder.y_embedding (L, C)         cond_projector.null_embedding (1, C) / (1, L, C)
    blocks.N.cross_attn.q_linear.*        blocks.N.cross_attn.q.*
    blocks.N.cross_attn.kv_linear.*       blocks.N.cross_attn.kv.*
    pos_embed (1, T, D)                   not stored: checked against our sin-cos table

Everything else (t_embedder, blocks' attn / mlp / adaLN_modulation, final_layer, csize_embedder,
ar_embedder) keeps its name. The conversion is strict: every source tensor is consumed, every
tensor of the model is filled, shapes must agree, else one error lists what is left over, missing
or of another shape.

What the converted checkpoint expects of the data it is fine-tuned on: the authors' encoders
(the SD VAE sd-vae-ft-mse with latents scaled by 0.18215; the original DINO ViT-B/16 CLS after
its final norm at 224 px, which the model L2-normalises; T5 v1.1-XXL with 120 tokens for T2I).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lumos.errors import CheckpointError
from lumos.models.lumos_dit import LUMOS_SIZES, LumosDiT, get_2d_sincos_pos_embed, lumos_dit_config


class CheckpointConversionError(CheckpointError):
    """A source checkpoint that does not map onto the Lumos model exactly."""


@dataclass(frozen=True)
class SourceSpec:
    """A released model family: the head it becomes and what its state dict does not say."""

    head: str
    cond_kind: str
    micro_conditions: bool
    input_size: int  # latent grid of the released resolution, when the file has no pos_embed
    pos_embed_scale: float  # PixArt's lewei_scale of the released model


SOURCES: dict[str, SourceSpec] = {
    # gradio_demos/lumos_I2I.py: LumosI2I_XL_2(input_size=32, lewei_scale=1.0, caption_channels=768)
    "lumos-i2i": SourceSpec("i2i", "image", False, input_size=32, pos_embed_scale=1.0),
    # gradio_demos/lumos_T2I.py: LumosT2IMS_XL_2(input_size=128, lewei_scale=2.0)
    "lumos-t2i": SourceSpec("t2i", "text", True, input_size=128, pos_embed_scale=2.0),
}

# Their name -> ours, by prefix or infix; names not matched stay as they are.
_RENAMES = (
    (re.compile(r"^x_embedder\.proj\."), "x_embedder."),
    (re.compile(r"^y_embedder\.y_proj\."), "cond_projector.mlp."),
    (re.compile(r"^y_embedder\.y_embedding$"), "cond_projector.null_embedding"),
    (re.compile(r"^(blocks\.\d+\.cross_attn\.)q_linear\."), r"\1q."),
    (re.compile(r"^(blocks\.\d+\.cross_attn\.)kv_linear\."), r"\1kv."),
)
_POS_EMBED = "pos_embed"
_WRAPPERS = ("state_dict_ema", "state_dict", "ema", "model")  # PixArt-style training files


def source_spec(source: str) -> SourceSpec:
    """The released model family `source` (a key of SOURCES), else a one-line error."""
    if source not in SOURCES:
        raise CheckpointConversionError(
            f"unknown source {source!r}; choose one of {sorted(SOURCES)}"
        )
    return SOURCES[source]


def our_name(name: str) -> str:
    """The Lumos parameter name of one of the authors' parameter names."""
    for pattern, replacement in _RENAMES:
        if pattern.search(name):
            return pattern.sub(replacement, name)
    return name


def unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a loaded file: a flat state dict (the released files), or the EMA / model
    weights of a PixArt-style training checkpoint. Returns them and where they were found."""
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), "top level"
    if isinstance(obj, Mapping):
        for key in _WRAPPERS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(
                isinstance(v, torch.Tensor) for v in inner.values()
            ):
                return dict(inner), f"key {key!r}"
    raise CheckpointConversionError(
        "the source holds no state dict (a mapping of names to tensors at its top level or under "
        f"one of {list(_WRAPPERS)}): is it a Lumos .pth checkpoint?"
    )


def load_source(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """Read a .pth / .pt (torch.load, tensors only) or .safetensors file from a path or s3:// URI
    (an object is downloaded to a temporary file first, not held in memory as bytes)."""
    from lumos.storage import Storage
    from lumos.tempdirs import OwnedTemporaryDirectory

    parent, _, name = uri.rstrip("/").rpartition("/")
    store = Storage.from_uri(parent or ".")
    if not store.exists(name):
        raise CheckpointConversionError(f"no source checkpoint at {uri}")
    local = store.local_path(name)
    if local is not None:
        return _read_source(local, uri)
    with OwnedTemporaryDirectory("lumos-convert-") as tmp:
        path = Path(tmp) / name
        store.download_file(name, path)
        return _read_source(path, uri)


def _read_source(path: Path, uri: str) -> tuple[dict[str, torch.Tensor], str]:
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path)), "safetensors"
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged file, or one that needs arbitrary code to unpickle
        raise CheckpointConversionError(
            f"cannot read {uri} as a torch checkpoint of tensors ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    return unwrap_state_dict(obj)


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> torch.Size:
    if key not in state:
        raise CheckpointConversionError(
            f"the source has no {key!r}: not a {source} checkpoint of the authors' layout"
        )
    return state[key].shape


def model_config_for(
    source: str, state: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> dict[str, Any]:
    """The LumosDiT config of a source state dict: widths and depth read from its tensors, the
    head count from the size registry (or `num_heads`), the resolution from its pos_embed."""
    spec = source_spec(source)
    hidden = _shape(state, "t_embedder.mlp.2.weight", source)[0]
    patch_w = _shape(state, "x_embedder.proj.weight", source)
    in_channels, patch = patch_w[1], patch_w[-1]
    out_rows = _shape(state, "final_layer.linear.weight", source)[0]
    out_channels = out_rows // (patch * patch)
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k))})
    mlp_hidden = _shape(state, "blocks.0.mlp.fc1.weight", source)[0]
    cond_dim = _shape(state, "y_embedder.y_proj.fc1.weight", source)[1]
    null_shape = _shape(state, "y_embedder.y_embedding", source)
    if out_channels not in (in_channels, 2 * in_channels):
        raise CheckpointConversionError(
            f"the source's final layer has {out_channels} output channels for {in_channels} "
            "input channels (expected the same, or twice with the learned variance)"
        )
    if num_heads is None:
        matches = [
            s["num_heads"]
            for s in LUMOS_SIZES.values()
            if (s["depth"], s["hidden_size"], s["patch_size"]) == (depth, hidden, patch)
        ]
        if not matches:
            raise CheckpointConversionError(
                f"the source is depth {depth}, width {hidden}, patch {patch}: no Lumos size has "
                "that layout, so its number of heads is unknown (pass num_heads)"
            )
        num_heads = matches[0]
    input_size = spec.input_size
    if _POS_EMBED in state:
        tokens = state[_POS_EMBED].shape[-2]
        grid = math.isqrt(tokens)
        if grid * grid != tokens:
            raise CheckpointConversionError(
                f"the source's pos_embed has {tokens} tokens: not a square grid"
            )
        input_size = grid * patch
    return lumos_dit_config(
        "XL/2",
        depth=depth,
        hidden_size=hidden,
        num_heads=num_heads,
        patch_size=patch,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        mlp_ratio=mlp_hidden / hidden,
        input_size=input_size,
        pos_embed_scale=spec.pos_embed_scale,
        cond_kind=spec.cond_kind,
        cond_dim=cond_dim,
        cond_tokens=1 if spec.cond_kind == "image" else null_shape[0],
        micro_conditions=spec.micro_conditions,
        # The authors drop the condition with probability 0.1 (class_dropout_prob), as we do.
        cond_dropout_prob=0.1,
    )


def _listed(what: str, names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit]) + (
        f", ... ({len(names)} in all)" if len(names) > limit else ""
    )
    return f"{what}: {shown}"


def map_state_dict(
    source: str, state: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The LumosDiT config of `state` and its tensors under our names. Raises
    CheckpointConversionError (one line) if any source tensor is left over, any model tensor
    missing, or a shape differs. Works on meta tensors too (shapes only)."""
    config = model_config_for(source, state, num_heads)
    with torch.device("meta"):
        target_shapes = {k: v.shape for k, v in LumosDiT(**config).state_dict().items()}
    converted: dict[str, torch.Tensor] = {}
    left_over, shapes, mismatched = [], [], set()
    for name, tensor in state.items():
        if name == _POS_EMBED:  # fixed, recomputed by our model: consumed by checking it
            _check_pos_embed(tensor, config)
            continue
        ours = our_name(name)
        if ours not in target_shapes:
            left_over.append(name)
            continue
        value = tensor.detach()
        want = target_shapes[ours]
        if ours == "cond_projector.null_embedding" and value.numel() == want.numel():
            value = value.reshape(want)  # their (L, C) -> our (1, C) or (1, L, C)
        if value.shape != want:
            shapes.append(f"{name} {tuple(value.shape)} vs {ours} {tuple(want)}")
            mismatched.add(ours)
            continue
        converted[ours] = value
    missing = sorted(set(target_shapes) - set(converted) - mismatched)
    if left_over or missing or shapes:
        parts = [
            _listed("left over in the source", sorted(left_over)) if left_over else "",
            _listed("missing from the source", missing) if missing else "",
            _listed("shape differs", shapes) if shapes else "",
        ]
        raise CheckpointConversionError(
            f"the source does not map onto the {source} model exactly; "
            + "; ".join(p for p in parts if p)
        )
    return config, converted


def convert_state_dict(
    source: str, state: Mapping[str, torch.Tensor], num_heads: int | None = None
) -> LumosDiT:
    """A LumosDiT (fp32, eval mode) holding exactly the source's weights (see map_state_dict)."""
    config, converted = map_state_dict(source, state, num_heads)
    model = LumosDiT(**config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()}, strict=True)
    return model.eval()


def _check_pos_embed(tensor: torch.Tensor, config: dict[str, Any]) -> None:
    grid = config["input_size"] // config["patch_size"]
    ours = get_2d_sincos_pos_embed(
        config["hidden_size"], grid, grid, grid, config["pos_embed_scale"]
    )
    same = tensor.shape == ours.shape and (
        tensor.is_meta or torch.allclose(tensor.float(), ours, atol=1e-4)
    )
    if not same:
        raise CheckpointConversionError(
            f"the source's pos_embed {tuple(tensor.shape)} is not the sin-cos table of a "
            f"{grid}x{grid} grid at scale {config['pos_embed_scale']}: another resolution or "
            "position scale than the released model's"
        )


def convert_checkpoint(
    source: str, checkpoint_uri: str, output_uri: str, num_heads: int | None = None
) -> dict[str, Any]:
    """Convert a released checkpoint file into a Lumos checkpoint directory at `output_uri`
    (its EMA and raw weights are both the released weights), which `lumos finetune --init`
    accepts. Returns the checkpoint's metadata."""
    from lumos.checkpoints import save_checkpoint

    spec = source_spec(source)  # before reading a file of gigabytes
    state, found_at = load_source(checkpoint_uri)
    model = convert_state_dict(source, state, num_heads)
    meta = {
        "head": spec.head,
        "step": 0,
        "encoders": None,  # the authors' encoders: see this module's docstring
        "parent": None,
        "converted_from": {
            "source": source,
            "checkpoint": checkpoint_uri,
            "state_dict": found_at,
            "tensors": len(state),
            "file_name": Path(checkpoint_uri).name,
        },
        "model_config": {k: v for k, v in model.config.items() if not k.startswith("_")},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_config": None,
        "transfer_report": None,
    }
    save_checkpoint(output_uri, model, model, meta)
    return {**meta, "uri": output_uri}
