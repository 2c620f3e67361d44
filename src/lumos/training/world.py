"""The world a training process was launched into, checked against the one its job configured.

    LUMOS_EXPECTED_WORLD=2x8 lumos pretrain ...     # refused unless run by torchrun as 2 nodes x 8
    check_launched_world()                          # processes (WORLD_SIZE=16, LOCAL_WORLD_SIZE=8)

A TrainJob (lumos.k8s.trainjob) sets LUMOS_EXPECTED_WORLD to its `numNodes x numProcPerNode`.
Kubeflow Trainer only injects the PET_* variables that `torchrun` reads; a command that does not
run under torchrun starts one process per node that each train alone and write the same output.
Training therefore refuses to start unless torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE are the
configured ones. Without LUMOS_EXPECTED_WORLD (a laptop, `accelerate launch`) nothing is checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from lumos.errors import LumosError

EXPECTED_WORLD_ENV = "LUMOS_EXPECTED_WORLD"
_WORLD = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


class WorldMismatch(LumosError):
    """The processes found are not the ones the job configured (nodes x processes per node)."""


def expected_world_value(num_nodes: int, procs_per_node: int) -> str:
    """The LUMOS_EXPECTED_WORLD value of a job of `num_nodes` x `procs_per_node` processes."""
    return f"{num_nodes}x{procs_per_node}"


def check_launched_world(environ: Mapping[str, str] = os.environ) -> None:
    """Raise WorldMismatch unless WORLD_SIZE / LOCAL_WORLD_SIZE match LUMOS_EXPECTED_WORLD."""
    expected = environ.get(EXPECTED_WORLD_ENV)
    if not expected:
        return
    match = _WORLD.match(expected)
    if match is None:
        raise WorldMismatch(
            f"{EXPECTED_WORLD_ENV}={expected!r} is not NODESxPROCESSES (e.g. 2x8): fix the "
            "TrainJob's env"
        )
    nodes, per_node = int(match[1]), int(match[2])
    world = environ.get("WORLD_SIZE")
    local = environ.get("LOCAL_WORLD_SIZE")
    if world == str(nodes * per_node) and local == str(per_node):
        return
    found = f"WORLD_SIZE={world or 'unset'}, LOCAL_WORLD_SIZE={local or 'unset'}"
    hint = (
        "this process was not started by torchrun: run the command under `torchrun` (it reads "
        "the PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT "
        "that Kubeflow Trainer injects)"
        if world is None
        else "the TrainJob's numNodes / numProcPerNode (or the PET_* variables) were changed "
        "after it was rendered: render it again from cluster.distributed"
    )
    raise WorldMismatch(
        f"refusing to train: the job is configured for {nodes} nodes x {per_node} processes "
        f"(WORLD_SIZE={nodes * per_node}, LOCAL_WORLD_SIZE={per_node}) but found {found}; {hint}"
    )
