"""The cached features the training loop reads, assembled into batches per head.

Featurize wrote `<dataset>/features/part-XXXXX.safetensors` (+ `.json`, `.text.safetensors`) and
`features.json` last. Here the parts are loaded into memory (float16: 1M images at 32x32x4 latents
plus a 768-d embedding are about 10 GB), filtered to the training split, and served in a
deterministic order that is a pure function of (seed, epoch), so a resumed run sees exactly the
batches the uninterrupted run would have seen from its saved position on.

For datasets beyond one machine's memory the same order can be served without loading everything:
the item -> (part, row) index is small, and `safetensors.safe_open` reads single rows of a part
from a local (or cached) file; the sampler below does not change.

Batches follow the heads' contract (docs/architecture.md, "Heads"):
- single-image heads (i2i, t2i): `latents (B,C,h,w)`, `image_embeds (B,D)` and, when the dataset
  has captions, `text_embeds (B,L,Dt)`, `text_mask (B,L)`; t2i only uses rows with a caption.
- multi-frame heads (novel_view, video): samples grouped by `meta.group`, sorted by `meta.index`;
  every run of `num_frames` consecutive frames of a group is one item: `latents (B,F,C,h,w)`,
  `image_embeds (B,F,D)`, `frame_index (B,F)` and, for views, `camera (B,F,4)` =
  (azimuth_deg, elevation_deg, radius, 0), absolute: `lumos.heads` makes it relative to view 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from lumos.storage import Storage

FEATURES_DIR = "features"
MULTI_FRAME_HEADS = ("novel_view", "video")


class FeaturesNotFound(FileNotFoundError):
    """The dataset has no (complete) features: featurize it first."""


@dataclass
class FeatureTable:
    """Every training-split sample of a featurized dataset, in memory."""

    spec: dict[str, Any]  # features.json: encoders, counts, shapes
    records: list[dict[str, Any]]  # per-sample json written by ingest (key, meta, caption, ...)
    latents: torch.Tensor  # (N, C, h, w) float16, already scaled
    image_embeds: torch.Tensor  # (N, D) float16, raw DINO CLS
    text_embeds: torch.Tensor | None  # (N, L, Dt) float16, zeros where a row has no caption
    text_mask: torch.Tensor | None  # (N, L) bool
    has_text: torch.Tensor  # (N,) bool
    excluded_eval: int = 0  # samples left out because their split is "eval"

    def __len__(self) -> int:
        return len(self.records)


def read_features_spec(dataset_uri: str) -> dict[str, Any]:
    """`features.json` of a dataset; a clear error when the dataset was not featurized."""
    store = Storage.from_uri(dataset_uri).child(FEATURES_DIR)
    if not store.exists("features.json"):
        raise FeaturesNotFound(
            f"no features at {store.key_uri('features.json')}: run `lumos featurize` on "
            f"{dataset_uri} first (the training loop reads cached latents and embeddings)"
        )
    return store.read_json("features.json")


def load_feature_table(dataset_uri: str, split: str = "train") -> FeatureTable:
    """Load the features of `dataset_uri`; split "train" keeps every sample not marked "eval"."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    spec = read_features_spec(dataset_uri)
    store = Storage.from_uri(dataset_uri).child(FEATURES_DIR)
    records: list[dict[str, Any]] = []
    latents, image_embeds, text_embeds, text_masks, has_text = [], [], [], [], []
    text_shape = spec["shapes"].get("text_embeds")  # [L, Dt] or None when nothing is paired
    excluded = 0
    for part in spec["parts"]:
        name = part["name"]
        tensors = load_safetensors(store.read_bytes(f"{name}.safetensors"))
        part_json = store.read_json(f"{name}.json")
        n = len(part_json["keys"])
        part_text = torch.zeros(n, *text_shape, dtype=torch.float16) if text_shape else None
        part_mask = torch.zeros(n, text_shape[0], dtype=torch.bool) if text_shape else None
        part_has_text = torch.zeros(n, dtype=torch.bool)
        if part.get("paired", 0) > 0:
            text = load_safetensors(store.read_bytes(f"{name}.text.safetensors"))
            rows = text["rows"]
            assert part_text is not None and part_mask is not None, "text part without a shape"
            part_text[rows] = text["text_embeds"]
            part_mask[rows] = text["text_mask"]
            part_has_text[rows] = True
        keep = [i for i, r in enumerate(part_json["meta"]) if _in_split(r, split)]
        excluded += n - len(keep)
        index = torch.tensor(keep, dtype=torch.long)
        records += [part_json["meta"][i] for i in keep]
        latents.append(tensors["latents"][index])
        image_embeds.append(tensors["image_embeds"][index])
        has_text.append(part_has_text[index])
        if part_text is not None and part_mask is not None:
            text_embeds.append(part_text[index])
            text_masks.append(part_mask[index])
    if not records:
        raise ValueError(f"the features of {dataset_uri} hold no {split!r} samples")
    return FeatureTable(
        spec=spec,
        records=records,
        latents=torch.cat(latents),
        image_embeds=torch.cat(image_embeds),
        text_embeds=torch.cat(text_embeds) if text_embeds else None,
        text_mask=torch.cat(text_masks) if text_masks else None,
        has_text=torch.cat(has_text),
        excluded_eval=excluded,
    )


def _in_split(record: dict[str, Any], split: str) -> bool:
    is_eval = (record.get("meta") or {}).get("split") == "eval"
    return split == "all" or (split == "eval") == is_eval


