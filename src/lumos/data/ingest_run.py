"""One ingest run over a stream of source items: read (threads), exact-dedup before decoding,
decode (processes), near-dedup, write shards and the per-object report, in source order.

`ingest`, `ingest_partition` (lumos.data.ingest) drive it; it never writes a manifest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lumos.data.decode import ImageRecipe, PreparedImage, Rejection, prepare_image
from lumos.data.dedup import DedupIndex, DuplicateMatch, sha256_digest
from lumos.data.manifest import change_since
from lumos.data.metrics import IngestMetrics
from lumos.data.scratch import DiskMap
from lumos.data.shards import ShardWriter
from lumos.data.sources import Source, SourceItem, parse_sidecars, read_with_retries
from lumos.storage import Storage, StorageError
from lumos.tempdirs import OwnedTemporaryDirectory

log = logging.getLogger(__name__)


if TYPE_CHECKING:
    from lumos.configs.data import IngestConfig
    from lumos.data.manifest import DatasetHistory


# Reads: 8 items per thread task, at most 16 tasks in flight (S3 latency is hidden by the threads,
# Source.read_threads of them).
_READ_BATCH, _READ_WINDOW = 8, 16
# Decoding: 16 images per process task, at most 2 tasks per worker in flight: 32 images per worker,
# as many as 8-image tasks with 4 in flight, in half the inter-process messages.
_DECODE_BATCH, _DECODE_TASKS_PER_WORKER = 16, 2


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


def is_paired(seed: int, source_key: str, fraction: float) -> bool:
    """Deterministic, stable membership of the paired subset: a seeded hash of the source key, so
    the choice never changes when later (incremental) runs or other partitions add images."""
    digest = hashlib.sha256(f"{seed}:{source_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def source_fingerprint(source: Source) -> tuple[str, int]:
    """(SHA-256 over every listed key and version, number of objects): detects an unchanged source."""
    h = hashlib.sha256()
    count = 0
    for obj in source.list():
        h.update(f"{obj.key}\t{obj.version}\n".encode())
        count += 1
    return h.hexdigest(), count


def short_side_bin(width: int, height: int) -> str:
    side = min(width, height)
    lo = 1 << max(side.bit_length() - 1, 0)
    return f"{lo}-{2 * lo - 1}"


SAMPLE_HISTOGRAMS = (
    "resolution_histogram", "source_short_side_histogram", "source_formats", "source_modes"
)  # fmt: skip


def new_histograms() -> dict[str, Counter[str]]:
    """The run's histograms over the samples it wrote (in the manifest's run stats)."""
    return {name: Counter() for name in SAMPLE_HISTOGRAMS}


def count_sample(histograms: dict[str, Counter[str]], counts: Counter[str], sample: dict) -> None:
    """Count a written sample (its shard record) in the run's histograms and captioned/paired."""
    counts["captioned"] += sample["caption"] is not None
    counts["paired"] += sample["paired"]
    histograms["resolution_histogram"][f"{sample['width']}x{sample['height']}"] += 1
    short_side = short_side_bin(sample["source_width"], sample["source_height"])
    histograms["source_short_side_histogram"][short_side] += 1
    histograms["source_formats"][sample["source_format"]] += 1
    histograms["source_modes"][sample["source_mode"]] += 1


def _ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    executor: Executor | None,
    window: int,
    arg: Callable[[Any], Any] = lambda item: item,
) -> Iterator[tuple[Any, Any]]:
    """(item, fn(arg(item))) in input order, at most `window` calls in flight: bounded memory."""
    if executor is None:
        for item in items:
            yield item, fn(arg(item))
        return
    pending: deque = deque()
    for item in items:
        pending.append((item, executor.submit(fn, arg(item))))
        if len(pending) >= window:
            done, future = pending.popleft()
            yield done, future.result()
    while pending:
        done, future = pending.popleft()
        yield done, future.result()


