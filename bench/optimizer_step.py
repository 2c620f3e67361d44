"""The optimizer step alone: MasterWeightAdamW's default path against fused_step=True.

    python bench/optimizer_step.py --size XL/2 --device cuda          # on a lent GPU (seconds)
    python bench/optimizer_step.py --size tiny --depth 28             # XL/2's 462 tensors, tiny width

The model is a registry size in bf16 with random bf16 gradients (no forward or backward), so
the figures are the step of `mixed_precision: bf16-weights` with the loop's clipping (--clip):
- default: the gradients copied to fp32, clip_grad_norm_, torch's AdamW (fused on CUDA), the
  masters copied back to bf16;
- fused: `fused_master_update` compiled once and called per parameter.
Each is the median of --steps steps after --warmup. Also printed: the fused step's first call
(its compile, with inductor's caches off so that it is always a cold compile) and the memory
traffic per step that each path's arithmetic implies, as GB/s at the measured time, and how
far the two paths' master weights are apart after the same steps (a correctness check). Writes
bench/results/optimizer_step.json (or --out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch._inductor.config

from lumos.models.lumos_dit import lumos_dit
from lumos.training.optim import MasterWeightAdamW

RESULTS = Path(__file__).parent / "results" / "optimizer_step.json"
# Bytes of memory traffic per parameter and step, by the arithmetic in docs/benchmarks.md:
# default: bf16 grad -> fp32 (2 + 4), clipping's norm and multiply (4 + 8), AdamW on the fp32
# master, grad and moments (4 + 8 + 8 + 8 read/written), fp32 master -> bf16 (4 + 2);
# fused: bf16 grad (2), master, moments (8 each), bf16 weight (2), and the norm's read (2).
BYTES_PER_PARAM = {"default": (40, 52), "fused": (28, 30)}  # (without, with) clipping


def timed(step, device: torch.device) -> float:
    """Seconds of one call, the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="XL/2", help="a key of LUMOS_SIZES")
    parser.add_argument("--depth", type=int, default=None, help="override the size's depth")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--clip", type=float, default=1.0, help="max grad norm; 0: no clipping")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch._inductor.config.force_disable_caches = True  # the compile is always timed cold
    device = torch.device(args.device)
    overrides = {"depth": args.depth} if args.depth else {}
    base = lumos_dit(args.size, input_size=32, **overrides).to(device, torch.bfloat16)
    clip = args.clip or None
    adamw = dict(lr=1e-4, weight_decay=0.03, eps=1e-10, fused=device.type == "cuda")

    result: dict = {
        "size": args.size,
        "depth_override": args.depth,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "clip": clip,
        "steps": args.steps,
        "paths": {},
    }
    masters: dict[str, list[torch.Tensor]] = {}
    for path in ("default", "fused"):
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        generator = torch.Generator(device).manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, device=device).to(p.dtype) * 1e-3
        optimizer = MasterWeightAdamW(
            model.parameters(), max_grad_norm=clip, fused_step=path == "fused", **adamw
        )
        first = timed(optimizer.step, device)  # the fused path compiles here
        for _ in range(args.warmup):
            optimizer.step()
        times = [timed(optimizer.step, device) for _ in range(args.steps)]
        numel = sum(p.numel() for p in params)
        ms = statistics.median(times) * 1e3
        gbytes = numel * BYTES_PER_PARAM[path][clip is not None] / 1e9
        result["paths"][path] = {
            "tensors": len(params),
            "parameters": numel,
            "first_call_s": round(first, 2),
            "ms_per_step": round(ms, 3),
            "arithmetic_gb_per_step": round(gbytes, 2),
            "implied_gb_per_s": round(gbytes / (ms / 1e3), 1),
        }
        print(f"{path:8s} {len(params)} tensors, {numel / 1e6:.1f}M parameters: first call "
              f"{first:.1f} s, {ms:.2f} ms/step (median of {args.steps}), "
              f"{gbytes:.2f} GB by arithmetic = {gbytes / (ms / 1e3):.0f} GB/s", flush=True)  # fmt: skip
        masters[path] = [m.detach().clone() for m in optimizer.master_params]
        del model, optimizer, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    paths = result["paths"]
    result["fused_speedup"] = round(
        paths["default"]["ms_per_step"] / paths["fused"]["ms_per_step"], 3
    )
    print(f"fused / default: {result['fused_speedup']:.2f}x")
    # The same steps on the same gradients: the two paths must agree (the clipping norm is
    # summed in another order, so not to the bit). Against the distance the steps moved them.
    initial = [p.detach().float() for p in base.parameters() if p.requires_grad]
    pairs = zip(masters["default"], masters["fused"], initial, strict=True)
    diffs = [((a - b).abs().max().item(), (a - w).abs().max().item()) for a, b, w in pairs]
    result["masters_max_abs_diff"] = max(d for d, _ in diffs)
    result["masters_max_abs_moved"] = max(m for _, m in diffs)
    print(f"masters after {1 + args.warmup + args.steps} steps: max |fused - default| = "
          f"{result['masters_max_abs_diff']:.3g} (they moved up to "
          f"{result['masters_max_abs_moved']:.3g})")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
