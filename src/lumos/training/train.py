"""One training loop for I2I pretraining and every fine-tune (t2i, novel_view, video).

Reads top to bottom like DiT's train.py: `train()` calls one setup function per concern (launch,
resume point, data, model and EMA, optimizer), then runs the loop; a checkpoint is one module
function (`save_training_checkpoint`), its restore another (`lumos.checkpoints.training_state`).
Heads differ only by their model config and how a batch becomes model inputs (`lumos.heads`);
the loop is the same.

    result = train(TrainConfig(head="i2i", model_size="XL/2"), "s3://lumos/datasets/images",
                   "s3://lumos/runs/r1/checkpoints/i2i")
    result = train(TrainConfig(head="t2i"), dataset_uri, out_uri, init_from=result.checkpoint_uri)

Precision (`mixed_precision`): "bf16" computes under bf16 autocast over fp32 weights; "bf16-weights"
holds the model's parameters in bf16 (every op computes in bf16, no autocast) while the optimizer
(`lumos.training.optim.MasterWeightAdamW`) keeps fp32 master weights, clips the fp32 copies of the
gradients, steps AdamW on the masters and copies them back; the EMA follows the masters and the
checkpoints hold the fp32 masters, so they look the same in every mode. "bf16-weights" is the
layout bench/train_throughput.py measured fastest (variant `lumos-bf16w`, which runs the same
optimizer class; figures in docs/benchmarks.md). The presets keep "bf16" until the two modes are
timed in one run of the loop.

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

DDP suffices up to XL/2 (its peak memory at batch 64 is in docs/benchmarks.md). FSDP is wired
with torch's `fully_shard` directly, not accelerate's FSDP plugin: accelerate 1.15 silently
falls back to DDP for CPU processes, so its plugin path could not be tested on CPUs, whereas this
one runs the same code on gloo (tests) and NCCL.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm.auto import tqdm

from lumos.checkpoints import (
    checkpoint_dirname,
    is_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_checkpoint_meta,
    remove_stale_staging,
    save_checkpoint,
)
from lumos.checkpoints.training_state import (
    restore_training_state,
    training_state_files,
    write_process_state,
)
from lumos.config import ConfigError
from lumos.configs.training import TrainConfig
from lumos.diffusion.gaussian import GaussianDiffusion
from lumos.errors import CheckpointError, FeaturesError
from lumos.features.format import read_features_spec
from lumos.features.items import FeatureDataset
from lumos.features.table import FeatureTable, load_feature_table, node_parts, pad_text
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
DATA_PARALLEL = (
    DistributedType.NO,
    DistributedType.MULTI_GPU,
    DistributedType.MULTI_CPU,
)
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
    if cfg.init == "scratch" and init_from is not None:
        raise ConfigError(
            f"{cfg.head}: init is 'scratch' (fresh weights) but an init checkpoint was given "
            f"({init_from}): drop it, or set init: prior"
        )
    # --- setup: processes, the run being resumed, data, model and EMA, optimizer -------------
    launch = setup_launch(cfg)
    resume_meta = find_resume_point(out_uri, launch)
    if resume_meta is None and _needs_prior(cfg) and init_from is None and continue_from is None:
        # Never a silent fallback to fresh weights: a fine-tune from scratch says so.
        raise ConfigError(
            f"{cfg.head}: init is 'prior' but no checkpoint to start from was given: pass "
            "init_from (the I2I prior, or another head's checkpoint), or set init: scratch"
        )
    if resume_meta is None:  # the checkpoint to start from is read first: its error, not the data's
        for start in (init_from, continue_from):
            if start is not None:
                read_checkpoint_meta(start)
    spec = read_features_spec(dataset_uri)
    if resume_meta is not None:
        _check_resumable(cfg, resume_meta, spec, init_from or continue_from)
        if resume_meta["step"] >= cfg.steps:
            logger.info("%s holds step %d of %d already", out_uri, resume_meta["step"], cfg.steps)
            return _result_from_meta(resume_meta)
    _seed_everything(cfg.seed)  # the same initial model on every process
    data = setup_data(cfg, dataset_uri, spec, launch)
    state, lineage = setup_model(
        cfg, spec, launch, data.sampler, resume_meta, init_from, continue_from
    )
    # A different stream per process, so the processes draw different noise and timesteps.
    _seed_everything(cfg.seed * launch.world + launch.rank)
    if resume_meta is not None:
        state.step = restore_training_state(
            resume_meta["uri"], state.model, state.ema, state.optimizer, data.sampler,
            launch.rank, (launch.node, launch.nodes),
        )  # fmt: skip
        logger.info("resumed from %s at step %d", resume_meta["uri"], state.step)
    train_model = prepare(cfg, launch, state, num_sizes=len(data.table.latent_sizes))
    diffusion = GaussianDiffusion()  # DDPM, linear betas 1e-4..0.02, 1000 steps, learned sigma
    global_batch = cfg.batch_size * launch.world * cfg.grad_accum  # items per optimizer step
    meta = checkpoint_meta(cfg, dataset_uri, spec, data, state, lineage, global_batch)

    # --- loop ---------------------------------------------------------------------------------
    accelerator, device = launch.accelerator, launch.device
    model, optimizer = state.model, state.optimizer
    latent_downsample = int(spec["latent_downsample"])
    # What the model outputs (its config): the loss target follows it.
    prediction_type = accelerator.unwrap_model(model).config.prediction_type
    # Batches in page-locked memory: their copy to the GPU does not wait for the previous step,
    # so the next batch is assembled while the GPU computes.
    pin_memory = device.type == "cuda"
    log = TrainLog(cfg, launch, out_uri, state.step, global_batch * (cfg.num_frames or 1))
    log.final_loss = resume_meta.get("loss") if resume_meta else None
    checkpoint = functools.partial(save_training_checkpoint, cfg, out_uri, launch, state, meta)
    checkpoint_uri = resume_meta["uri"] if resume_meta else None
    if state.step == 0 and cfg.steps == 0:
        checkpoint_uri = checkpoint(None)  # an untrained model: the gate must reject it
    # SIGTERM (a preempted node, a deleted job) ends the run after the current step, with a
    # checkpoint (lumos.training.stopping).
    with StopSignal(cfg.stop_check_every, device) as stop:
        while state.step < cfg.steps:
            step = state.step
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            for _ in range(cfg.grad_accum):
                # Captions travel packed and are padded to the model's length on the device.
                batch = data.dataset.batch(data.sampler.next_batch(), pin_memory, pack_text=True)
                batch = pad_text(_to_device(batch, device))
                x0, kwargs = batch_to_model_inputs(cfg.head, batch, latent_downsample)
                t = diffusion.sample_timesteps(x0.shape[0], device=device)  # (B,)
                # Under FSDP every micro-step reduce-scatters its gradients (accelerate's no_sync
                # does not apply to fully_shard): skipping it would keep unsharded gradients.
                with accelerator.accumulate(model):
                    loss = diffusion.training_losses(
                        train_model, x0, t, kwargs, snr_gamma=cfg.snr_gamma,
                        snr_floor=cfg.snr_floor, prediction_type=prediction_type,
                    )["loss"].mean()  # fmt: skip
                    accelerator.backward(loss)  # divided by grad_accum inside
                    if accelerator.sync_gradients and state.master_optimizer is None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()  # a no-op until the last micro-step (accelerate)
                    optimizer.zero_grad(set_to_none=True)
                log.add(loss.detach() / cfg.grad_accum)
            decay = cfg.ema_decay
            if cfg.ema_warmup:
                decay = min(decay, (1 + step) / (10 + step))
            # The EMA follows the fp32 weights: the optimizer's masters when the model holds bf16.
            masters, raw_model = state.master_optimizer, accelerator.unwrap_model(model)
            weights = masters.master_params if masters else raw_model.parameters()
            update_ema(state.ema, weights, decay)
            state.step = step = step + 1
            log.step_done(step, lr)

            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint_uri = checkpoint(log.final_loss)
            if step < cfg.steps and stop.should_stop(step):  # collective: same steps on all
                if step % cfg.checkpoint_every:  # not written just above
                    checkpoint_uri = checkpoint(log.final_loss)
                log.close()
                raise TrainingStopped(
                    f"{stop.received or 'SIGTERM on another process'}: stopped at step {step} "
                    f"of {cfg.steps} after writing checkpoint {checkpoint_uri}; run the same "
                    "training again (same out_uri) to resume from it"
                )
    log.close()
    return _train_result(cfg, out_uri, meta, state.step, log, checkpoint_uri, resume_meta)


# --- setup ----------------------------------------------------------------------------------------


@dataclass
class Launch:
    """This process's place in the run: its accelerator and rank, and which processes share one
    copy of the features (all of them, or each node's with `shard_features_by_node`)."""

    accelerator: Accelerator
    rank: int
    world: int
    nodes: int = 1  # nodes the features are split over
    node: int = 0  # this process's node among them

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def data_world(self) -> int:
        """The processes that split one copy of the features' items between them."""
        return self.world // self.nodes

    @property
    def data_rank(self) -> int:
        return self.rank % self.data_world


@dataclass
class TrainData:
    """The head's training items and their order."""

    table: FeatureTable
    dataset: FeatureDataset
    sampler: ResumableSampler
    train_items: int  # over the whole run (every node's parts)
    starved_items: int  # of image sizes too few to fill one global batch


@dataclass
class TrainState:
    """What a checkpoint saves and a resume restores: model, EMA, optimizer, data position."""

    model: Any  # the LumosDiT; after `prepare`, as accelerate wrapped it
    ema: LumosDiT  # fp32, sharded like the model under FSDP
    model_config: dict[str, Any]
    optimizer: Any  # AdamW, or MasterWeightAdamW with bf16 weights; after `prepare`, wrapped
    sampler: ResumableSampler
    master_optimizer: MasterWeightAdamW | None = None  # bf16 weights: holds the fp32 masters
    num_parameters: int = 0
    step: int = 0


def setup_launch(cfg: TrainConfig) -> Launch:
    """The accelerator, checked against how the processes were launched."""
    accelerator = _make_accelerator(cfg)
    rank, world = accelerator.process_index, accelerator.num_processes
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
        raise ConfigError(
            "distributed='fsdp' shards the model across processes, but this run has one: "
            "launch several (accelerate launch --multi_gpu) or use distributed='ddp'"
        )
    nodes, node = _feature_nodes(cfg, rank, world)
    return Launch(accelerator, rank, world, nodes, node)


def find_resume_point(out_uri: str, launch: Launch) -> dict[str, Any] | None:
    """The metadata of the run's latest checkpoint under `out_uri` (None: a fresh run). Removes
    what a run killed while saving left behind."""
    if is_checkpoint(out_uri):
        raise CheckpointError(
            f"out_uri {out_uri} is a checkpoint, not a run directory: a run writes its "
            "checkpoints under out_uri as step-XXXXXXX/ and resumes from the latest; pass the "
            "directory above it to resume that run"
        )
    checkpoints = list_checkpoints(out_uri)
    resume_meta = read_checkpoint_meta(checkpoints[-1][1]) if checkpoints else None
    if launch.accelerator.is_main_process:
        remove_stale_staging(out_uri)  # before this run needs the disk space for its own
    return resume_meta


def setup_data(
    cfg: TrainConfig, dataset_uri: str, spec: dict[str, Any], launch: Launch
) -> TrainData:
    """Cached features -> this head's items -> their order for this process."""
    parts = node_parts(len(spec["parts"]), launch.node, launch.nodes) if launch.nodes > 1 else None
    table = load_feature_table(dataset_uri, split="train", part_ids=parts)
    dataset = FeatureDataset.for_head(table, cfg.head, num_frames=cfg.num_frames or 1)
    print_ = launch.accelerator.print
    if dataset.skipped_groups:
        print_(
            f"{cfg.head}: {dataset.skipped_groups} groups have fewer than {cfg.num_frames} frames "
            "and are not used"
        )
    # Several image sizes (aspect buckets): every batch holds one size.
    data_world, data_rank = launch.data_world, launch.data_rank
    sampler = ResumableSampler(
        len(dataset), cfg.batch_size * data_world, cfg.seed, data_rank, data_world,
        groups=dataset.item_sizes(),
    )  # fmt: skip
    if sampler.starved_items:
        print_(
            f"{cfg.head}: {sampler.starved_items} items are of image sizes with fewer items than "
            f"one global batch ({sampler.global_batch}) and are not used; items per latent size: "
            + ", ".join(
                f"{table.latent_sizes[i][0]}x{table.latent_sizes[i][1]}: {n}"
                for i, n in (sampler.group_sizes or {}).items()
            )
        )
    train_items, starved_items = len(dataset), sampler.starved_items
    if launch.nodes > 1:  # each node counted its own parts: report the whole run's (every node's)
        counts = torch.tensor([[train_items, starved_items]], device=launch.device)
        counts = launch.accelerator.gather(counts)  # (W, 2)
        train_items, starved_items = (counts.sum(dim=0) // data_world).tolist()
    return TrainData(table, dataset, sampler, train_items, starved_items)


def setup_model(
    cfg: TrainConfig,
    spec: dict[str, Any],
    launch: Launch,
    sampler: ResumableSampler,
    resume_meta: dict[str, Any] | None,
    init_from: str | None,
    continue_from: str | None = None,
) -> tuple[TrainState, dict[str, Any]]:
    """The model (fresh, transferred from `init_from` or continued from `continue_from`), its
    EMA and the optimizer; and the lineage the checkpoints record (`parent`, `transfer_report`)."""
    device = launch.device
    model_config = build_model_config(cfg, spec)
    model = LumosDiT(**model_config)
    transfer_report, parent, continued_ema = None, None, None
    if resume_meta is not None:  # the transfer happened in the run being resumed
        transfer_report, parent = resume_meta.get("transfer_report"), resume_meta.get("parent")
    elif continue_from is not None:
        transfer_report, continued_ema = continue_training_from(continue_from, model, cfg)
        parent = transfer_report["source"]
        launch.accelerator.print(f"{cfg.head}: continues {parent} ({transfer_report['summary']})")
    elif init_from is not None:
        transfer_report = initialise_from(init_from, model, cfg)
        parent = transfer_report["source"]
        launch.accelerator.print(f"{cfg.head}: {transfer_report['summary']} from {parent}")
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
        mesh = init_device_mesh(device.type, (launch.world,))
        _shard(model, mesh, cfg.mixed_precision)
        _shard(ema, mesh, cfg.mixed_precision)

    # The optimizer, built after sharding: under FSDP its state covers only this process's shards.
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
    state = TrainState(
        model, ema, model_config, optimizer, sampler, master_optimizer, num_parameters
    )
    return state, {"parent": parent, "transfer_report": transfer_report}


def prepare(cfg: TrainConfig, launch: Launch, state: TrainState, num_sizes: int) -> Any:
    """Hand the model and optimizer to accelerate (DDP, autocast, gradient accumulation), in
    place in `state`; returns the model the training step calls (compiled with `cfg.compile`)."""
    accelerator = launch.accelerator
    if cfg.distributed == "fsdp":
        # Already sharded: accelerate adds autocast and gradient accumulation but must not wrap
        # it in DDP, which `evaluation_mode` skips (it does not switch the model to eval).
        state.model = accelerator.prepare_model(state.model, evaluation_mode=True)
        state.optimizer = accelerator.prepare_optimizer(state.optimizer)
    else:
        state.model, state.optimizer = accelerator.prepare(state.model, state.optimizer)
    if not cfg.compile:
        return state.model
    # One static graph per latent size. With aspect buckets, dynamo's automatic dynamic shapes
    # still compiled a graph per size (the model branches on its grid), stopped compiling at its
    # recompile limit (8) and ran further sizes eagerly; in a CPU run of 11 sizes (torch 2.13) a
    # backward reused for another size crashed on its strides. Each size now compiles once, at
    # its first batch, up to twice the sizes the features hold.
    # The limit is dynamo's process-global config, the knob torch's compile troubleshooting
    # guide names: there is no per-model one. It is only ever raised here, never lowered.
    limit = 2 * num_sizes
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    return torch.compile(state.model, dynamic=False)


def checkpoint_meta(
    cfg: TrainConfig,
    dataset_uri: str,
    spec: dict[str, Any],
    data: TrainData,
    state: TrainState,
    lineage: dict[str, Any],
    global_batch: int,
) -> dict[str, Any]:
    """The run's part of every checkpoint's `lumos_checkpoint.json` (the step and loss aside)."""
    return {
        "head": cfg.head,
        "encoders": spec.get("encoders"),
        "data": {
            "dataset_uri": dataset_uri,
            "manifest_sha256": spec.get("manifest_sha256"),
        },
        "features": {k: spec.get(k) for k in ("shapes", "latent_downsample", "resolution")},
        "parent": lineage["parent"],
        "train_config": cfg.model_dump(mode="json"),
        "transfer_report": lineage["transfer_report"],
        "num_parameters": state.num_parameters,
        "global_batch": global_batch,
        "train_items": data.train_items,
        "skipped_groups": data.dataset.skipped_groups,
        "starved_items": data.starved_items,
    }


# --- checkpoint, log --------------------------------------------------------------------------------


def save_training_checkpoint(
    cfg: TrainConfig,
    out_uri: str,
    launch: Launch,
    state: TrainState,
    meta: dict[str, Any],
    loss: float | None,
) -> str:
    """Write the checkpoint of `state.step` under `out_uri` and prune the older ones; returns its
    URI. Collective: every process calls it (each writes its RNG state; under FSDP the shards
    are gathered); the main process writes the weights, the training state and meta, last."""
    accelerator, step = launch.accelerator, state.step
    ckpt = Storage.from_uri(out_uri).child(checkpoint_dirname(step))
    node_leader = launch.data_rank == 0  # writes its node's data position
    write_process_state(ckpt, launch.rank, state.sampler, (launch.node, launch.nodes), node_leader)
    model: LumosDiT = accelerator.unwrap_model(state.model)
    raw: LumosDiT | None = model
    ema_weights: LumosDiT | None = state.ema
    if state.master_optimizer is not None:  # the fp32 masters, not their bf16 copies in the model
        masters = state.master_optimizer.master_state_dict(model)
        raw = _model_from_weights(masters, state.model_config)
    if cfg.distributed == "fsdp":  # (never with bf16 weights: the config refuses it)
        # Gathering the shards is collective (every process calls it); the main process
        # receives full weights and optimizer state, the same files DDP writes.
        inner = state.optimizer.optimizer
        optimizer_state = get_optimizer_state_dict(model, inner, options=FULL_STATE)
        raw, ema_weights = (
            _gather(model, state.model_config),
            _gather(state.ema, state.model_config),
        )
    else:
        optimizer_state = state.optimizer.state_dict()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = training_state_files(
            step, launch.world, optimizer_state, state.sampler, launch.nodes
        )
        if raw is None or ema_weights is None:
            raise RuntimeError("the main process holds no gathered weights to save")
        save_checkpoint(ckpt.uri, raw, ema_weights, {**meta, "step": step, "loss": loss}, files)
        prune_checkpoints(out_uri, cfg.keep_checkpoints)
    accelerator.wait_for_everyone()
    return ckpt.uri


class TrainLog:
    """The mean loss and throughput of each log interval: one host sync per interval (as DiT),
    to the progress bar, the run's result and Prometheus."""

    def __init__(
        self,
        cfg: TrainConfig,
        launch: Launch,
        out_uri: str,
        step: int,
        images_per_step: int,
    ) -> None:
        self.cfg, self.launch, self.images_per_step = cfg, launch, images_per_step
        main = launch.accelerator.is_main_process
        push_url = cfg.pushgateway_url if main else None
        self.metrics = TrainingMetrics(
            run=Storage.from_uri(out_uri).uri, head=cfg.head, pushgateway_url=push_url
        )
        self.losses: list[tuple[int, float]] = []
        self.final_loss: float | None = None
        self.start_step, self.start_time = step, time.perf_counter()
        self.running_loss = torch.zeros((), device=launch.device)
        self.log_steps, self.log_time = 0, time.perf_counter()
        self.images_per_second = 0.0
        show = cfg.progress_bar and main
        self.bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.head}", disable=not show)

    def add(self, loss: torch.Tensor) -> None:
        """A micro-step's share of the step's loss (no sync: it stays on the device)."""
        self.running_loss += loss

    def step_done(self, step: int, lr: float) -> None:
        self.log_steps += 1
        self.bar.update(1)
        if step % self.cfg.log_every and step != self.cfg.steps:
            return
        # The mean loss over the interval's steps and every process.
        mean = self.running_loss / self.log_steps
        mean_loss = self.launch.accelerator.reduce(mean, reduction="mean").item()
        now = time.perf_counter()
        self.images_per_second = self.images_per_step * self.log_steps / (now - self.log_time)
        self.losses.append((step, mean_loss))
        self.final_loss = mean_loss
        self.bar.set_postfix(
            loss=f"{mean_loss:.4f}",
            img_s=f"{self.images_per_second:.1f}",
            lr=f"{lr:.2e}",
        )
        self.metrics.update(step=step, loss=mean_loss, images_per_second=self.images_per_second)
        self.metrics.push()
        self.running_loss.zero_()
        self.log_steps, self.log_time = 0, now

    def mean_images_per_second(self, step: int) -> float:
        """Over this call's steps, all processes (frames count as images)."""
        steps = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        return self.images_per_step * steps / elapsed if steps else 0.0

    def close(self) -> None:
        self.bar.close()


# --- the model ---------------------------------------------------------------------------------------


def build_model_config(cfg: TrainConfig, spec: dict[str, Any]) -> dict[str, Any]:
    """The LumosDiT config for a head: registry size, data dims from the features, overrides."""
    shapes = spec["shapes"]
    channels, height, width = shapes["latents"]
    if height != width:
        raise FeaturesError(
            f"the features' reference latents are {height}x{width}; training expects square "
            "ones (features.json shapes.latents): re-run featurize"
        )
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
            raise FeaturesError(
                "head 't2i' needs text embeddings: the dataset has no paired samples"
            )
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


def _needs_prior(cfg: TrainConfig) -> bool:
    """A fine-tune (any head but I2I pretraining) with init: prior starts from a checkpoint."""
    return cfg.head != "i2i" and cfg.init == "prior"


def initialise_from(init_from: str, model: LumosDiT, cfg: TrainConfig) -> dict[str, Any]:
    """Load an (I2I) checkpoint's weights into `model` by weight transfer; returns the report."""
    source = load_checkpoint(init_from, raw=not cfg.init_from_ema)
    weights = source.ema_model if cfg.init_from_ema else source.model
    if weights is None:
        raise CheckpointError(
            f"{source.uri} holds no {'EMA' if cfg.init_from_ema else 'raw'} weights"
        )
    # A head continued from its own checkpoint (T2I's next resolution stage) keeps what it learned
    # (text projection, null embedding, size embedder); from another head those start afresh.
    same_head = source.meta.get("head") == cfg.head
    report = transfer_weights(
        weights.state_dict(),
        model,
        HEADS[cfg.head].allowed_new,
        reinitialise=not same_head,
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
        raise CheckpointError(
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
    if len(ema_params) != len(params):
        raise ValueError(f"the EMA has {len(ema_params)} parameters, the model {len(params)}")
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
        # accelerate has no public reset of that state (its own tests call this private one).
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy's limit (a process's seed is seed * world + rank)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _check_resumable(
    cfg: TrainConfig, meta: dict[str, Any], spec: dict[str, Any], init_from: str | None
) -> None:
    """Raise unless the checkpoint `meta` belongs to this run: the same config (but for
    `RESUME_MAY_CHANGE`), the same features, the same parent checkpoint."""
    parent = meta.get("parent")
    if init_from is not None and latest_checkpoint(init_from) != parent:
        raise CheckpointError(
            f"{meta['uri']} was initialised from {parent}, not from {init_from}: "
            "use a fresh out_uri to fine-tune from another checkpoint"
        )
    saved_data = meta.get("data") or {}
    saved_sha, sha = saved_data.get("manifest_sha256"), spec.get("manifest_sha256")
    if saved_sha and sha and saved_sha != sha:
        raise CheckpointError(
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
        raise CheckpointError(
            f"{meta['uri']} holds a checkpoint of another run: its {differs} differ from this "
            f"config ({', '.join(f'{k}: {saved.get(k)!r} -> {now[k]!r}' for k in differs)}); "
            "use a fresh out_uri, or the same config to resume"
        )


def _train_result(
    cfg: TrainConfig,
    out_uri: str,
    meta: dict[str, Any],
    step: int,
    log: TrainLog,
    checkpoint_uri: str | None,
    resume_meta: dict[str, Any] | None,
) -> TrainResult:
    """The result of this call: `meta` is the run's checkpoint metadata (`checkpoint_meta`)."""
    if checkpoint_uri is None:  # steps >= 1 always end with one, steps == 0 writes one
        raise RuntimeError(f"training into {out_uri} ended without a checkpoint")
    return TrainResult(
        checkpoint_uri=checkpoint_uri,
        head=cfg.head,
        step=step,
        final_loss=log.final_loss,
        losses=log.losses,
        images_per_second=log.mean_images_per_second(step),
        last_images_per_second=log.images_per_second,
        num_parameters=meta["num_parameters"],
        train_items=meta["train_items"],
        skipped_groups=meta["skipped_groups"],
        starved_items=meta["starved_items"],
        global_batch=meta["global_batch"],
        resumed_from=resume_meta["uri"] if resume_meta else None,
        transfer_report=meta["transfer_report"],
    )


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


__all__ = [
    "TrainResult",
    "build_model_config",
    "save_training_checkpoint",
    "train",
    "update_ema",
]
