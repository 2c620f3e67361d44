"""Micro-batching across clients: requests that arrive within `max_wait_s` share one model call.

    batcher = MicroBatcher(model.generate, max_batch=8, max_wait_s=0.01, max_queue=64, name="lumos")
    predictions = await batcher.submit(instances)     # in the server's event loop

One worker runs one batch at a time (the accelerator is busy anyway); the next batch gathers while
it runs. A request whose instances would take the queue past `max_queue` is refused at once with
`Overloaded` (HTTP 429 with Retry-After), instead of waiting into a client timeout. A request
is never split across batches, so a batch may exceed `max_batch` only by one request's instances
when that request alone is larger.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import HTTPException

from lumos.errors import LumosError
from lumos.serving.metrics import PREDICTOR_METRICS


class Overloaded(HTTPException):
    """The queue is full: HTTP 429 with a Retry-After header (FastAPI's HTTPException handler)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(
            status_code=429,
            detail=message,
            headers={"Retry-After": str(retry_after_s)},
        )


class MicroBatcher:
    """Gathers the instances of concurrent requests into batches for `run` (a blocking call)."""

    def __init__(
        self,
        run: Callable[[list[Any]], list[Any]],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        name: str,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise LumosError(
                f"max_batch and max_queue must be >= 1 and max_wait_s >= 0, got "
                f"{max_batch}, {max_queue}, {max_wait_s}"
            )
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.name = name
        self._pending: list[tuple[Sequence[Any], asyncio.Future, float]] = []
        self._queued = 0  # instances waiting (not yet in a running batch)
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._batch_seconds = 1.0  # the last batch's duration: what Retry-After is based on

    @property
    def queued(self) -> int:
        return self._queued

    async def submit(self, instances: Sequence[Any]) -> list[Any]:
        """The results of `run` for `instances`, in order; raises Overloaded when the queue is full."""
        if self._wake is None or self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._work(self._wake))
        if self._queued + len(instances) > self.max_queue:
            retry = max(1, math.ceil(self._batch_seconds * (self._queued / self.max_batch + 1)))
            raise Overloaded(
                f"the predictor is overloaded: {self._queued} instances queued, the limit is "
                f"{self.max_queue}; retry after {retry} s",
                retry,
            )
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append((instances, future, time.monotonic()))
        self._set_queued(self._queued + len(instances))
        self._wake.set()
        return await future

    def _set_queued(self, value: int) -> None:
        self._queued = value
        PREDICTOR_METRICS.queue_depth.labels(model=self.name).set(value)

    def _take_batch(self) -> list[tuple[Sequence[Any], asyncio.Future, float]]:
        batch: list[tuple[Sequence[Any], asyncio.Future, float]] = []
        size = 0
        while self._pending and (not batch or size + len(self._pending[0][0]) <= self.max_batch):
            item = self._pending.pop(0)
            batch.append(item)
            size += len(item[0])
        return batch

    async def _work(self, wake: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await wake.wait()
            wake.clear()
            while self._pending:
                # Wait for more requests until the batch is full or the oldest waited max_wait_s.
                deadline = self._pending[0][2] + self.max_wait_s
                while self._queued < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    try:
                        await asyncio.wait_for(wake.wait(), timeout=left)
                    except TimeoutError:
                        break
                    wake.clear()
                batch = self._take_batch()
                instances = [inst for request, _, _ in batch for inst in request]
                self._set_queued(self._queued - len(instances))
                PREDICTOR_METRICS.batch_size.labels(model=self.name).observe(len(instances))
                start = time.monotonic()
                try:
                    results = await loop.run_in_executor(None, self.run, instances)
                except Exception as err:  # every request of the batch gets the error
                    for _, future, _ in batch:
                        if not future.done():
                            future.set_exception(err)
                    continue
                finally:
                    self._batch_seconds = time.monotonic() - start
                offset = 0
                for request, future, _ in batch:
                    if not future.done():  # a client that went away cancelled its future
                        future.set_result(results[offset : offset + len(request)])
                    offset += len(request)