def _batched(items: Iterable[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def available_cpus() -> int:
    """CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a Kubernetes
    pod's CPU limit), which os.cpu_count() ignores."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 CPU limit visible
    return cpus


def _start_decoders(workers: int) -> ProcessPoolExecutor:
    """A pool of decoding processes, all started now. Fork (where available) starts them fast and
    works from scripts without a __main__ guard; they are forked before ingest starts its reader
    threads, so no thread's lock is copied mid-use."""
    methods = get_all_start_methods()
    context = get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    pool.submit(int).result()  # with fork, the first submit starts every worker
    return pool


def _prepare_one(raw: bytes, recipe: ImageRecipe) -> PreparedImage | Rejection:
    try:
        return prepare_image(raw, recipe)
    except Exception as err:  # a decoder failure prepare_image did not foresee: still reported
        return Rejection("truncated_or_corrupt", f"unexpected {type(err).__name__}: {err}")


def _prepare_batch(recipe: ImageRecipe, raws: list[bytes | None]) -> list[Any]:
    """Worker-process entry: prepare each image (None: nothing to decode)."""
    return [None if raw is None else _prepare_one(raw, recipe) for raw in raws]


@dataclass
class _Fetched:
    """One item after reading: its bytes and parsed sidecars, or why it is rejected already."""

    item: SourceItem
    raw: bytes | None = None
    digest: bytes | None = None
    meta: dict | None = None
    caption: str | None = None
    bytes_read: int = 0
    rejection: Rejection | None = None
    exact_of: str | None = None  # an earlier image of this run with the same bytes (source key)
    exact_match: DuplicateMatch | None = None  # same bytes as an image kept by an earlier run


class IngestRun:
    """Processes items into shards under `out` (a dataset or a staging area)."""

    def __init__(
        self,
        cfg: IngestConfig,
        source: Source,
        out: Storage,
        *,
        run_id: str,
        history: DatasetHistory,
        first_shard: int,
        progress_total: int | None,
        progress: bool,
        defer_near_dedup: bool = False,
    ) -> None:
        self.cfg = cfg
        # A partition of a fan-out stages every decoded image that is not an exact duplicate:
        # whether it is a near duplicate depends on what earlier partitions keep, so
        # merge_partitions decides it, in source order, over all the staged images.
        self.defer_near_dedup = defer_near_dedup
        self.recipe = cfg.recipe()
        self.source = source
        self.out = out
        self.run_id = run_id
        self.index = history.index  # its keys are every dataset key in use
        self.writer = ShardWriter(out, first_index=first_shard, max_bytes=cfg.shard_max_bytes)
        self._report_dir = OwnedTemporaryDirectory("lumos-ingest-report-")
        self.report_path = Path(self._report_dir.name) / "report.jsonl"
        self._report = open(self.report_path, "w", encoding="utf-8")  # noqa: SIM115
        self.counts: Counter[str] = Counter()
        self.changed_examples: list[str] = []  # the first few `record_changed` items, for the log
        self.by_reason: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.stats = new_histograms()
        self.bytes_read = 0
        self.metrics = IngestMetrics(cfg.pushgateway_url, run_id)
        # Exact duplicates within this run, decided before decoding: digest (hex) -> first source
        # key, and the outcome of each first occurrence once it is known (rows are accepted in
        # order) as [outcome, reason | key, detail]. On disk, with the index: bounded memory.
        self._first_by_digest = DiskMap(history.db, "run_first_by_digest")
        self._first_outcome = DiskMap(history.db, "run_first_outcome")
        self._progress = None
        self._progress_wanted = progress
        self._progress_total = progress_total
        self._started = time.monotonic()

    # -- reading (threads) ---------------------------------------------------------------------
    def _read(self, key: str) -> bytes:
        return read_with_retries(
            self.source.read,
            key,
            max_retries=self.cfg.max_retries,
            backoff_s=self.cfg.retry_backoff_s,
        )

    def _fetch_batch(self, items: list[SourceItem]) -> list[_Fetched]:
        return [self._fetch(item) for item in items]

    def _fetch(self, item: SourceItem) -> _Fetched:
        if item.kind != "image":
            return _Fetched(item, rejection=Rejection(item.kind, ""))
        fetched = _Fetched(item)
        try:
            raw = self._read(item.source_key)
            sidecars = {key: self._read(key) for key in item.sidecars}
        except (StorageError, OSError) as err:
            fetched.rejection = Rejection("unreadable", str(err))
            return fetched
        fetched.bytes_read = len(raw) + sum(len(d) for d in sidecars.values())
        if not raw:
            fetched.rejection = Rejection("empty_file")
            return fetched
        try:
            fetched.meta, fetched.caption = parse_sidecars(sidecars)
        except ValueError as err:
            fetched.rejection = Rejection("invalid_sidecar", str(err))
            return fetched
        fetched.raw = raw
        fetched.digest = sha256_digest(raw)
        return fetched

    # -- exact dedup before decoding (main thread, in order) -----------------------------------
    def _to_decode(self, fetched_items: Iterable[_Fetched]) -> Iterator[_Fetched]:
        for fetched in fetched_items:
            if fetched.digest is not None:
                match = self.index.find_exact(fetched.digest)
                if match is not None:
                    fetched.exact_match, fetched.raw = match, None
                    yield fetched
                    continue
                digest = fetched.digest.hex()
                first = self._first_by_digest.get(digest)
                if first is not None:
                    fetched.exact_of, fetched.raw = first, None
                else:
                    self._first_by_digest[digest] = fetched.item.source_key
            yield fetched

    # -- accepting results (main thread, in order) ---------------------------------------------
    def _row(self, item: SourceItem, outcome: str, **fields: Any) -> None:
        row = {
            "source_key": item.source_key,
            "outcome": outcome,
            "version_tag": item.version_tag,
            **fields,
        }
        if item.sidecars:
            row["sidecars"] = list(item.sidecars)
        self._report.write(json.dumps(row, sort_keys=True) + "\n")
        self.counts[outcome] += 1
        self.counts["sidecars"] += len(item.sidecars)
        self.metrics.seen.inc(1 + len(item.sidecars))
        if self._progress is not None:
            self._progress.update(1 + len(item.sidecars))

    def record_changed(self, item: SourceItem, detail: str) -> None:
        """Report a seen item that changed since an earlier run ingested it. Incremental ingest
        does not re-ingest it (its objects count as previously seen); the row says so."""
        row = {"source_key": item.source_key, "outcome": "changed", "detail": detail}
        self._report.write(json.dumps(row, sort_keys=True) + "\n")
        self.counts["changed"] += 1
        if len(self.changed_examples) < 5:
            self.changed_examples.append(f"{item.source_key}: {detail}")
        if self._progress is not None:
            self._progress.update(len(item.all_keys))

    def _reject(self, item: SourceItem, rejection: Rejection) -> None:
        self.by_reason[rejection.reason] += 1
        self.metrics.rejected.labels(rejection.reason).inc()
        self._first_outcome[item.source_key] = ["rejected", rejection.reason, rejection.detail]
        self._row(item, "rejected", reason=rejection.reason, detail=rejection.detail)

    def _duplicate(self, item: SourceItem, match: DuplicateMatch) -> None:
        self.by_kind[match.kind] += 1
        self.metrics.duplicate.labels(match.kind).inc()
        self._first_outcome[item.source_key] = ["duplicate", match.key, ""]
        self._row(
            item, "duplicate", reason=match.kind, duplicate_of=match.key, distance=match.distance
        )

    def accept(self, fetched: _Fetched, result: PreparedImage | Rejection | None) -> None:
        item = fetched.item
        self.bytes_read += fetched.bytes_read
        self.metrics.bytes_read.inc(fetched.bytes_read)
        if fetched.rejection is not None:
            self._reject(item, fetched.rejection)
        elif fetched.exact_match is not None:
            self._duplicate(item, fetched.exact_match)
        elif fetched.exact_of is not None:
            # Same bytes as an earlier image of this run: it shares that image's fate.
            outcome, what, detail = self._first_outcome[fetched.exact_of]
            if outcome == "rejected":  # `what` is the reason
                self._reject(item, Rejection(what, f"same bytes as {fetched.exact_of}; {detail}"))
            else:  # `what` is the kept key (the first copy's own, or the one it duplicates)
                self._duplicate(item, DuplicateMatch(what, "exact", 0))
        elif isinstance(result, Rejection):
            self._reject(item, result)
        else:
            if not isinstance(result, PreparedImage):
                raise RuntimeError(f"no decode result for {item.source_key}")
            near = None if self.defer_near_dedup else self.index.find_near(result.phash)
            if near is not None:
                self._duplicate(item, near)
            else:
                self._write_sample(fetched, result)
        self.metrics.push()

    def _write_sample(self, fetched: _Fetched, img: PreparedImage) -> None:
        item = fetched.item
        if fetched.digest is None:
            raise RuntimeError("broken invariant: fetched.digest is not None")
        key = unique_key(item.key, self.index, self.source.uri, item.source_key)
        paired = fetched.caption is not None and is_paired(
            self.cfg.seed, item.source_key, self.cfg.paired_fraction
        )
        sample = {
            "key": key,
            "source_key": item.source_key,
            "source_uri": self.source.uri,
            "width": img.width,
            "height": img.height,
            "meta": fetched.meta or {},
            "caption": fetched.caption,
            "paired": paired,
            "source_width": img.source_width,
            "source_height": img.source_height,
            "source_format": img.source_format,
            "source_mode": img.source_mode,
            "sha256": fetched.digest.hex(),
            "phash": f"{img.phash:016x}",
        }
        shard = self.writer.add(key, self.cfg.image_format, img.data, sample)
        self.index.add(key, fetched.digest, img.phash)
        self._first_outcome[item.source_key] = ["ingested", key, ""]
        count_sample(self.stats, self.counts, sample)
        self.metrics.ingested.inc()
        self._row(item, "ingested", key=key, shard=shard, paired=paired)

    # -- the whole stream ----------------------------------------------------------------------
    def run(self, items: Iterable[SourceItem]) -> None:
        workers = self.cfg.workers or available_cpus()
        decoders = _start_decoders(workers) if workers > 1 else None  # before any thread starts
        readers = ThreadPoolExecutor(
            max_workers=self.source.read_threads, thread_name_prefix="lumos-ingest-read"
        )
        if self._progress_wanted:
            from tqdm import tqdm

            self._progress = tqdm(
                total=self._progress_total,
                unit="obj",
                desc="ingest",
                smoothing=0.1,
                mininterval=1.0,
            )
        try:
            # Batches of items per task: fewer hand-offs between threads and processes.
            fetch_batches = _ordered_map(
                self._fetch_batch, _batched(items, _READ_BATCH), readers, window=_READ_WINDOW
            )
            fetched = (f for _, batch in fetch_batches for f in batch)
            groups = _batched(self._to_decode(fetched), _DECODE_BATCH)
            decode = functools.partial(_prepare_batch, self.recipe)
            decoded = _ordered_map(
                decode,
                groups,
                decoders,
                window=_DECODE_TASKS_PER_WORKER * workers,
                arg=lambda g: [f.raw for f in g],
            )
            for group, results in decoded:
                for fetched_item, result in zip(group, results, strict=True):
                    self.accept(fetched_item, result)
        except BaseException:
            self.writer.abort()
            raise
        finally:
            readers.shutdown(cancel_futures=True)
            if decoders is not None:
                decoders.shutdown(cancel_futures=True)
            self._report.close()
            if self._progress is not None:
                self._progress.close()
        self.shards = self.writer.close()
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self.metrics.bytes_per_second.set(self.bytes_read / elapsed)
        self.metrics.images_per_second.set(self.processed() / elapsed)
        self.metrics.push(force=True)
        self.elapsed_s = elapsed

    def processed(self) -> int:
        """Items ingested, found duplicate or rejected by this run (not those only reported)."""
        return self.counts["ingested"] + self.counts["duplicate"] + self.counts["rejected"]

    def upload_report(self, key: str) -> None:
        """Upload the report (after `run`), its rows naming the shards as they were uploaded."""
        named = self.report_path.with_name("report-named.jsonl")
        with open(self.report_path, encoding="utf-8") as rows, open(named, "w") as out:
            out.writelines(with_shard_name(row, self.writer.final_name) for row in rows)
        self.out.upload_file(named, key)
        self._report_dir.cleanup()

    def run_counts(self, listed: int, previously_seen: int) -> dict[str, Any]:
        counts: dict[str, Any] = {
            "listed": listed,
            "previously_seen": previously_seen,
            "sidecars": self.counts["sidecars"],
            "ingested": self.counts["ingested"],
            "duplicate": self.counts["duplicate"],
            "rejected": self.counts["rejected"],
            "duplicate_by_kind": dict(sorted(self.by_kind.items())),
            "rejected_by_reason": dict(sorted(self.by_reason.items())),
            "captioned": self.counts["captioned"],
            "paired": self.counts["paired"],
            "changed": self.counts["changed"],
        }
        accounted = (
            previously_seen
            + counts["sidecars"]
            + counts["ingested"]
            + counts["duplicate"]
            + counts["rejected"]
        )
        if accounted != listed:
            raise RuntimeError(
                f"ingest accounting broken: {listed} objects listed but {accounted} accounted for "
                f"({counts}); this is a bug in lumos.data.ingest, please report it"
            )
        return counts

    def run_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {k: dict(sorted(v.items())) for k, v in self.stats.items()}
        stats["bytes_read"] = self.bytes_read
        stats["elapsed_s"] = round(self.elapsed_s, 3)
        processed = self.counts["ingested"] + self.counts["duplicate"] + self.counts["rejected"]
        stats["objects_per_s"] = round(processed / self.elapsed_s, 2)
        stats["bytes_per_s"] = round(self.bytes_read / self.elapsed_s, 1)
        return stats


def with_shard_name(line: str, final_name: Callable[[str], str]) -> str:
    """A report row (a JSON line) with its shard's pending name replaced by the shard's name
    (`ShardWriter.final_name`); rows that name no shard are returned as they are."""
    if '"shard": ' not in line:
        return line
    row = json.loads(line)
    row["shard"] = final_name(row["shard"])
    return json.dumps(row, sort_keys=True) + "\n"


class ListingTally:
    """Counts and fingerprints a listing as it streams past."""

    def __init__(self, objects: Iterable[Any]) -> None:
        self._objects = objects
        self.count = 0
        self._hash = hashlib.sha256()

    def __iter__(self) -> Iterator[Any]:
        for obj in self._objects:
            self.count += 1
            self._hash.update(f"{obj.key}\t{obj.version}\n".encode())
            yield obj

    @property
    def fingerprint(self) -> str:
        return self._hash.hexdigest()


def unique_key(key: str, index: DedupIndex, source_uri: str, source_key: str) -> str:
    """`key`, or when another source (or a clashing sanitised name) has it in the dataset, `key`
    tagged with a hash of its source object. In use once the sample is added to the index."""
    if key not in index:
        return key
    return f"{key}-{_key_tag(source_uri, source_key)}"


def untagged_key(key: str, source_uri: str, source_key: str) -> str:
    """The key `unique_key` was given for this source object: a staged key without the tag its
    partition added, so the merge picks the final key as a single-node run would."""
    return key.removesuffix(f"-{_key_tag(source_uri, source_key)}")


def _key_tag(source_uri: str, source_key: str) -> str:
    return hashlib.sha256(f"{source_uri}\t{source_key}".encode()).hexdigest()[:8]


def unseen_items(
    items: Iterable[SourceItem],
    source_uri: str,
    history: DatasetHistory,
    skipped: Counter,
    on_changed: Callable[[SourceItem, str], None],
) -> Iterator:
    """The items no earlier run into the dataset has seen. Seen ones are counted in `skipped`;
    those that changed since (a sidecar added or removed, an object rewritten) also go to
    `on_changed` with what changed."""
    for item in items:
        recorded = history.seen_as(source_uri, item.source_key)  # one lookup per item
        if recorded is None:
            yield item
            continue
        skipped["objects"] += len(item.all_keys)
        change = change_since(recorded, item.sidecars, item.version_tag)
        if change is not None:
            on_changed(item, change)


def run_record(
    run: IngestRun,
    *,
    source_uri: str,
    fingerprint: str,
    listed: int,
    previously_seen: int,
    report: str,
    index: str,
    incremental: bool,
) -> dict:
    return {
        "run_id": run.run_id,
        "source_uri": source_uri,
        "incremental": incremental,
        "fingerprint": fingerprint,
        "report": report,
        "index": index,
        "shards": [s.name for s in run.shards],
        "counts": run.run_counts(listed, previously_seen),
        "stats": run.run_stats(),
        "created_at": datetime.now(UTC).isoformat(),
    }
