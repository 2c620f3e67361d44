"""The training loop on tiny features: steps, checkpoints, exact resume, fine-tune transfer."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch.nn.modules.module import register_module_forward_pre_hook

import lumos.training.train as loop
from lumos.checkpoints import (
    CheckpointNotFound,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_checkpoint_meta,
)
from lumos.models.lumos_dit import LumosDiT
from lumos.storage import Storage
from lumos.training.stopping import TrainingStopped
from lumos.training.train import build_model_config, train, update_ema


def test_i2i_trains_and_writes_a_complete_checkpoint(images_features, tmp_path, tiny_config):
    out = str(tmp_path / "run")
    result = train(tiny_config(steps=3), images_features, out)

    assert result.step == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    assert result.train_items == 18  # 20 images, 2 in the eval split
    assert result.checkpoint_uri == latest_checkpoint(out)
    meta = read_checkpoint_meta(out)
    assert meta["format"] == "lumos-checkpoint/1" and meta["head"] == "i2i" and meta["step"] == 3
    assert meta["encoders"] == {"vae": {"kind": "pixel"}}
    assert meta["train_config"]["steps"] == 3 and meta["parent"] is None
    loaded = load_checkpoint(out)
    assert loaded.model is not None and not loaded.ema_model.training
    # The EMA moved away from the raw weights' initial copy, but is not the raw weights.
    raw, ema = loaded.model.state_dict(), loaded.ema_model.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)


@pytest.mark.parametrize(
    "precision",
    [
        {},
        # bf16 weights with fp32 masters; a small grad_clip, so that clipping (of the fp32
        # gradient copies) takes part.
        {"mixed_precision": "bf16-weights", "grad_clip": 0.05},
    ],
    ids=["fp32", "bf16-weights"],
)
def test_resume_reproduces_the_uninterrupted_loss_curve(
    images_features, tmp_path, tiny_config, precision
):
    cfg = tiny_config(steps=6, grad_accum=2, checkpoint_every=3, **precision)
    full = train(cfg, images_features, str(tmp_path / "full"))

    interrupted = str(tmp_path / "interrupted")
    first = train(cfg.model_copy(update={"steps": 3}), images_features, interrupted)
    # A run killed while saving step 6 left its staging directory: the resumed run removes it.
    with Storage.from_uri(interrupted).child("step-0000006").staging_dir() as killed:
        (Path(killed) / "transformer").mkdir()
        (Path(killed) / "transformer" / "weights.bin").write_bytes(b"\0" * 4096)
        second = train(cfg, images_features, interrupted)
        assert not Path(killed).exists()
    assert sorted(p.name for p in Path(interrupted).iterdir()) == ["step-0000003", "step-0000006"]

    assert second.resumed_from == first.checkpoint_uri
    curve = torch.tensor([loss for _, loss in first.losses + second.losses], dtype=torch.float64)
    expected = torch.tensor([loss for _, loss in full.losses], dtype=torch.float64)
    assert [s for s, _ in first.losses + second.losses] == [s for s, _ in full.losses]
    torch.testing.assert_close(curve, expected, rtol=1e-6, atol=1e-9)
    # The final weights agree as well (raw and EMA).
    a, b = load_checkpoint(full.checkpoint_uri), load_checkpoint(second.checkpoint_uri)
    assert a.model is not None and b.model is not None
    for got, want in ((b.model, a.model), (b.ema_model, a.ema_model)):
        torch.testing.assert_close(got.state_dict(), want.state_dict(), rtol=1e-5, atol=1e-7)


def test_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_exactly(
    images_features, tmp_path, tiny_config, monkeypatch
):
    """SIGTERM (Kubernetes preempting the pod) during step 3 of 6: the run finishes step 3,
    writes a checkpoint there (not a checkpoint step) and raises TrainingStopped; run again, it
    resumes from step 3 and logs the uninterrupted run's losses."""
    cfg = tiny_config(steps=6, checkpoint_every=100)
    full = train(cfg, images_features, str(tmp_path / "full"))

    calls: list[int] = []

    def update_ema_then_signal(*args):  # a real signal, to this process, inside step 3
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        update_ema(*args)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(loop, "update_ema", update_ema_then_signal)
    out = str(tmp_path / "stopped")
    with pytest.raises(TrainingStopped, match=r"SIGTERM: stopped at step 3 of 6 .*step-0000003"):
        train(cfg, images_features, out)
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is handler  # the process's own handler is back
    assert [step for step, _ in list_checkpoints(out)] == [3]

    resumed = train(cfg, images_features, out)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("step-0000003")
    assert [step for step, _ in resumed.losses] == [4, 5, 6]
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in resumed.losses], dtype=torch.float64),
        torch.tensor([loss for _, loss in full.losses[3:]], dtype=torch.float64),
        rtol=1e-6,
        atol=1e-9,
    )


