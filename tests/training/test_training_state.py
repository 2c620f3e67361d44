"""A training run's checkpoint save and restore, apart from the loop: `save_training_checkpoint`
writes what `restore_training_state` loads back into freshly built objects, exactly."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lumos.checkpoints import read_checkpoint_meta
from lumos.checkpoints.training_state import restore_training_state
from lumos.features.format import read_features_spec
from lumos.training import train as loop


def build(cfg, dataset_uri):
    """What `train()` builds before its loop, by the same setup functions."""
    launch = loop.setup_launch(cfg)
    spec = read_features_spec(dataset_uri)
    data = loop.setup_data(cfg, dataset_uri, spec, launch)
    state, lineage = loop.setup_model(cfg, spec, launch, data.sampler, None, None)
    meta = loop.checkpoint_meta(cfg, dataset_uri, spec, data, state, lineage, cfg.batch_size)
    return launch, data, state, meta


def params(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


@pytest.mark.parametrize("precision", ["no", "bf16-weights"])
def test_a_saved_training_state_restores_exactly(images_features, tmp_path, tiny_config, precision):
    cfg = tiny_config(mixed_precision=precision)
    torch.manual_seed(0)
    launch, data, state, meta = build(cfg, images_features)
    loop.prepare(cfg, launch, state, num_sizes=1)
    # One optimizer step (so that Adam has state), an EMA that differs from the model, three
    # batches into the data order, step 7.
    for p in state.model.parameters():
        p.grad = torch.randn_like(p)
    state.optimizer.step()
    loop.update_ema(state.ema, [p.float() for p in state.model.parameters()], 0.5)
    for _ in range(3):
        data.sampler.next_batch()
    state.step = 7
    uri = loop.save_training_checkpoint(cfg, str(tmp_path / "run"), launch, state, meta, 0.25)
    # What the process draws next, and what it holds, at the moment of the checkpoint.
    draws = (torch.rand(3), np.random.rand(), random.random())
    weights, ema = params(state.model), params(state.ema)
    optimizer = state.optimizer.state_dict()["state"]
    position, next_batch = data.sampler.state_dict(), data.sampler.next_batch()

    torch.manual_seed(1)  # other initial weights: the restore must replace every one of them
    _, fresh_data, fresh, _ = build(cfg, images_features)
    assert any(not torch.equal(a, b) for a, b in zip(params(fresh.model), weights, strict=True))
    step = restore_training_state(
        uri, fresh.model, fresh.ema, fresh.optimizer, fresh_data.sampler, rank=0
    )

    assert step == 7
    for got, want in ((params(fresh.model), weights), (params(fresh.ema), ema)):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    restored = fresh.optimizer.state_dict()["state"]
    assert restored.keys() == optimizer.keys() and restored
    for key, value in optimizer.items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(restored[key][name]), torch.as_tensor(tensor))
    assert fresh_data.sampler.state_dict() == position
    assert fresh_data.sampler.next_batch() == next_batch
    assert torch.equal(torch.rand(3), draws[0])
    assert np.random.rand() == draws[1] and random.random() == draws[2]
    saved = read_checkpoint_meta(uri)
    assert (saved["step"], saved["loss"], saved["head"]) == (7, 0.25, "i2i")
    assert saved["train_items"] == 18 and saved["parent"] is None


def test_a_restore_in_another_world_is_a_clear_error(images_features, tmp_path, tiny_config):
    cfg = tiny_config()
    launch, data, state, meta = build(cfg, images_features)
    uri = loop.save_training_checkpoint(cfg, str(tmp_path / "run"), launch, state, meta, None)
    _, fresh_data, fresh, _ = build(cfg, images_features)
    args = (uri, fresh.model, fresh.ema, fresh.optimizer, fresh_data.sampler)
    with pytest.raises(ValueError, match="split the features over 1 nodes, this run splits them"):
        restore_training_state(*args, rank=0, feature_node=(0, 2))
    with pytest.raises(ValueError, match="no RNG state for process 1: it was saved by 1 processes"):
        restore_training_state(*args, rank=1)
