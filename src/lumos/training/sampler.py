"""The training order: global batches fixed by (seed, epoch), resumable from a position.

The order is a deterministic function of (seed, epoch), so a resumed run sees exactly the
batches the uninterrupted run would have seen from its saved position on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lumos.errors import CheckpointError, FeaturesError
from lumos.features.format import ROW_DTYPE


class ResumableSampler:
    """Global batches in an order fixed by (seed, epoch); the position makes resume exact.

    Each micro-step takes `global_batch` items of the epoch's permutation (the last incomplete
    batch of an epoch is dropped, as in DiT); process `rank` of `world_size` takes its slice.
    With `groups` (an id per item: its image size), every batch holds items of one group: each
    group's items are permuted and cut into batches (dropping each group's incomplete last one),
    then the batches of all groups are shuffled together (PixArt's aspect-ratio batches).
    """

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        groups: np.ndarray | None = None,
    ) -> None:
        if global_batch % world_size != 0:
            raise ValueError("the global batch must split evenly over processes")
        if num_items > np.iinfo(ROW_DTYPE).max:
            raise ValueError(f"{num_items} training items exceed the 2^31 this sampler indexes")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.groups: list[np.ndarray] | None = None  # each group's items
        self.group_sizes: dict[int, int] | None = None  # group id -> its number of items
        if groups is not None:
            if len(groups) != num_items:
                raise ValueError("one group id per item")
            order = np.argsort(groups, kind="stable").astype(ROW_DTYPE)
            bounds = np.flatnonzero(groups[order][1:] != groups[order][:-1]) + 1
            self.groups = np.split(order, bounds)
            self.group_sizes = {int(groups[g[0]]): len(g) for g in self.groups}
        sizes = list(self.group_sizes.values()) if self.group_sizes else [num_items]
        self.batches_per_epoch = sum(n // global_batch for n in sizes)
        # Items of groups too small for one global batch: never trained on.
        self.starved_items = sum(n for n in sizes if n < global_batch)
        if self.batches_per_epoch == 0:
            raise FeaturesError(
                f"{num_items} training items cannot fill one global batch of {global_batch} "
                f"(batch_size x processes){' in any image size' if groups is not None else ''}: "
                "lower batch_size or add data"
            )
        self.epoch, self.position = 0, 0  # position: batches already taken in this epoch
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.groups is None:
            # The same order as permuting an int64 range (what checkpoints before int32 rows used).
            return rng.permutation(np.arange(self.num_items, dtype=ROW_DTYPE))
        batches = []
        for members in self.groups:
            full = len(members) // self.global_batch * self.global_batch
            batches.append(rng.permutation(members)[:full].reshape(-1, self.global_batch))
        stacked = np.concatenate(batches)  # (batches_per_epoch, global_batch)
        return stacked[rng.permutation(len(stacked))].reshape(-1)

    def next_batch(self) -> list[int]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position * self.global_batch
        batch = self._order[start : start + self.global_batch]
        self.position += 1
        return batch[self.rank :: self.world_size].tolist()

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "global_batch": self.global_batch,
            "seed": self.seed,
            # JSON keys are strings: the ids as text, as they read back from a checkpoint
            "group_sizes": {str(k): n for k, n in self.group_sizes.items()}
            if self.group_sizes is not None
            else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        same = (state["num_items"], state["global_batch"], state["seed"], state.get("group_sizes"))
        this = (self.num_items, self.global_batch, self.seed, self.state_dict()["group_sizes"])
        if same != this:
            raise CheckpointError(
                f"cannot resume the data order: the checkpoint was taken with (items, global batch, "
                f"seed, items per image size) = {same}, this run has {this}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