def test_steps_zero_writes_an_untrained_checkpoint(images_features, tmp_path, tiny_config):
    result = train(tiny_config(steps=0), images_features, str(tmp_path / "run"))
    assert result.step == 0 and result.final_loss is None and result.losses == []
    meta = read_checkpoint_meta(result.checkpoint_uri)
    assert meta["step"] == 0
    # Rerunning a finished run returns its checkpoint instead of training again.
    again = train(tiny_config(steps=0), images_features, str(tmp_path / "run"))
    assert again.checkpoint_uri == result.checkpoint_uri


def test_old_checkpoints_are_pruned(images_features, tmp_path, tiny_config):
    out = tmp_path / "run"
    # What a save cut off leaves (say a SIGTERM checkpoint whose upload the grace period ended):
    # a step directory without its metadata.
    (out / "step-0000001" / "training_state").mkdir(parents=True)
    (out / "step-0000001" / "training_state" / "rng-rank-00000.pt").write_bytes(b"partial")
    train(tiny_config(steps=4, checkpoint_every=2, keep_checkpoints=1), images_features, str(out))
    assert [step for step, _ in list_checkpoints(str(out))] == [4]
    assert sorted(p.name for p in out.iterdir()) == ["step-0000004"]


def test_resuming_with_another_config_is_an_error(images_features, tmp_path, tiny_config):
    out = str(tmp_path / "run")
    train(tiny_config(steps=1), images_features, out)
    with pytest.raises(ValueError, match="another run.*batch_size"):
        train(tiny_config(steps=2, batch_size=2), images_features, out)


def test_resuming_on_other_features_is_an_error(images_features, tmp_path, tiny_config):
    out = str(tmp_path / "run")
    train(tiny_config(steps=1), images_features, out)
    other = tmp_path / "other-features"
    shutil.copytree(images_features, other)
    spec_file = other / "features" / "features.json"
    spec = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps({**spec, "manifest_sha256": "1" * 64}))
    for steps in (2, 1):  # resuming, and rerunning the finished run
        with pytest.raises(ValueError, match="trained on other features"):
            train(tiny_config(steps=steps), str(other), out)


def test_a_checkpoint_as_out_uri_is_an_error(images_features, tmp_path, tiny_config):
    # Resuming "into" a checkpoint would nest new checkpoints inside it, and the next resume
    # would start from the outer one again.
    first = train(tiny_config(steps=1), images_features, str(tmp_path / "run"))
    with pytest.raises(ValueError, match="is a checkpoint, not a run directory"):
        train(tiny_config(steps=2), images_features, first.checkpoint_uri)


def test_model_overrides_may_not_set_what_the_features_decide(tiny_config):
    with pytest.raises(ValidationError, match=r"may not set \['in_channels', 'input_size'\]"):
        tiny_config(model_overrides={"input_size": 16, "in_channels": 3, "depth": 1})
    with pytest.raises(ValidationError, match="seed"):
        tiny_config(seed=2**32)


def test_accelerates_environment_does_not_change_gradient_accumulation(
    images_features, tmp_path, tiny_config, monkeypatch
):
    plain = train(tiny_config(steps=2), images_features, str(tmp_path / "plain"))
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with_env = train(tiny_config(steps=2), images_features, str(tmp_path / "env"))
    assert with_env.losses == plain.losses
    a, b = (
        load_checkpoint(plain.checkpoint_uri).ema_model,
        load_checkpoint(with_env.checkpoint_uri).ema_model,
    )
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointNotFound, match="no checkpoint at URI: .*nothing-here"):
        load_checkpoint(str(tmp_path / "nothing-here"))
    assert latest_checkpoint(str(tmp_path / "nothing-here")) is None


@pytest.fixture(scope="module")
def i2i_checkpoint(images_features, tmp_path_factory) -> str:
    from lumos.configs.training import TrainConfig

    cfg = TrainConfig(
        model_size="tiny",
        model_overrides={"depth": 1, "hidden_size": 32, "num_heads": 2},
        steps=2,
        batch_size=4,
        mixed_precision="no",
        compile=False,
        progress_bar=False,
    )
    return train(cfg, images_features, str(tmp_path_factory.mktemp("i2i"))).checkpoint_uri


