"""The cached features the training loop reads, assembled into batches per head.

Featurize wrote `<dataset>/features/part-XXXXX.safetensors` (+ `.json`, `.text.safetensors`) and
`features.json` last. Here every part is memory-mapped, never read into memory: a local dataset's
own files, or for a dataset in the object store, copies downloaded once into a local cache
(`$LUMOS_FEATURE_CACHE`, else `<tmp>/lumos-features`). A batch reads just its rows, through the
page cache, which the processes of one node share. What stays in memory is a few bytes per
sample (its part row, whether it has text) and the parts' json records, read on demand: the
pretraining set can be far larger than memory (190M images at 32x32x4 latents are about 1.8 TB).

The training order is a deterministic function of (seed, epoch), so a resumed run sees exactly
the batches the uninterrupted run would have seen from its saved position on.

Batches follow the heads' contract (docs/architecture.md, "Heads"), float16 as cached (the
model casts them):
- i2i: `latents (B,C,h,w)`, `image_embeds (B,D)`.
- t2i: `latents`, `text_embeds (B,L,Dt)`, `text_mask (B,L)`; it only uses rows with a caption.
- multi-frame heads (novel_view, video): samples grouped by `meta.group`, sorted by `meta.index`;
  every run of `num_frames` consecutive frames of a group is one item: `latents (B,F,C,h,w)`,
  `image_embeds (B,F,D)`, `frame_index (B,F)` and, for views, `camera (B,F,4)` =
  (azimuth_deg, elevation_deg, radius, 0), absolute: `lumos.heads` makes it relative to view 0.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from lumos.heads import get_head
from lumos.storage import PreconditionFailed, Storage

FEATURES_DIR = "features"
MULTI_FRAME_HEADS = ("novel_view", "video")
CACHE_ENV = "LUMOS_FEATURE_CACHE"
# Sample indices: 4 bytes each (2^31 samples at most) keep the per-process index of a 190M-image
# set near 2 GB (row in part, item, training order) instead of twice that.
ROW_DTYPE = np.int32


class FeaturesNotFound(FileNotFoundError):
    """The dataset has no (complete) features: featurize it first."""


class FeaturesChanged(RuntimeError):
    """The features in the object store changed while a run was loading them."""


@dataclass
class FeaturePart:
    """The features of one part (one ingest shard). Tensors are memory-mapped or in memory."""

    # One (n_s, C, h_s, w_s) float16 tensor, already scaled, per image size of the part (one
    # unless the dataset was ingested with aspect buckets); row r is latents[size[r]][index[r]].
    latents: list[torch.Tensor]
    image_embeds: torch.Tensor  # (n, D) float16, raw DINO CLS
    records: Callable[[], list[dict[str, Any]]]  # loads the n per-sample records (ingest's json)
    size: np.ndarray | None = None  # (n,) uint8: which of `latents` holds each row; None: one
    index: np.ndarray | None = None  # (n,) int32: the row's place in it
    text_rows: np.ndarray | None = None  # (M,) int64 ascending: the rows with a caption
    # Caption m's tokens (the unpadded ones) are text_tokens[text_starts[m]:][:text_lengths[m]].
    text_tokens: torch.Tensor | None = None  # (T, Dt) float16
    text_starts: np.ndarray | None = None  # (M,) int64
    text_lengths: np.ndarray | None = None  # (M,) int64
    # What multi-frame heads need of the records (`frame_tensors`), when featurize stored it:
    frame_group: np.ndarray | None = None  # (n,) int64 `group_id` of meta.group
    frame_index: np.ndarray | None = None  # (n,) int64 meta.index
    camera: np.ndarray | None = None  # (n, 4) float32 `absolute_camera` of meta.camera

    def latent(self, row: int) -> torch.Tensor:
        """Row `row`'s latents (C, h, w), a view of the map."""
        if self.size is None:
            return self.latents[0][row]
        assert self.index is not None
        return self.latents[self.size[row]][self.index[row]]

    def caption(self, row: int) -> torch.Tensor | None:
        """Row `row`'s caption tokens (n, Dt), a view of the map; None when it has none."""
        if self.text_rows is None:
            return None
        t = int(np.searchsorted(self.text_rows, row))
        if t == len(self.text_rows) or self.text_rows[t] != row:
            return None
        assert self.text_tokens is not None and self.text_starts is not None
        assert self.text_lengths is not None
        start = int(self.text_starts[t])
        return self.text_tokens[start : start + int(self.text_lengths[t])]


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
        assert latents.shape[0] == n and image_embeds.shape[0] == n, "one feature row per record"
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
                    raise ValueError(
                        f"sample {records[r].get('key')!r} has no meta.group / meta.index: "
                        "multi-frame heads need the views / clips sidecars (see "
                        "docs/architecture.md, raw source layout)"
                    )
                try:
                    index[span.start + i] = int(meta["index"])
                except (TypeError, ValueError) as err:
                    raise ValueError(
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
            raise ValueError("text features asked for, but the dataset has no paired samples")
        if self.size_ids is not None and len(np.unique(self.size_ids[flat])) > 1:
            mixed = [self.latent_sizes[i] for i in np.unique(self.size_ids[flat])]
            raise ValueError(
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


def read_features_spec(dataset_uri: str) -> dict[str, Any]:
    """`features.json` of a dataset; a clear error when the dataset was not featurized."""
    store = Storage.from_uri(dataset_uri).child(FEATURES_DIR)
    if not store.exists("features.json"):
        raise FeaturesNotFound(
            f"no features at {store.key_uri('features.json')}: run `lumos featurize` on "
            f"{dataset_uri} first (the training loop reads cached latents and embeddings)"
        )
    return store.read_json("features.json")


def feature_cache_dir() -> Path:
    """Where the features of datasets in the object store are kept on local disk."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "lumos-features")


class _LocalFiles:
    """Local paths of a features directory's files: its own files when it is local, else copies
    in the cache, downloaded once per node and again only when the object changed. A lock file
    per object makes the processes of a node wait for one download instead of each fetching
    its own; the download lands under a temporary name first, so no reader sees half a file."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self.versions: dict[str, str] = {}
        if store.local_path("features.json") is None:
            self.versions = {info.key: info.version for info in store.list()}
            self.cache = feature_cache_dir() / hashlib.sha256(store.uri.encode()).hexdigest()[:16]

    def __call__(self, key: str) -> Path:
        own = self.store.local_path(key)
        if own is not None:
            if not own.is_file():
                raise FeaturesNotFound(f"missing feature file {own}: re-run `lumos featurize`")
            return own
        if key not in self.versions:
            raise FeaturesNotFound(
                f"missing feature file {self.store.key_uri(key)}: re-run `lumos featurize`"
            )
        version = hashlib.sha256(self.versions[key].encode()).hexdigest()[:12]
        path = self.cache / f"{version}-{key}"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not path.is_file():  # another process may have fetched it meanwhile
                try:  # the version listed, which names the file, and no other
                    self.store.download_file(key, path, if_version=self.versions[key])
                except PreconditionFailed as err:
                    raise FeaturesChanged(
                        f"{self.store.key_uri(key)} changed while this run was loading the "
                        "features (re-featurized?): start the run again to read the new ones"
                    ) from err
        return path

    def fetch_all(self, keys: list[str], threads: int = 16) -> list[Path]:
        """`self(key)` for every key, `threads` at a time (object-store latency, not bandwidth,
        bounds one download of a small part)."""
        if not self.versions:  # local: nothing to fetch
            return [self(key) for key in keys]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self, keys))


