"""The tiny training setup the training tests share (CPU, fp32, a few steps)."""

from __future__ import annotations

TINY_MODEL = {"depth": 1, "hidden_size": 32, "num_heads": 2}

# TrainConfig fields of a tiny CPU run: one block, fp32, no compile, a loss logged every step.
TINY_CONFIG = dict(
    model_size="tiny",
    model_overrides=TINY_MODEL,
    steps=4,
    batch_size=2,
    warmup_steps=2,
    mixed_precision="no",
    compile=False,
    log_every=1,
    progress_bar=False,
    lr=1e-3,
)
