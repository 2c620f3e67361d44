"""Ingest: raw in-the-wild images -> a sharded, deduplicated, fully accounted dataset.

    result = ingest(IngestConfig(), "s3://raw/photos", "s3://lumos/datasets/images")

Per object: read (retried), exact-dedup by content digest (before any decode), decode and
validate (decode.py), resize + centre-crop, near-dedup by perceptual hash (dedup.py), write into
webdataset shards (shards.py). Every listed object ends in the report exactly once: `ingested`,
`duplicate` (of a kept key) or `rejected` (with a reason); sidecars are listed with their image.
The manifest, written last, makes the dataset visible: a reader never sees a partial dataset.

Fan-out across pods: `plan_partitions` -> `ingest_partition` per partition (a KFP ParallelFor) ->
`merge_partitions`, which deduplicates across partitions and writes the final dataset. A partition
stages every decoded image that is not an exact duplicate; the merge decides near duplicates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lumos.configs.data import IngestConfig
from lumos.data.dedup import DedupIndex, DuplicateMatch
from lumos.data.ingest_run import (
    IngestRun,
    ListingTally,
    count_sample,
    new_histograms,
    new_run_id,
    run_record,
    source_fingerprint,
    unique_key,
    unseen_items,
    untagged_key,
)
from lumos.data.manifest import (
    MANIFEST,
    DatasetHistory,
    add_counts,
    change_since,
    commit_manifest,
    is_up_to_date,
    load_history,
    next_shard_index,
    read_manifest,
    read_manifest_versioned,
)
from lumos.data.scratch import DiskMap
from lumos.data.shards import ShardWriter, iter_shard_records
from lumos.data.sources import Source, group_boundaries, group_items
from lumos.errors import DatasetError
from lumos.storage import ObjectNotFound, Storage
from lumos.tempdirs import OwnedTemporaryDirectory

log = logging.getLogger(__name__)

PARTITION_FORMAT = "lumos-ingest-partition/1"
PARTITION_DONE = "partition.json"


class IngestResult(BaseModel):
    """What one ingest run did; JSON-serialisable (the KFP components pass it on)."""

    model_config = ConfigDict(extra="forbid")

    dataset_uri: str
    manifest_uri: str
    report_uri: str
    run_id: str
    up_to_date: bool = False  # nothing changed since the last run: the dataset was left as it was
    listed: int = 0  # objects listed in the source
    previously_seen: int = 0  # objects skipped in incremental mode (ingested by an earlier run)
    # Of those, items (an image with its sidecars, or a rejected object) that changed since an
    # earlier run saw them: not re-ingested by incremental mode, reported with outcome "changed"
    changed: int = 0
    sidecars: int = 0  # caption / metadata sidecars, accounted with their image
    ingested: int = 0
    duplicate: int = 0
    rejected: int = 0
    duplicate_by_kind: dict[str, int] = Field(default_factory=dict)
    rejected_by_reason: dict[str, int] = Field(default_factory=dict)
    paired: int = 0
    new_shards: int = 0
    num_shards: int = 0  # in the whole dataset
    num_samples: int = 0  # in the whole dataset

    @property
    def accounted(self) -> int:
        return self.previously_seen + self.sidecars + self.ingested + self.duplicate + self.rejected


# The per-run counts a manifest (or a staged partition) records, as IngestResult names them.
RUN_COUNTS = (
    "listed", "previously_seen", "sidecars", "ingested", "duplicate", "rejected",
    "duplicate_by_kind", "rejected_by_reason", "paired", "changed",
)  # fmt: skip


def warn_changed(count: int, examples: list[str]) -> None:
    """Log the seen items that changed since an earlier run saw them (incremental mode)."""
    if count:
        log.warning(
            "%d item(s) seen by earlier runs changed since (outcome 'changed' in the report), "
            "e.g. %s. Incremental ingest does not ingest them again: run a full ingest "
            "(incremental: false) to rebuild the dataset with them",
            count,
            "; ".join(examples),
        )


def nothing_new(
    store: Storage, manifest: dict, *, listed: int, previously_seen: int, changed: int
) -> IngestResult:
    """An incremental run that found no new objects: it leaves the dataset as it was (no run is
    recorded) and returns the dataset with this run's counts."""
    log.info("incremental ingest: no new objects for %s", store.uri)
    unchanged = result_from_manifest(store, manifest, up_to_date=True)
    zero = {name: 0 for name in ("sidecars", "ingested", "duplicate", "rejected", "paired")}
    return unchanged.model_copy(
        update={
            **zero,
            "listed": listed,
            "previously_seen": previously_seen,
            "changed": changed,
            "duplicate_by_kind": {},
            "rejected_by_reason": {},
            "new_shards": 0,
        }
    )


