"""The feature files: what featurize writes beside a dataset and training and evaluation read.

    <dataset>/features/part-00000.safetensors       latents (N,C,h,w) f16 scaled, image_embeds (N,D) f16
                                                    (several sizes: latents_{h}x{w}, rows_{h}x{w})
                                                    views / clips: frame_group, frame_index (N,)
                                                    int64, camera (N, 4) f32
                      /part-00000.text.safetensors  rows (M,): the captioned rows,
                                                    text_offsets (M+1,), text_tokens (T,Dt) f16
                      /part-00000.json              keys, meta (the per-sample json of the shard)
                      /features.json                written last: encoders, counts, shapes

docs/architecture.md ("Features layout") gives every field. Featurize writes a part with
`write_feature_part` (its json last: the json marks the part complete) and `features.json` with
`write_features_spec` once every part is done. Text is stored unpadded (`pack_text`): caption m's
T5 tokens are `text_tokens[text_offsets[m]:text_offsets[m+1]]`, the tokens before its padding (T5
pads on the right and the model masks the padding). A part holding several image sizes (aspect
buckets) stores, per latent size, `latents_{h}x{w}` (n, C, h, w) and `rows_{h}x{w}` (n,) int64:
which of the part's rows they are, ascending.

The readers map one part at a time: `map_part` (latents of one size or of several, the frame arrays when the
part has them) and `map_text`, which also reads the padded text layout of features written
before the unpadded one (`lumos-features/1`: `text_embeds (M,L,Dt)`, `text_mask (M,L)`).
`lumos.features.table` joins the parts of a dataset into one table of samples,
`lumos.features.items` makes a head's items and batches of it, and `lumos.features.cache` keeps
local copies of the parts of a dataset in the object store.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from lumos.errors import FeaturesError, LumosError
from lumos.storage import Storage

FEATURES_DIR = "features"
FEATURES_FORMAT = "lumos-features/2"  # /2: unpadded text tokens
# Sample indices: 4 bytes each (2^31 samples at most) keep the per-process index of a 190M-image
# set near 2 GB (row in part, item, training order) instead of twice that.
ROW_DTYPE = np.int32


class FeaturesNotFound(LumosError, FileNotFoundError):
    """The dataset has no (complete) features: featurize it first."""


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
        if self.index is None:
            raise RuntimeError("broken invariant: self.index is not None")
        return self.latents[self.size[row]][self.index[row]]

    def caption(self, row: int) -> torch.Tensor | None:
        """Row `row`'s caption tokens (n, Dt), a view of the map; None when it has none."""
        if self.text_rows is None:
            return None
        t = int(np.searchsorted(self.text_rows, row))
        if t == len(self.text_rows) or self.text_rows[t] != row:
            return None
        if self.text_tokens is None or self.text_starts is None:
            raise RuntimeError(
                "broken invariant: self.text_tokens is not None and self.text_starts is not None"
            )
        if self.text_lengths is None:
            raise RuntimeError("broken invariant: self.text_lengths is not None")
        start = int(self.text_starts[t])
        return self.text_tokens[start : start + int(self.text_lengths[t])]


def read_features_spec(dataset_uri: str) -> dict[str, Any]:
    """`features.json` of a dataset; a clear error when the dataset was not featurized."""
    store = Storage.from_uri(dataset_uri).child(FEATURES_DIR)
    if not store.exists("features.json"):
        raise FeaturesNotFound(
            f"no features at {store.key_uri('features.json')}: run `lumos featurize` on "
            f"{dataset_uri} first (the training loop reads cached latents and embeddings)"
        )
    return store.read_json("features.json")


def is_eval_record(record: dict[str, Any]) -> bool:
    """Whether a sample's record puts it in the eval split (`meta.split == "eval"`)."""
    return (record.get("meta") or {}).get("split") == "eval"


def read_part_records(path: Path) -> list[dict[str, Any]]:
    try:
        return json.loads(path.read_bytes())["meta"]
    except (ValueError, KeyError) as err:
        raise FeaturesError(f"{path} is not a feature part's json ({err})") from err


def _map_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views of its memory map (nothing is read yet)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 (no __iter__)
    except (OSError, RuntimeError) as err:  # safetensors' own error is a RuntimeError subclass
        raise FeaturesError(f"{path} is not a readable safetensors file ({err})") from err