def _map_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views of its memory map (nothing is read yet)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (no __iter__)
    except (OSError, RuntimeError) as err:  # safetensors' own error is a RuntimeError subclass
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from err


def _select(
    tensors: dict[str, torch.Tensor], path: Path, *layouts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The tensors of the first of `layouts` (tuples of tensor names) that the file holds."""
    for names in layouts:
        if set(tensors).issuperset(names):
            return {n: tensors[n] for n in names}
    wanted = " or ".join(str(list(names)) for names in layouts)
    raise ValueError(
        f"{path} holds tensors {sorted(tensors)}, not {wanted}: re-run `lumos featurize`"
    )


def _map_text(path: Path, text_len: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
    """A part's captions: (rows, tokens (T, Dt), starts, lengths), from the unpadded layout or
    from the padded one of features written before it (`lumos-features/1`)."""
    text = _select(
        _map_all(path), path,
        ("rows", "text_offsets", "text_tokens"), ("rows", "text_embeds", "text_mask"),
    )  # fmt: skip
    rows = text["rows"].numpy().astype(np.int64)  # these index arrays are small: in memory
    if np.any(rows[1:] <= rows[:-1]):
        raise ValueError(f"{path}: text rows are not ascending")
    if "text_tokens" in text:
        offsets = text["text_offsets"].numpy().astype(np.int64)
        tokens, starts, lengths = text["text_tokens"], offsets[:-1], np.diff(offsets)
        consistent = (
            len(offsets) == len(rows) + 1
            and offsets[0] == 0
            and offsets[-1] == len(tokens)
            and bool(np.all(lengths >= 0))
        )
    else:  # padded: a row's tokens are the positions its mask keeps, always a prefix
        padded, mask = text["text_embeds"], text["text_mask"].numpy()
        lengths = mask.sum(axis=1).astype(np.int64)
        starts = np.arange(len(mask), dtype=np.int64) * padded.shape[1]
        tokens = padded.reshape(-1, padded.shape[-1])  # a view: nothing is read
        right_padded = np.arange(mask.shape[1]) < lengths[:, None]
        consistent = len(mask) == len(rows) and bool(np.array_equal(mask, right_padded))
    if not consistent:
        raise ValueError(
            f"{path}: its caption rows, offsets and tokens do not match: re-run `lumos featurize`"
        )
    if len(lengths) and lengths.max() > text_len:
        raise ValueError(
            f"{path}: a caption has {lengths.max()} tokens, more than the {text_len} that "
            "features.json gives as the text length: re-run `lumos featurize`"
        )
    return rows, tokens, starts, lengths


def node_parts(num_parts: int, node: int, nodes: int) -> list[int]:
    """The feature parts node `node` of `nodes` reads when a run splits them by node: parts
    node, node + nodes, ... (ingest's shards are of about equal size, so the nodes are too)."""
    if not 0 <= node < nodes:
        raise ValueError(f"node {node} is not one of {nodes} nodes")
    if num_parts < nodes:
        raise ValueError(
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
    files = _LocalFiles(Storage.from_uri(dataset_uri).child(FEATURES_DIR))
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
        part = _map_part(files(f"{name}.safetensors"), records)
        if split_listed:
            n, is_eval = int(entry["count"]), np.zeros(int(entry["count"]), dtype=bool)
            is_eval[np.asarray(entry["eval_rows"], dtype=np.int64)] = True
        else:
            is_eval = np.array([is_eval_record(r) for r in records()], dtype=bool)
            n = len(is_eval)
        if part.image_embeds.shape[0] != n:
            raise ValueError(
                f"part {name} of {dataset_uri} has {part.image_embeds.shape[0]} feature rows "
                f"for {n} records: the features are inconsistent; re-run `lumos featurize`"
            )
        part_sizes.append([(int(t.shape[-2]), int(t.shape[-1])) for t in part.latents])
        part_has_text = np.zeros(n, dtype=bool)
        if entry.get("paired", 0) > 0:
            text_len = spec["shapes"]["text_embeds"][0]
            rows, part.text_tokens, part.text_starts, part.text_lengths = _map_text(
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
        raise ValueError(f"the features of {dataset_uri}{which} hold no {split!r} samples")
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
        raise ValueError(f"{dataset_uri} holds {len(table.latent_sizes)} image sizes; 255 at most")
    if len(table.latent_sizes) > 1:  # aspect buckets: each row's size, for batching by size
        ids = {size: i for i, size in enumerate(table.latent_sizes)}
        table.size_ids = np.concatenate([
            np.array([ids[s] for s in sizes], dtype=np.uint8)[
                part.size[rows] if part.size is not None else np.zeros(len(rows), dtype=np.int64)
            ]
            for part, sizes, rows in zip(parts, part_sizes, local_rows, strict=True)
        ])  # fmt: skip
    return table


def _map_part(path: Path, records: Callable[[], list[dict[str, Any]]]) -> FeaturePart:
    """A part's features, mapped: one `latents` tensor, or for a part holding several image
    sizes, `latents_{h}x{w}` with `rows_{h}x{w}` per size (featurize's layouts); and the frame
    arrays of views and clips when the part has them."""
    mapped = _map_all(path)
    suffixes = sorted(n.removeprefix("latents_") for n in mapped if n.startswith("latents_"))
    if not suffixes:
        tensors = _select(mapped, path, ("latents", "image_embeds"))
        part = FeaturePart([tensors["latents"]], tensors["image_embeds"], records)
    else:
        wanted = ("image_embeds", *(f"{k}_{s}" for s in suffixes for k in ("latents", "rows")))
        tensors = _select(mapped, path, wanted)
        n = tensors["image_embeds"].shape[0]
        size, index = np.full(n, 255, dtype=np.uint8), np.zeros(n, dtype=ROW_DTYPE)
        for i, suffix in enumerate(suffixes):
            rows = tensors[f"rows_{suffix}"].numpy()
            size[rows], index[rows] = i, np.arange(len(rows), dtype=ROW_DTYPE)
        counts = sum(len(tensors[f"rows_{s}"]) for s in suffixes)
        if counts != n or np.any(size == 255):
            raise ValueError(
                f"{path}: its latents of each size do not cover its {n} rows exactly once: "
                "re-run `lumos featurize`"
            )
        latents = [tensors[f"latents_{s}"] for s in suffixes]
        part = FeaturePart(latents, tensors["image_embeds"], records, size=size, index=index)
    n = part.image_embeds.shape[0]
    for name in ("frame_group", "frame_index", "camera"):
        if name in mapped and mapped[name].shape[0] != n:
            raise ValueError(
                f"{path}: {name} has {mapped[name].shape[0]} rows for {n} samples: re-run "
                "`lumos featurize`"
            )
    if "frame_group" in mapped and "frame_index" in mapped:
        part.frame_group, part.frame_index = (
            mapped["frame_group"].numpy(),
            mapped["frame_index"].numpy(),
        )
    if "camera" in mapped:
        part.camera = mapped["camera"].numpy()
    return part


def is_eval_record(record: dict[str, Any]) -> bool:
    """Whether a sample's record puts it in the eval split (`meta.split == "eval"`)."""
    return (record.get("meta") or {}).get("split") == "eval"


def _part_records(files: _LocalFiles, key: str) -> list[dict[str, Any]]:
    return _read_records(files(key))


def _read_records(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_bytes())["meta"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a feature part's json ({err})") from err


def absolute_camera(camera: dict[str, float]) -> list[float]:
    """[azimuth_deg, elevation_deg, radius, 0]: the heads' camera layout (they make it relative)."""
    try:
        return [float(camera["azimuth"]), float(camera["elevation"]), float(camera["radius"]), 0.0]
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"meta.camera must hold the numbers azimuth, elevation and radius, got {camera!r}"
        ) from err


def group_id(group: Any) -> int:
    """A multi-frame group's name (meta.group) as an int64: the first 8 bytes of its BLAKE2b."""
    digest = hashlib.blake2b(str(group).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def frame_tensors(records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """What multi-frame heads read of a part's records, as tensors featurize stores with the
    part, so that building their items reads no json: `frame_group` and `frame_index` (n,)
    int64 when every record has meta.group and an integer meta.index, `camera` (n, 4) float32
    when every record has a valid meta.camera. Otherwise not stored: the reader then falls back
    to the records, whose errors name the sample."""
    metas = [r.get("meta") or {} for r in records]
    out: dict[str, torch.Tensor] = {}
    if not metas:
        return out
    try:
        if all("group" in m and "index" in m for m in metas):
            index = [int(m["index"]) for m in metas]
            out["frame_group"] = torch.tensor([group_id(m["group"]) for m in metas])
            out["frame_index"] = torch.tensor(index, dtype=torch.int64)
    except (TypeError, ValueError):
        out = {}
    try:
        if all("camera" in m for m in metas):
            cameras = [absolute_camera(m["camera"]) for m in metas]
            out["camera"] = torch.tensor(cameras, dtype=torch.float32)
    except ValueError:
        pass
    return out


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
            assert num_frames >= 2, f"head {head!r} needs num_frames >= 2, got {num_frames}"
            ds.groups, index = table.frames()
            ds.items, ds.skipped_groups = _frame_windows(ds.groups, index, num_frames)
            if head == "novel_view":
                ds.cameras = _cameras(table, ds.items)
        elif head == "t2i":
            ds.items = np.nonzero(table.has_text)[0].astype(ROW_DTYPE)[:, None]  # (M, 1)
        else:
            ds.items = np.arange(len(table), dtype=ROW_DTYPE)[:, None]
        if not len(ds.items):
            raise ValueError(
                f"no training items for head {head!r} (num_frames={num_frames}) in a dataset of "
                f"{len(table)} samples: t2i needs captioned (paired) samples, multi-frame heads "
                f"need groups (meta.group / meta.index) of at least num_frames samples"
            )
        if table.size_ids is not None:
            sizes = table.size_ids[ds.items]  # (num_items, frames)
            mixed = np.nonzero((sizes != sizes[:, :1]).any(axis=1))[0]
            if len(mixed):
                keys = [table.records[int(r)]["key"] for r in ds.items[mixed[0]]]
                raise ValueError(
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
        raise ValueError(
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
        assert global_batch % world_size == 0, "the global batch must split evenly over processes"
        if num_items > np.iinfo(ROW_DTYPE).max:
            raise ValueError(f"{num_items} training items exceed the 2^31 this sampler indexes")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.groups: list[np.ndarray] | None = None  # each group's items
        self.group_sizes: dict[int, int] | None = None  # group id -> its number of items
        if groups is not None:
            assert len(groups) == num_items, "one group id per item"
            order = np.argsort(groups, kind="stable").astype(ROW_DTYPE)
            bounds = np.flatnonzero(groups[order][1:] != groups[order][:-1]) + 1
            self.groups = np.split(order, bounds)
            self.group_sizes = {int(groups[g[0]]): len(g) for g in self.groups}
        sizes = list(self.group_sizes.values()) if self.group_sizes else [num_items]
        self.batches_per_epoch = sum(n // global_batch for n in sizes)
        # Items of groups too small for one global batch: never trained on.
        self.starved_items = sum(n for n in sizes if n < global_batch)
        if self.batches_per_epoch == 0:
            raise ValueError(
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
            raise ValueError(
                f"cannot resume the data order: the checkpoint was taken with (items, global batch, "
                f"seed, items per image size) = {same}, this run has {this}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