@pytest.mark.parametrize(
    "head, features, new_prefix",
    [
        ("t2i", "images_features", "cond_projector."),
        ("novel_view", "views_features", "temporal_blocks."),
        ("video", "clips_features", "temporal_blocks."),
    ],
)
def test_finetune_from_i2i_reports_the_transfer(
    head, features, new_prefix, i2i_checkpoint, request, tmp_path, tiny_config
):
    dataset = request.getfixturevalue(features)
    num_frames = None if head == "t2i" else 3
    cfg = tiny_config(head=head, steps=2, batch_size=2, num_frames=num_frames)
    result = train(cfg, dataset, str(tmp_path / head), init_from=i2i_checkpoint)

    report = result.transfer_report
    assert report is not None and report["source"] == i2i_checkpoint
    assert report["source_head"] == "i2i" and report["source_weights"] == "ema"
    assert any(name.startswith("blocks.0.attn.") for name in report["loaded"])
    assert any(name.startswith(new_prefix) for name in report["new"])
    if head != "t2i":  # the concatenated input-view / first-frame latent grows the patch embedding
        assert report["partially_loaded"] == ["x_embedder.weight"]
    meta = read_checkpoint_meta(result.checkpoint_uri)
    assert meta["head"] == head and meta["parent"] == i2i_checkpoint
    assert meta["transfer_report"] == report
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    if head == "t2i":
        assert result.train_items == 10  # the captioned images (the 2 eval ones have none)
    else:
        assert result.train_items == 3 * (5 - 3 + 1)  # 3 training groups, windows of 3 frames


def test_t2i_continued_from_a_t2i_checkpoint_keeps_its_text_conditioning(
    images_features, i2i_checkpoint, tmp_path, tiny_config
):
    # T2I's resolution stages each start from the previous stage's checkpoint.
    cfg = tiny_config(head="t2i", steps=1, batch_size=2)
    stage1 = train(cfg, images_features, str(tmp_path / "t2i-1"), init_from=i2i_checkpoint)
    stage2 = train(cfg, images_features, str(tmp_path / "t2i-2"), init_from=stage1.checkpoint_uri)
    report = stage2.transfer_report
    assert report is not None and report["source_head"] == "t2i"
    assert report["new"] == [] and report["dropped"] == []
    null = "cond_projector.null_embedding"
    first, second = load_checkpoint(stage1.checkpoint_uri), load_checkpoint(stage2.checkpoint_uri)
    assert first.model is not None and second.model is not None
    assert torch.equal(second.model.state_dict()[null], first.model.state_dict()[null])


@pytest.mark.parametrize("latent, scale", [(32, 1.0), (64, 1.0), (128, 2.0)])
def test_position_scale_follows_the_resolution(latent, scale, tiny_config):
    spec = {
        "shapes": {"latents": [4, latent, latent], "image_embeds": [16]},
        "latent_downsample": 8,
    }
    assert build_model_config(tiny_config(), spec)["pos_embed_scale"] == scale


def test_checkpoint_to_s3_and_resume_from_it(images_features, s3_bucket, tiny_config):
    out = f"s3://{s3_bucket}/runs/i2i"
    first = train(tiny_config(steps=2), images_features, out)
    assert first.checkpoint_uri == f"{out}/step-0000002"
    second = train(tiny_config(steps=3), images_features, out)
    assert second.resumed_from == first.checkpoint_uri and second.step == 3
    loaded = load_checkpoint(out)
    assert loaded.meta["step"] == 3 and loaded.uri == f"{out}/step-0000003"


def test_resuming_a_finetune_from_another_parent_is_an_error(
    images_features, i2i_checkpoint, tmp_path, tiny_config
):
    out = str(tmp_path / "t2i")
    cfg = tiny_config(head="t2i", steps=1, batch_size=2)
    train(cfg, images_features, out, init_from=i2i_checkpoint)
    other = train(tiny_config(steps=0), images_features, str(tmp_path / "other-i2i"))
    for steps in (2, 1):  # resuming, and rerunning the finished run
        with pytest.raises(ValueError, match="was initialised from"):
            train(
                cfg.model_copy(update={"steps": steps}),
                images_features,
                out,
                init_from=other.checkpoint_uri,
            )


