"""Stopping a training run on SIGTERM with a checkpoint, instead of losing the steps since the last.

Kubernetes sends SIGTERM before it kills a pod (a preempted or drained GPU node, a deleted job),
then waits the pod's termination grace period; torchrun forwards it to its workers and waits
`TORCH_ELASTIC_SHUTDOWN_TIMEOUT` (both set by `lumos.k8s.trainjob`). `StopSignal` records the
signal; the loop asks `should_stop(step)` after each step, writes a checkpoint at that step and
raises `TrainingStopped`. Running the same command again resumes from that checkpoint.

With several processes a signal may reach only some of them (one node preempted), so they
agree first: every `check_every` steps one all-reduce of a flag, the same steps on every
process. A process's own flag alone decides only when it trains alone.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

from lumos.errors import LumosError

logger = logging.getLogger(__name__)


class TrainingStopped(LumosError, RuntimeError):
    """The run stopped early on a termination signal, after writing a checkpoint."""


@contextlib.contextmanager
def handling_sigterm(handler: Callable[[int, FrameType | None], Any]) -> Iterator[bool]:
    """`handler` takes SIGTERM meanwhile; the previous handler is back afterwards. Only the main
    thread can set signal handlers: from another, nothing changes (yields False)."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield True
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopSignal:
    """Records SIGTERM while active (a context manager) instead of letting it end the process.

    Only the main thread can set signal handlers: from another thread it records nothing and
    SIGTERM keeps its usual effect (logged once).
    """

    def __init__(self, check_every: int, device: torch.device) -> None:
        self.check_every = check_every
        self.device = device
        self.received: str | None = None  # the signal's name, once one arrived
        self._handling = contextlib.ExitStack()

    def __enter__(self) -> StopSignal:
        if not self._handling.enter_context(handling_sigterm(self._record)):
            logger.info("training outside the main thread: SIGTERM stops it without a checkpoint")
        return self

    def __exit__(self, *exc: object) -> None:
        self._handling.close()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        logger.warning("%s received: checkpointing after this step, then stopping", self.received)

    def should_stop(self, step: int) -> bool:
        """Whether every process stops after `step` (collective: call it after every step)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received is not None
        if step % self.check_every:
            return False
        flag = torch.tensor([float(self.received is not None)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def run_passing_sigterm_on(cmd: list[str], env: Mapping[str, str]) -> tuple[int, bool]:
    """Run a training launcher (`accelerate launch`) to its end; a SIGTERM to this process
    meanwhile is passed on to it (which passes it to its processes: they stop with a checkpoint)
    instead of ending this process first. Returns (its exit code, whether SIGTERM came)."""
    proc = subprocess.Popen(cmd, env=dict(env))
    received: list[int] = []

    def pass_on(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        proc.send_signal(signum)

    with handling_sigterm(pass_on):
        returncode = proc.wait()
    return returncode, bool(received)


__all__ = ["StopSignal", "TrainingStopped", "handling_sigterm", "run_passing_sigterm_on"]
