"""Latency of one image: 20 DPM-Solver++ steps with CFG (batch 2) + decode, PyTorch vs ONNX Runtime.

    python bench/sampling_latency.py --size tiny                      # CPU smoke test (seconds)
    python bench/sampling_latency.py --size XL/2 --resolution 256     # on a GPU node

Paths timed (each the median of --repeats runs after --warmup runs, same model, same noise):
    pytorch-eager        lumos.diffusion.sampling.sample + the VAE decoder, eager
    pytorch-compile      the same with torch.compile'd denoiser and decoder
    pytorch-cudagraphs   torch.compile(mode="reduce-overhead") = CUDA graphs (CUDA only)
    onnxruntime          lumos.serving.onnx_pipeline.OnnxPipeline over `lumos export`'s output,
                         on the execution providers serving picks (TensorRT > CUDA > CPU)

The weights are random (no downloads): latency does not depend on them. tiny uses a 2-level VAE
(2x downsampling); other sizes the SD VAE's architecture (8x, 4 latent channels). Prints a table
and writes bench/results/sampling_latency.json. Target (BENCHMARKS.md): <= 60 ms per 256 px image
on an H100/H200, and the ONNX path within 1.5x of the best PyTorch path on the same card.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lumos.checkpoints import save_checkpoint
from lumos.configs.encoders import EncodersConfig, VAEConfig
from lumos.configs.export import ExportConfig
from lumos.diffusion.sampling import sample
from lumos.export.onnx_export import _decoder_graph_class, export
from lumos.export.tensorrt import onnxruntime_providers, select_providers
from lumos.heads import head_model_config
from lumos.models.lumos_dit import LUMOS_SIZES, LumosDiT, lumos_dit_config
from lumos.serving.onnx_pipeline import OnnxPipeline

RESULTS = Path(__file__).parent / "results" / "sampling_latency.json"
PATHS = ("pytorch-eager", "pytorch-compile", "pytorch-cudagraphs", "onnxruntime")


def build_vae(size: str):
    """Random-weight VAE: tiny (2 levels, 2x) for the smoke test, else the SD KL-f8 layout."""
    from diffusers import AutoencoderKL

    if size == "tiny":
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
        )
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    )


def build_model(size: str, head: str, latent: int) -> LumosDiT:
    base = lumos_dit_config(size, input_size=latent, in_channels=4, cond_dim=768)
    text_dim, tokens = (32, 8) if size == "tiny" else (4096, 120)
    config = head_model_config(base, head, text_dim=text_dim, text_tokens=tokens)
    model = LumosDiT(**config)
    with torch.no_grad():  # open the zero-initialised output paths so the work is real
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def conditions(model: LumosDiT, pixels: int) -> dict[str, torch.Tensor]:
    cfg = model.config
    if cfg.cond_kind == "text":
        return {
            "cond": torch.randn(1, cfg.cond_tokens, cfg.cond_dim),
            "cond_mask": torch.ones(1, cfg.cond_tokens, dtype=torch.bool),
            "micro_cond": torch.tensor([[float(pixels), float(pixels)]]),
        }
    return {"cond": torch.randn(1, cfg.cond_dim)}


class _CloneOutput(torch.nn.Module):
    """CUDA-graph outputs live in a buffer the next replay overwrites: hand out a copy."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs).clone()


