"""How much a checkpoint uses its condition, per noise level: the x0 error with and without it.

    python bench/condition_use.py CHECKPOINT DATASET [--split eval] [--items 32]

For items of DATASET (the features of the checkpoint's head), noises them to several timesteps,
and measures the mean squared error of the model's x0 prediction (from its epsilon, or the
epsilon its v implies, clipped to the latent range) with the condition and with it dropped
(`force_drop`: the null condition, and for novel views / video no input view / first frame),
per frame for the multi-frame heads. Beside them, the error of copying the input view / first
frame. A model that uses its condition has a
lower error with it; one whose first frame is concatenated to every frame can copy frame 0
exactly, so its frame-0 error with the condition says how much of the concatenated latent it
reads (docs/benchmarks.md, "The tiny models beside trivial baselines"). Prints a table and
writes bench/results/condition_use.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from lumos.checkpoints import load_checkpoint
from lumos.diffusion.gaussian import GaussianDiffusion
from lumos.features.items import FeatureDataset
from lumos.features.table import load_feature_table
from lumos.heads import batch_to_model_inputs

ROOT = Path(__file__).resolve().parents[1]
TIMESTEPS = (10, 100, 300, 500, 700, 900, 999)


def measure(checkpoint: str, dataset: str, split: str, items: int, seed: int) -> dict:
    ckpt = load_checkpoint(checkpoint, device="cpu", raw=False)
    model, head = ckpt.ema_model.eval(), ckpt.meta["head"]
    table = load_feature_table(dataset, split=split)
    num_frames = int(model.config.get("num_frames", 1) or 1)
    ds = FeatureDataset.for_head(table, head, num_frames=num_frames)
    if head == "t2i":
        raise SystemExit(
            "t2i: captions are embedded at evaluation time; give an i2i or multi-frame head"
        )
    batch = ds.batch(list(range(min(items, len(ds.items)))))
    x0, kwargs = batch_to_model_inputs(head, batch, 1)  # (B, [F,] C, h, w)
    multi = x0.ndim == 5
    frames = x0 if multi else x0[:, None]  # (B, F, C, h, w)
    copy = ((frames[:, :1] - frames) ** 2).mean(dim=(0, 2, 3, 4))  # (F,)
    diffusion = GaussianDiffusion()
    generator = torch.Generator().manual_seed(seed)
    c, n = x0.shape[-3], x0.shape[0]
    rows = []
    with torch.no_grad():
        for t in TIMESTEPS:
            ts = torch.full((n,), t)
            noise = torch.randn(tuple(x0.shape), generator=generator)
            x_t = diffusion.q_sample(x0, ts, noise)
            ab = float(diffusion.alphas_cumprod[t])
            errors = {}
            for name, drop in (("with", False), ("without", True)):
                out = model(x_t, ts, **kwargs, force_drop=torch.full((n,), drop))
                eps = out.split(c, dim=-3)[0]
                if model.config.prediction_type == "v_prediction":
                    eps = diffusion.eps_from_v(eps, x_t, ts)  # the epsilon the v implies
                pred = ((x_t - (1 - ab) ** 0.5 * eps) / ab**0.5).clamp(-1, 1)
                err = (pred - x0) ** 2
                err = err if multi else err[:, None]
                errors[name] = [round(v, 5) for v in err.mean(dim=(0, 2, 3, 4)).tolist()]
            rows.append({"t": t, "snr": round(ab / (1 - ab), 6), **errors})
    return {
        "checkpoint": ckpt.uri,
        "head": head,
        "step": ckpt.meta.get("step"),
        "dataset": dataset,
        "split": split,
        "items": n,
        "copy_first": [round(v, 5) for v in copy.tolist()],
        "x0_mse": rows,
        "machine": f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} threads)",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("dataset")
    p.add_argument("--split", default="eval")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "condition_use.json"))
    args = p.parse_args()
    result = measure(args.checkpoint, args.dataset, args.split, args.items, args.seed)
    print(f"{result['head']} step {result['step']}: x0 mse per frame, with / without the condition")
    print(f"  copying frame 0: {result['copy_first']}")
    for row in result["x0_mse"]:
        print(f"  t={row['t']:4d} (snr {row['snr']:.4g}): {row['with']} / {row['without']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
