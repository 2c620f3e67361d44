"""State dicts with the authors' Lumos parameter names and shapes, for the conversion tests.

Written from the authors' module layout (github.com/ant-research/lumos,
lumos_diffusion/model/lumos/: LumosI2I, LumosT2IMS, Lumos_blocks; timm's PatchEmbed, Attention
and Mlp), independently of `lumos.models.convert`: the tests check the converter against it.
"""

from __future__ import annotations

import torch

from lumos.models.lumos_dit import get_2d_sincos_pos_embed


def authors_shapes(
    source: str,
    *,
    depth: int = 28,
    hidden: int = 1152,
    patch: int = 2,
    in_ch: int = 4,
    cond_dim: int | None = None,
    tokens: int | None = None,
    grid: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Parameter (and persistent buffer) names and shapes of the authors' model."""
    t2i = source == "lumos-t2i"
    cond_dim = cond_dim or (4096 if t2i else 768)
    tokens = tokens or (120 if t2i else 1)
    grid = grid or (64 if t2i else 16)
    d = hidden
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, grid * grid, d),  # a persistent buffer (register_buffer)
        "x_embedder.proj.weight": (d, in_ch, patch, patch),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.y_embedding": (tokens, cond_dim),  # CaptionEmbedder's buffer: the null
        "y_embedder.y_proj.fc1.weight": (d, cond_dim),
        "y_embedder.y_proj.fc1.bias": (d,),
        "y_embedder.y_proj.fc2.weight": (d, d),
        "y_embedder.y_proj.fc2.bias": (d,),
        "final_layer.scale_shift_table": (2, d),
        "final_layer.linear.weight": (patch * patch * 2 * in_ch, d),
        "final_layer.linear.bias": (patch * patch * 2 * in_ch,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "cross_attn.q_linear.weight": (d, d), b + "cross_attn.q_linear.bias": (d,),
            b + "cross_attn.kv_linear.weight": (2 * d, d), b + "cross_attn.kv_linear.bias": (2 * d,),
            b + "cross_attn.proj.weight": (d, d), b + "cross_attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })  # fmt: skip
    if t2i:  # LumosT2IMS: SizeEmbedder(hidden_size // 3) for the size and the aspect ratio
        for name in ("csize_embedder", "ar_embedder"):
            shapes.update({
                f"{name}.mlp.0.weight": (d // 3, 256), f"{name}.mlp.0.bias": (d // 3,),
                f"{name}.mlp.2.weight": (d // 3, d // 3), f"{name}.mlp.2.bias": (d // 3,),
            })  # fmt: skip
    return shapes


def random_state(source: str, seed: int = 0, scale: float = 1.0, **dims) -> dict:
    """A small authors' state dict with random values and the true sin-cos pos_embed."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=gen) for k, s in authors_shapes(source, **dims).items()}
    grid = dims["grid"]
    state["pos_embed"] = get_2d_sincos_pos_embed(dims["hidden"], grid, grid, grid, scale)
    return state
