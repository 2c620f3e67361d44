"""The samples of a featurized dataset as one table, memory-mapped part by part.

    table = load_feature_table("s3://lumos/datasets/images", split="train")
    batch = table.gather(rows, text=True)  # latents (B,C,h,w), image_embeds (B,D), text_embeds...

Every part is memory-mapped, never read into memory: a local dataset's own files, or for a
dataset in the object store, copies in the node's cache (`lumos.features.cache`). A batch reads
just its rows, through the page cache, which the processes of one node share. What stays in
memory is a few bytes per sample (its part row, whether it has text) and the parts' json
records, read on demand: the pretraining set can be far larger than memory (190M images at
32x32x4 latents are about 1.8 TB).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lumos.errors import FeaturesError
from lumos.features.cache import FeatureFiles
from lumos.features.format import (
    FEATURES_DIR,
    ROW_DTYPE,
    FeaturePart,
    group_id,
    is_eval_record,
    map_part,
    map_text,
    read_features_spec,
    read_part_records,
)
from lumos.storage import Storage


class TableRecords(Sequence[dict[str, Any]]):
    """The per-sample records of a table's rows, read from their part's json when first asked
    for; the most recently used parts stay loaded."""

    def __init__(self, table: FeatureTable, keep_parts: int = 4) -> None:
        self.table, self.keep_parts = table, keep_parts
        self._loaded: OrderedDict[int, list[dict[str, Any]]] = OrderedDict()

    def _part(self, p: int) -> list[dict[str, Any]]:
        if p in self._loaded:
            self._loaded.move_to_end(p)
        else:
            self._loaded[p] = self.table.parts[p].records()
            if len(self._loaded) > self.keep_parts:
                self._loaded.popitem(last=False)
        return self._loaded[p]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row: int) -> dict[str, Any]:  # type: ignore[override]
        if not isinstance(row, int | np.integer):
            raise TypeError(f"records are indexed by one int row, got {type(row).__name__}")
        if not -len(self) <= row < len(self):
            raise IndexError(f"row {row} out of range for a table of {len(self)} samples")
        p, local = self.table.locate(np.array([row % len(self)]))
        return self._part(int(p[0]))[int(local[0])]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        starts, local = self.table.part_starts, self.table.local_rows
        for p in range(len(self.table.parts)):
            if starts[p] == starts[p + 1]:  # none of this part's samples is in the split
                continue
            records = self._part(p)
            for r in local[starts[p] : starts[p + 1]]:
                yield records[r]


@dataclass
class FeatureTable:
    """The samples of one split of a featurized dataset: row i is `local_rows[i]` of the part
    whose range [part_starts[p], part_starts[p + 1]) holds it."""

    spec: dict[str, Any]  # features.json: encoders, counts, shapes
    parts: list[FeaturePart]
    part_starts: np.ndarray  # (P + 1,) int64
    local_rows: np.ndarray  # (N,) int32: row within its part
    has_text: np.ndarray  # (N,) bool
    excluded_eval: int = 0  # samples left out because their split is "eval"
    # Several image sizes (aspect buckets): each row's index in `latent_sizes` ((h, w), sorted)
    size_ids: np.ndarray | None = None  # (N,) uint8; None: one size
    latent_sizes: list[tuple[int, int]] = field(default_factory=list)
    records: TableRecords = field(init=False)

    def __post_init__(self) -> None:
        self.records = TableRecords(self)

    @classmethod
    def in_memory(
        cls,
        records: list[dict[str, Any]],
        latents: torch.Tensor,
        image_embeds: torch.Tensor,
        spec: dict[str, Any] | None = None,
    ) -> FeatureTable:
        """One part held in memory (tests, small tables built in code)."""
        n = len(records)
        if latents.shape[0] != n or image_embeds.shape[0] != n:
            raise ValueError("one feature row per record")
        part = FeaturePart(latents=[latents], image_embeds=image_embeds, records=lambda: records)
        return cls(
            spec=spec or {},
            parts=[part],
            part_starts=np.array([0, n], dtype=np.int64),
            local_rows=np.arange(n, dtype=ROW_DTYPE),
            has_text=np.zeros(n, dtype=bool),
            latent_sizes=[(int(latents.shape[-2]), int(latents.shape[-1]))],
        )

    def __len__(self) -> int:
        return len(self.local_rows)

    def part_rows(self, p: int) -> np.ndarray:
        """The rows, within part `p`, of the table's rows in that part (in table order)."""
        return self.local_rows[self.part_starts[p] : self.part_starts[p + 1]]

    def frames(self) -> tuple[np.ndarray, np.ndarray]:
        """(group, frame index), both (N,) int64, of every row: `group_id(meta.group)` and
        meta.index, from the arrays featurize stores with each part (no json is read), else from
        the part's records."""
        group, index = np.zeros(len(self), np.int64), np.zeros(len(self), np.int64)
        for p, part in enumerate(self.parts):
            rows, span = self.part_rows(p), slice(self.part_starts[p], self.part_starts[p + 1])
            if part.frame_group is not None and part.frame_index is not None:
                group[span], index[span] = part.frame_group[rows], part.frame_index[rows]
                continue
            records = part.records()
            for i, r in enumerate(rows.tolist()):
                meta = records[r].get("meta") or {}
                if "group" not in meta or "index" not in meta:
                    raise FeaturesError(
                        f"sample {records[r].get('key')!r} has no meta.group / meta.index: "
                        "multi-frame heads need the views / clips sidecars (see "
                        "docs/architecture.md, raw source layout)"
                    )
                try:
                    index[span.start + i] = int(meta["index"])
                except (TypeError, ValueError) as err:
                    raise FeaturesError(
                        f"sample {records[r].get('key')!r} has meta.index {meta['index']!r}: "
                        "it must be an integer (the frame's place in its group)"
                    ) from err
                group[span.start + i] = group_id(meta["group"])
        return group, index

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part index, row within the part) of each table row."""
        return np.searchsorted(self.part_starts, rows, side="right") - 1, self.local_rows[rows]

    def gather(
        self,
        rows: Sequence[int] | np.ndarray,
        text: bool = False,
        pin_memory: bool = False,
        pack_text: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The features of `rows` (any shape S): latents (*S, C, h, w), image_embeds (*S, D) and,
        with `text`, text_embeds (*S, L, Dt) and text_mask (*S, L): each caption's tokens, then
        zeros (and mask False) up to L; all zeros for a row without one.
        `pack_text` leaves the padding to `pad_text` (on the GPU, after the copy): instead of
        text_embeds, text_tokens (T, Dt) holds the captions' tokens one after another and
        text_index (T,) each token's place among the S x L padded positions. A batch of T5-XXL
        captions is then about 3x smaller to assemble and to copy (captions average ~36 of 120).
        Reads only these rows of the memory-mapped parts. `pin_memory` (CUDA only) assembles the
        features in page-locked memory, so their copy to the GPU runs without waiting for the GPU
        (`FeatureDataset.batch` pins the rest of a batch)."""
        index = np.asarray(rows, dtype=np.int64)
        flat = index.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(
                f"rows {flat.min()}..{flat.max()} out of range for {len(self)} samples"
            )
        text_shape = self.spec.get("shapes", {}).get("text_embeds") if text else None
        if text and text_shape is None:
            raise FeaturesError("text features asked for, but the dataset has no paired samples")
        if self.size_ids is not None and len(np.unique(self.size_ids[flat])) > 1:
            mixed = [self.latent_sizes[i] for i in np.unique(self.size_ids[flat])]
            raise FeaturesError(
                f"rows of latent sizes {mixed} cannot share a batch: batch the rows of one size "
                "together (ResumableSampler's groups, FeatureDataset.item_sizes)"
            )
        part_ids, local = self.locate(flat)
        where = list(zip(part_ids.tolist(), local.tolist(), strict=True))
        first = (
            self.parts[where[0][0]].latent(where[0][1]) if where else self.parts[0].latents[0][0]
        )

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float16, pin_memory=pin_memory)

        out = {
            "latents": empty(len(flat), *first.shape),
            "image_embeds": empty(len(flat), *self.parts[0].image_embeds.shape[1:]),
        }
        # One copy per row straight from the map into the batch: no temporaries (a caption of
        # T5-XXL tokens is about 8 KB a token), and a row costs the same whichever part holds it.
        for i, (p, r) in enumerate(where):
            out["latents"][i].copy_(self.parts[p].latent(r))
            out["image_embeds"][i].copy_(self.parts[p].image_embeds[r])
        if text_shape is not None:
            captions = [self.parts[p].caption(r) for p, r in where]
            lengths = torch.tensor([0 if c is None else len(c) for c in captions])
            mask = torch.arange(text_shape[0]) < lengths[:, None]  # (B, L)
            out["text_mask"] = mask
            tokens = empty(int(lengths.sum()), text_shape[1])
            at = 0
            for c in captions:
                if c is not None:
                    tokens[at : at + len(c)].copy_(c)
                    at += len(c)
            out["text_tokens"], out["text_index"] = tokens, mask.reshape(-1).nonzero()[:, 0]
        shaped = {
            k: v if k in PACKED_TEXT else v.reshape(*index.shape, *v.shape[1:])
            for k, v in out.items()
        }
        return shaped if pack_text else pad_text(shaped)