def test_bf16_autocast_after_a_full_precision_run_in_the_same_process(
    images_features, tmp_path, tiny_config
):
    train(tiny_config(steps=1), images_features, str(tmp_path / "fp32"))
    result = train(
        tiny_config(steps=2, mixed_precision="bf16"), images_features, str(tmp_path / "bf16")
    )
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    # Autocast computes in bf16; the weights (and so the checkpoint) stay float32.
    assert (
        next(load_checkpoint(result.checkpoint_uri).ema_model.parameters()).dtype == torch.float32
    )


def test_bf16_weights_train_bf16_parameters_on_fp32_masters(images_features, tmp_path, tiny_config):
    seen: set[torch.dtype] = set()

    def record_dtypes(module: torch.nn.Module, args: object) -> None:
        if isinstance(module, LumosDiT):
            seen.update(p.dtype for p in module.parameters())

    hook = register_module_forward_pre_hook(record_dtypes)
    try:
        result = train(
            tiny_config(steps=3, mixed_precision="bf16-weights"), images_features, str(tmp_path)
        )
    finally:
        hook.remove()

    assert seen == {torch.bfloat16}, "the model computes with bf16 parameters"
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    state = Storage.from_uri(result.checkpoint_uri).read_bytes("training_state/optimizer.pt")
    masters = torch.load(io.BytesIO(state), weights_only=False)["master_weights"]
    assert len(masters) == len(list(load_checkpoint(result.checkpoint_uri).model.parameters()))
    assert all(m.dtype == torch.float32 for m in masters)
    # bf16 compute follows the fp32 run closely (the zero-initialised output makes step 1 equal).
    fp32 = train(tiny_config(steps=3), images_features, str(tmp_path / "fp32"))
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in result.losses]),
        torch.tensor([loss for _, loss in fp32.losses]),
        rtol=1e-2,
        atol=0,
    )


def test_bf16_weights_checkpoint_loads_like_any_other(images_features, tmp_path, tiny_config):
    cfg = tiny_config(steps=2, mixed_precision="bf16-weights")
    result = train(cfg, images_features, str(tmp_path / "i2i"))

    # What evaluation and export load: fp32 weights, the masters as the raw model.
    loaded = load_checkpoint(result.checkpoint_uri)
    assert loaded.model is not None
    assert loaded.meta["train_config"]["mixed_precision"] == "bf16-weights"
    for model in (loaded.model, loaded.ema_model):
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    state = Storage.from_uri(result.checkpoint_uri).read_bytes("training_state/optimizer.pt")
    masters = torch.load(io.BytesIO(state), weights_only=False)["master_weights"]
    for master, saved in zip(masters, loaded.model.parameters(), strict=True):
        assert torch.equal(master, saved)
    raw, ema = loaded.model.state_dict(), loaded.ema_model.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    # A fine-tune starts from it through the usual weight transfer.
    t2i = tiny_config(head="t2i", steps=1, batch_size=2, mixed_precision="bf16-weights")
    finetune = train(t2i, images_features, str(tmp_path / "t2i"), init_from=result.checkpoint_uri)
    assert finetune.transfer_report is not None and finetune.transfer_report["loaded"]


def test_bf16_weights_with_fsdp_is_a_config_error(tiny_config):
    with pytest.raises(ValidationError, match="'bf16-weights' is for distributed 'ddp'"):
        tiny_config(mixed_precision="bf16-weights", distributed="fsdp")


def test_features_split_by_node_is_for_single_image_heads(tiny_config):
    with pytest.raises(ValidationError, match="shard_features_by_node is for i2i and t2i"):
        tiny_config(head="video", shard_features_by_node=True)
    assert tiny_config(head="t2i", shard_features_by_node=True).shard_features_by_node


def test_features_split_by_node_on_one_node_is_the_usual_run(
    images_features, tmp_path, tiny_config
):
    """One node (no LOCAL_WORLD_SIZE: one process): the flag changes nothing."""
    usual = train(tiny_config(steps=2), images_features, str(tmp_path / "usual"))
    split = train(
        tiny_config(steps=2, shard_features_by_node=True), images_features, str(tmp_path / "split")
    )
    assert split.losses == usual.losses and split.train_items == usual.train_items == 18


def test_nodes_of_unequal_process_counts_are_an_error(
    images_features, tmp_path, tiny_config, monkeypatch
):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # 3 processes a node, but 1 process in all
    with pytest.raises(RuntimeError, match="LOCAL_WORLD_SIZE=3 does not divide the 1 processes"):
        train(tiny_config(shard_features_by_node=True), images_features, str(tmp_path / "x"))