def result_from_manifest(store: Storage, manifest: dict, *, up_to_date: bool) -> IngestResult:
    run = manifest["runs"][-1]
    c = {"changed": 0, **run["counts"]}  # "changed" is counted since 2026-11-26
    return IngestResult(
        dataset_uri=store.uri,
        manifest_uri=store.key_uri(MANIFEST),
        report_uri=store.key_uri(run["report"]),
        run_id=run["run_id"],
        up_to_date=up_to_date,
        **{name: c[name] for name in RUN_COUNTS},
        new_shards=len(run["shards"]),
        num_shards=len(manifest["shards"]),
        num_samples=manifest["num_samples"],
    )


def ingest(
    cfg: IngestConfig, source_uri: str, dataset_uri: str, progress: bool = True
) -> IngestResult:
    """Ingest every object under `source_uri` (dir, s3:// prefix or .tar) into `dataset_uri`.

    Full mode (default) builds the dataset from this source alone; re-running on an unchanged
    source leaves the dataset as it is. Incremental mode adds only objects no earlier run into
    this dataset has seen, deduplicating against everything ingested before.
    """
    store = Storage.from_uri(dataset_uri)
    run_id = new_run_id()
    with Source(source_uri) as source:
        manifest, seen_version = read_manifest_versioned(store)
        total = None
        if manifest is not None and not cfg.incremental:
            fingerprint, total = source_fingerprint(source)
            if is_up_to_date(manifest, cfg, source.uri, fingerprint):
                log.info("%s is up to date with %s: nothing to do", store.uri, source.uri)
                return result_from_manifest(store, manifest, up_to_date=True)
        history = load_history(store, cfg, manifest)
        try:
            listing = ListingTally(source.list())
            skipped: Counter[str] = Counter()
            index_start = len(history.index)
            run = IngestRun(
                cfg,
                source,
                store,
                run_id=run_id,
                history=history,
                first_shard=next_shard_index(manifest),
                progress_total=total,
                progress=progress,
            )
            run.run(
                unseen_items(group_items(listing), source.uri, history, skipped, run.record_changed)
            )
            warn_changed(run.counts["changed"], run.changed_examples)
            if listing.count == 0:
                raise DatasetError(f"no objects under {source.uri}: check the source URI")
            if history.manifest is not None and history.runs and not run.processed():
                return nothing_new(
                    store,
                    history.manifest,
                    listed=listing.count,
                    previously_seen=skipped["objects"],
                    changed=run.counts["changed"],
                )
            record = save_run(
                store,
                run,
                history,
                index_start,
                listing,
                skipped["objects"],
                report_key=f"reports/ingest-{run_id}.jsonl",
                index_key=f"index/dedup-{run_id}.jsonl.gz",
            )
            committed = commit_manifest(
                store, cfg, history, record, run.shards, seen_version=seen_version
            )
            return result_from_manifest(store, committed, up_to_date=False)
        finally:
            history.close()


