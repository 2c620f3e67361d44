"""The Lumos transformer: a DiT/PixArt-style latent denoiser conditioned by cross-attention.

One file for the whole architecture (as DiT's models.py): embedders, the block, the final layer,
the model and the size registry. The same class serves every head; heads differ by configuration
(condition kind, number of frames, frame embedding, concatenated latent), never by subclassing.

The model imports only torch and diffusers so the throughput benchmark can run it on a GPU image
that has neither pydantic nor the rest of this project.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from lumos.errors import ModelConfigError

COND_KINDS = ("image", "text")
# What the first C output channels are: the noise (the paper's) or v = sqrt(a) eps - sqrt(1 - a) x0
# (Salimans & Ho 2022), whose x0 stays well conditioned at high noise (lumos.diffusion.gaussian).
PREDICTION_TYPES = ("epsilon", "v_prediction")
FRAME_EMBEDS = ("none", "index", "camera")


def zero_module(module: nn.Module) -> nn.Module:
    """Set every parameter of `module` to zero (adaLN-Zero and zero-initialised outputs)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sinusoidal_embedding(
    values: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal features of a float tensor of any shape (...,) -> (..., dim), as in DiT/GLIDE."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half
    )  # (half,)
    args = values.float().unsqueeze(-1) * freqs  # (..., half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (..., 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)  # (..., dim)
    return emb


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_h: int, grid_w: int, base_size: int, scale: float
) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding (1, grid_h * grid_w, embed_dim).

    Positions are rescaled to the model's base grid and divided by `scale` (PixArt's "lewei
    scale"): a model trained at a higher resolution sees positions in the range it saw at the base
    resolution, which is what lets the 256 px prior transfer to 512 / 1024 px fine-tuning.
    """
    if embed_dim % 4 != 0:
        raise ModelConfigError(f"embed_dim {embed_dim} must be divisible by 4 for 2D sin-cos")
    pos_h = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / scale  # (gh,)
    pos_w = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / scale  # (gw,)
    grid_y, grid_x = torch.meshgrid(pos_h, pos_w, indexing="ij")  # (gh, gw) each
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (gh * gw, D / 4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (gh * gw, D / 2)

    # DiT/MAE/PixArt order (their `np.meshgrid(grid_w, grid_h)` puts the column first): the first
    # half encodes the column (w) coordinate, the second the row (h), so their weights load here.
    emb = torch.cat([one_axis(grid_x), one_axis(grid_y)], dim=1)  # (gh * gw, D)
    return emb.float().unsqueeze(0)  # (1, gh * gw, D)


def rotary_2d(
    grid_h: int, grid_w: int, head_dim: int, base_size: int, scale: float, base: float = 100.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D rotary tables (cos, sin), each (gh * gw, head_dim / 2), for `apply_rotary`.

    The first half of each head's channel pairs turns with the column, the second with the row,
    so the attention score of two tokens depends on their offset, not on where they are (RoFormer,
    made axial for grids as in FiT and Lumina). Positions are rescaled like the sin-cos table.
    Wavelengths run from 2 pi tokens up to about 2 pi * `base` tokens.
    """
    if head_dim % 4 != 0:
        raise ModelConfigError(f"head width {head_dim} must be divisible by 4 for 2D rotary")
    pairs = head_dim // 4  # channel pairs per axis
    freqs = base ** (-torch.arange(pairs, dtype=torch.float64) / pairs)  # (pairs,)
    pos_h = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / scale  # (gh,)
    pos_w = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / scale  # (gw,)
    grid_y, grid_x = torch.meshgrid(pos_h, pos_w, indexing="ij")  # (gh, gw) each
    angles = torch.cat(
        [grid_x.reshape(-1, 1) * freqs, grid_y.reshape(-1, 1) * freqs], dim=1
    )  # (gh * gw, head_dim / 2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each channel pair (2i, 2i + 1) of x (N, H, T, Dh) by its angle (T, Dh / 2)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)  # (N, H, T, Dh / 2) each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (N, H, T, Dh / 2, 2)
    return out.flatten(-2).to(x.dtype)  # (N, H, T, Dh)


