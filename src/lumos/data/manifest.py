"""The dataset manifest and what earlier runs left in a dataset.

The manifest (`<dataset>/manifest.json`) is written last by every run: it lists the shards, the
runs (each with its report and dedup index), cumulative counts and statistics. A reader that finds
no manifest sees no dataset; one that finds it sees a complete one.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from lumos.data.decode import REJECTION_REASONS
from lumos.data.dedup import DedupIndex
from lumos.data.scratch import DiskMap, ScratchDB
from lumos.data.shards import SHARD_PREFIX, ShardInfo, shard_index
from lumos.errors import DatasetError, LumosError
from lumos.storage import ObjectNotFound, PreconditionFailed, Storage, StorageError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from lumos.configs.data import IngestConfig

DATASET_FORMAT = "lumos-dataset/1"
MANIFEST = "manifest.json"


@dataclass
class DatasetHistory:
    """Earlier runs' state an incremental run builds on (empty for a full run). The per-object
    parts (index, seen) live in `db` on local disk; close() removes them."""

    manifest: dict | None
    db: ScratchDB
    index: DedupIndex  # the kept images; its keys are every dataset key in use
    # "source uri\tsource key" of objects that need no processing again -> what their report
    # row recorded: {"sidecars": [...], "version_tag": ... (None in reports older than it)}
    seen: DiskMap
    runs: list[dict]
    shards: list[dict]

    def was_seen(self, source_uri: str, source_key: str) -> bool:
        return f"{source_uri}\t{source_key}" in self.seen

    def seen_as(self, source_uri: str, source_key: str) -> dict[str, Any] | None:
        """What an earlier run recorded of a seen object (`seen`'s value), or None if unseen."""
        return self.seen.get(f"{source_uri}\t{source_key}")

    def close(self) -> None:
        self.db.close()


def change_since(
    recorded: dict[str, Any], sidecars: Iterable[str], version_tag: str | None
) -> str | None:
    """How a seen object, with these sidecars and this version tag now, differs from what an
    earlier run recorded of it (`DatasetHistory.seen_as`), or None if it does not."""
    before, now = set(recorded["sidecars"]), set(sidecars)
    if now - before:
        return f"sidecars added since it was seen: {sorted(now - before)}"
    if before - now:
        return f"sidecars removed since it was seen: {sorted(before - now)}"
    if recorded["version_tag"] is not None and recorded["version_tag"] != version_tag:
        return "rewritten since it was seen (its or a sidecar's ETag/size/mtime changed)"
    return None


class ConcurrentIngest(LumosError):
    """Another ingest committed to the dataset while this one ran."""


def read_manifest(store: Storage) -> dict | None:
    """The dataset's manifest, or None when there is no complete dataset yet."""
    return read_manifest_versioned(store)[0]


def read_manifest_versioned(store: Storage) -> tuple[dict | None, str | None]:
    """The manifest and the version read (for `commit_manifest`'s compare-and-swap), or
    (None, None) when there is no complete dataset yet."""
    try:
        manifest, version = store.read_json_versioned(MANIFEST)
    except ObjectNotFound:
        return None, None
    if manifest.get("format") != DATASET_FORMAT:
        raise StorageError(
            f"{store.key_uri(MANIFEST)} has format {manifest.get('format')!r}, expected "
            f"{DATASET_FORMAT!r}: ingest into a new dataset URI"
        )
    return manifest, version


def load_history(store: Storage, cfg: IngestConfig, manifest: dict | None) -> DatasetHistory:
    db = ScratchDB()
    index = DedupIndex(cfg.near_duplicate_distance, db)
    history = DatasetHistory(manifest, db, index, DiskMap(db, "seen"), [], [])
    if manifest is None or not cfg.incremental:
        return history
    try:
        _load_runs(store, cfg, manifest, history)
    except BaseException:
        history.close()
        raise
    return history


def _load_runs(store: Storage, cfg: IngestConfig, manifest: dict, history: DatasetHistory) -> None:
    old = {k: manifest["ingest_config"].get(k) for k in cfg.output_settings()}
    if old != cfg.output_settings():
        raise DatasetError(
            f"incremental ingest into {store.uri} needs the dataset's output settings {old}, "
            f"got {cfg.output_settings()}: use the same settings, or run a full ingest "
            "(incremental=False) into a new dataset URI"
        )
    for run in manifest["runs"]:
        with store.open_read(run["index"]) as stream:
            history.index.load(stream, run["index"])
        with store.open_read(run["report"]) as stream:
            rows = (json.loads(line) for line in stream)
            history.seen.update(
                (
                    f"{run['source_uri']}\t{row['source_key']}",
                    {"sidecars": row.get("sidecars", []), "version_tag": row.get("version_tag")},
                )
                for row in rows
                if row["outcome"] != "changed"  # keeps what the object was when ingested
                and not (row["outcome"] == "rejected" and row.get("reason") == "unreadable")
            )  # unreadable: retried by the next run
    history.runs = list(manifest["runs"])
    history.shards = list(manifest["shards"])


def next_shard_index(manifest: dict | None) -> int:
    """Shards of a new run come after every position the current manifest refers to (readers of
    the old manifest keep reading consistent shards until the new manifest replaces it; the hash
    in a name keeps two runs that build on one manifest apart)."""
    if not manifest or not manifest["shards"]:
        return 0
    return 1 + max(shard_index(s["name"]) for s in manifest["shards"])


def add_counts(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum two dicts of counts (nested dicts summed key by key; non-numbers skipped)."""
    out = dict(total)
    for key, value in part.items():
        if isinstance(value, dict):
            out[key] = add_counts(out.get(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
    return out


def is_up_to_date(
    manifest: dict | None, cfg: IngestConfig, source_uri: str, fingerprint: str
) -> bool:
    if manifest is None or len(manifest["runs"]) != 1:
        return False
    run = manifest["runs"][0]
    old_cfg = {k: manifest["ingest_config"].get(k) for k in cfg.result_settings()}
    return (
        run["source_uri"] == source_uri
        and run["fingerprint"] == fingerprint
        and old_cfg == cfg.result_settings()
    )


def commit_manifest(
    store: Storage,
    cfg: IngestConfig,
    history: DatasetHistory,
    run_record: dict,
    new_shards: list[ShardInfo],
    *,
    seen_version: str | None,
) -> dict:
    """Write the manifest (last: this is what makes the run visible), then drop what no manifest
    refers to any more (the shards and indexes of a replaced dataset).

    The write is a compare-and-swap on the manifest this run read (`seen_version`, None: there
    was none): of two ingests into one dataset at once, the second to commit fails with
    `ConcurrentIngest` and adds nothing, instead of replacing the first one's history."""
    runs = [*history.runs, run_record]
    shards = [*history.shards, *(s.to_json() for s in new_shards)]
    counts: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    sources: Counter[str] = Counter()
    for run in runs:
        counts = add_counts(counts, run["counts"])
        stats = add_counts(stats, {k: v for k, v in run["stats"].items() if isinstance(v, dict)})
        sources[run["source_uri"]] += run["counts"]["ingested"]
    stats["sources"] = dict(sources)
    stats["rejection_reasons"] = counts.get("rejected_by_reason", {})
    manifest = {
        "format": DATASET_FORMAT,
        "resolution": cfg.resolution,
        "output_sizes": [list(s) for s in cfg.output_sizes],
        "image_format": cfg.image_format,
        "num_samples": sum(s["count"] for s in shards),
        "shards": shards,
        "counts": counts,
        "stats": stats,
        "ingest_config": cfg.model_dump(mode="json"),
        "created_at": datetime.now(UTC).isoformat(),
        "runs": runs,
        "rejection_reasons": REJECTION_REASONS,
    }
    replaced = history.manifest if not history.runs else None
    try:
        store.write_json(
            MANIFEST, manifest, if_version=seen_version, if_absent=seen_version is None
        )
    except PreconditionFailed as err:
        raise ConcurrentIngest(
            f"another ingest committed to {store.uri} while this one ran, so this run's "
            "images are not in the dataset: run this ingest again (it builds on that one)"
        ) from err
    if replaced is not None:  # a full rebuild over an older dataset
        keep = {s["name"] for s in shards}
        for old in replaced["shards"]:
            if old["name"] not in keep:
                store.delete(f"{SHARD_PREFIX}/{old['name']}")
        for old_run in replaced["runs"]:
            store.delete(old_run["index"])
    return manifest
