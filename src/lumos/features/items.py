"""A head's items over a feature table, and their collation into batches.

    dataset = FeatureDataset.for_head(load_feature_table(uri), "novel_view", num_frames=4)
    batch = dataset.batch([0, 5, 7])  # the keys lumos.heads reads, float16 as cached

Batches follow the heads' contract (docs/architecture.md, "Heads"), float16 as cached (the
model casts them):
- i2i: `latents (B,C,h,w)`, `image_embeds (B,D)`.
- t2i: `latents`, `text_embeds (B,L,Dt)`, `text_mask (B,L)`; it only uses rows with a caption.
- multi-frame heads (novel_view, video): samples grouped by `meta.group`, sorted by `meta.index`;
  every run of `num_frames` consecutive frames of a group is one item: `latents (B,F,C,h,w)`,
  `image_embeds (B,F,D)`, `frame_index (B,F)` and, for views, `camera (B,F,4)` =
  (azimuth_deg, elevation_deg, radius, 0), absolute: `lumos.heads` makes it relative to view 0.
The training loop and evaluation both read them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lumos.configs.training import MULTI_FRAME_HEADS
from lumos.errors import FeaturesError
from lumos.features.format import ROW_DTYPE, absolute_camera
from lumos.features.table import PACKED_TEXT, FeatureTable
from lumos.heads import get_head


@dataclass
class FeatureDataset:
    """The items of one head over a `FeatureTable`, and their collation into a batch."""

    table: FeatureTable
    head: str
    num_frames: int = 1
    # (num_items, frames) int32: the table rows of each item (frames = 1 for single-image heads)
    items: np.ndarray = field(default_factory=lambda: np.zeros((0, 1), dtype=ROW_DTYPE))
    skipped_groups: int = 0  # multi-frame groups shorter than num_frames
    # (N, 4) float32 absolute camera of every table row, for head "novel_view"
    cameras: np.ndarray | None = None
    # (N,) int64 group id (`group_id` of meta.group) of every table row, for multi-frame heads
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        items = np.asarray(self.items, dtype=ROW_DTYPE)
        self.items = items[:, None] if items.ndim == 1 else items

    @classmethod
    def for_head(cls, table: FeatureTable, head: str, num_frames: int = 1) -> FeatureDataset:
        ds = cls(table=table, head=head, num_frames=num_frames)
        if head in MULTI_FRAME_HEADS:
            if num_frames < 2:
                raise ValueError(f"head {head!r} needs num_frames >= 2, got {num_frames}")
            ds.groups, index = table.frames()
            ds.items, ds.skipped_groups = _frame_windows(ds.groups, index, num_frames)
            if head == "novel_view":
                ds.cameras = _cameras(table, ds.items)
        elif head == "t2i":
            ds.items = np.nonzero(table.has_text)[0].astype(ROW_DTYPE)[:, None]  # (M, 1)
        else:
            ds.items = np.arange(len(table), dtype=ROW_DTYPE)[:, None]
        if not len(ds.items):
            raise FeaturesError(
                f"no training items for head {head!r} (num_frames={num_frames}) in a dataset of "
                f"{len(table)} samples: t2i needs captioned (paired) samples, multi-frame heads "
                f"need groups (meta.group / meta.index) of at least num_frames samples"
            )
        if table.size_ids is not None:
            sizes = table.size_ids[ds.items]  # (num_items, frames)
            mixed = np.nonzero((sizes != sizes[:, :1]).any(axis=1))[0]
            if len(mixed):
                keys = [table.records[int(r)]["key"] for r in ds.items[mixed[0]]]
                raise FeaturesError(
                    f"{len(mixed)} {head} items mix image sizes (first: {keys}): the frames of a "
                    "group must share one size; ingest views and clips without aspect buckets"
                )
        return ds

    def item_sizes(self) -> np.ndarray | None:
        """(num_items,) uint8: each item's image size (`table.latent_sizes`); None: one size."""
        if self.table.size_ids is None:
            return None
        return self.table.size_ids[self.items[:, 0]]

    def __len__(self) -> int:
        return len(self.items)

    def batch(
        self,
        item_ids: Sequence[int] | np.ndarray,
        pin_memory: bool = False,
        pack_text: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Collate items into the keys the head reads (`HeadSpec.batch_keys`), float16 as cached
        (the model casts them); `pin_memory`: see `FeatureTable.gather`. `pack_text`: captions
        packed, text_tokens and text_index in place of text_embeds, for `pad_text` to pad on the
        device (the training loop does)."""
        rows = self.items[np.asarray(item_ids, dtype=np.int64)]  # (B, F)
        keys = get_head(self.head).batch_keys
        if pack_text and "text_embeds" in keys:
            keys = tuple(k for k in keys if k != "text_embeds") + PACKED_TEXT
        if self.head not in MULTI_FRAME_HEADS:
            # latents (B, C, h, w) and image_embeds (B, D) or text (B, L, Dt), (B, L)
            text = "text_embeds" in keys or "text_tokens" in keys
            out = self.table.gather(rows[:, 0], text, pin_memory, pack_text)
        else:
            # latents (B, F, C, h, w), image_embeds (B, F, D)
            out = self.table.gather(rows, pin_memory=pin_memory)
            b, f = rows.shape
            out["frame_index"] = torch.arange(f).expand(b, f).clone()  # (B, F)
            if self.head == "novel_view":
                if self.cameras is None:  # built from items given directly, not by for_head
                    self.cameras = _cameras(self.table, self.items)
                # (B, F, 4) absolute; lumos.heads.relative_camera makes it relative to view 0
                out["camera"] = torch.from_numpy(self.cameras[rows])
        if pin_memory:  # one tensor in pageable memory would make the GPU copies wait again
            return {k: out[k] if out[k].is_pinned() else out[k].pin_memory() for k in keys}
        return {k: out[k] for k in keys}


def _cameras(table: FeatureTable, rows: np.ndarray) -> np.ndarray:
    """(N, 4) float32: the absolute camera of each of `rows` (any shape; others zero); all
    must have one.
    From the arrays featurize stores with each part, else from the part's records."""
    cameras = np.zeros((len(table), 4), dtype=np.float32)
    missing = []
    needed = np.unique(rows)
    for p, part in enumerate(table.parts):
        lo, hi = table.part_starts[p], table.part_starts[p + 1]
        if part.camera is not None:
            cameras[lo:hi] = part.camera[table.part_rows(p)]
            continue
        in_part = needed[(needed >= lo) & (needed < hi)]
        records = part.records() if len(in_part) else []
        for r in in_part.tolist():
            record = records[int(table.local_rows[r])]
            meta = record.get("meta") or {}
            if "camera" in meta:
                cameras[r] = absolute_camera(meta["camera"])
            else:
                missing.append(record["key"])
    if missing:
        raise FeaturesError(
            f"head 'novel_view' needs meta.camera on every view; {len(missing)} views "
            f"lack it (first: {missing[0]!r}): ingest the views dataset with its sidecars"
        )
    return cameras


def _frame_windows(group: np.ndarray, index: np.ndarray, num_frames: int) -> tuple[np.ndarray, int]:
    """Every run of `num_frames` consecutive frames (by frame index) of each group: (windows,
    num_frames) table rows, groups in the order of their first row; and how many groups were
    shorter than `num_frames`."""
    n = len(group)
    _, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    first = np.full(len(counts), n, dtype=np.int64)
    np.minimum.at(first, inverse, np.arange(n))
    order = np.lexsort((np.arange(n), index, first[inverse]))  # by group, then index, then row
    end = np.cumsum(counts[np.argsort(first)])  # where each group ends, in `order`
    group_end = np.repeat(end, np.diff(end, prepend=0))  # (n,) the end of each slot's group
    starts = np.nonzero(np.arange(n) + num_frames <= group_end)[0]
    windows = order[starts[:, None] + np.arange(num_frames)].astype(ROW_DTYPE)
    return windows.reshape(-1, num_frames), int((counts < num_frames).sum())
