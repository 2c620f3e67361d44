"""The training benchmark's plain reference computes exactly the Lumos function.

This is what makes the benchmark's comparison fair: the same model, written plainly.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import torch

from lumos.training.optim import MasterWeightAdamW

BENCH = Path(__file__).resolve().parents[2] / "bench" / "train_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("train_throughput_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reference_layout_equals_lumos_dit():
    bench = load_bench()
    assert bench.check_same_function("tiny") < 1e-5
    assert bench.check_same_function("tiny", seed=1) < 1e-5


def test_reference_has_the_lumos_parameter_count():
    bench = load_bench()
    with torch.device("meta"):
        ref = bench.RefDiT(**bench.lumos_dit_module.lumos_dit_config("XL/2"))
        lumos = bench.lumos_dit_module.lumos_dit("XL/2")
    count = sum(p.numel() for p in ref.parameters())
    assert count == sum(p.numel() for p in lumos.parameters())


def test_bf16w_variant_steps_the_training_loops_optimizer():
    bench = load_bench()
    # The class is the library's (loaded by path), not a copy kept in the benchmark.
    assert inspect.getfile(bench.MasterWeightAdamW) == inspect.getfile(MasterWeightAdamW)
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    opt = bench.MasterWeightAdamW(model.parameters(), lr=1e-3, foreach=True)
    before = [m.clone() for m in opt.master_params]
    model(torch.ones(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    opt.zero_grad()
    for p, m, b in zip(model.parameters(), opt.master_params, before, strict=True):
        assert m.dtype == torch.float32 and not torch.equal(m, b)
        assert torch.equal(p, m.to(torch.bfloat16))
        assert p.grad is None


def test_profile_splits_a_steps_device_time_by_kernel_kind():
    """`--profile`: what the next GPU session reads to aim a speed-up (kernel names from H100)."""
    bench = load_bench()
    assert bench.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == (
        "matmul"
    )
    assert bench.kernel_kind("nvjet_tst_192x192_64x4_1x2_h_bz_coopA_NTN") == "matmul"
    assert bench.kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel<...>") == (
        "attention"
    )
    assert bench.kernel_kind("triton_per_fused_add_mul_native_layer_norm_12") == "fused (inductor)"
    assert bench.kernel_kind("multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert bench.kernel_kind("aten::copy_") == "other"

    device = torch.device("cpu")
    step = bench.Step("lumos", set(), "tiny", device, compile_=False)
    g = torch.Generator().manual_seed(0)
    data = (
        torch.randn(2, 4, 32, 32, generator=g),
        torch.randint(0, 1000, (2,), generator=g),
        torch.randn(2, 4, 32, 32, generator=g),
        torch.randn(2, 768, generator=g),
    )
    profile = bench.profile_steps(step, data, device, steps=1)
    assert abs(sum(profile["share_by_kind"].values()) - 1.0) < 1e-6
    assert profile["share_by_kind"]["matmul"] > 0 and len(profile["top_kernels"]) == 20
    assert profile["ms_per_step_by_kind"]["matmul"] > 0
    phases = profile["ms_per_step_by_phase"]
    assert list(phases) == ["forward", "backward", "optimizer"] and min(phases.values()) > 0
    assert step.phase_marks is None  # timing is off again