class Mlp(nn.Module):
    """Two linear layers with tanh-GELU (DiT, PixArt)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(x), approximate="tanh")  # (..., hidden_dim)
        return self.fc2(x)  # (..., out_dim)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features and an MLP (DiT)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = sinusoidal_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(next(self.mlp.parameters()).dtype))  # (N, D)


class FrameIndexEmbedder(nn.Module):
    """Frame index (video) -> vector added to the timestep embedding.

    The output layer starts at zero so that inserting it leaves the pretrained model unchanged.
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = Mlp(frequency_embedding_size, hidden_size, hidden_size)

    def forward(self, frame_index: torch.Tensor) -> torch.Tensor:
        freq = sinusoidal_embedding(frame_index, self.frequency_embedding_size)  # (B, F, 256)
        return self.mlp(freq.to(self.mlp.fc1.weight.dtype))  # (B, F, D)


class CameraEmbedder(nn.Module):
    """Relative camera (B, F, camera_dim) -> vector added to the timestep embedding (zero at init)."""

    def __init__(self, hidden_size: int, camera_dim: int = 4):
        super().__init__()
        self.mlp = Mlp(camera_dim, hidden_size, hidden_size)

    def forward(self, camera: torch.Tensor) -> torch.Tensor:
        return self.mlp(camera.to(self.mlp.fc1.weight.dtype))  # (B, F, D)


class SizeEmbedder(nn.Module):
    """Each scalar of (B, K) -> its own vector of `out_size`, concatenated to (B, K * out_size).

    PixArt-alpha's SizeEmbedder (a TimestepEmbedder applied per value): sinusoidal features of the
    raw value (pixels for sizes, h / w for the aspect ratio), Linear, SiLU, Linear.
    """

    def __init__(self, out_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.out_size = out_size
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, out_size),
            nn.SiLU(),
            nn.Linear(out_size, out_size),
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        b, k = values.shape
        freq = sinusoidal_embedding(values, self.frequency_embedding_size)  # (B, K, 256)
        emb = self.mlp(freq.to(next(self.mlp.parameters()).dtype))  # (B, K, out_size)
        return emb.reshape(b, k * self.out_size)  # (B, K * out_size)


