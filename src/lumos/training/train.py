"""One training loop for I2I pretraining and every fine-tune (t2i, novel_view, video).

Reads top to bottom like DiT's train.py: setup, data, model and EMA, optimizer, resume, loop,
checkpoint. Heads differ only by their model config and how a batch becomes model inputs
(`lumos.heads`); the loop is the same.

    result = train(TrainConfig(head="i2i", model_size="XL/2"), "s3://lumos/datasets/images",
                   "s3://lumos/runs/r1/checkpoints/i2i")
    result = train(TrainConfig(head="t2i"), dataset_uri, out_uri, init_from=result.checkpoint_uri)

Precision (`mixed_precision`): "bf16" computes under bf16 autocast over fp32 weights; "bf16-weights"
holds the model's parameters in bf16 (every op computes in bf16, no autocast) while the optimizer
(`lumos.training.optim.MasterWeightAdamW`) keeps fp32 master weights, clips the fp32 copies of the
gradients, steps AdamW on the masters and copies them back; the EMA follows the masters and the
checkpoints hold the fp32 masters, so they look the same in every mode. "bf16-weights" is the
layout that bench/train_throughput.py measured fastest (variant `lumos-bf16w`, which runs the same
optimizer class); inside this loop it ran XL/2 at 533 img/s on an H100 (docs/benchmarks.md). The
presets keep "bf16" until the two modes are timed in one run of the loop.

Single process, or several under `accelerate launch --multi_gpu` (DDP): `batch_size` is per
process and per micro-step, so one optimizer step sees batch_size x grad_accum x processes items.
With `distributed="fsdp"` (same launch) the processes shard the model, its gradients, the
optimizer state and the EMA instead of each holding a copy (FSDP2 `fully_shard`, one unit per
block): for sizes whose replicas do not fit. Checkpoints are the same full, unsharded files
either way (gathered on the main process when saving), so evaluation and export never see FSDP.
A run whose `out_uri` already holds a checkpoint resumes from it: model, EMA, optimizer, LR
schedule (a function of the step), RNG states of every process and the data position, so the
resumed run continues the uninterrupted run's loss curve exactly (the first logged mean after a
resume between two log steps covers only the steps since the resume). It resumes only the same
run: the same config (but for `RESUME_MAY_CHANGE`), features and parent checkpoint, else a clear
error.

DDP suffices up to XL/2 (822M parameters: 33.5 GiB peak at batch 64 in bf16, measured on an
H200). FSDP is wired with torch's `fully_shard` directly, not accelerate's FSDP plugin: accelerate
1.15 silently falls back to DDP for CPU processes, so its plugin path could not be tested on CPUs,
whereas this one runs the same code on gloo (tests) and NCCL.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
)
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm.auto import tqdm

from lumos.checkpoints import (
    checkpoint_dirname,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    local_copy,
    prune_checkpoints,
    read_checkpoint_meta,
    remove_stale_staging,
    save_checkpoint,
)
from lumos.configs.training import TrainConfig
from lumos.diffusion.gaussian import GaussianDiffusion
from lumos.features.format import read_features_spec
from lumos.features.items import FeatureDataset
from lumos.features.table import load_feature_table, node_parts, pad_text
from lumos.heads import HEADS, batch_to_model_inputs, head_model_config
from lumos.models.lumos_dit import LumosDiT, lumos_dit_config
from lumos.models.transfer import transfer_weights
from lumos.storage import Storage
from lumos.training.monitoring import TrainingMetrics
from lumos.training.optim import MasterWeightAdamW
from lumos.training.sampler import ResumableSampler
from lumos.training.stopping import StopSignal, TrainingStopped

logger = logging.getLogger(__name__)

# One process, or DDP on GPUs (NCCL) or CPUs (gloo: how the tests check the multi-process path).
DATA_PARALLEL = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
# Full (unsharded) state dicts of FSDP modules, gathered onto the main process's CPU memory.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)

# Settings that may change between an interrupted run and its resumption; any other difference
# means out_uri holds another run's checkpoints, and resuming from them would be wrong.
RESUME_MAY_CHANGE = (
    "steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "pushgateway_url",
    "compile",
    "progress_bar",
    "stop_check_every",
)


class TrainResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint_uri: str  # the final checkpoint (a step-XXXXXXX directory under out_uri)
    head: str
    step: int
    final_loss: float | None  # mean loss of the last logged interval (None after 0 steps)
    losses: list[tuple[int, float]]  # (step, mean loss since the previous log) of this call
    images_per_second: float  # over this call's steps, all processes (frames count as images)
    # Over the last log interval only: the steady state, without torch.compile's warm-up.
    last_images_per_second: float
    num_parameters: int
    train_items: int
    skipped_groups: int  # multi-frame groups shorter than num_frames (not trained on)
    # Items of image sizes (aspect buckets) too few to fill one global batch (not trained on).
    starved_items: int = 0
    global_batch: int  # items per optimizer step
    resumed_from: str | None
    transfer_report: dict[str, Any] | None


def train(
    cfg: TrainConfig,
    dataset_uri: str,
    out_uri: str,
    init_from: str | None = None,
    continue_from: str | None = None,
) -> TrainResult:
    """Train `cfg.head` on the features of `dataset_uri`, checkpointing to `out_uri`.

    `init_from` (a checkpoint or run URI) initialises the model through weight transfer, for
    fine-tuning a head from the I2I checkpoint. `continue_from` (a checkpoint of the same head,
    e.g. the previous retraining's I2I) continues it: the model from its weights and the EMA from
    its EMA, with a fresh optimizer and schedule; its checkpoints record it as their parent.
    `steps=0` writes an untrained (with `continue_from`: the continued) checkpoint.
    """
    if init_from is not None and continue_from is not None:
        raise ValueError("give init_from (another head's checkpoint) or continue_from, not both")
    # --- setup --------------------------------------------------------------------------------
    accelerator = _make_accelerator(cfg)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != world:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate runs {world}: each "
            "process would train alone on the same out_uri; on CPUs set ACCELERATE_USE_CPU=1 "
            "(or use `accelerate launch --cpu`)"
        )
    if accelerator.distributed_type not in DATA_PARALLEL:
        raise NotImplementedError(
            f"distributed type {accelerator.distributed_type} is not supported: launch one "
            "process or several with --multi_gpu, and set TrainConfig(distributed='fsdp') to "
            "shard the model (accelerate's own FSDP launch, --use_fsdp, is not used here)"
        )
    if cfg.distributed == "fsdp" and world == 1:
        raise ValueError(
            "distributed='fsdp' shards the model across processes, but this run has one: "
            "launch several (accelerate launch --multi_gpu) or use distributed='ddp'"
        )
    if is_checkpoint(out_uri):
        raise ValueError(
            f"out_uri {out_uri} is a checkpoint, not a run directory: a run writes its "
            "checkpoints under out_uri as step-XXXXXXX/ and resumes from the latest; pass the "
            "directory above it to resume that run"
        )
    checkpoints = list_checkpoints(out_uri)
    resume_meta = read_checkpoint_meta(checkpoints[-1][1]) if checkpoints else None
    if accelerator.is_main_process:
        remove_stale_staging(out_uri)  # before this run needs the disk space for its own
    spec = read_features_spec(dataset_uri)
    if resume_meta is not None:
        _check_resumable(cfg, resume_meta, spec, init_from or continue_from)
        if resume_meta["step"] >= cfg.steps:
            logger.info(
                "%s already holds step %d >= %d steps", out_uri, resume_meta["step"], cfg.steps
            )
            return _result_from_meta(resume_meta)
    _seed_everything(cfg.seed)  # the same initial model on every process

    # --- data: cached features -> items of this head ------------------------------------------
    # Which processes share one copy of the features: all of them, or each node's (split by node).
    nodes, node = _feature_nodes(cfg, rank, world)
    data_world, data_rank = world // nodes, rank % (world // nodes)
    parts = node_parts(len(spec["parts"]), node, nodes) if nodes > 1 else None
    table = load_feature_table(dataset_uri, split="train", part_ids=parts)
    dataset = FeatureDataset.for_head(table, cfg.head, num_frames=cfg.num_frames or 1)
    if dataset.skipped_groups:
        accelerator.print(
            f"{cfg.head}: {dataset.skipped_groups} groups have fewer than {cfg.num_frames} frames "
            "and are not used"
        )
    # Several image sizes (aspect buckets): every batch holds one size.
    sizes = dataset.item_sizes()
    sampler = ResumableSampler(
        len(dataset), cfg.batch_size * data_world, cfg.seed, data_rank, data_world, groups=sizes
    )
    if sampler.starved_items:
        accelerator.print(
            f"{cfg.head}: {sampler.starved_items} items are of image sizes with fewer items than "
            f"one global batch ({sampler.global_batch}) and are not used; items per latent size: "
            + ", ".join(
                f"{table.latent_sizes[i][0]}x{table.latent_sizes[i][1]}: {n}"
                for i, n in (sampler.group_sizes or {}).items()
            )
        )
    train_items, starved_items = len(dataset), sampler.starved_items
    if nodes > 1:  # each node counted its own parts: report the whole run's (every node's)
        counts = accelerator.gather(torch.tensor([[train_items, starved_items]], device=device))
        train_items, starved_items = (counts.sum(dim=0) // data_world).tolist()  # (W, 2) -> 2
    frames = cfg.num_frames or 1
    global_batch = cfg.batch_size * world * cfg.grad_accum  # items per optimizer step
    images_per_step = global_batch * frames
    latent_downsample = int(spec["latent_downsample"])
    # Batches in page-locked memory: their copy to the GPU does not wait for the previous step,
    # so the next batch is assembled while the GPU computes.
    pin_memory = device.type == "cuda"

    # --- model and EMA ------------------------------------------------------------------------
    model_cfg = build_model_config(cfg, spec)
    model = LumosDiT(**model_cfg)
    transfer_report, parent, continued_ema = None, None, None
    if resume_meta is not None:  # the transfer happened in the run being resumed
        transfer_report, parent = resume_meta.get("transfer_report"), resume_meta.get("parent")
    elif continue_from is not None:
        transfer_report, continued_ema = continue_training_from(continue_from, model, cfg)
        parent = transfer_report["source"]
        accelerator.print(f"{cfg.head}: continues {parent} ({transfer_report['summary']})")
    elif init_from is not None:
        transfer_report = initialise_from(init_from, model, cfg)
        parent = transfer_report["source"]
        accelerator.print(f"{cfg.head}: {transfer_report['summary']} from {parent}")
    model.to(device).train()
    if cfg.mixed_precision == "bf16-weights":
        # Cast before the EMA copy and the optimizer's fp32 masters are taken, so both start from
        # the very weights the model computes with.
        model.bfloat16()
    # The EMA starts as a copy of the initial (or transferred) weights, as in DiT; always fp32.
    ema = copy.deepcopy(model).float().requires_grad_(False).eval()
    if continued_ema is not None:  # a continued run's EMA goes on from the source's EMA
        transfer_weights(continued_ema, ema, HEADS[cfg.head].allowed_new, reinitialise=False)
    num_parameters = sum(p.numel() for p in model.parameters())
    if cfg.distributed == "fsdp":
        # Every process starts from the same full model (same seed) and keeps its 1/world shard.
        # The EMA is sharded alike, so its update stays an elementwise op on the local shards.
        mesh = init_device_mesh(device.type, (world,))
        _shard(model, mesh, cfg.mixed_precision)
        _shard(ema, mesh, cfg.mixed_precision)

    # --- optimizer ----------------------------------------------------------------------------
    # Built after sharding: under FSDP its state covers only this process's shards.
    adamw: dict[str, Any] = dict(
        lr=cfg.lr,
        betas=cfg.adam_betas,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=device.type == "cuda",  # one kernel for all parameters
    )
    # With bf16 weights the optimizer holds the fp32 masters (and clips their gradients).
    master_optimizer: MasterWeightAdamW | None = None
    if cfg.mixed_precision == "bf16-weights":
        master_optimizer = MasterWeightAdamW(
            model.parameters(), max_grad_norm=cfg.grad_clip, **adamw
        )
    optimizer = master_optimizer or torch.optim.AdamW(model.parameters(), **adamw)

    # --- resume -------------------------------------------------------------------------------
    # A different stream per process, so the processes draw different noise and timesteps.
    _seed_everything(cfg.seed * world + rank)
    step = 0
    if resume_meta is not None:
        step = _load_training_state(
            resume_meta["uri"], model, ema, optimizer, sampler, rank, (node, nodes)
        )
        logger.info("resumed from %s at step %d", resume_meta["uri"], step)

    if cfg.distributed == "fsdp":
        # Already sharded: accelerate adds autocast and gradient accumulation but must not wrap
        # it in DDP, which `evaluation_mode` skips (it does not switch the model to eval).
        model = accelerator.prepare_model(model, evaluation_mode=True)
        optimizer = accelerator.prepare_optimizer(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    train_model = model
    if cfg.compile:
        # One static graph per latent size. With aspect buckets, dynamo's automatic dynamic
        # shapes still compiled a graph per size (the model branches on its grid), stopped
        # compiling at its recompile limit (8) and ran further sizes eagerly; in a CPU run of 11
        # sizes (torch 2.13) a backward reused for another size crashed on its strides. Each size
        # now compiles once, at its first batch, up to twice the sizes the features hold.
        limit = 2 * len(table.latent_sizes)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
        train_model = torch.compile(model, dynamic=False)
    diffusion = GaussianDiffusion()  # DDPM, linear betas 1e-4..0.02, 1000 steps, learned sigma

    meta = {
        "head": cfg.head,
        "encoders": spec.get("encoders"),
        "data": {"dataset_uri": dataset_uri, "manifest_sha256": spec.get("manifest_sha256")},
        "features": {k: spec.get(k) for k in ("shapes", "latent_downsample", "resolution")},
        "parent": parent,
        "train_config": cfg.model_dump(mode="json"),
        "transfer_report": transfer_report,
        "num_parameters": num_parameters,
        "global_batch": global_batch,
        "train_items": train_items,
        "skipped_groups": dataset.skipped_groups,
        "starved_items": starved_items,
    }

    def checkpoint(step: int, loss: float | None) -> str:
        ckpt = Storage.from_uri(out_uri).child(checkpoint_dirname(step))
        # Every process saves its own RNG state; the main process writes the rest, meta last.
        ckpt.write_bytes(f"training_state/rng-rank-{rank:05d}.pt", _to_bytes(_rng_state()))
        if nodes > 1 and data_rank == 0:  # each node's place in its own parts' order
            ckpt.write_json(f"training_state/data-node-{node:05d}.json", sampler.state_dict())
        raw, ema_weights = accelerator.unwrap_model(model), ema
        if master_optimizer is not None:  # the fp32 masters, not their bf16 copies in the model
            raw = _model_from_weights(master_optimizer.master_state_dict(raw), model_cfg)
        if cfg.distributed == "fsdp":
            # Gathering the shards is collective (every process calls it); the main process
            # receives full weights and optimizer state, the same files DDP writes.
            optimizer_state = get_optimizer_state_dict(raw, optimizer.optimizer, options=FULL_STATE)
            raw, ema_weights = _gather(raw, model_cfg), _gather(ema, model_cfg)
        else:
            optimizer_state = optimizer.state_dict()
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # The LR schedule is a function of the step: the step is its whole state.
            position: dict[str, Any] = {"step": step, "world_size": world, "feature_nodes": nodes}
            if nodes == 1:
                position["data"] = sampler.state_dict()
            else:  # each node's own position, written by the node above
                position["data_by_node"] = [f"data-node-{i:05d}.json" for i in range(nodes)]
            state = {
                "optimizer.pt": _to_bytes(optimizer_state),
                "state.json": json.dumps(position, indent=2).encode(),
            }
            assert raw is not None and ema_weights is not None, "gathered on the main process"
            save_checkpoint(ckpt.uri, raw, ema_weights, {**meta, "step": step, "loss": loss}, state)
            prune_checkpoints(out_uri, cfg.keep_checkpoints)
        accelerator.wait_for_everyone()
        return ckpt.uri

    # --- loop ---------------------------------------------------------------------------------
    push_url = cfg.pushgateway_url if accelerator.is_main_process else None
    metrics = TrainingMetrics(
        run=Storage.from_uri(out_uri).uri, head=cfg.head, pushgateway_url=push_url
    )
    losses: list[tuple[int, float]] = []
    final_loss = resume_meta.get("loss") if resume_meta else None
    start_step, start_time = step, time.perf_counter()
    running_loss, log_steps, log_time = torch.zeros((), device=device), 0, time.perf_counter()
    images_per_second = 0.0
    checkpoint_uri = resume_meta["uri"] if resume_meta else None
    show_bar = cfg.progress_bar and accelerator.is_main_process
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.head}", disable=not show_bar)
    if step == 0 and cfg.steps == 0:
        checkpoint_uri = checkpoint(0, None)  # an untrained model: the gate must reject it
    # SIGTERM (a preempted node, a deleted job) ends the run after the current step, with a
    # checkpoint (lumos.training.stopping).
    with StopSignal(cfg.stop_check_every, device) as stop:
        while step < cfg.steps:
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum):
                # Captions travel packed and are padded to the model's length on the device.
                batch = dataset.batch(sampler.next_batch(), pin_memory, pack_text=True)
                batch = pad_text(_to_device(batch, device))
                x0, model_kwargs = batch_to_model_inputs(cfg.head, batch, latent_downsample)
                t = diffusion.sample_timesteps(x0.shape[0], device=device)  # (B,)
                # Under FSDP every micro-step reduce-scatters its gradients (accelerate's no_sync
                # does not apply to fully_shard): skipping it would keep unsharded gradients.
                with accelerator.accumulate(model):
                    loss = diffusion.training_losses(train_model, x0, t, model_kwargs)[
                        "loss"
                    ].mean()
                    accelerator.backward(loss)  # divided by grad_accum inside
                    if accelerator.sync_gradients and master_optimizer is None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()  # a no-op until the last micro-step (accelerate)
                    optimizer.zero_grad(set_to_none=True)
                running_loss += loss.detach() / cfg.grad_accum
            decay = cfg.ema_decay
            if cfg.ema_warmup:
                decay = min(decay, (1 + step) / (10 + step))
            # The EMA follows the fp32 weights: the optimizer's masters when the model holds bf16.
            raw_model = accelerator.unwrap_model(model)
            weights = master_optimizer.master_params if master_optimizer else raw_model.parameters()
            update_ema(ema, weights, decay)
            step += 1
            log_steps += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.steps:
                # One sync per log interval (as DiT): the mean loss over steps and processes.
                mean_loss = accelerator.reduce(running_loss / log_steps, reduction="mean").item()
                now = time.perf_counter()
                images_per_second = images_per_step * log_steps / (now - log_time)
                losses.append((step, mean_loss))
                final_loss = mean_loss
                bar.set_postfix(
                    loss=f"{mean_loss:.4f}", img_s=f"{images_per_second:.1f}", lr=f"{lr:.2e}"
                )
                metrics.update(step=step, loss=mean_loss, images_per_second=images_per_second)
                metrics.push()
                running_loss.zero_()
                log_steps, log_time = 0, now
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint_uri = checkpoint(step, final_loss)
            if step < cfg.steps and stop.should_stop(step):  # collective: same steps on all
                if step % cfg.checkpoint_every:  # not written just above
                    checkpoint_uri = checkpoint(step, final_loss)
                bar.close()
                raise TrainingStopped(
                    f"{stop.received or 'SIGTERM on another process'}: stopped at step {step} "
                    f"of {cfg.steps} after writing checkpoint {checkpoint_uri}; run the same "
                    "training again (same out_uri) to resume from it"
                )
    bar.close()

    elapsed = time.perf_counter() - start_time
    steps_done = step - start_step
    assert checkpoint_uri is not None
    return TrainResult(
        checkpoint_uri=checkpoint_uri,
        head=cfg.head,
        step=step,
        final_loss=final_loss,
        losses=losses,
        images_per_second=images_per_step * steps_done / elapsed if steps_done else 0.0,
        last_images_per_second=images_per_second,
        num_parameters=num_parameters,
        train_items=train_items,
        skipped_groups=dataset.skipped_groups,
        starved_items=starved_items,
        global_batch=global_batch,
        resumed_from=resume_meta["uri"] if resume_meta else None,
        transfer_report=transfer_report,
    )


def build_model_config(cfg: TrainConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """The LumosDiT config for a head: registry size, data dims from the features, overrides."""
    shapes = spec["shapes"]
    channels, height, width = shapes["latents"]
    assert height == width, f"square latents expected, got {height}x{width}"
    pixels = height * int(spec["latent_downsample"])
    base = lumos_dit_config(
        cfg.model_size,
        input_size=height,
        in_channels=channels,
        pos_embed_scale=position_scale(pixels),
    )
    data_dims: dict[str, Any] = {"image_embed_dim": shapes["image_embeds"][0]}
    if cfg.head == "t2i":
        if not shapes.get("text_embeds"):
            raise ValueError("head 't2i' needs text embeddings: the dataset has no paired samples")
        data_dims.update(text_tokens=shapes["text_embeds"][0], text_dim=shapes["text_embeds"][1])
    elif cfg.head == "novel_view":
        data_dims["num_views"] = cfg.num_frames
    elif cfg.head == "video":
        data_dims["num_frames"] = cfg.num_frames
    config = head_model_config(base, cfg.head, **data_dims)
    config.update(cfg.model_overrides)
    return lumos_dit_config(cfg.model_size, **config)  # validates the override keys


def position_scale(pixels: int) -> float:
    """PixArt's position scale for a training resolution: 1.0 up to 512 px, 2.0 at 1024 px, so
    positions at 1024 px span the range the 512 px stage saw."""
    return max(1.0, pixels / 512)


def initialise_from(init_from: str, model: LumosDiT, cfg: TrainConfig) -> dict[str, Any]:
    """Load an (I2I) checkpoint's weights into `model` by weight transfer; returns the report."""
    source = load_checkpoint(init_from, raw=not cfg.init_from_ema)
    weights = source.ema_model if cfg.init_from_ema else source.model
    assert weights is not None, "load_checkpoint(raw=True) returns the raw weights"
    # A head continued from its own checkpoint (T2I's next resolution stage) keeps what it learned
    # (text projection, null embedding, size embedder); from another head those start afresh.
    same_head = source.meta.get("head") == cfg.head
    report = transfer_weights(
        weights.state_dict(), model, HEADS[cfg.head].allowed_new, reinitialise=not same_head
    )
    return {
        "source": source.uri,
        "source_head": source.meta.get("head"),
        "source_step": source.meta.get("step"),
        "source_weights": "ema" if cfg.init_from_ema else "raw",
        "summary": report.summary(),
        **report.model_dump(),
    }


def continue_training_from(
    uri: str, model: LumosDiT, cfg: TrainConfig
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load a checkpoint of the same head to continue it: its raw weights into `model`; returns
    the report (the lineage a checkpoint records) and its EMA weights, for the EMA."""
    source = load_checkpoint(uri, raw=True)
    if source.meta.get("head") != cfg.head or source.model is None:
        raise ValueError(
            f"continue_from {uri} is a {source.meta.get('head')!r} checkpoint: a {cfg.head} run "
            "continues a checkpoint of its own head (init_from transfers another head's)"
        )
    report = transfer_weights(
        source.model.state_dict(), model, HEADS[cfg.head].allowed_new, reinitialise=False
    )
    return {
        "source": source.uri,
        "source_head": source.meta.get("head"),
        "source_step": source.meta.get("step"),
        "source_weights": "raw and ema",
        "continued": True,
        "summary": report.summary(),
        **report.model_dump(),
    }, source.ema_model.state_dict()


@torch.no_grad()
def update_ema(ema: torch.nn.Module, weights: Iterable[torch.Tensor], decay: float) -> None:
    """ema = decay * ema + (1 - decay) * weights (DiT), as one multi-tensor op: a per-parameter
    loop costs hundreds of small kernel launches per step at XL size. `weights` are the model's
    parameters in `ema.parameters()` order (or their fp32 masters)."""
    ema_params: list[torch.Tensor] = list(ema.parameters())
    params = [p.detach() for p in weights]
    assert len(ema_params) == len(params), "the EMA copy and the model differ in parameters"
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


# --- helpers: accelerator, FSDP, RNG, resume ------------------------------------------------------


def _shard(model: LumosDiT, mesh: Any, mixed_precision: str) -> None:
    """FSDP2 in place: one unit per block (gathered only while it computes), then the rest."""
    # bf16 all-gathers halve the traffic; the sharded master weights and the gradient
    # reduction stay fp32, and accelerate's autocast still picks each op's precision.
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if mixed_precision == "bf16" else None,
        reduce_dtype=torch.float32,
    )
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def _gather(model: LumosDiT, config: dict[str, Any]) -> LumosDiT | None:
    """The full weights of an FSDP-sharded model as a plain LumosDiT on the main process (None
    on the others). Collective: every process must call it."""
    weights = get_model_state_dict(model, options=FULL_STATE)  # empty except on the main process
    return _model_from_weights(weights, config) if weights else None


def _model_from_weights(weights: Mapping[str, Any], config: dict[str, Any]) -> LumosDiT:
    """A LumosDiT that holds `weights` themselves (assigned, not copied), for saving."""
    with torch.device("meta"):  # no initialisation: the tensors are assigned
        model = LumosDiT(**config)
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def _feature_nodes(cfg: TrainConfig, rank: int, world: int) -> tuple[int, int]:
    """(nodes the features are split over, this process's node): (1, 0) unless
    `cfg.shard_features_by_node`. A node's processes are those torchrun started together
    (LOCAL_WORLD_SIZE of them, with consecutive ranks)."""
    if not cfg.shard_features_by_node:
        return 1, 0
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local < 1 or world % local:
        raise RuntimeError(
            f"LOCAL_WORLD_SIZE={local} does not divide the {world} processes into nodes: launch "
            "the same number of processes on every node (torchrun --nproc_per_node)"
        )
    return world // local, rank // local


def _make_accelerator(cfg: TrainConfig) -> Accelerator:
    kwargs = dict(
        # Autocast for "bf16" only: with bf16 weights the model computes in bf16 by itself.
        mixed_precision="bf16" if cfg.mixed_precision == "bf16" else "no",
        # A plugin, not gradient_accumulation_steps: accelerate lets the environment's
        # ACCELERATE_GRADIENT_ACCUMULATION_STEPS override that one, and the loop counts
        # cfg.grad_accum micro-steps itself.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum),
        # DDP must be told that some parameters get no gradient in a step: with one image token
        # the cross-attention takes its exact shortcut, which never uses its query projection.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    try:
        return Accelerator(**kwargs)
    except ValueError:
        # accelerate keeps one state per process; a second run in the same (non-distributed)
        # process with another precision (tests, an in-process pipeline) must start it afresh.
        if AcceleratorState().distributed_type != DistributedType.NO:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's limit (a process's seed is seed * world + rank)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    # weights_only=False: python / numpy RNG states are tuples of ints; these are our own files.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _check_resumable(
    cfg: TrainConfig, meta: dict[str, Any], spec: dict[str, Any], init_from: str | None
) -> None:
    """Raise unless the checkpoint `meta` belongs to this run: the same config (but for
    `RESUME_MAY_CHANGE`), the same features, the same parent checkpoint."""
    parent = meta.get("parent")
    if init_from is not None and latest_checkpoint(init_from) != parent:
        raise ValueError(
            f"{meta['uri']} was initialised from {parent}, not from {init_from}: "
            "use a fresh out_uri to fine-tune from another checkpoint"
        )
    saved_data = meta.get("data") or {}
    saved_sha, sha = saved_data.get("manifest_sha256"), spec.get("manifest_sha256")
    if saved_sha and sha and saved_sha != sha:
        raise ValueError(
            f"{meta['uri']} was trained on other features ({saved_data.get('dataset_uri')}, "
            f"manifest {saved_sha[:12]}) than these (manifest {sha[:12]}): its data position "
            "belongs to those; use a fresh out_uri for this dataset"
        )
    saved = meta.get("train_config") or {}
    now = cfg.model_dump(mode="json")
    # A field added after the checkpoint was written counts as its default (the old behaviour).
    fields = TrainConfig.model_fields
    saved = {k: saved.get(k, fields[k].get_default(call_default_factory=True)) for k in now}
    differs = sorted(k for k in now if k not in RESUME_MAY_CHANGE and saved[k] != now[k])
    if differs:
        raise ValueError(
            f"{meta['uri']} holds a checkpoint of another run: its {differs} differ from this "
            f"config ({', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in differs)}); "
            "use a fresh out_uri, or the same config to resume"
        )


def _load_training_state(
    checkpoint_uri: str,
    model: LumosDiT,
    ema: LumosDiT,
    optimizer: torch.optim.Optimizer,
    sampler: ResumableSampler,
    rank: int,
    feature_node: tuple[int, int] = (0, 1),
) -> int:
    """Restore everything a resumed run needs; returns the step to continue from.
    `feature_node`: (this process's node, nodes) when the features are split by node."""
    store = Storage.from_uri(checkpoint_uri)
    with local_copy(checkpoint_uri, ["transformer", "transformer_ema"]) as root:
        for target, sub in ((model, "transformer"), (ema, "transformer_ema")):
            weights = load_file(str(root / sub / "diffusion_pytorch_model.safetensors"))
            if isinstance(target, FSDPModule):  # every process keeps its shard of the full file
                set_model_state_dict(
                    target, weights, options=StateDictOptions(full_state_dict=True)
                )
            else:
                target.load_state_dict(weights, strict=True)
    state = store.read_json("training_state/state.json")
    optimizer_state = _from_bytes(store.read_bytes("training_state/optimizer.pt"))
    if isinstance(model, FSDPModule):  # saved full (by parameter name) by get_optimizer_state_dict
        # Not strict: a parameter that never had a gradient (the cross-attention's query with one
        # image token) has no Adam state, as in a plain optimizer's state dict.
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    else:
        optimizer.load_state_dict(optimizer_state)
    node, nodes = feature_node
    if state.get("feature_nodes", 1) != nodes:
        raise ValueError(
            f"{checkpoint_uri} was saved by a run that split the features over "
            f"{state.get('feature_nodes', 1)} nodes, this run splits them over {nodes}: each "
            "node's data position belongs to its parts; resume with the same number of nodes"
        )
    if nodes > 1:
        sampler.load_state_dict(store.read_json(f"training_state/data-node-{node:05d}.json"))
    else:
        sampler.load_state_dict(state["data"])
    rng_key = f"training_state/rng-rank-{rank:05d}.pt"
    if not store.exists(rng_key):
        raise ValueError(
            f"{checkpoint_uri} has no RNG state for process {rank}: it was saved by "
            f"{state['world_size']} processes; resume with the same number"
        )
    _set_rng_state(_from_bytes(store.read_bytes(rng_key)))
    return int(state["step"])


def _result_from_meta(meta: dict[str, Any]) -> TrainResult:
    """The result of a run that was already complete (a retried pipeline step)."""
    cfg = meta["train_config"]
    return TrainResult(
        checkpoint_uri=meta["uri"],
        head=meta["head"],
        step=meta["step"],
        final_loss=meta.get("loss"),
        losses=[],
        images_per_second=0.0,
        last_images_per_second=0.0,
        num_parameters=meta.get("num_parameters", 0),
        train_items=meta.get("train_items", 0),
        skipped_groups=meta.get("skipped_groups", 0),
        starved_items=meta.get("starved_items", 0),
        global_batch=meta.get("global_batch", cfg["batch_size"] * cfg["grad_accum"]),
        resumed_from=meta["uri"],
        transfer_report=meta.get("transfer_report"),
    )


__all__ = ["TrainResult", "build_model_config", "train", "update_ema"]