def save_run(
    out: Storage,
    run: IngestRun,
    history: DatasetHistory,
    index_start: int,
    listing: ListingTally,
    previously_seen: int,
    *,
    report_key: str,
    index_key: str,
) -> dict[str, Any]:
    """Upload a finished run's report and index entries into `out`; the run's manifest record."""
    run.upload_report(report_key)
    save_index(out, index_key, history.index, index_start)
    return run_record(
        run,
        source_uri=run.source.uri,
        fingerprint=listing.fingerprint,
        listed=listing.count,
        previously_seen=previously_seen,
        report=report_key,
        index=index_key,
        incremental=bool(history.runs),
    )


def save_index(store: Storage, key: str, index: DedupIndex, start: int) -> None:
    """Index entries [start:] (this run's) to `key`, streamed through a local file."""
    with OwnedTemporaryDirectory("lumos-index-") as tmp:
        path = Path(tmp) / "index.jsonl.gz"
        index.export(path, start)
        store.upload_file(path, key)


def plan_partitions(source_uri: str, num_partitions: int) -> list[str]:
    """Split a source into up to `num_partitions` contiguous key ranges of about equal object
    counts (never splitting an image from its sidecars). Each descriptor is a JSON string."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    with Source(source_uri) as source:
        _, total = source_fingerprint(source)
        if total == 0:
            raise DatasetError(f"no objects under {source.uri}: check the source URI")
        ends: list[str | None] = []
        counts: list[int] = []
        target_i = 1
        last_count = 0
        for key, count in group_boundaries(source.list()):
            if target_i < num_partitions and count >= total * target_i / num_partitions:
                ends.append(key)
                counts.append(count - last_count)
                last_count = count
                while target_i < num_partitions and count >= total * target_i / num_partitions:
                    target_i += 1
        source_uri = source.uri
    if ends and last_count == total:  # the last boundary is the very end: no empty last range
        ends.pop()
        counts.pop()
        last_count = sum(counts)
    ends.append(None)
    counts.append(total - last_count)
    starts: list[str | None] = [None, *ends[:-1]]
    return [
        json.dumps(
            {
                "format": PARTITION_FORMAT,
                "index": i,
                "num_partitions": len(ends),
                "source_uri": source_uri,
                "start_after": start,
                "last_key": end,
                "objects": n,
            },
            sort_keys=True,
        )
        for i, (start, end, n) in enumerate(zip(starts, ends, counts, strict=True))
    ]


def ingest_partition(
    cfg: IngestConfig,
    source_uri: str,
    staging_uri: str,
    partition: str,
    *,
    dataset_uri: str | None = None,
    progress: bool = False,
) -> IngestResult:
    """Ingest one partition (from `plan_partitions`) into a staging area for `merge_partitions`.

    With cfg.incremental and `dataset_uri`, objects the dataset has seen are skipped and dedup
    starts from its index. Re-running a partition (a retried pod) overwrites its staging area.
    Near-dedup is left to the merge: every decoded image that is not an exact duplicate is staged
    (reported `ingested` here), since whether it is a near duplicate depends on what earlier
    partitions keep.
    """
    desc = json.loads(partition)
    if desc.get("format") != PARTITION_FORMAT:
        raise ValueError(f"not a partition descriptor from plan_partitions: {partition!r}")
    staging = Storage.from_uri(staging_uri)
    run_id = new_run_id()
    with Source(source_uri) as source:
        if desc["source_uri"] != source.uri:
            raise DatasetError(
                f"partition {desc['index']} was planned for {desc['source_uri']}, not {source.uri}"
            )
        manifest = read_manifest(Storage.from_uri(dataset_uri)) if dataset_uri else None
        history = (
            load_history(Storage.from_uri(dataset_uri), cfg, manifest)
            if dataset_uri
            else (load_history(staging, cfg, None))
        )
        try:
            listing = ListingTally(source.list(desc["start_after"], desc["last_key"]))
            skipped: Counter[str] = Counter()
            index_start = len(history.index)
            staging.delete(PARTITION_DONE)
            run = IngestRun(
                cfg,
                source,
                staging,
                run_id=run_id,
                history=history,
                first_shard=0,
                progress_total=desc["objects"],
                progress=progress,
                defer_near_dedup=True,
            )
            run.run(
                unseen_items(group_items(listing), source.uri, history, skipped, run.record_changed)
            )
            record = save_run(
                staging,
                run,
                history,
                index_start,
                listing,
                skipped["objects"],
                report_key="report.jsonl",
                index_key="index.jsonl.gz",
            )
        finally:
            history.close()
    done = {
        "format": PARTITION_FORMAT,
        "partition": desc,
        "run": record,
        "shards": [s.to_json() for s in run.shards],
        "ingest_config": cfg.model_dump(mode="json"),
    }
    staging.write_json(PARTITION_DONE, done)  # last: marks the staging area complete
    c = record["counts"]
    return IngestResult(
        dataset_uri=staging.uri,
        manifest_uri=staging.key_uri(PARTITION_DONE),
        report_uri=staging.key_uri("report.jsonl"),
        run_id=run_id,
        **{name: c[name] for name in RUN_COUNTS},
        new_shards=len(run.shards),
        num_shards=len(run.shards),
        num_samples=c["ingested"],
    )


def _read_staged(staging_uris: list[str]) -> list[tuple[Storage, dict]]:
    staged = []
    for uri in staging_uris:
        store = Storage.from_uri(uri)
        try:
            done = store.read_json(PARTITION_DONE)
        except ObjectNotFound as err:
            raise DatasetError(
                f"staging area {uri} is incomplete ({PARTITION_DONE} missing): its ingest_partition "
                "did not finish; re-run it before merging"
            ) from err
        staged.append((store, done))
    staged.sort(key=lambda s: s[1]["partition"]["index"])
    if not staged:
        raise ValueError("merge_partitions needs at least one staging URI")
    sources = {done["partition"]["source_uri"] for _, done in staged}
    expected = staged[0][1]["partition"]["num_partitions"]
    indices = [done["partition"]["index"] for _, done in staged]
    if len(sources) != 1 or indices != list(range(expected)):
        raise DatasetError(
            f"staging areas do not form one complete plan: sources {sorted(sources)}, partitions "
            f"{indices} of {expected}; merge the staging areas of exactly one plan_partitions call"
        )
    return staged


def merge_partitions(cfg: IngestConfig, staging_uris: list[str], dataset_uri: str) -> IngestResult:
    """Merge staged partitions into the dataset: deduplicate across partitions (and, with
    cfg.incremental, against the dataset's earlier runs), repack into final shards, write one
    report for the whole run, and the manifest last."""
    staged = _read_staged(list(staging_uris))
    source_uri = staged[0][1]["partition"]["source_uri"]
    fingerprint = hashlib.sha256(
        "".join(done["run"]["fingerprint"] for _, done in staged).encode()
    ).hexdigest()
    store = Storage.from_uri(dataset_uri)
    manifest, seen_version = read_manifest_versioned(store)
    if (
        manifest is not None
        and not cfg.incremental
        and is_up_to_date(manifest, cfg, source_uri, fingerprint)
    ):
        return result_from_manifest(store, manifest, up_to_date=True)
    history = load_history(store, cfg, manifest)
    try:
        index_start = len(history.index)
        run_id = new_run_id()
        started = time.monotonic()
        # source key -> fields replacing its staged report row (on disk: bounded memory)
        changed = DiskMap(history.db, "merge_changes")
        # "partition index\tstaged key" -> the dataset key the staged image ended as: its own
        # final key, or the key it duplicates (maps the partition's exact duplicates' duplicate_of)
        final_keys = DiskMap(history.db, "merge_final_keys")
        writer = ShardWriter(
            store, first_index=next_shard_index(manifest), max_bytes=cfg.shard_max_bytes
        )
        try:
            written, histograms = _repack(
                cfg, staged, source_uri, history, writer, changed, final_keys
            )
        except BaseException:
            writer.abort()
            raise
        shards = writer.close()
        report_key = f"reports/ingest-{run_id}.jsonl"
        with OwnedTemporaryDirectory("lumos-merge-") as tmp:
            report_path = Path(tmp) / "report.jsonl"
            run_counts, changed_examples = _write_merged_report(
                staged, source_uri, history, changed, final_keys, writer.final_name, report_path
            )
            warn_changed(run_counts["changed"], changed_examples)
            if (
                history.manifest is not None
                and history.runs
                and not any(run_counts[k] for k in ("ingested", "duplicate", "rejected"))
            ):  # as a single-node run: nothing new changes nothing (a retried merge neither)
                return nothing_new(
                    store,
                    history.manifest,
                    listed=run_counts["listed"],
                    previously_seen=run_counts["previously_seen"],
                    changed=run_counts["changed"],
                )
            store.upload_file(report_path, report_key)
        run_counts.update(written)
        if run_counts["ingested"] != sum(s.count for s in shards):
            raise RuntimeError("merge: report and shards disagree")
        index_key = f"index/dedup-{run_id}.jsonl.gz"
        save_index(store, index_key, history.index, index_start)
        stats: dict[str, Any] = {}
        for _, done in staged:
            stats = add_counts(
                stats, {k: v for k, v in done["run"]["stats"].items() if k != "elapsed_s"}
            )
        stats.update({k: dict(sorted(v.items())) for k, v in histograms.items()})
        stats["merge_elapsed_s"] = round(time.monotonic() - started, 3)
        record = {
            "run_id": run_id,
            "source_uri": source_uri,
            "incremental": bool(history.runs),
            "fingerprint": fingerprint,
            "report": report_key,
            "index": index_key,
            "shards": [s.name for s in shards],
            "partitions": len(staged),
            "counts": run_counts,
            "stats": stats,
            "created_at": datetime.now(UTC).isoformat(),
        }
        committed = commit_manifest(store, cfg, history, record, shards, seen_version=seen_version)
        return result_from_manifest(store, committed, up_to_date=False)
    finally:
        history.close()


def _repack(
    cfg: IngestConfig,
    staged: list[tuple[Storage, dict]],
    source_uri: str,
    history: DatasetHistory,
    writer: ShardWriter,
    changed: DiskMap,
    final_keys: DiskMap,
) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """Dedup the staged samples in source order, as a single-node run does, and write the new
    ones into the final shards. Partitions stage every decoded image that is not an exact
    duplicate, so near-dedup here sees each image against exactly the images kept before it.
    `changed` gets the merge's decision for each sample: its final key and shard, or the image it
    duplicates; `final_keys` the dataset key each staged key ended as. Returns the captioned and
    paired counts of what was written, and its histograms."""
    written: Counter[str] = Counter({"captioned": 0, "paired": 0})
    histograms = new_histograms()
    # digest (hex) -> the key an earlier staged copy of these bytes ended as: a copy in a later
    # partition shares its fate as an exact duplicate, as in a single-node run.
    first_by_digest = DiskMap(history.db, "merge_first_by_digest")
    for staging, done in staged:
        partition = done["partition"]["index"]
        for shard in done["shards"]:
            for _, files in iter_shard_records(staging, shard["name"]):
                sample = json.loads(files["json"])
                if history.was_seen(source_uri, sample["source_key"]):
                    continue
                staged_key = sample["key"]
                digest, phash = bytes.fromhex(sample["sha256"]), int(sample["phash"], 16)
                first = first_by_digest.get(digest.hex())
                match = (
                    DuplicateMatch(first, "exact", 0)
                    if first is not None
                    else history.index.find_exact(digest) or history.index.find_near(phash)
                )
                if match is not None:  # a duplicate of an image kept before it
                    changed[sample["source_key"]] = {
                        "outcome": "duplicate",
                        "reason": match.kind,
                        "duplicate_of": match.key,
                        "distance": match.distance,
                    }
                    final = match.key
                else:
                    name_key = untagged_key(staged_key, source_uri, sample["source_key"])
                    final = unique_key(name_key, history.index, source_uri, sample["source_key"])
                    sample["key"] = final
                    name = writer.add(final, cfg.image_format, files[cfg.image_format], sample)
                    history.index.add(final, digest, phash)
                    changed[sample["source_key"]] = {"key": final, "shard": name}
                    count_sample(histograms, written, sample)
                first_by_digest[digest.hex()] = final
                final_keys[f"{partition}\t{staged_key}"] = final
    return written, histograms


def _write_merged_report(
    staged: list[tuple[Storage, dict]],
    source_uri: str,
    history: DatasetHistory,
    changed: DiskMap,
    final_keys: DiskMap,
    shard_name: Callable[[str], str],
    path: Path,
) -> tuple[dict[str, Any], list[str]]:
    """One report for the run at `path`: the staged rows in partition order, with the merge's
    decisions applied (an exact duplicate of a staged image points at what that image ended
    as; a kept one at its final shard, by `shard_name` of its pending name), and a "changed" row for each item the dataset has seen that changed since. Returns the
    run's counts, those of the rows written, and the first few changed items."""
    counts: Counter[str] = Counter()
    changed_examples: list[str] = []
    by_reason: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    with open(path, "w", encoding="utf-8") as out:
        for staging, done in staged:
            partition = done["partition"]["index"]
            with staging.open_read(done["run"]["report"]) as stream:
                for line in stream:
                    row = json.loads(line)
                    recorded = (
                        None
                        if row["outcome"] == "changed"
                        else history.seen_as(source_uri, row["source_key"])
                    )
                    if recorded is not None:  # staged by a partition without the history
                        change = change_since(
                            recorded, row.get("sidecars", []), row.get("version_tag")
                        )
                        if change is None:
                            continue
                        row = {"source_key": row["source_key"], "outcome": "changed"}
                        row["detail"] = change
                    if row["outcome"] == "changed" and len(changed_examples) < 5:
                        changed_examples.append(f"{row['source_key']}: {row['detail']}")
                    if row["outcome"] == "duplicate":
                        staged_of = f"{partition}\t{row['duplicate_of']}"
                        row["duplicate_of"] = final_keys.get(staged_of, row["duplicate_of"])
                    update = (
                        changed.get(row["source_key"]) if row["outcome"] == "ingested" else None
                    )
                    if update is not None and update.get("outcome") == "duplicate":
                        row = {k: v for k, v in row.items() if k not in ("key", "shard", "paired")}
                    if update is not None and "shard" in update:
                        update = {**update, "shard": shard_name(update["shard"])}
                    row.update(update or {})
                    out.write(json.dumps(row, sort_keys=True) + "\n")
                    counts[row["outcome"]] += 1
                    counts["sidecars"] += len(row.get("sidecars", []))
                    if row["outcome"] == "rejected":
                        by_reason[row["reason"]] += 1
                    elif row["outcome"] == "duplicate":
                        by_kind[row["reason"]] += 1
    listed = sum(done["run"]["counts"]["listed"] for _, done in staged)
    reported = sum(counts[k] for k in ("sidecars", "ingested", "duplicate", "rejected"))
    return {
        "listed": listed,
        "previously_seen": listed - reported,
        "sidecars": counts["sidecars"],
        "ingested": counts["ingested"],
        "duplicate": counts["duplicate"],
        "rejected": counts["rejected"],
        "duplicate_by_kind": dict(sorted(by_kind.items())),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "changed": counts["changed"],
    }, changed_examples
