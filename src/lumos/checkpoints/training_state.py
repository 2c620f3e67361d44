"""What only a resumed run reads of a checkpoint: optimizer, RNG states and data position.

    <checkpoint>/training_state/optimizer.pt           the optimizer's state dict (full under FSDP)
                               /state.json             step, world_size, feature_nodes, data
                               /rng-rank-XXXXX.pt      each process's python / numpy / torch RNGs
                               /data-node-XXXXX.json   with the features split by node: each
                                                       node's position in its own parts' order

The LR schedule is a function of the step, so the step is its whole state. Every process writes
its own RNG file (`write_process_state`); the main process writes the rest with the checkpoint
(`training_state_files`). `restore_training_state` loads all of it into a freshly built model,
EMA, optimizer and sampler, so a resumed run continues the uninterrupted run's loss curve.
"""

from __future__ import annotations

import io
import json
import random
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

from lumos.checkpoints.format import local_copy
from lumos.errors import CheckpointError
from lumos.storage import Storage

STATE_DIR = "training_state"


class DataPosition(Protocol):
    """Where a run is in its data order (`lumos.training.sampler.ResumableSampler`)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states."""
    np_state: Any = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def to_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def from_bytes(data: bytes) -> Any:
    # weights_only=False: python / numpy RNG states are tuples of ints; these are our own files.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def write_process_state(
    checkpoint: Storage,
    rank: int,
    sampler: DataPosition,
    feature_node: tuple[int, int] = (0, 1),
    node_leader: bool = False,
) -> None:
    """What each process writes itself: its RNG state and, with the features split by node
    (`feature_node` = (node, nodes)), the first process of each node its node's data position."""
    checkpoint.write_bytes(f"{STATE_DIR}/rng-rank-{rank:05d}.pt", to_bytes(rng_state()))
    node, nodes = feature_node
    if nodes > 1 and node_leader:
        checkpoint.write_json(f"{STATE_DIR}/data-node-{node:05d}.json", sampler.state_dict())


def training_state_files(
    step: int,
    world_size: int,
    optimizer_state: dict[str, Any],
    sampler: DataPosition,
    feature_nodes: int = 1,
) -> dict[str, bytes]:
    """The files the main process writes under `training_state/` (`save_checkpoint`'s
    `training_state`): the optimizer's state and the position (step, world, data order)."""
    position: dict[str, Any] = {
        "step": step,
        "world_size": world_size,
        "feature_nodes": feature_nodes,
    }
    if feature_nodes == 1:
        position["data"] = sampler.state_dict()
    else:  # each node's own position, written by that node (`write_process_state`)
        position["data_by_node"] = [f"data-node-{i:05d}.json" for i in range(feature_nodes)]
    return {
        "optimizer.pt": to_bytes(optimizer_state),
        "state.json": json.dumps(position, indent=2).encode(),
    }


def restore_training_state(
    checkpoint_uri: str,
    model: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: DataPosition,
    rank: int,
    feature_node: tuple[int, int] = (0, 1),
) -> int:
    """Restore everything a resumed run needs; returns the step to continue from.
    `feature_node`: (this process's node, nodes) when the features are split by node."""
    store = Storage.from_uri(checkpoint_uri)
    with local_copy(checkpoint_uri, ["transformer", "transformer_ema"]) as root:
        for target, sub in ((model, "transformer"), (ema, "transformer_ema")):
            weights: dict[str, Any] = load_file(
                str(root / sub / "diffusion_pytorch_model.safetensors")
            )
            if isinstance(target, FSDPModule):  # every process keeps its shard of the full file
                set_model_state_dict(
                    target, weights, options=StateDictOptions(full_state_dict=True)
                )
            else:
                target.load_state_dict(weights, strict=True)
    state = store.read_json(f"{STATE_DIR}/state.json")
    optimizer_state = from_bytes(store.read_bytes(f"{STATE_DIR}/optimizer.pt"))
    if isinstance(model, FSDPModule):  # saved full (by parameter name) by get_optimizer_state_dict
        # Not strict: a parameter that never had a gradient (the cross-attention's query with one
        # image token) has no Adam state, as in a plain optimizer's state dict.
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
    else:
        optimizer.load_state_dict(optimizer_state)
    node, nodes = feature_node
    if state.get("feature_nodes", 1) != nodes:
        raise CheckpointError(
            f"{checkpoint_uri} was saved by a run that split the features over "
            f"{state.get('feature_nodes', 1)} nodes, this run splits them over {nodes}: each "
            "node's data position belongs to its parts; resume with the same number of nodes"
        )
    if nodes > 1:
        sampler.load_state_dict(store.read_json(f"{STATE_DIR}/data-node-{node:05d}.json"))
    else:
        sampler.load_state_dict(state["data"])
    rng_key = f"{STATE_DIR}/rng-rank-{rank:05d}.pt"
    if not store.exists(rng_key):
        raise CheckpointError(
            f"{checkpoint_uri} has no RNG state for process {rank}: it was saved by "
            f"{state['world_size']} processes; resume with the same number"
        )
    set_rng_state(from_bytes(store.read_bytes(rng_key)))
    return int(state["step"])
