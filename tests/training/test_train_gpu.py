"""The training loop on a CUDA GPU: bf16 autocast, fused AdamW, torch.compile, exact resume.

Run on a GPU machine with `pytest -m gpu tests/training -s` (prints the measured throughput).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from lumos.checkpoints import load_checkpoint
from lumos.configs.training import TrainConfig
from lumos.features.format import write_feature_part, write_features_spec
from lumos.storage import Storage
from lumos.training.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Per-GPU batch of the XL/2 throughput test; bench/gpu_checks.sh passes its BATCH.
BATCH = int(os.environ.get("LUMOS_GPU_BATCH", "64"))


def random_features(
    root,
    n: int,
    latent: tuple[int, int, int],
    embed_dim: int,
    image: int,
    text: tuple[int, int] | None = None,
) -> str:
    """`n` random feature rows in the contract layout (the loop does not care what they show);
    with `text` = (tokens, dim), every row captioned with 8 to 64 T5-shaped tokens."""
    g = torch.Generator().manual_seed(0)
    paired = text is not None
    records = [
        {"key": f"k{i:06d}", "meta": {}, "caption": "c" if paired else None, "paired": paired}
        for i in range(n)
    ]
    rows = text_embeds = text_mask = None
    if text is not None:
        rows = torch.arange(n)
        text_mask = torch.arange(text[0]) < torch.randint(8, 65, (n, 1), generator=g)
        text_embeds = torch.randn(n, *text, generator=g).half() * text_mask[..., None]
    features = Storage.from_uri(str(root)).child("features")
    write_feature_part(
        features,
        "part-00000",
        records,
        torch.randn(n, *latent, generator=g),
        torch.randn(n, embed_dim, generator=g),
        rows,
        text_embeds,
        text_mask,
    )
    shapes = {
        "image": [image, image],
        "latents": list(latent),
        "image_embeds": [embed_dim],
        "text_embeds": list(text) if text is not None else None,
    }
    write_features_spec(
        features,
        [{"name": "part-00000", "count": n, "paired": n if paired else 0}],
        shapes,
        encoders={},
        manifest_sha256=None,
        resolution=image,
        dataset_uri=str(root),
    )
    return str(root)


def test_bf16_compiled_training_and_resume_on_cuda(tmp_path):
    data = random_features(tmp_path / "data", 512, (4, 16, 16), 768, 128)
    cfg = TrainConfig(
        model_size="S/2",
        steps=6,
        batch_size=16,
        checkpoint_every=3,
        log_every=1,
        warmup_steps=2,
        compile=False,
        progress_bar=False,
    )
    assert cfg.mixed_precision == "bf16"
    full = train(cfg, data, str(tmp_path / "full"))
    first = train(cfg.model_copy(update={"steps": 3}), data, str(tmp_path / "resumed"))
    second = train(cfg, data, str(tmp_path / "resumed"))
    resumed = torch.tensor([loss for _, loss in first.losses + second.losses], dtype=torch.float64)
    expected = torch.tensor([loss for _, loss in full.losses], dtype=torch.float64)
    print("\nGPU resume: max |loss difference| =", (resumed - expected).abs().max().item())
    # cuDNN / SDPA kernels may reorder floating-point sums between runs: near-exact, not bitwise.
    torch.testing.assert_close(resumed, expected, rtol=1e-3, atol=1e-4)

    compiled = train(
        cfg.model_copy(update={"compile": True, "steps": 4}), data, str(tmp_path / "compiled")
    )
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in compiled.losses)
    loaded = load_checkpoint(compiled.checkpoint_uri, device="cuda")
    assert next(loaded.ema_model.parameters()).dtype == torch.float32  # master weights stay fp32


# "bf16-weights" is the layout bench/train_throughput.py measured fastest (`lumos-bf16w`).
@pytest.mark.parametrize("mixed_precision", ["bf16", "bf16-weights"])
@pytest.mark.parametrize("size", ["XL/2"])
def test_throughput_at_the_paper_size(tmp_path, size, mixed_precision):
    data = random_features(tmp_path / "data", 4096, (4, 32, 32), 768, 256)
    timed_run(tmp_path, data, model_size=size, mixed_precision=mixed_precision, steps=40)


def timed_run(tmp_path, data: str, **config) -> None:
    """Train a compiled config at batch BATCH, print its throughput, check its losses are finite."""
    cfg = TrainConfig(
        **config,
        batch_size=BATCH,
        log_every=10,
        compile=True,
        checkpoint_every=1000,
        keep_checkpoints=1,
        progress_bar=False,
    )
    result = train(cfg, data, str(tmp_path / "run"))
    print(
        f"\n{cfg.model_size} {cfg.head} 256px {cfg.mixed_precision} compiled, batch {BATCH}: "
        f"{result.last_images_per_second:.0f} img/s (steady), "
        f"{result.images_per_second:.0f} img/s with compile, peak memory "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, losses {result.losses}"
    )
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    # An XL/2 checkpoint is about 13 GB, and pytest keeps its last three runs' temporary
    # directories: without this a second run on a GPU machine's small disk ran out of space.
    shutil.rmtree(tmp_path / "run")


def test_batches_are_assembled_in_pinned_memory(images_features, views_features):
    """With pin_memory (the loop sets it on CUDA), every tensor of a batch is page-locked: one
    pageable tensor would make its copy to the GPU wait for the previous step again."""
    from lumos.features.items import FeatureDataset
    from lumos.features.table import load_feature_table

    for dataset, head, frames in ((images_features, "t2i", 1), (views_features, "novel_view", 3)):
        items = FeatureDataset.for_head(load_feature_table(dataset), head, num_frames=frames)
        for pack_text in (False, True):  # the loop packs captions
            batch = items.batch([0, 1], pin_memory=True, pack_text=pack_text)
            assert all(t.is_pinned() for t in batch.values()), {
                k: t.is_pinned() for k, t in batch.items()
            }
        assert not any(t.is_pinned() for t in items.batch([0, 1]).values())


def test_t2i_throughput_at_the_paper_size(tmp_path):
    """The T2I fine-tune's step: XL/2 cross-attending to 120 T5-XXL tokens (4096-d)."""
    data = random_features(tmp_path / "data", 512, (4, 32, 32), 768, 256, text=(120, 4096))
    timed_run(
        tmp_path, data, head="t2i", model_size="XL/2", mixed_precision="bf16-weights", steps=30
    )