class ConditionProjector(nn.Module):
    """Projects the raw condition into the cross-attention tokens; owns the null condition.

    image: a DINO CLS (N, cond_dim) is L2-normalised and projected by an MLP to ONE token.
    text:  T5 token embeddings (N, L, cond_dim) are projected token by token.

    The null embedding lives in the projector's *input* space, so classifier-free guidance drops
    replace the raw condition and the projector learns what "no condition" maps to. It is a fixed
    random buffer saved with the model: a fresh random one would break guidance of a trained model.
    As in the authors' code, the CLS is normalised and the null replaces it as it is (the authors
    normalise outside the model; their `y_embedding` is this buffer).
    """

    null_embedding: torch.Tensor

    def __init__(
        self,
        cond_kind: str,
        cond_dim: int,
        hidden_size: int,
        cond_tokens: int,
        dropout_prob: float,
    ):
        super().__init__()
        self.cond_kind = cond_kind
        self.dropout_prob = dropout_prob
        self.mlp = Mlp(cond_dim, hidden_size, hidden_size)
        null_shape = (1, cond_dim) if cond_kind == "image" else (1, cond_tokens, cond_dim)
        self.register_buffer(
            "null_embedding", torch.randn(null_shape) / cond_dim**0.5, persistent=True
        )

    def drop_mask(
        self, n: int, device: torch.device, force_drop: torch.Tensor | None
    ) -> torch.Tensor:
        """(N,) bool: the rows whose condition is replaced by the null (random in training)."""
        drop = torch.zeros(n, dtype=torch.bool, device=device)  # (N,)
        if self.training and self.dropout_prob > 0:
            # This enables classifier-free guidance: the model also learns p(x) without condition.
            drop = torch.rand(n, device=device) < self.dropout_prob  # (N,)
        if force_drop is not None:
            drop = drop | force_drop.to(device=device, dtype=torch.bool)  # (N,)
        return drop

    def forward(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None,
        drop: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        null_shape = tuple(self.null_embedding.shape[1:])
        if tuple(cond.shape[1:]) != null_shape:
            raise ValueError(
                f"cond_kind={self.cond_kind!r} expects cond of shape (N, {', '.join(map(str, null_shape))}) "
                f"(cond_dim, and cond_tokens for text), got {tuple(cond.shape)}"
            )
        null = self.null_embedding.to(cond.dtype)  # (1, Dc) or (1, L, Dc)
        if self.cond_kind == "image":
            cond = F.normalize(cond, dim=-1)  # (N, Dc) unit norm, as the paper's CLS
            cond = torch.where(drop[:, None], null, cond)  # (N, Dc)
            tokens = self.mlp(cond).unsqueeze(1)  # (N, 1, D)
            return tokens, None
        cond = torch.where(drop[:, None, None], null, cond)  # (N, L, Dc)
        if cond_mask is not None:
            # The null sequence is a full sequence: every token of a dropped row is attended.
            cond_mask = cond_mask.to(torch.bool) | drop[:, None]  # (N, L)
        return self.mlp(cond), cond_mask  # (N, L, D), (N, L)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused QKV projection and SDPA."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ModelConfigError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)  # (N, T, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, Dh) each
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)  # (N, H, T, Dh) each
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class CrossAttention(nn.Module):
    """Cross-attention from image tokens to condition tokens: no gate, no query norm, zero-init out.

    With ONE condition token the softmax over a single key is exactly 1, so the output is
    `proj(v(c))` for every query: `forward` takes that exact shortcut (no q, no k, no attention,
    the projections run on one token instead of T), and keeps the general path for text tokens.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads != 0:
            raise ModelConfigError(f"width {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # A static shape check: torch.compile specialises on it, no data-dependent control flow.
        if c.shape[1] == 1 and mask is None:
            return self.forward_single_token(x, c)
        return self.forward_general(x, c, mask)

    def forward_single_token(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        v = F.linear(c, self.kv.weight[d:], self.kv.bias[d:])  # (N, 1, D) value rows only
        return self.proj(v).expand_as(x)  # (N, T, D) a broadcast view, no copy

    def forward_general(
        self, x: torch.Tensor, c: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        n, t, d = x.shape
        h, dh = self.num_heads, d // self.num_heads
        q = self.q(x).reshape(n, t, h, dh).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(c).reshape(n, c.shape[1], 2, h, dh)  # (N, L, 2, H, Dh)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, L, Dh) each
        attn_mask = None if mask is None else mask[:, None, None, :].to(torch.bool)  # (N, 1, 1, L)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, T, Dh)
        x = x.transpose(1, 2).reshape(n, t, d)  # (N, T, D)
        return self.proj(x)  # (N, T, D)


class TemporalAttention(nn.Module):
    """Attention across the F frames at each token position (video / novel views).

    Pre-norm residual; the output projection starts at zero, so a model with temporal layers
    inserted computes exactly what the pretrained single-frame model computes per frame.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        nf, t, d = x.shape  # nf = B * F
        b = nf // num_frames
        y = x.reshape(b, num_frames, t, d).transpose(1, 2)  # (B, T, F, D)
        y = y.reshape(b * t, num_frames, d)  # (B * T, F, D)
        y = self.attn(self.norm(y))  # (B * T, F, D)
        y = y.reshape(b, t, num_frames, d).transpose(1, 2).reshape(nf, t, d)  # (B * F, T, D)
        return x + y  # (B * F, T, D)