def time_it(fn, warmup: int, repeats: int, sync) -> tuple[list[float], float]:
    """(per-run ms, first-call seconds: includes compilation)."""
    start = time.perf_counter()
    fn()
    sync()
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1000)
    return times, first


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=sorted(LUMOS_SIZES))
    parser.add_argument("--head", default="i2i", choices=["i2i", "t2i"])
    parser.add_argument("--resolution", type=int, default=None, help="pixels (tiny: 32, else 256)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=4.5)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="PyTorch paths (auto: bfloat16 on CUDA, float32 on CPU); ONNX is float32",
    )
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {PATHS}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    on_cuda = device.type == "cuda"
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    dtype = getattr(torch, dtype_name)
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    if not on_cuda and "pytorch-cudagraphs" in paths:
        paths.remove("pytorch-cudagraphs")  # CUDA graphs need CUDA: said in the output
    resolution = args.resolution or (32 if args.size == "tiny" else 256)
    torch.manual_seed(0)
    vae = build_vae(args.size).eval()
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if resolution % (down * 2):
        parser.error(f"--resolution must be a multiple of {down * 2} for size {args.size}")
    latent = resolution // down
    model = build_model(args.size, args.head, latent)
    kwargs = conditions(model, resolution)
    noise = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0))
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    decoder_fp32 = _decoder_graph_class()(vae, 0.18215).eval()

    results = []

    def pytorch_path(name: str, denoiser, decoder) -> None:
        def run():
            x = sample(
                denoiser,
                noise.shape,
                kwargs,
                steps=args.steps,
                guidance_scale=args.guidance_scale,
                noise=noise,
                device=device,
            )
            with torch.no_grad():
                return decoder(x.to(dtype))

        times, first = time_it(run, args.warmup, args.repeats, sync)
        results.append(
            {
                "path": name,
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "first_call_s": first,
                "dtype": dtype_name,
                "device": str(device),
            }
        )

    model_d = model.to(device, dtype)
    decoder_d = _decoder_graph_class()(vae.to(device, dtype), 0.18215).eval()
    if "pytorch-eager" in paths:
        pytorch_path("pytorch-eager", model_d, decoder_d)
    if "pytorch-compile" in paths:
        pytorch_path("pytorch-compile", torch.compile(model_d), torch.compile(decoder_d))
        torch._dynamo.reset()
    if "pytorch-cudagraphs" in paths:
        pytorch_path(
            "pytorch-cudagraphs",
            _CloneOutput(torch.compile(model_d, mode="reduce-overhead")),
            _CloneOutput(torch.compile(decoder_d, mode="reduce-overhead")),
        )
        torch._dynamo.reset()

    onnx_info = None
    if "onnxruntime" in paths:
        model_cpu = model.to("cpu", torch.float32)
        vae_cpu = vae.to("cpu", torch.float32)
        with tempfile.TemporaryDirectory(prefix="lumos-bench-") as tmp:
            vae_cpu.save_pretrained(Path(tmp) / "vae")
            encoders = EncodersConfig(vae=VAEConfig(kind="sd-vae", path=str(Path(tmp) / "vae")))
            ckpt = str(Path(tmp) / "ckpt")
            save_checkpoint(
                ckpt,
                model_cpu,
                model_cpu,
                {
                    "head": args.head,
                    "step": 0,
                    "encoders": encoders.model_dump(mode="json"),
                    "data": None,
                    "parent": None,
                    "train_config": {},
                    "transfer_report": None,
                },
            )
            start = time.perf_counter()
            exported = export(
                ExportConfig(check_batch_sizes=[1], tensorrt="off"), ckpt, str(Path(tmp) / "export")
            )
            export_s = time.perf_counter() - start
            pipe = OnnxPipeline(Path(tmp) / "export")
            np_kwargs = {k: v.numpy() for k, v in kwargs.items()}
            np_noise = noise.numpy()

            def run_onnx():
                return pipe.decode(
                    pipe.sample_latents(
                        np_kwargs,
                        steps=args.steps,
                        guidance_scale=args.guidance_scale,
                        noise=np_noise,
                    )
                )

            times, first = time_it(run_onnx, args.warmup, args.repeats, lambda: None)
            # The same image as eager fp32 PyTorch? (a correctness check of the timed path)
            with torch.no_grad():
                ref = decoder_fp32(
                    sample(
                        model_cpu,
                        noise.shape,
                        kwargs,
                        steps=args.steps,
                        guidance_scale=args.guidance_scale,
                        noise=noise,
                    )
                )
            max_diff = float(np.abs(run_onnx() - ref.numpy()).max())
        onnx_info = {
            "export_s": export_s,
            "max_abs_diff_vs_pytorch_fp32": max_diff,
            "graph_max_abs_diff": exported.max_abs_diff,
        }
        results.append(
            {
                "path": "onnxruntime",
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "first_call_s": first,
                "dtype": "float32",
                "device": ",".join(pipe.providers),
            }
        )

    best_torch = min(
        (r["median_ms"] for r in results if r["path"].startswith("pytorch")), default=None
    )
    report = {
        "what": "one image: DPM-Solver++ steps with CFG (batch 2) + decode",
        "size": args.size,
        "head": args.head,
        "resolution": resolution,
        "latent": [4, latent, latent],
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "device": torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "onnxruntime_providers": onnxruntime_providers(),
        "serving_providers": select_providers(onnxruntime_providers()),
        "results": results,
        "onnx": onnx_info,
        "onnx_over_best_pytorch": (
            next((r["median_ms"] for r in results if r["path"] == "onnxruntime"), None) / best_torch
            if best_torch and any(r["path"] == "onnxruntime" for r in results)
            else None
        ),
        "skipped": [] if on_cuda else ["pytorch-cudagraphs: needs CUDA"],
        "notes": (
            [
                "onnxruntime ran on CPU while PyTorch ran on CUDA: install onnxruntime-gpu "
                "(not beside onnxruntime) to compare on the same card"
            ]
            if on_cuda
            and "onnxruntime" in paths
            and select_providers(onnxruntime_providers())[0] == "CPUExecutionProvider"
            else []
        ),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(
        f"\n{args.size} {args.head}, {resolution} px, {args.steps} steps, CFG "
        f"{args.guidance_scale}, on {report['device']}"
    )
    print(f"{'path':<22}{'median ms':>12}{'min ms':>10}{'first s':>10}  dtype / device")
    for r in results:
        print(
            f"{r['path']:<22}{r['median_ms']:>12.1f}{r['min_ms']:>10.1f}"
            f"{r['first_call_s']:>10.1f}  {r['dtype']} / {r['device']}"
        )
    if report["onnx_over_best_pytorch"] is not None:
        print(
            f"onnxruntime / best PyTorch: {report['onnx_over_best_pytorch']:.2f}x "
            f"(max |image diff| vs fp32 PyTorch {onnx_info['max_abs_diff_vs_pytorch_fp32']:.1e})"
        )
    for note in report["notes"]:
        print(f"note: {note}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