def _select(
    tensors: dict[str, torch.Tensor], path: Path, *layouts: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The tensors of the first of `layouts` (tuples of tensor names) that the file holds."""
    for names in layouts:
        if set(tensors).issuperset(names):
            return {n: tensors[n] for n in names}
    wanted = " or ".join(str(list(names)) for names in layouts)
    raise FeaturesError(
        f"{path} holds tensors {sorted(tensors)}, not {wanted}: re-run `lumos featurize`"
    )


def map_text(path: Path, text_len: int) -> tuple[np.ndarray, torch.Tensor, np.ndarray, np.ndarray]:
    """A part's captions: (rows, tokens (T, Dt), starts, lengths), from the unpadded layout or
    from the padded one of features written before it (`lumos-features/1`)."""
    text = _select(
        _map_all(path), path,
        ("rows", "text_offsets", "text_tokens"), ("rows", "text_embeds", "text_mask"),
    )  # fmt: skip
    rows = text["rows"].numpy().astype(np.int64)  # these index arrays are small: in memory
    if np.any(rows[1:] <= rows[:-1]):
        raise FeaturesError(f"{path}: text rows are not ascending")
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
        raise FeaturesError(
            f"{path}: its caption rows, offsets and tokens do not match: re-run `lumos featurize`"
        )
    if len(lengths) and lengths.max() > text_len:
        raise FeaturesError(
            f"{path}: a caption has {lengths.max()} tokens, more than the {text_len} that "
            "features.json gives as the text length: re-run `lumos featurize`"
        )
    return rows, tokens, starts, lengths


def map_part(path: Path, records: Callable[[], list[dict[str, Any]]]) -> FeaturePart:
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
            raise FeaturesError(
                f"{path}: its latents of each size do not cover its {n} rows exactly once: "
                "re-run `lumos featurize`"
            )
        latents = [tensors[f"latents_{s}"] for s in suffixes]
        part = FeaturePart(latents, tensors["image_embeds"], records, size=size, index=index)
    n = part.image_embeds.shape[0]
    for name in ("frame_group", "frame_index", "camera"):
        if name in mapped and mapped[name].shape[0] != n:
            raise FeaturesError(
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


def absolute_camera(camera: dict[str, float]) -> list[float]:
    """[azimuth_deg, elevation_deg, radius, 0]: the heads' camera layout (they make it relative)."""
    try:
        return [float(camera["azimuth"]), float(camera["elevation"]), float(camera["radius"]), 0.0]
    except (KeyError, TypeError, ValueError) as err:
        raise FeaturesError(
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


# --- the writer (featurize) ---------------------------------------------------------------------


def write_feature_part(
    features: Storage,
    name: str,
    records: list[dict[str, Any]],
    latents: torch.Tensor | Sequence[torch.Tensor],
    image_embeds: torch.Tensor,
    text_rows: torch.Tensor | None = None,
    text_embeds: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    shard: dict[str, Any] | None = None,
    encoders: dict[str, Any] | None = None,
    image_size: list[int] | None = None,
) -> None:
    """Write one part in the contract layout; its json last (the json marks the part complete).

    `latents` is (N, C, h, w), or one (C, h, w) per row when the rows differ in size: they are
    then stored per size, with their rows (the records give each size's image height, width)."""
    n = len(records)
    if len(latents) != n or image_embeds.shape[0] != n:
        raise ValueError("one feature row per record")
    tensors = {"image_embeds": image_embeds.to(torch.float16).contiguous()}
    groups: dict[tuple[int, ...], list[int]] = {}
    if not isinstance(latents, torch.Tensor):
        for row, latent in enumerate(latents):
            groups.setdefault(tuple(latent.shape), []).append(row)
    if len(groups) <= 1:  # one size: one (N, C, h, w) tensor
        stacked = latents if isinstance(latents, torch.Tensor) else torch.stack(list(latents))
        tensors["latents"] = stacked.to(torch.float16).contiguous()
        latent_shape = list(stacked.shape[1:])
        sizes = [{"image": image_size or latent_shape[1:], "latents": latent_shape, "count": n}]
    else:
        sizes = []
        for shape, rows in sorted(groups.items()):
            h, w = shape[1:]
            tensors[f"latents_{h}x{w}"] = torch.stack([latents[r] for r in rows]).half()
            tensors[f"rows_{h}x{w}"] = torch.tensor(rows, dtype=torch.int64)
            first = records[rows[0]]  # ingest's record: the image's output size
            sizes.append({"image": [first["height"], first["width"]], "latents": list(shape),
                          "count": len(rows)})  # fmt: skip
    tensors.update(frame_tensors(records))  # views / clips: their groups, frames and cameras
    # A part rewritten in place (other encoders) is incomplete until its new json lands: an old
    # json beside new tensors would let a rerun with the old encoders skip the part.
    features.delete(f"{name}.json")
    features.write_bytes(f"{name}.safetensors", save_safetensors(tensors))
    paired = 0 if text_rows is None else len(text_rows)
    if paired:
        if text_rows is None or text_embeds is None or text_mask is None:
            raise RuntimeError(
                "broken invariant: text_rows is not None and text_embeds is not None and text_mask is not None"
            )
        if not (text_embeds.shape[0] == text_mask.shape[0] == paired):
            raise ValueError("one text row per paired row")
        tokens, offsets = pack_text(text_embeds, text_mask)
        features.write_bytes(
            f"{name}.text.safetensors",
            save_safetensors(
                {
                    "rows": text_rows.to(torch.int64).contiguous(),
                    "text_offsets": offsets,
                    "text_tokens": tokens.to(torch.float16).contiguous(),
                }
            ),
        )
    else:
        features.delete(f"{name}.text.safetensors")  # a stale one from other encoders
    features.write_json(
        f"{name}.json",
        {
            "keys": [r["key"] for r in records],
            "meta": records,
            # Beyond the contract's keys: what makes a rerun able to skip this part.
            "shard": shard,
            "encoders": encoders,
            "count": n,
            "paired": paired,
            "sizes": sizes,
            "shapes": {
                # One image size: its image and latent shapes; several: see "sizes".
                "image": sizes[0]["image"] if len(sizes) == 1 else None,
                "latents": sizes[0]["latents"] if len(sizes) == 1 else None,
                "image_embeds": list(image_embeds.shape[1:]),
                "text_embeds": list(text_embeds.shape[1:])
                if paired and text_embeds is not None
                else None,
            },
        },
    )


def pack_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded token embeddings (M, L, Dt) and their mask (M, L) -> the unpadded tokens of every
    row, concatenated (T, Dt), and each row's start in them plus the end (M+1,) int64."""
    mask = mask.to(torch.bool)
    lengths = mask.sum(dim=1)  # (M,)
    right_padded = torch.arange(mask.shape[1]) < lengths[:, None]  # (M, L)
    if not torch.equal(mask, right_padded):
        row = int((mask != right_padded).any(dim=1).nonzero()[0])
        raise FeaturesError(
            f"text row {row}'s padding mask is not right-padded (tokens first, then padding): "
            f"{mask[row].int().tolist()}; set the tokenizer's padding_side to 'right'"
        )
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, dim=0)
    return embeds[mask], offsets  # boolean indexing keeps row-major order: row 0's tokens first


def write_features_spec(
    features: Storage,
    parts: list[dict[str, Any]],
    shapes: dict[str, list[int] | None],
    encoders: dict[str, Any],
    manifest_sha256: str | None,
    resolution: int | None,
    dataset_uri: str,
    sizes: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`features.json`, written last: a reader that finds it finds every part complete.

    `shapes` gives the base image and latent shapes; `sizes` every image size with its count
    (default: the base size only)."""
    image_shape, latent_shape = shapes["image"], shapes["latents"]
    if not image_shape or not latent_shape:
        raise FeaturesError("features.json needs the image and latent shapes")
    image_h, latent_h = image_shape[0], latent_shape[-2]
    total = sum(p["count"] for p in parts)
    sizes = sizes or [{"image": image_shape, "latents": latent_shape, "count": total}]
    spec = {
        "format": FEATURES_FORMAT,
        "dataset_uri": dataset_uri,
        "manifest_sha256": manifest_sha256,
        "encoders": encoders,
        "resolution": resolution,
        # Pixels per latent cell (8 for the SD VAE, 1 in pixel space): T2I's size condition.
        "latent_downsample": image_h // latent_h,
        "parts": parts,
        "counts": {"samples": total, "paired": sum(p["paired"] for p in parts)},
        "shapes": shapes,
        "sizes": sizes,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    features.write_json("features.json", spec)
    return spec