class FrameAttention(nn.Module):
    """Attention within each frame whose queries know the frame (multi-frame heads).

    To move an object, frame k's tokens must read the first frame (concatenated to every token)
    at an offset that depends on k. The spatial blocks cannot: their positions are absolute and
    the frame reaches them only as a per-channel scale and shift. Here the positions are rotary
    (relative) and adaLN adds a vector that depends on the frame's conditioning (timestep plus
    frame index or camera) to every query, and a constant query under rotary positions scores
    keys by their offset: "k steps to the left" is one linear map (docs/architecture.md).
    The output projection starts at zero, so inserting the layer changes nothing at first.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.attn = SelfAttention(dim, num_heads)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return x + self.attn(modulate(self.norm(x), shift, scale), rotary)  # (N, T, D)


class LumosBlock(nn.Module):
    """adaLN-Zero self-attention, ungated cross-attention to the condition, adaLN-Zero MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = self.adaLN_modulation(c)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (N, T, D)
        x = x + gate_msa.unsqueeze(1) * self.attn(h)  # (N, T, D)
        x = x + self.cross_attn(x, cond, cond_mask)  # (N, T, D)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(h)  # (N, T, D)
        return x


class FinalLayer(nn.Module):
    """Norm, shift/scale from a learned (2, D) table plus the timestep embedding, linear to patch
    pixels: PixArt's T2IFinalLayer, which the authors' Lumos models use.

    Unlike DiT's final layer there is no SiLU + Linear on the timestep embedding: `c` is added to
    the table as it is (2 * D parameters instead of 2 * D * (D + 1)).
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.scale_shift_table[None] + c[:, None]  # (N, 2, D)
        shift, scale = mod.unbind(1)  # (N, D) each: row 0 shifts, row 1 scales (PixArt's order)
        x = modulate(self.norm_final(x), shift, scale)  # (N, T, D)
        return self.linear(x)  # (N, T, p * p * C_out)


class LumosDiT(ModelMixin, ConfigMixin):  # type: ignore[misc]
    """The Lumos denoiser. See docs/architecture.md for the forward contract.

    input_size is the latent grid (32 for 256 px with the SD VAE); pos_embed_scale is 1.0 at
    256 px and 2.0 at 1024 px. With learn_sigma the output has 2 * in_channels channels:
    epsilon (or v, see prediction_type) then the variance interpolation value (improved DDPM).
    cond_init_std: the normal init of the condition projector (PixArt's 0.02); None leaves it
    xavier like the other layers.
    """

    _supports_gradient_checkpointing = False
    pos_embed: torch.Tensor

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        cond_kind: str = "image",
        cond_dim: int = 768,
        cond_tokens: int = 1,
        cond_dropout_prob: float = 0.1,
        pos_embed_scale: float = 1.0,
        micro_conditions: bool = False,
        num_frames: int = 1,
        frame_embed: str = "none",
        camera_dim: int = 4,
        concat_latent_channels: int = 0,
        cond_init_std: float | None = 0.02,
        frame_attention: bool = False,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        if cond_kind not in COND_KINDS:
            raise ModelConfigError(f"cond_kind must be one of {COND_KINDS}, got {cond_kind!r}")
        if frame_embed not in FRAME_EMBEDS:
            raise ModelConfigError(
                f"frame_embed must be one of {FRAME_EMBEDS}, got {frame_embed!r}"
            )
        if frame_embed != "none" and num_frames < 2:
            raise ModelConfigError(
                f"frame_embed={frame_embed!r} needs num_frames >= 2, got {num_frames}"
            )
        if prediction_type not in PREDICTION_TYPES:
            raise ModelConfigError(
                f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
            )
        if frame_attention and num_frames < 2:
            raise ModelConfigError(f"frame_attention needs num_frames >= 2, got {num_frames}")
        if cond_kind == "image" and cond_tokens != 1:
            raise ModelConfigError(
                f"cond_kind='image' projects to one token; cond_tokens={cond_tokens}"
            )
        if hidden_size % num_heads or hidden_size % 4:
            raise ModelConfigError(
                f"hidden_size {hidden_size} must be divisible by num_heads {num_heads} and by 4"
            )
        if cond_init_std is not None and cond_init_std <= 0:
            raise ModelConfigError(f"cond_init_std must be > 0 or None, got {cond_init_std}")
        if input_size % patch_size:
            raise ModelConfigError(
                f"input_size {input_size} is not a multiple of patch {patch_size}"
            )
        # Plain attributes for forward (typed, and constants to torch.compile).
        self.patch_size = patch_size
        self.base_grid = input_size // patch_size
        self.hidden_size = hidden_size
        self.pos_embed_scale = pos_embed_scale
        self.num_frames = num_frames
        self.frame_embed = frame_embed
        self.micro_conditions = micro_conditions
        self.concat_latent_channels = concat_latent_channels
        self.cond_init_std = cond_init_std
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.multi_frame = num_frames > 1

        self.x_embedder = nn.Conv2d(
            in_channels + concat_latent_channels,
            hidden_size,
            kernel_size=patch_size,
            stride=patch_size,
        )
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.cond_projector = ConditionProjector(
            cond_kind, cond_dim, hidden_size, cond_tokens, cond_dropout_prob
        )
        # PixArt-MS: the size (h, w) and the aspect ratio each get a third of the width; their
        # concatenation is added to the timestep embedding. A width not divisible by 3 leaves its
        # last hidden_size % 3 channels without size information (XL/2's 1152 has none left).
        self.csize_embedder = SizeEmbedder(hidden_size // 3) if micro_conditions else None
        self.ar_embedder = SizeEmbedder(hidden_size // 3) if micro_conditions else None
        self.frame_embedder: nn.Module | None = None
        if frame_embed == "index":
            self.frame_embedder = FrameIndexEmbedder(hidden_size)
        elif frame_embed == "camera":
            self.frame_embedder = CameraEmbedder(hidden_size, camera_dim)
        self.blocks = nn.ModuleList(
            [LumosBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.num_heads = num_heads
        self.frame_blocks = (
            nn.ModuleList([FrameAttention(hidden_size, num_heads) for _ in range(depth)])
            if frame_attention
            else None
        )
        self.temporal_blocks = (
            nn.ModuleList([TemporalAttention(hidden_size, num_heads) for _ in range(depth)])
            if self.multi_frame
            else None
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # Fixed (not learned) and cheap to recompute: not saved, so checkpoints stay resolution-free.
        grid = input_size // patch_size
        self.register_buffer(
            "pos_embed",
            get_2d_sincos_pos_embed(hidden_size, grid, grid, grid, pos_embed_scale),
            persistent=False,
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation plus zeros wherever a new path must start as the identity."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        # Patch embedding initialised like a linear layer (DiT).
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.x_embedder.bias is not None:
            nn.init.zeros_(self.x_embedder.bias)
        for layer in self.t_embedder.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        if self.cond_init_std is not None:
            # PixArt's caption projection (std 0.02). On a unit-norm DINO CLS this makes the
            # condition token about 1e-3 of the image tokens' scale; None keeps xavier, which a
            # short run needs to learn the condition at all (docs/benchmarks.md, tiny models).
            nn.init.normal_(self.cond_projector.mlp.fc1.weight, std=self.cond_init_std)
            nn.init.normal_(self.cond_projector.mlp.fc2.weight, std=self.cond_init_std)
        for module in self.modules():
            if isinstance(module, LumosBlock):
                # adaLN-Zero: every residual branch starts closed.
                zero_module(module.adaLN_modulation)
                # Ungated cross-attention starts as a no-op through its zero output projection.
                zero_module(module.cross_attn.proj)
            elif isinstance(module, TemporalAttention | FrameAttention):
                # Inserted layers leave the pretrained per-frame function unchanged.
                zero_module(module.attn.proj)
            elif isinstance(module, FrameIndexEmbedder | CameraEmbedder):
                zero_module(module.mlp.fc2)
            elif isinstance(module, SizeEmbedder):
                # As PixArt-MS and the authors' LumosT2IMS (not zero: a small perturbation of the
                # timestep embedding when the T2I head is initialised from the prior).
                for layer in module.mlp:
                    if isinstance(layer, nn.Linear):
                        nn.init.normal_(layer.weight, std=0.02)
            elif isinstance(module, FinalLayer):
                # The output starts at zero; the (2, D) table keeps its random init (PixArt).
                zero_module(module.linear)

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """(1, gh * gw, D): the cached table at the configured size, recomputed for other grids."""
        base = self.base_grid
        if grid_h == base and grid_w == base:
            return self.pos_embed
        emb = get_2d_sincos_pos_embed(self.hidden_size, grid_h, grid_w, base, self.pos_embed_scale)
        return emb.to(self.pos_embed.device)

    def unpatchify(self, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """(N, T, p * p * C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        n = x.shape[0]
        x = x.reshape(n, grid_h, grid_w, p, p, c)  # (N, gh, gw, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, gh, p, gw, p)
        return x.reshape(n, c, grid_h * p, grid_w * p)  # (N, C, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor | None = None,
        *,
        frame_cond: torch.Tensor | None = None,
        concat_latent: torch.Tensor | None = None,
        micro_cond: torch.Tensor | None = None,
        force_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        expected_ndim = 5 if self.multi_frame else 4
        if x.ndim != expected_ndim:
            raise ValueError(
                f"x must be {'(B, F, C, H, W)' if self.multi_frame else '(B, C, H, W)'} "
                f"for num_frames={self.num_frames}, got shape {tuple(x.shape)}"
            )
        if (concat_latent is not None) != (self.concat_latent_channels > 0):
            raise ValueError(
                f"concat_latent is required iff concat_latent_channels > 0 "
                f"(configured {self.concat_latent_channels})"
            )
        if (frame_cond is not None) != (self.frame_embed != "none"):
            raise ValueError(
                f"frame_cond is required iff frame_embed != 'none' (configured {self.frame_embed!r})"
            )
        if (micro_cond is not None) != self.micro_conditions:
            raise ValueError(
                f"micro_cond is required iff micro_conditions (configured {self.micro_conditions})"
            )
        # Cached features are float16; compute in the model's own dtype (bf16/fp32).
        dtype = self.x_embedder.weight.dtype
        b = x.shape[0]
        # One drop decision per item for everything that conditions it: the condition token(s)
        # and the concatenated input view / first frame, so guidance acts on both.
        drop = self.cond_projector.drop_mask(b, x.device, force_drop)  # (B,)
        num_frames = x.shape[1] if self.multi_frame else 1
        h, w = x.shape[-2], x.shape[-1]
        p = self.patch_size
        if h % p != 0 or w % p != 0:
            raise ValueError(f"latent {h}x{w} is not a multiple of patch {p}")

        x = x.reshape(b * num_frames, x.shape[-3], h, w).to(dtype)  # (N, C, H, W), N = B * F
        if concat_latent is not None:
            # The input view / first frame conditions every frame through its channels.
            # A dropped item sees zeros: the unconditional branch knows nothing of the view.
            concat_latent = torch.where(drop[:, None, None, None], 0.0, concat_latent.to(dtype))
            extra = concat_latent.unsqueeze(1).expand(-1, num_frames, -1, -1, -1)
            extra = extra.reshape(b * num_frames, -1, h, w)  # (N, C_cat, H, W)
            x = torch.cat([x, extra], dim=1)  # (N, C + C_cat, H, W)
        x = self.x_embedder(x)  # (N, D, gh, gw)
        grid_h, grid_w = x.shape[-2], x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (N, T, D)
        x = x + self.position_embedding(grid_h, grid_w).to(dtype)  # (N, T, D)

        c = self.t_embedder(t)  # (B, D)
        if (
            self.csize_embedder is not None
            and self.ar_embedder is not None
            and micro_cond is not None
        ):
            size = micro_cond.float()  # (B, 2) height, width in pixels
            aspect = size[:, :1] / size[:, 1:]  # (B, 1) height / width
            sizes = torch.cat([self.csize_embedder(size), self.ar_embedder(aspect)], dim=1)
            c = c + F.pad(sizes, (0, c.shape[1] - sizes.shape[1]))  # (B, D)
        tokens, mask = self.cond_projector(cond.to(dtype), cond_mask, drop)  # (B, L, D)
        if self.multi_frame:
            c = c.unsqueeze(1).expand(-1, num_frames, -1)  # (B, F, D)
            if self.frame_embedder is not None:
                c = c + self.frame_embedder(frame_cond)  # (B, F, D)
            c = c.reshape(b * num_frames, -1)  # (N, D)
            tokens = tokens.unsqueeze(1).expand(-1, num_frames, -1, -1)  # (B, F, L, D)
            tokens = tokens.reshape(b * num_frames, tokens.shape[2], -1)  # (N, L, D)
            if mask is not None:
                mask = mask.unsqueeze(1).expand(-1, num_frames, -1)  # (B, F, L)
                mask = mask.reshape(b * num_frames, -1)  # (N, L)
        rotary = None
        if self.frame_blocks is not None:
            cos, sin = rotary_2d(
                grid_h,
                grid_w,
                self.hidden_size // self.num_heads,
                self.base_grid,
                self.pos_embed_scale,
            )
            rotary = (cos.to(x.device), sin.to(x.device))  # (T, Dh / 2) each
        for i, block in enumerate(self.blocks):
            x = block(x, c, tokens, mask)  # (N, T, D)
            if self.frame_blocks is not None and rotary is not None:
                x = self.frame_blocks[i](x, c, rotary)  # (N, T, D)
            if self.temporal_blocks is not None:
                x = self.temporal_blocks[i](x, num_frames)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p * p * C_out)
        x = self.unpatchify(x, grid_h, grid_w)  # (N, C_out, H, W)
        if self.multi_frame:
            x = x.reshape(b, num_frames, self.out_channels, h, w)  # (B, F, C_out, H, W)
        return x


# The size registry (DiT's naming: width/depth/heads, "/2" = patch size 2). One line each.
LUMOS_SIZES: dict[str, dict] = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=4, patch_size=2),
    "S/2": dict(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "B/2": dict(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "L/2": dict(depth=24, hidden_size=1024, num_heads=16, patch_size=2),
    "XL/2": dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2),
}


def lumos_dit_config(size: str, **overrides) -> dict:
    """The full init config of a registry size, with overrides (unknown keys are an error)."""
    if size not in LUMOS_SIZES:
        raise ModelConfigError(f"unknown Lumos size {size!r}; choose one of {sorted(LUMOS_SIZES)}")
    params = inspect.signature(LumosDiT.__init__).parameters
    config = {k: v.default for k, v in params.items() if k != "self"}
    config.update(LUMOS_SIZES[size])
    unknown = set(overrides) - set(config)
    if unknown:
        raise ModelConfigError(
            f"unknown LumosDiT config keys {sorted(unknown)}; valid: {sorted(config)}"
        )
    config.update(overrides)
    return config


def lumos_dit(size: str, **overrides) -> LumosDiT:
    """Build a model of a registry size: `lumos_dit("XL/2")`, `lumos_dit("tiny", input_size=8)`."""
    return LumosDiT(**lumos_dit_config(size, **overrides))
