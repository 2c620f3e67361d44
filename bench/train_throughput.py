"""Training throughput of Lumos-XL/2 at 256 px against a plain-PyTorch reference, in one run.

    python bench/train_throughput.py                       # XL/2, batch 64, CUDA, ref,lumos,lumos-bf16w
    python bench/train_throughput.py --variants ref,lumos,lumos-bf16w-maxautotune
    python bench/train_throughput.py --size tiny --device cpu --steps 2     # CPU smoke test

What one step is: cached latents (B, 4, 32, 32) and one DINO CLS (B, 768) per image, q_sample,
forward, epsilon MSE plus a small stand-in for the vb term on the variance channels (so every
output channel gets a gradient), backward, AdamW (fused on CUDA), zero_grad. Data loading and the
frozen encoders are excluded (features are cached in this project).

Variants are a base (`ref` | `lumos`) with modifiers joined by `-` or `+`:
  bf16w        bf16 weights and activations, fp32 master weights in the optimizer: the library's
               MasterWeightAdamW, as the training loop's mixed_precision "bf16-weights" (else:
               fp32 weights under bf16 autocast, as the reference and the loop's "bf16")
  eager        no torch.compile
  maxautotune  torch.compile(mode="max-autotune-no-cudagraphs") (compiles for several minutes)
  cudagraphs   torch.compile(mode="max-autotune") (with CUDA graphs)
  cdt          inductor's coordinate-descent tuning of its own (norm / pointwise) kernels
  regional     compile each transformer block (one compiled graph reused 28 times: seconds of
               compile instead of minutes) instead of the whole model
  cudnn|flash  force that SDPA backend
--profile adds where each variant's device time goes to the JSON: by phase (forward, backward,
optimizer, timed with CUDA events), by kind of kernel (matmul, attention, fused elementwise,
optimizer, other) and the top 20 kernels.
The reference is the Lumos layout written plainly: DiT blocks with separate q/k/v/out linears,
SDPA, and a cross-attention that really attends to its one condition token.

FLOPs: counted with torch.utils.flop_counter on one eager step of each model. TFLOP/s and MFU
use the *reference layout's* FLOPs for every variant (model FLOPs, so a variant that skips exact
work is credited with speed, not with FLOPs); the executed FLOPs are reported beside them. MFU is
against the bf16 matmul ceiling measured in the same run (8192^3, median of 20 after 2 s of
them).

Imports only torch, diffusers, lumos/models/lumos_dit.py and lumos/training/optim.py (loaded by
path from the checkout), so it runs on a GPU image without the project's other dependencies.
Writes JSON to $OUT/train_throughput.json, else bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


def load_lumos_file(name: str):
    """lumos/<name>.py by path (name like "models.lumos_dit"): the package __init__s pull in
    pydantic, these files do not. Falls back to the installed package outside a checkout."""
    path = REPO / "src" / "lumos" / (name.replace(".", "/") + ".py")
    if not path.exists():
        return importlib.import_module(f"lumos.{name}")
    spec = importlib.util.spec_from_file_location(f"{name.replace('.', '_')}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# The training loop's optimizer for bf16 weights: the benchmark measures the library's code.
MasterWeightAdamW = load_lumos_file("training.optim").MasterWeightAdamW
try:
    lumos_dit_module = load_lumos_file("models.lumos_dit")
except ImportError as err:  # the GPU image has torch but not diffusers: carry its wheels
    raise SystemExit(
        f"train_throughput needs diffusers for LumosDiT ({err}); install the diffusers wheel and "
        "its requirements (Pillow, huggingface_hub, safetensors, regex, requests, filelock, "
        "importlib_metadata)"
    ) from err
try:  # ModelMixin.to(dtype) warns about fp32-only modules; LumosDiT has none
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
except ImportError:
    pass


# ----------------------------------------------------------------------------------------------
# The plain-PyTorch reference of the same layout (what "compiled reference" means in BENCHMARKS)
# ----------------------------------------------------------------------------------------------
class RefAttention(nn.Module):
    """Unfused q, k, v, out linears and SDPA; attends to `context` (itself when None)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        n, t, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(n, t, h, d // h).transpose(1, 2)  # (N, H, T, Dh)
        k = self.k(context).reshape(n, context.shape[1], h, d // h).transpose(1, 2)  # (N, H, L, Dh)
        v = self.v(context).reshape(n, context.shape[1], h, d // h).transpose(1, 2)  # (N, H, L, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(n, t, d))  # (N, T, D)


class RefBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.cross_attn = RefAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU("tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s1, sc1, g1, s2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)  # (N, D) each
        h = self.norm1(x) * (1 + sc1[:, None]) + s1[:, None]  # (N, T, D)
        x = x + g1[:, None] * self.attn(h)  # (N, T, D)
        x = x + self.cross_attn(x, y)  # (N, T, D)
        h = self.norm2(x) * (1 + sc2[:, None]) + s2[:, None]  # (N, T, D)
        return x + g2[:, None] * self.mlp(h)  # (N, T, D)


class RefDiT(nn.Module):
    """The Lumos layout written plainly (DiT-style), same widths and parameter count."""

    def __init__(self, input_size=32, in_channels=4, patch_size=2, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, cond_dim=768, cond_dropout_prob=0.1, **_):  # fmt: skip
        super().__init__()
        self.patch_size, self.out_channels = patch_size, 2 * in_channels
        self.cond_dropout_prob = cond_dropout_prob
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        grid = input_size // patch_size
        pos = lumos_dit_module.get_2d_sincos_pos_embed(hidden_size, grid, grid, grid, 1.0)
        self.register_buffer("pos_embed", pos, persistent=False)
        self.t_embedder = nn.Sequential(
            nn.Linear(256, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.y_embedder = nn.Sequential(
            nn.Linear(cond_dim, hidden_size), nn.GELU("tanh"), nn.Linear(hidden_size, hidden_size)
        )
        self.register_buffer("null_embedding", torch.randn(1, cond_dim) / cond_dim**0.5)
        self.blocks = nn.ModuleList(
            [RefBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n, _, hh, ww = x.shape
        p = self.patch_size
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D)
        t_freq = lumos_dit_module.sinusoidal_embedding(t, 256)  # (N, 256)
        c = self.t_embedder(t_freq)  # (N, D)
        y = F.normalize(cond, dim=-1)  # (N, Dc)
        if self.training and self.cond_dropout_prob > 0:
            drop = torch.rand(n, device=x.device) < self.cond_dropout_prob  # (N,)
            y = torch.where(drop[:, None], self.null_embedding, y)  # (N, Dc)
        y = self.y_embedder(y).unsqueeze(1)  # (N, 1, D)
        for block in self.blocks:
            x = block(x, c, y)  # (N, T, D)
        shift, scale = (self.final_table[None] + c[:, None]).unbind(1)  # (N, D) each
        x = self.final_norm(x) * (1 + scale[:, None]) + shift[:, None]  # (N, T, D)
        x = self.final_linear(x)  # (N, T, p * p * C)
        x = x.reshape(n, hh // p, ww // p, p, p, self.out_channels)  # (N, gh, gw, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, gh, p, gw, p)
        return x.reshape(n, self.out_channels, hh, ww)  # (N, C, H, W)


@torch.no_grad()
def ref_from_lumos(lumos: nn.Module, ref: RefDiT) -> RefDiT:
    """Copy a LumosDiT's weights into the reference: proves both compute the same function."""
    d = lumos.config.hidden_size
    sd = lumos.state_dict()
    out = {
        "x_embedder.weight": sd["x_embedder.weight"],
        "x_embedder.bias": sd["x_embedder.bias"],
        "null_embedding": sd["cond_projector.null_embedding"],
        "final_table": sd["final_layer.scale_shift_table"],
        "final_linear.weight": sd["final_layer.linear.weight"],
        "final_linear.bias": sd["final_layer.linear.bias"],
    }
    for i, j in ((0, 0), (2, 2)):
        for kind in ("weight", "bias"):
            out[f"t_embedder.{i}.{kind}"] = sd[f"t_embedder.mlp.{j}.{kind}"]
    for i, fc in ((0, "fc1"), (2, "fc2")):
        for kind in ("weight", "bias"):
            out[f"y_embedder.{i}.{kind}"] = sd[f"cond_projector.mlp.{fc}.{kind}"]
    for b in range(lumos.config.depth):
        src, dst = f"blocks.{b}.", f"blocks.{b}."
        for kind in ("weight", "bias"):
            q, k, v = sd[src + f"attn.qkv.{kind}"].split(d)
            out[dst + f"attn.q.{kind}"], out[dst + f"attn.k.{kind}"] = q, k
            out[dst + f"attn.v.{kind}"] = v
            out[dst + f"attn.proj.{kind}"] = sd[src + f"attn.proj.{kind}"]
            out[dst + f"cross_attn.q.{kind}"] = sd[src + f"cross_attn.q.{kind}"]
            k, v = sd[src + f"cross_attn.kv.{kind}"].split(d)
            out[dst + f"cross_attn.k.{kind}"], out[dst + f"cross_attn.v.{kind}"] = k, v
            out[dst + f"cross_attn.proj.{kind}"] = sd[src + f"cross_attn.proj.{kind}"]
            out[dst + f"mlp.0.{kind}"] = sd[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.2.{kind}"] = sd[src + f"mlp.fc2.{kind}"]
            out[dst + f"adaLN_modulation.1.{kind}"] = sd[src + f"adaLN_modulation.1.{kind}"]
    ref.load_state_dict(out, strict=True)
    return ref


def check_same_function(size: str = "tiny", seed: int = 0) -> float:
    """Max |LumosDiT - RefDiT| on random weights and inputs (eval mode, fp32, CPU)."""
    torch.manual_seed(seed)
    config = lumos_dit_module.lumos_dit_config(size, input_size=8)
    lumos = lumos_dit_module.LumosDiT(**config).eval()
    with torch.no_grad():
        for p in lumos.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-init layers would hide differences
    ref = ref_from_lumos(lumos, RefDiT(**config).eval())
    x = torch.randn(3, config["in_channels"], 8, 8)
    t = torch.tensor([0, 400, 999])
    cond = torch.randn(3, config["cond_dim"])
    with torch.no_grad():
        return (lumos(x, t, cond) - ref(x, t, cond)).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
MODIFIERS = {
    "regional", "bf16w", "eager", "maxautotune", "cudagraphs", "cdt", "cudnn", "flash"
}  # fmt: skip


def parse_variant(name: str) -> tuple[str, set[str]]:
    parts = name.replace("+", "-").split("-")
    base, mods = parts[0], set(parts[1:])
    if base not in ("ref", "lumos") or not mods <= MODIFIERS:
        raise SystemExit(f"bad variant {name!r}: base ref|lumos, modifiers {sorted(MODIFIERS)}")
    return base, mods


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(
    device: torch.device, size: int, repeats: int = 20, warmup_s: float | None = None
) -> float:
    """bf16 matmul TFLOP/s, median of `repeats` single matmuls, after `warmup_s` seconds of them
    (default 2 s on CUDA: an idle GPU's clock needs that to rise, and a ceiling measured before
    it has would flatter every MFU measured against it)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    warmup_s = (2.0 if device.type == "cuda" else 0.1) if warmup_s is None else warmup_s
    start = time.perf_counter()
    while True:
        a @ b
        synchronize(device)
        if time.perf_counter() - start >= warmup_s:
            break
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def build_model(base: str, size: str) -> nn.Module:
    config = lumos_dit_module.lumos_dit_config(size)
    if base == "lumos":
        return lumos_dit_module.LumosDiT(**config)
    return RefDiT(**config)


class Step:
    """One training step of a variant: model, optimizer, precision, compile mode, SDPA backend."""

    def __init__(self, base: str, mods: set[str], size: str, device: torch.device, compile_: bool):
        torch.manual_seed(0)
        self.device = device
        self.model = build_model(base, size).to(device).train()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.bf16_weights = "bf16w" in mods
        adamw = dict(lr=1e-4, weight_decay=0.03, eps=1e-10)  # PixArt-alpha's recipe
        adamw["fused" if device.type == "cuda" else "foreach"] = True
        if self.bf16_weights:
            self.model.to(torch.bfloat16)
            # No clipping, as in the fp32-weight variants (the loop passes max_grad_norm).
            self.opt = MasterWeightAdamW(self.model.parameters(), **adamw)
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), **adamw)
        self.forward = self.model
        self.compiled = compile_ and "eager" not in mods
        if self.compiled:
            mode = "max-autotune-no-cudagraphs" if "maxautotune" in mods else None
            mode = "max-autotune" if "cudagraphs" in mods else mode
            options = {"coordinate_descent_tuning": True} if "cdt" in mods else None
            if options and mode:
                raise SystemExit(
                    "cdt cannot be combined with maxautotune/cudagraphs (one of mode/options)"
                )
            if "regional" in mods:
                # Each block is its own module instance: without room for one cache entry per
                # block, dynamo stops recompiling after 8 and the rest run eagerly.
                torch._dynamo.config.cache_size_limit = 256
                torch._dynamo.config.accumulated_cache_size_limit = 4096
                for block in self.model.blocks:
                    block.compile(mode=mode, options=options)
            else:
                self.forward = torch.compile(self.model, mode=mode, options=options)
        self.phase_marks: list | None = None  # (phase, event or time) while timing phases
        self.sdpa = None
        if mods & {"cudnn", "flash"}:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = SDPBackend.CUDNN_ATTENTION if "cudnn" in mods else SDPBackend.FLASH_ATTENTION
            self.sdpa = lambda: sdpa_kernel(backend)
        betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.sqrt_ab = alphas_cumprod.sqrt().float().to(device)
        self.sqrt_1m_ab = (1 - alphas_cumprod).sqrt().float().to(device)

    def autocast(self):
        if self.bf16_weights:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def __call__(self, x0, t, noise, cond, forward=None) -> torch.Tensor:
        forward = forward or self.forward
        self.mark("start")
        with self.sdpa() if self.sdpa else nullcontext(), self.autocast():
            a = self.sqrt_ab[t].view(-1, 1, 1, 1)
            b = self.sqrt_1m_ab[t].view(-1, 1, 1, 1)
            xt = a * x0 + b * noise  # (B, C, H, W)
            if self.bf16_weights:
                xt, cond = xt.bfloat16(), cond.bfloat16()
            out = forward(xt, t, cond)  # (B, 2C, H, W)
            eps, var = out.float().chunk(2, dim=1)  # (B, C, H, W) each
            # Stand-in for the vb term: keeps the variance channels in the backward pass.
            loss = F.mse_loss(eps, noise) + 1e-3 * var.pow(2).mean()
        self.mark("forward")
        loss.backward()
        self.mark("backward")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.mark("optimizer")
        return loss.detach()

    def mark(self, phase: str) -> None:
        """The end of a phase of the step, while `phase_marks` is a list (`phase_times`)."""
        if self.phase_marks is None:
            return
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.phase_marks.append((phase, event))
        else:  # CPU ops are synchronous
            self.phase_marks.append((phase, time.perf_counter()))

    def count_flops(self, x0, t, noise, cond) -> int:
        """FLOPs of one eager forward + backward (the optimizer's elementwise work not counted)."""
        with FlopCounterMode(display=False) as counter:
            with self.sdpa() if self.sdpa else nullcontext(), self.autocast():
                a = self.sqrt_ab[t].view(-1, 1, 1, 1)
                xt = a * x0 + self.sqrt_1m_ab[t].view(-1, 1, 1, 1) * noise
                if self.bf16_weights:
                    xt, cond = xt.bfloat16(), cond.bfloat16()
                out = self.model(xt, t, cond)
                loss = out.float().pow(2).mean()
            loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


KERNEL_KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "aten::mm", "addmm", "bmm")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("fused (inductor)", ("triton",)),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lower for k in keys)), "other")


def phase_times(step: Step, data, device: torch.device, steps: int = 3) -> dict[str, float]:
    """Mean ms per step of its phases: forward (with the loss), backward, and the optimizer
    (step and zero_grad), from CUDA events between them: whatever kernels each phase runs."""
    step.phase_marks = []
    for _ in range(steps):
        step(*data)
    synchronize(device)
    marks, step.phase_marks = step.phase_marks, None
    totals: dict[str, float] = {}
    for (_, before), (phase, after) in zip(marks, marks[1:], strict=False):
        if phase == "start":  # the gap between two steps
            continue
        ms = before.elapsed_time(after) if device.type == "cuda" else (after - before) * 1e3
        totals[phase] = totals.get(phase, 0.0) + ms
    return {phase: ms / steps for phase, ms in totals.items()}


def profile_steps(step: Step, data, device: torch.device, steps: int = 3) -> dict:
    """Where a step's device time goes: per phase (`phase_times`), per kind of kernel (matmul,
    attention, fused elementwise, optimizer, other) and the top kernels, over `steps` steps
    (torch.profiler). On CUDA only the kernels count: an op's device time is its kernels' time,
    so counting both would count each kernel twice (as an earlier version of this did)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    phases = phase_times(step, data, device, steps)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step(*data)
        synchronize(device)
    if device.type == "cuda":
        events = [  # kernels and copies; not the spans of record_function annotations
            e
            for e in prof.key_averages()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
        rows = [(e.key, e.self_device_time_total) for e in events]
    else:  # CPU ops run synchronously: their own (self) time
        rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    total = sum(us for _, us in rows) or 1.0
    kinds: dict[str, float] = {}
    for name, us in rows:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + us
    return {
        "ms_per_step_by_phase": phases,
        "ms_per_step_by_kind": {k: v / 1e3 / steps for k, v in sorted(kinds.items())},
        "share_by_kind": {k: v / total for k, v in sorted(kinds.items())},
        "top_kernels": [
            {"name": name[:120], "ms_per_step": us / 1e3 / steps, "share": us / total}
            for name, us in rows[:20]
        ],
    }


def measure(name: str, args, device: torch.device, data, compile_: bool) -> dict:
    base, mods = parse_variant(name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = Step(base, mods, args.size, device, compile_)
    flops = step.count_flops(*data)
    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        loss = step(*data)
    synchronize(device)
    warmup_s = time.perf_counter() - compile_start
    assert torch.isfinite(loss), f"{name}: non-finite loss {loss.item()}"
    times = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        loss = step(*data)
        synchronize(device)
        times.append(time.perf_counter() - start)
    assert torch.isfinite(loss), f"{name}: non-finite loss {loss.item()}"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else math.nan
    result = {
        "variant": name,
        "params_m": step.num_params / 1e6,
        "compiled": step.compiled,
        "bf16_weights": step.bf16_weights,
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_mean": 1e3 * statistics.mean(times),
        "img_per_s": args.batch / statistics.median(times),
        "executed_flops_per_step": flops,
        "warmup_s": warmup_s,
        "peak_mem_gib": peak,
        "final_loss": loss.item(),
    }
    if args.profile:
        result["profile"] = profile_steps(step, data, device)
        shares = ", ".join(f"{k} {v:.0%}" for k, v in result["profile"]["share_by_kind"].items())
        print(f"{name}: device time by kind: {shares}", flush=True)
        phases = ", ".join(
            f"{k} {v:.1f}" for k, v in result["profile"]["ms_per_step_by_phase"].items()
        )
        print(f"{name}: ms per step by phase: {phases}", flush=True)
    del step
    gc.collect()
    torch._dynamo.reset()
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="XL/2", help="registry size (tiny, S/2, B/2, L/2, XL/2)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument(
        "--warmup", type=int, default=3, help="untimed steps (compile happens here)"
    )
    parser.add_argument("--latent", type=int, default=32, help="latent grid (32 = 256 px)")
    parser.add_argument("--variants", default="ref,lumos,lumos-bf16w")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument(
        "--compile-on-cpu",
        action="store_true",
        help="compile on CPU too (inductor's C++ build takes minutes on 2 cores)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--matmul-size", type=int, default=None, help="default 8192 (CUDA), 512")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT or bench/results)")
    parser.add_argument(
        "--profile", action="store_true", help="also profile 3 steps: device time by kernel kind"
    )
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (optimizer math) on TF32
        torch.backends.cudnn.allow_tf32 = True
    compile_ = not args.no_compile and (device.type == "cuda" or args.compile_on_cpu)
    if not args.no_compile and not compile_:
        print("note: torch.compile skipped on CPU (pass --compile-on-cpu to force)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        parse_variant(v)

    diff = check_same_function()
    print(f"reference computes the Lumos function: max |diff| = {diff:.2e} (tiny, fp32)")
    assert diff < 1e-4, f"the reference layout differs from LumosDiT by {diff}"
    ceiling = matmul_ceiling(device, args.matmul_size or (8192 if device.type == "cuda" else 512))
    gen = torch.Generator(device="cpu").manual_seed(0)
    cond_dim = lumos_dit_module.lumos_dit_config(args.size)["cond_dim"]
    data = (
        torch.randn(args.batch, 4, args.latent, args.latent, generator=gen).to(device),
        torch.randint(0, 1000, (args.batch,), generator=gen).to(device),
        torch.randn(args.batch, 4, args.latent, args.latent, generator=gen).to(device),
        torch.randn(args.batch, cond_dim, generator=gen).to(device),
    )
    # Model FLOPs: the reference layout's count, used for every variant's TFLOP/s and MFU.
    ref_flops = Step("ref", set(), args.size, device, compile_=False).count_flops(*data)
    out = Path(args.out) if args.out else (
        Path(os.environ["OUT"]) / "train_throughput.json" if os.environ.get("OUT")
        else REPO / "bench" / "results" / "train_throughput.json"
    )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for v in variants:  # one at a time, saved as it goes: a run cut short keeps what it measured
        results.append(measure(v, args, device, data, compile_))
        print(f"measured {v}: {results[-1]['img_per_s']:.1f} img/s", flush=True)
        out.write_text(json.dumps({"partial": True, "ceiling": ceiling, "results": results}))
    ref_speed = next(
        (r["img_per_s"] for r in results if parse_variant(r["variant"])[0] == "ref"), None
    )
    for r in results:
        seconds = r["step_ms_median"] / 1e3
        r["model_flops_per_step"] = ref_flops
        r["tflops_model"] = ref_flops / seconds / 1e12
        r["tflops_executed"] = r["executed_flops_per_step"] / seconds / 1e12
        r["mfu"] = r["tflops_model"] / ceiling
        r["speedup_vs_ref"] = r["img_per_s"] / ref_speed if ref_speed else None

    report = {
        "benchmark": "train_throughput",
        "size": args.size,
        "batch": args.batch,
        "latent": args.latent,
        "steps": args.steps,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "matmul_ceiling_tflops": ceiling,
        "ref_flops_per_step": ref_flops,
        "reference_check_max_abs_diff": diff,
        "results": results,
    }
    header = f"{'variant':<28}{'img/s':>9}{'step ms':>9}{'TFLOP/s':>9}{'exec TF/s':>10}{'MFU':>7}{'vs ref':>8}{'peak GiB':>9}"
    print(
        f"\n{args.size}, batch {args.batch}, {args.latent}x{args.latent} latents, {report['device']}"
    )
    print(
        f"bf16 matmul ceiling: {ceiling:.1f} TFLOP/s; reference FLOPs/step: {ref_flops / 1e12:.3f} T"
    )
    print(header)
    for r in results:
        speed = f"{r['speedup_vs_ref']:.2f}x" if r["speedup_vs_ref"] else "-"
        print(
            f"{r['variant']:<28}{r['img_per_s']:>9.1f}{r['step_ms_median']:>9.1f}"
            f"{r['tflops_model']:>9.1f}{r['tflops_executed']:>10.1f}{r['mfu']:>7.1%}{speed:>8}"
            f"{r['peak_mem_gib']:>9.1f}"
        )
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