def absolute_camera(camera: dict[str, float]) -> list[float]:
    """[azimuth_deg, elevation_deg, radius, 0]: the heads' camera layout (they make it relative)."""
    return [float(camera["azimuth"]), float(camera["elevation"]), float(camera["radius"]), 0.0]


@dataclass
class FeatureDataset:
    """The items of one head over a `FeatureTable`, and their collation into a batch."""

    table: FeatureTable
    head: str
    num_frames: int = 1
    items: list[list[int]] = field(default_factory=list)  # rows of the table, one list per item
    skipped_groups: int = 0  # multi-frame groups shorter than num_frames

    @classmethod
    def for_head(cls, table: FeatureTable, head: str, num_frames: int = 1) -> FeatureDataset:
        ds = cls(table=table, head=head, num_frames=num_frames)
        if head in MULTI_FRAME_HEADS:
            assert num_frames >= 2, f"head {head!r} needs num_frames >= 2, got {num_frames}"
            ds.items, ds.skipped_groups = _frame_windows(table.records, num_frames)
            if head == "novel_view":
                rows = sorted({r for window in ds.items for r in window})
                missing = [
                    table.records[r]["key"]
                    for r in rows
                    if "camera" not in table.records[r].get("meta", {})
                ]
                if missing:
                    raise ValueError(
                        f"head 'novel_view' needs meta.camera on every view; {len(missing)} views "
                        f"lack it (first: {missing[0]!r}): ingest the views dataset with its sidecars"
                    )
        elif head == "t2i":
            ds.items = [[i] for i in torch.nonzero(table.has_text).flatten().tolist()]
        else:
            ds.items = [[i] for i in range(len(table))]
        if not ds.items:
            raise ValueError(
                f"no training items for head {head!r} (num_frames={num_frames}) in a dataset of "
                f"{len(table)} samples: t2i needs captioned (paired) samples, multi-frame heads "
                f"need groups (meta.group / meta.index) of at least num_frames samples"
            )
        return ds

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, item_ids: list[int]) -> dict[str, torch.Tensor]:
        """Collate items into float32 tensors (autocast lowers them where the model wants)."""
        t = self.table
        rows = torch.tensor([self.items[i] for i in item_ids], dtype=torch.long)  # (B, F) or (B, 1)
        if self.head not in MULTI_FRAME_HEADS:
            rows = rows[:, 0]  # (B,)
            out = {
                "latents": t.latents[rows].float(),  # (B, C, h, w)
                "image_embeds": t.image_embeds[rows].float(),  # (B, D)
            }
            if t.text_embeds is not None and t.text_mask is not None:
                out["text_embeds"] = t.text_embeds[rows].float()  # (B, L, Dt)
                out["text_mask"] = t.text_mask[rows]  # (B, L)
            return out
        b, f = rows.shape
        out = {
            "latents": t.latents[rows].float(),  # (B, F, C, h, w)
            "image_embeds": t.image_embeds[rows].float(),  # (B, F, D)
            "frame_index": torch.arange(f).expand(b, f).clone(),  # (B, F)
        }
        if self.head == "novel_view":  # for_head checked that every view has its camera
            out["camera"] = torch.tensor(
                [
                    [absolute_camera(t.records[r]["meta"]["camera"]) for r in item]
                    for item in rows.tolist()
                ]
            )  # (B, F, 4) absolute; lumos.heads.relative_camera makes it relative to view 0
        return out


def _frame_windows(records: list[dict[str, Any]], num_frames: int) -> tuple[list[list[int]], int]:
    """Every run of `num_frames` consecutive frames (by meta.index) of each group."""
    groups: dict[str, list[tuple[int, int]]] = {}
    for row, record in enumerate(records):
        meta = record.get("meta") or {}
        if "group" not in meta or "index" not in meta:
            raise ValueError(
                f"sample {record.get('key')!r} has no meta.group / meta.index: multi-frame heads "
                "need the views / clips sidecars (see docs/architecture.md, raw source layout)"
            )
        groups.setdefault(str(meta["group"]), []).append((int(meta["index"]), row))
    windows, skipped = [], 0
    for name in sorted(groups):
        frames = [row for _, row in sorted(groups[name])]
        if len(frames) < num_frames:
            skipped += 1
            continue
        windows += [frames[s : s + num_frames] for s in range(len(frames) - num_frames + 1)]
    return windows, skipped


class ResumableSampler:
    """Global batches in an order fixed by (seed, epoch); the position makes resume exact.

    Each micro-step takes `global_batch` items of the epoch's permutation (the last incomplete
    batch of an epoch is dropped, as in DiT); process `rank` of `world_size` takes its slice.
    """

    def __init__(
        self, num_items: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < global_batch:
            raise ValueError(
                f"{num_items} training items cannot fill one global batch of {global_batch} "
                "(batch_size x processes): lower batch_size or add data"
            )
        assert global_batch % world_size == 0, "the global batch must split evenly over processes"
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.batches_per_epoch = num_items // global_batch
        self.epoch, self.position = 0, 0  # position: batches already taken in this epoch
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_batch(self) -> list[int]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.position * self.global_batch
        batch = self._order[start : start + self.global_batch]
        self.position += 1
        return batch[self.rank :: self.world_size].tolist()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "num_items": self.num_items,
            "global_batch": self.global_batch,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        same = (state["num_items"], state["global_batch"], state["seed"])
        if same != (self.num_items, self.global_batch, self.seed):
            raise ValueError(
                f"cannot resume the data order: the checkpoint was taken with (items, global batch, "
                f"seed) = {same}, this run has {(self.num_items, self.global_batch, self.seed)}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
