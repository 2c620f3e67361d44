"""State dicts with the authors' Lumos parameter names and shapes, for the conversion tests.

Written from the authors' module layout (github.com/ant-research/lumos,
lumos_diffusion/model/lumos/: LumosI2I, LumosT2IMS, Lumos_blocks; timm's PatchEmbed, Attention
and Mlp), independently of `lumos.models.convert`: the tests check the converter against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def _sinusoid(values: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """Their TimestepEmbedder.timestep_embedding: [cos, sin] of values * 10000^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def authors_forward(
    state: dict[str, torch.Tensor],
    num_heads: int,
    x: torch.Tensor,
    timestep: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor | None = None,
    img_hw: torch.Tensor | None = None,
    aspect_ratio: torch.Tensor | None = None,
) -> torch.Tensor:
    """Their LumosI2I / LumosT2IMS forward in eval mode, written out with plain torch ops from
    the state dict. x (N, C, H, W); y (N, L, Cy), the CLS already normalised (their demo does it
    outside the model) or their null `y_embedding`; mask (N, L); img_hw (N, 2), aspect_ratio
    (N, 1) for T2I-MS."""
    s = state
    n, _, hh, ww = x.shape
    p = s["x_embedder.proj.weight"].shape[-1]
    d = s["x_embedder.proj.weight"].shape[0]
    h = F.conv2d(x, s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + s["pos_embed"]  # (N, T, D)

    def mlp(prefix: str, v: torch.Tensor, act) -> torch.Tensor:
        first, second = ("fc1", "fc2") if f"{prefix}.fc1.weight" in s else ("0", "2")
        v = act(F.linear(v, s[f"{prefix}.{first}.weight"], s[f"{prefix}.{first}.bias"]))
        return F.linear(v, s[f"{prefix}.{second}.weight"], s[f"{prefix}.{second}.bias"])

    def gelu(v: torch.Tensor) -> torch.Tensor:
        return F.gelu(v, approximate="tanh")

    t = mlp("t_embedder.mlp", _sinusoid(timestep), F.silu)  # (N, D)
    if img_hw is not None and aspect_ratio is not None:  # SizeEmbedder: each value on its own
        csize = torch.cat(
            [mlp("csize_embedder.mlp", _sinusoid(img_hw[:, i]), F.silu) for i in (0, 1)], 1
        )
        ar = mlp("ar_embedder.mlp", _sinusoid(aspect_ratio[:, 0]), F.silu)
        t = t + torch.cat([csize, ar], dim=1)
    cond = mlp("y_embedder.y_proj", y, gelu)  # (N, L, D)
    heads, dh = num_heads, d // num_heads
    blocks = len({k.split(".")[1] for k in s if k.startswith("blocks.")})

    def ln(v: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(v, (d,), eps=1e-6)

    for i in range(blocks):
        b = f"blocks.{i}."
        mod = F.linear(
            F.silu(t), s[b + "adaLN_modulation.1.weight"], s[b + "adaLN_modulation.1.bias"]
        )
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        a = ln(h) * (1 + sc1[:, None]) + sh1[:, None]
        qkv = F.linear(a, s[b + "attn.qkv.weight"], s[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, -1, 3, heads, dh).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, -1, d)
        h = h + g1[:, None] * F.linear(a, s[b + "attn.proj.weight"], s[b + "attn.proj.bias"])
        out = []
        for j in range(n):  # their xformers BlockDiagonalMask: each image sees its valid tokens
            c = cond[j] if mask is None else cond[j][mask[j].bool()]
            q = F.linear(
                h[j], s[b + "cross_attn.q_linear.weight"], s[b + "cross_attn.q_linear.bias"]
            )
            kv = F.linear(
                c, s[b + "cross_attn.kv_linear.weight"], s[b + "cross_attn.kv_linear.bias"]
            )
            k, v = kv.reshape(-1, 2, heads, dh).unbind(1)
            q = q.reshape(-1, heads, dh).transpose(0, 1)
            o = F.scaled_dot_product_attention(q, k.transpose(0, 1), v.transpose(0, 1))
            out.append(o.transpose(0, 1).reshape(-1, d))
        ca = torch.stack(out)
        h = h + F.linear(ca, s[b + "cross_attn.proj.weight"], s[b + "cross_attn.proj.bias"])
        a = ln(h) * (1 + sc2[:, None]) + sh2[:, None]
        h = h + g2[:, None] * mlp(b + "mlp", a, gelu)
    shift, scale = (s["final_layer.scale_shift_table"][None] + t[:, None]).chunk(2, dim=1)
    h = ln(h) * (1 + scale) + shift
    h = F.linear(h, s["final_layer.linear.weight"], s["final_layer.linear.bias"])
    c_out = h.shape[-1] // (p * p)
    h = h.reshape(n, hh // p, ww // p, p, p, c_out)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(n, c_out, hh, ww)