PACKED_TEXT = ("text_tokens", "text_index")  # `gather(pack_text=True)`'s keys for text_embeds


def pad_text(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with packed captions (`FeatureTable.gather(pack_text=True)`) padded: text_embeds
    (*S, L, Dt), zeros after each caption, on the batch's device. No host synchronisation: the
    tokens go to their places by index. A batch without packed captions is returned as is."""
    if "text_tokens" not in batch:
        return batch
    out = {k: v for k, v in batch.items() if k not in PACKED_TEXT}
    tokens, mask = batch["text_tokens"], batch["text_mask"]
    padded = torch.zeros(  # page-locked when the tokens are (a CPU batch for the GPU)
        (mask.numel(), tokens.shape[-1]), dtype=tokens.dtype, device=tokens.device,
        pin_memory=tokens.is_pinned(),
    )  # fmt: skip
    padded.index_copy_(0, batch["text_index"], tokens)
    out["text_embeds"] = padded.view(*mask.shape, tokens.shape[-1])
    return out


def node_parts(num_parts: int, node: int, nodes: int) -> list[int]:
    """The feature parts node `node` of `nodes` reads when a run splits them by node: parts
    node, node + nodes, ... (ingest's shards are of about equal size, so the nodes are too)."""
    if not 0 <= node < nodes:
        raise ValueError(f"node {node} is not one of {nodes} nodes")
    if num_parts < nodes:
        raise FeaturesError(
            f"the features have {num_parts} parts for {nodes} nodes, and each node needs at "
            "least one: ingest with a smaller shard_max_bytes, or read every part on every node "
            "(shard_features_by_node: false)"
        )
    return list(range(node, num_parts, nodes))


def load_feature_table(
    dataset_uri: str, split: str = "train", part_ids: Sequence[int] | None = None
) -> FeatureTable:
    """Map the features of `dataset_uri`; split "train" keeps every sample not marked "eval".
    `part_ids` (indices into features.json's parts, e.g. `node_parts`): only those are fetched
    and mapped; default all.

    Each part's entry in features.json lists its eval rows, so the parts' json records are only
    read when a caller asks for records (multi-frame heads, evaluation); features written before
    that entry existed are split by reading their records here."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split must be 'train', 'eval' or 'all', got {split!r}")
    spec = read_features_spec(dataset_uri)
    files = FeatureFiles(Storage.from_uri(dataset_uri).child(FEATURES_DIR))
    entries = spec["parts"]
    if part_ids is not None:
        if not part_ids or not all(0 <= i < len(entries) for i in part_ids):
            raise ValueError(f"parts {list(part_ids)} are not among the {len(entries)} parts")
        entries = [entries[i] for i in part_ids]
    split_listed = all("eval_rows" in e for e in entries)
    files.fetch_all(
        [f"{e['name']}.safetensors" for e in entries]
        + ([] if split_listed else [f"{e['name']}.json" for e in entries])
        + [f"{e['name']}.text.safetensors" for e in entries if e.get("paired", 0) > 0]
    )
    parts: list[FeaturePart] = []
    starts, local_rows, has_text, excluded = [0], [], [], 0
    part_sizes: list[list[tuple[int, int]]] = []  # per part: the (h, w) of each of its latents
    for entry in entries:
        name = entry["name"]
        records = functools.partial(_part_records, files, f"{name}.json")
        part = map_part(files(f"{name}.safetensors"), records)
        if split_listed:
            n, is_eval = int(entry["count"]), np.zeros(int(entry["count"]), dtype=bool)
            is_eval[np.asarray(entry["eval_rows"], dtype=np.int64)] = True
        else:
            is_eval = np.array([is_eval_record(r) for r in records()], dtype=bool)
            n = len(is_eval)
        if part.image_embeds.shape[0] != n:
            raise FeaturesError(
                f"part {name} of {dataset_uri} has {part.image_embeds.shape[0]} feature rows "
                f"for {n} records: the features are inconsistent; re-run `lumos featurize`"
            )
        part_sizes.append([(int(t.shape[-2]), int(t.shape[-1])) for t in part.latents])
        part_has_text = np.zeros(n, dtype=bool)
        if entry.get("paired", 0) > 0:
            text_len = spec["shapes"]["text_embeds"][0]
            rows, part.text_tokens, part.text_starts, part.text_lengths = map_text(
                files(f"{name}.text.safetensors"), text_len
            )
            part.text_rows = rows
            part_has_text[rows] = True
        selected = {"train": ~is_eval, "eval": is_eval, "all": np.ones(n, dtype=bool)}[split]
        keep = np.nonzero(selected)[0].astype(ROW_DTYPE)
        excluded += int(is_eval.sum()) if split == "train" else 0
        parts.append(part)
        local_rows.append(keep)
        has_text.append(part_has_text[keep])
        starts.append(starts[-1] + len(keep))
    if starts[-1] == 0:
        which = "" if part_ids is None else f" (parts {list(part_ids)})"
        raise FeaturesError(f"the features of {dataset_uri}{which} hold no {split!r} samples")
    table = FeatureTable(
        spec=spec,
        parts=parts,
        part_starts=np.array(starts, dtype=np.int64),
        local_rows=np.concatenate(local_rows),
        has_text=np.concatenate(has_text),
        excluded_eval=excluded,
    )
    table.latent_sizes = sorted({size for sizes in part_sizes for size in sizes})
    if len(table.latent_sizes) > 255:
        raise FeaturesError(
            f"{dataset_uri} holds {len(table.latent_sizes)} image sizes; 255 at most"
        )
    if len(table.latent_sizes) > 1:  # aspect buckets: each row's size, for batching by size
        ids = {size: i for i, size in enumerate(table.latent_sizes)}
        table.size_ids = np.concatenate([
            np.array([ids[s] for s in sizes], dtype=np.uint8)[
                part.size[rows] if part.size is not None else np.zeros(len(rows), dtype=np.int64)
            ]
            for part, sizes, rows in zip(parts, part_sizes, local_rows, strict=True)
        ])  # fmt: skip
    return table


def _part_records(files: FeatureFiles, key: str) -> list[dict[str, Any]]:
    return read_part_records(files(key))
