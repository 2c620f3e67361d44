"""Ingest: raw in-the-wild images -> a sharded, deduplicated, fully accounted dataset.

    result = ingest(IngestConfig(), "s3://raw/photos", "s3://lumos/datasets/images")

Per object: read (retried), exact-dedup by content digest (before any decode), decode and
validate (decode.py), resize + centre-crop, near-dedup by perceptual hash (dedup.py), write into
webdataset shards (shards.py). Every listed object ends in the report exactly once: `ingested`,
`duplicate` (of a kept key) or `rejected` (with a reason); sidecars are listed with their image.
The manifest, written last, makes the dataset visible: a reader never sees a partial dataset.

Fan-out across pods: `plan_partitions` -> `ingest_partition` per partition (a KFP ParallelFor) ->
`merge_partitions`, which deduplicates across partitions and writes the final dataset.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lumos.data.decode import (
    REJECTION_REASONS,
    ImageRecipe,
    PreparedImage,
    Rejection,
    prepare_image,
)
from lumos.data.dedup import DedupIndex, DuplicateMatch, sha256_digest
from lumos.data.shards import SHARD_PREFIX, ShardInfo, ShardWriter, iter_shard_records
from lumos.data.sources import (
    Source,
    SourceItem,
    group_boundaries,
    group_items,
    parse_sidecars,
    read_with_retries,
)
from lumos.storage import ObjectNotFound, Storage, StorageError

log = logging.getLogger(__name__)

DATASET_FORMAT = "lumos-dataset/1"
MANIFEST = "manifest.json"
PARTITION_FORMAT = "lumos-ingest-partition/1"
PARTITION_DONE = "partition.json"

# Settings that change what ends up in the shards; an incremental run must match the dataset's.
_OUTPUT_SETTINGS = ("resolution", "aspect_buckets", "image_format", "jpeg_quality", "background")
# Settings that do not change the result (left out of the up-to-date check).
_RUNTIME_SETTINGS = ("workers", "incremental", "max_retries", "retry_backoff_s", "pushgateway_url")


class IngestConfig(BaseModel):
    """How raw images become a dataset. The defaults are the recipe for in-the-wild photos."""

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(256, ge=8, description="Output side in pixels (square crops)")
    aspect_buckets: list[tuple[int, int]] | None = Field(
        None,
        description="Output (width, height) sizes for multi-resolution training; each image goes "
        "to the bucket closest in aspect ratio. None: square `resolution` only",
    )
    image_format: Literal["jpg", "png"] = Field(
        "jpg", description="jpg for photos; png is lossless (tiny presets, exact colours)"
    )
    jpeg_quality: int = Field(95, ge=1, le=100)
    min_size: int | None = Field(
        None,
        ge=1,
        description="Minimum shorter side of a source image; None: the output size (never upscale)",
    )
    max_aspect_ratio: float = Field(3.0, ge=1.0, description="Long side / short side limit")
    max_pixels: int = Field(
        8192 * 8192, ge=1, description="Width x height limit: the decompression-bomb guard"
    )
    background: tuple[int, int, int] = Field(
        (255, 255, 255), description="RGB under transparent pixels (alpha is composited on it)"
    )
    near_duplicate_distance: int | None = Field(
        4,
        ge=0,
        le=32,
        description="Max Hamming distance of 64-bit perceptual hashes for a near duplicate; "
        "None disables near-dup detection (multi-view and video frames are alike on purpose)",
    )
    shard_max_bytes: int = Field(1_000_000_000, ge=4096, description="Target shard size (~1 GB)")
    paired_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="Fraction of captioned images marked paired (T2I subset)"
    )
    seed: int = Field(0, description="Seeds the choice of the paired subset")
    workers: int | None = Field(
        None, ge=1, description="Decoding processes; None: one per CPU core; 1: in-process"
    )
    incremental: bool = Field(
        False, description="Process only objects not seen by earlier runs into this dataset"
    )
    max_retries: int = Field(3, ge=0, description="Retries of a failed read (transient errors)")
    retry_backoff_s: float = Field(0.5, ge=0.0, description="First retry delay; doubles each time")
    pushgateway_url: str | None = Field(None, description="Push ingest metrics here when set")

    @field_validator("aspect_buckets")
    @classmethod
    def _check_buckets(cls, buckets: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
        if buckets is None:
            return None
        if not buckets:
            raise ValueError("aspect_buckets must list at least one (width, height), or be None")
        for w, h in buckets:
            if w < 8 or h < 8 or w % 8 or h % 8:
                raise ValueError(
                    f"aspect bucket {w}x{h}: sides must be multiples of 8 and >= 8 "
                    "(the VAE downsamples by 8)"
                )
        return buckets

    @model_validator(mode="after")
    def _check_buckets_fit_limit(self) -> IngestConfig:
        for w, h in self.output_sizes:
            if max(w, h) / min(w, h) > self.max_aspect_ratio:
                raise ValueError(
                    f"aspect bucket {w}x{h} is beyond max_aspect_ratio={self.max_aspect_ratio}: "
                    "raise max_aspect_ratio or drop the bucket"
                )
        return self

    @property
    def output_sizes(self) -> tuple[tuple[int, int], ...]:
        if self.aspect_buckets:
            return tuple((int(w), int(h)) for w, h in self.aspect_buckets)
        return ((self.resolution, self.resolution),)

    def recipe(self) -> ImageRecipe:
        sizes = self.output_sizes
        return ImageRecipe(
            sizes=sizes,
            min_size=self.min_size or min(min(s) for s in sizes),
            max_aspect_ratio=self.max_aspect_ratio,
            max_pixels=self.max_pixels,
            background=tuple(self.background),
            image_format=self.image_format,
            jpeg_quality=self.jpeg_quality,
        )

    def output_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k in _OUTPUT_SETTINGS}

    def result_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in _RUNTIME_SETTINGS}


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


# ---------------------------------------------------------------------------------------------
# Small pieces
# ---------------------------------------------------------------------------------------------


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


def _short_side_bin(width: int, height: int) -> str:
    side = min(width, height)
    lo = 1 << max(side.bit_length() - 1, 0)
    return f"{lo}-{2 * lo - 1}"


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


def _start_decoders(workers: int) -> ProcessPoolExecutor:
    """A pool of decoding processes, all started now. Fork (where available) starts them fast and
    works from scripts without a __main__ guard; they are forked before ingest starts its reader
    threads, so no thread's lock is copied mid-use."""
    methods = get_all_start_methods()
    context = get_context("fork" if "fork" in methods else "spawn")
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context)
    pool.submit(int).result()  # with fork, the first submit starts every worker
    return pool


def _prepare_batch(recipe: ImageRecipe, raws: list[bytes | None]) -> list[Any]:
    """Worker-process entry: prepare each image (None: nothing to decode)."""
    return [None if raw is None else prepare_image(raw, recipe) for raw in raws]


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


class IngestMetrics:
    """Prometheus counters for one run; pushed to a Pushgateway when configured."""

    def __init__(self, pushgateway_url: str | None, run_id: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.url = pushgateway_url
        self.run_id = run_id
        self.registry = CollectorRegistry()
        self.seen = Counter("lumos_ingest_objects_seen", "Objects listed", registry=self.registry)
        self.ingested = Counter(
            "lumos_ingest_objects_ingested", "Images written to shards", registry=self.registry
        )
        self.duplicate = Counter(
            "lumos_ingest_objects_duplicate", "Duplicates", ["kind"], registry=self.registry
        )
        self.rejected = Counter(
            "lumos_ingest_objects_rejected", "Rejected objects", ["reason"], registry=self.registry
        )
        self.bytes_read = Counter(
            "lumos_ingest_bytes_read", "Bytes read from the source", registry=self.registry
        )
        self.bytes_per_second = Gauge(
            "lumos_ingest_bytes_per_second", "Source read throughput", registry=self.registry
        )
        self.images_per_second = Gauge(
            "lumos_ingest_images_per_second", "Images processed per second", registry=self.registry
        )
        self._last_push = time.monotonic()

    def push(self, force: bool = False) -> None:
        if not self.url or (not force and time.monotonic() - self._last_push < 15):
            return
        from prometheus_client import push_to_gateway

        self._last_push = time.monotonic()
        try:
            push_to_gateway(
                self.url,
                job="lumos-ingest",
                grouping_key={"run": self.run_id},
                registry=self.registry,
            )
        except Exception as err:  # metrics are best effort; the ingest itself must not fail
            log.warning("could not push ingest metrics to %s: %s", self.url, err)


# ---------------------------------------------------------------------------------------------
# One run over a stream of items: read, dedup, decode, write shards and the report
# ---------------------------------------------------------------------------------------------


class _IngestRun:
    """Processes items into shards under `out` (a dataset or a staging area)."""

    def __init__(
        self,
        cfg: IngestConfig,
        source: Source,
        out: Storage,
        *,
        run_id: str,
        index: DedupIndex,
        first_shard: int,
        used_keys: set[str],
        progress_total: int | None,
        progress: bool,
    ) -> None:
        self.cfg = cfg
        self.recipe = cfg.recipe()
        self.source = source
        self.out = out
        self.run_id = run_id
        self.index = index
        self.used_keys = used_keys
        self.writer = ShardWriter(out, first_index=first_shard, max_bytes=cfg.shard_max_bytes)
        self._report_dir = tempfile.TemporaryDirectory(prefix="lumos-ingest-report-")
        self.report_path = Path(self._report_dir.name) / "report.jsonl"
        self._report = open(self.report_path, "w", encoding="utf-8")  # noqa: SIM115
        self.counts: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self.by_kind: Counter[str] = Counter()
        self.stats: dict[str, Counter[str]] = {
            "resolution_histogram": Counter(),
            "source_short_side_histogram": Counter(),
            "source_formats": Counter(),
            "source_modes": Counter(),
        }
        self.bytes_read = 0
        self.metrics = IngestMetrics(cfg.pushgateway_url, run_id)
        # Exact duplicates within this run, decided before decoding: digest -> first source key,
        # and the outcome of each first occurrence once it is known (rows are accepted in order).
        self._first_by_digest: dict[bytes, str] = {}
        self._first_outcome: dict[str, tuple[str, str | None, str | None]] = {}
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
                first = self._first_by_digest.get(fetched.digest)
                if match is not None:
                    fetched.exact_match, fetched.raw = match, None
                elif first is not None:
                    fetched.exact_of, fetched.raw = first, None
                else:
                    self._first_by_digest[fetched.digest] = fetched.item.source_key
            yield fetched

    # -- accepting results (main thread, in order) ---------------------------------------------
    def _row(self, item: SourceItem, outcome: str, **fields: Any) -> None:
        row = {"source_key": item.source_key, "outcome": outcome, **fields}
        if item.sidecars:
            row["sidecars"] = list(item.sidecars)
        self._report.write(json.dumps(row, sort_keys=True) + "\n")
        self.counts[outcome] += 1
        self.counts["sidecars"] += len(item.sidecars)
        self.metrics.seen.inc(1 + len(item.sidecars))
        if self._progress is not None:
            self._progress.update(1 + len(item.sidecars))

    def _reject(self, item: SourceItem, rejection: Rejection) -> None:
        self.by_reason[rejection.reason] += 1
        self.metrics.rejected.labels(rejection.reason).inc()
        self._first_outcome[item.source_key] = ("rejected", rejection.reason, rejection.detail)
        self._row(item, "rejected", reason=rejection.reason, detail=rejection.detail)

    def _duplicate(self, item: SourceItem, match: DuplicateMatch) -> None:
        self.by_kind[match.kind] += 1
        self.metrics.duplicate.labels(match.kind).inc()
        self._first_outcome[item.source_key] = ("duplicate", match.key, None)
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
            if outcome == "rejected":
                self._reject(item, Rejection(what, f"same bytes as {fetched.exact_of}; {detail}"))
            elif outcome == "duplicate":
                self._duplicate(item, DuplicateMatch(what, "exact", 0))
            else:
                self._duplicate(item, DuplicateMatch(what, "exact", 0))
        elif isinstance(result, Rejection):
            self._reject(item, result)
        else:
            assert isinstance(result, PreparedImage), f"no decode result for {item.source_key}"
            near = self.index.find_near(result.phash)
            if near is not None:
                self._duplicate(item, near)
            else:
                self._write_sample(fetched, result)
        self.metrics.push()

    def _unique_key(self, item: SourceItem) -> str:
        key = item.key
        if key in self.used_keys:  # another source (or a clashing sanitised name) has it
            tag = hashlib.sha256(f"{self.source.uri}\t{item.source_key}".encode()).hexdigest()[:8]
            key = f"{key}-{tag}"
        self.used_keys.add(key)
        return key

    def _write_sample(self, fetched: _Fetched, img: PreparedImage) -> None:
        item = fetched.item
        assert fetched.digest is not None
        key = self._unique_key(item)
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
        self._first_outcome[item.source_key] = ("ingested", key, None)
        self.counts["captioned"] += fetched.caption is not None
        self.counts["paired"] += paired
        self.stats["resolution_histogram"][f"{img.width}x{img.height}"] += 1
        self.stats["source_short_side_histogram"][
            _short_side_bin(img.source_width, img.source_height)
        ] += 1
        self.stats["source_formats"][img.source_format] += 1
        self.stats["source_modes"][img.source_mode] += 1
        self.metrics.ingested.inc()
        self._row(item, "ingested", key=key, shard=shard, paired=paired)

    # -- the whole stream ----------------------------------------------------------------------
    def run(self, items: Iterable[SourceItem]) -> None:
        workers = self.cfg.workers or os.cpu_count() or 1
        decoders = _start_decoders(workers) if workers > 1 else None  # before any thread starts
        readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="lumos-ingest-read")
        if self._progress_wanted:
            from tqdm import tqdm

            self._progress = tqdm(
                total=self._progress_total, unit="obj", desc="ingest", smoothing=0.1
            )
        try:
            # Reads go in batches of 8 items per thread task: fewer hand-offs between threads.
            fetch_batches = _ordered_map(self._fetch_batch, _batched(items, 8), readers, window=16)
            fetched = (f for _, batch in fetch_batches for f in batch)
            groups = _batched(self._to_decode(fetched), 8)  # 8 images per task: less IPC
            decode = functools.partial(_prepare_batch, self.recipe)
            decoded = _ordered_map(
                decode, groups, decoders, window=4 * workers, arg=lambda g: [f.raw for f in g]
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
        processed = self.counts["ingested"] + self.counts["duplicate"] + self.counts["rejected"]
        self.metrics.bytes_per_second.set(self.bytes_read / elapsed)
        self.metrics.images_per_second.set(processed / elapsed)
        self.metrics.push(force=True)
        self.elapsed_s = elapsed

    def upload_report(self, key: str) -> None:
        self.out.upload_file(self.report_path, key)
        self._report_dir.cleanup()

    def run_counts(self, listed: int, previously_seen: int) -> dict[str, Any]:
        counts = {
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


# ---------------------------------------------------------------------------------------------
# What earlier runs left in the dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class _History:
    """Earlier runs' state an incremental run builds on (empty for a full run)."""

    manifest: dict | None
    index: DedupIndex
    seen: set[tuple[str, str]]  # (source uri, source key) that need no processing again
    used_keys: set[str]
    runs: list[dict]
    shards: list[dict]


def read_manifest(store: Storage) -> dict | None:
    """The dataset's manifest, or None when there is no complete dataset yet."""
    if not store.exists(MANIFEST):
        return None
    manifest = store.read_json(MANIFEST)
    if manifest.get("format") != DATASET_FORMAT:
        raise StorageError(
            f"{store.key_uri(MANIFEST)} has format {manifest.get('format')!r}, expected "
            f"{DATASET_FORMAT!r}: ingest into a new dataset URI"
        )
    return manifest


def _load_history(store: Storage, cfg: IngestConfig, manifest: dict | None) -> _History:
    history = _History(manifest, DedupIndex(cfg.near_duplicate_distance), set(), set(), [], [])
    if manifest is None or not cfg.incremental:
        return history
    old = {k: manifest["ingest_config"].get(k) for k in _OUTPUT_SETTINGS}
    if old != cfg.output_settings():
        raise ValueError(
            f"incremental ingest into {store.uri} needs the dataset's output settings {old}, "
            f"got {cfg.output_settings()}: use the same settings, or run a full ingest "
            "(incremental=False) into a new dataset URI"
        )
    for run in manifest["runs"]:
        history.index.load_bytes(store.read_bytes(run["index"]))
        with store.open_read(run["report"]) as stream:
            for line in stream:
                row = json.loads(line)
                if not (row["outcome"] == "rejected" and row.get("reason") == "unreadable"):
                    history.seen.add((run["source_uri"], row["source_key"]))  # unreadable: retry
    history.used_keys = set(history.index.keys)
    history.runs = list(manifest["runs"])
    history.shards = list(manifest["shards"])
    return history


def _next_shard_index(manifest: dict | None) -> int:
    """Shards of a new run never reuse a name the current manifest refers to (readers of the old
    manifest keep reading consistent shards until the new manifest replaces it)."""
    if not manifest or not manifest["shards"]:
        return 0
    return 1 + max(
        int(s["name"].removeprefix("shard-").removesuffix(".tar")) for s in manifest["shards"]
    )


def _add_nested(total: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Sum two dicts of counts (nested dicts summed key by key; non-numbers skipped)."""
    out = dict(total)
    for key, value in part.items():
        if isinstance(value, dict):
            out[key] = _add_nested(out.get(key, {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
    return out


def _up_to_date(
    manifest: dict | None, cfg: IngestConfig, source_uri: str, fingerprint: str
) -> bool:
    if manifest is None or len(manifest["runs"]) != 1:
        return False
    run = manifest["runs"][0]
    old_cfg = {k: v for k, v in manifest["ingest_config"].items() if k not in _RUNTIME_SETTINGS}
    return (
        run["source_uri"] == source_uri
        and run["fingerprint"] == fingerprint
        and old_cfg == cfg.result_settings()
    )


def _result_from_manifest(store: Storage, manifest: dict, *, up_to_date: bool) -> IngestResult:
    run = manifest["runs"][-1]
    c = run["counts"]
    return IngestResult(
        dataset_uri=store.uri,
        manifest_uri=store.key_uri(MANIFEST),
        report_uri=store.key_uri(run["report"]),
        run_id=run["run_id"],
        up_to_date=up_to_date,
        listed=c["listed"],
        previously_seen=c["previously_seen"],
        sidecars=c["sidecars"],
        ingested=c["ingested"],
        duplicate=c["duplicate"],
        rejected=c["rejected"],
        duplicate_by_kind=c["duplicate_by_kind"],
        rejected_by_reason=c["rejected_by_reason"],
        paired=c["paired"],
        new_shards=len(run["shards"]),
        num_shards=len(manifest["shards"]),
        num_samples=manifest["num_samples"],
    )


def _commit(
    store: Storage,
    cfg: IngestConfig,
    history: _History,
    run_record: dict,
    new_shards: list[ShardInfo],
) -> dict:
    """Write the manifest (last: this is what makes the run visible), then drop what no manifest
    refers to any more (the shards and indexes of a replaced dataset)."""
    runs = [*history.runs, run_record]
    shards = [*history.shards, *(s.to_json() for s in new_shards)]
    counts: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    sources: Counter[str] = Counter()
    for run in runs:
        counts = _add_nested(counts, run["counts"])
        stats = _add_nested(stats, {k: v for k, v in run["stats"].items() if isinstance(v, dict)})
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
    store.write_json(MANIFEST, manifest)
    if replaced is not None:  # a full rebuild over an older dataset
        keep = {s["name"] for s in shards}
        for old in replaced["shards"]:
            if old["name"] not in keep:
                store.delete(f"{SHARD_PREFIX}/{old['name']}")
        for old_run in replaced["runs"]:
            store.delete(old_run["index"])
    return manifest


class _ListingTally:
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


def _unseen(items: Iterable[SourceItem], source_uri: str, seen: set, skipped: Counter) -> Iterator:
    for item in items:
        if (source_uri, item.source_key) in seen:
            skipped["objects"] += len(item.all_keys)
        else:
            yield item


def _run_record(
    run: _IngestRun,
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


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


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
        manifest = read_manifest(store)
        total = None
        if manifest is not None and not cfg.incremental:
            fingerprint, total = source_fingerprint(source)
            if _up_to_date(manifest, cfg, source.uri, fingerprint):
                log.info("%s is up to date with %s: nothing to do", store.uri, source.uri)
                return _result_from_manifest(store, manifest, up_to_date=True)
        history = _load_history(store, cfg, manifest)
        listing = _ListingTally(source.list())
        skipped: Counter[str] = Counter()
        items = _unseen(group_items(listing), source.uri, history.seen, skipped)
        index_start = len(history.index)
        run = _IngestRun(
            cfg,
            source,
            store,
            run_id=run_id,
            index=history.index,
            first_shard=_next_shard_index(manifest),
            used_keys=history.used_keys,
            progress_total=total,
            progress=progress,
        )
        run.run(items)
    if listing.count == 0:
        raise ValueError(f"no objects under {source.uri}: check the source URI")
    if (
        history.runs
        and run.counts["ingested"] + run.counts["duplicate"] + run.counts["rejected"] == 0
    ):
        log.info("incremental ingest: no new objects in %s", source_uri)
        unchanged = _result_from_manifest(store, history.manifest, up_to_date=True)
        return unchanged.model_copy(
            update={
                "listed": listing.count,
                "previously_seen": skipped["objects"],
                "sidecars": 0,
                "ingested": 0,
                "duplicate": 0,
                "rejected": 0,
                "duplicate_by_kind": {},
                "rejected_by_reason": {},
                "paired": 0,
                "new_shards": 0,
            }
        )
    report_key, index_key = f"reports/ingest-{run_id}.jsonl", f"index/dedup-{run_id}.npz"
    run.upload_report(report_key)
    store.write_bytes(index_key, history.index.to_bytes(start=index_start))
    record = _run_record(
        run,
        source_uri=source.uri,
        fingerprint=listing.fingerprint,
        listed=listing.count,
        previously_seen=skipped["objects"],
        report=report_key,
        index=index_key,
        incremental=bool(history.runs),
    )
    committed = _commit(store, cfg, history, record, run.shards)
    return _result_from_manifest(store, committed, up_to_date=False)


def plan_partitions(source_uri: str, num_partitions: int) -> list[str]:
    """Split a source into up to `num_partitions` contiguous key ranges of about equal object
    counts (never splitting an image from its sidecars). Each descriptor is a JSON string."""
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    with Source(source_uri) as source:
        _, total = source_fingerprint(source)
        if total == 0:
            raise ValueError(f"no objects under {source.uri}: check the source URI")
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
    """
    desc = json.loads(partition)
    if desc.get("format") != PARTITION_FORMAT:
        raise ValueError(f"not a partition descriptor from plan_partitions: {partition!r}")
    staging = Storage.from_uri(staging_uri)
    run_id = new_run_id()
    with Source(source_uri) as source:
        if desc["source_uri"] != source.uri:
            raise ValueError(
                f"partition {desc['index']} was planned for {desc['source_uri']}, not {source.uri}"
            )
        manifest = read_manifest(Storage.from_uri(dataset_uri)) if dataset_uri else None
        history = (
            _load_history(Storage.from_uri(dataset_uri), cfg, manifest)
            if dataset_uri
            else (_load_history(staging, cfg, None))
        )
        listing = _ListingTally(source.list(desc["start_after"], desc["last_key"]))
        skipped: Counter[str] = Counter()
        items = _unseen(group_items(listing), source.uri, history.seen, skipped)
        index_start = len(history.index)
        staging.delete(PARTITION_DONE)
        run = _IngestRun(
            cfg,
            source,
            staging,
            run_id=run_id,
            index=history.index,
            first_shard=0,
            used_keys=history.used_keys,
            progress_total=desc["objects"],
            progress=progress,
        )
        run.run(items)
    run.upload_report("report.jsonl")
    staging.write_bytes("index.npz", history.index.to_bytes(start=index_start))
    record = _run_record(
        run,
        source_uri=source.uri,
        fingerprint=listing.fingerprint,
        listed=listing.count,
        previously_seen=skipped["objects"],
        report="report.jsonl",
        index="index.npz",
        incremental=bool(history.runs),
    )
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
        listed=c["listed"],
        previously_seen=c["previously_seen"],
        sidecars=c["sidecars"],
        ingested=c["ingested"],
        duplicate=c["duplicate"],
        rejected=c["rejected"],
        duplicate_by_kind=c["duplicate_by_kind"],
        rejected_by_reason=c["rejected_by_reason"],
        paired=c["paired"],
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
            raise ValueError(
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
        raise ValueError(
            f"staging areas do not form one complete plan: sources {sorted(sources)}, partitions "
            f"{indices} of {expected}; merge the staging areas of exactly one plan_partitions call"
        )
    return staged


def merge_partitions(
    cfg: IngestConfig, staging_uris: list[str], dataset_uri: str, progress: bool = False
) -> IngestResult:
    """Merge staged partitions into the dataset: deduplicate across partitions (and, with
    cfg.incremental, against the dataset's earlier runs), repack into final shards, write one
    report for the whole run, and the manifest last."""
    staged = _read_staged(list(staging_uris))
    source_uri = staged[0][1]["partition"]["source_uri"]
    fingerprint = hashlib.sha256(
        "".join(done["run"]["fingerprint"] for _, done in staged).encode()
    ).hexdigest()
    store = Storage.from_uri(dataset_uri)
    manifest = read_manifest(store)
    if not cfg.incremental and _up_to_date(manifest, cfg, source_uri, fingerprint):
        return _result_from_manifest(store, manifest, up_to_date=True)
    history = _load_history(store, cfg, manifest)
    index_start = len(history.index)
    run_id = new_run_id()
    writer = ShardWriter(
        store, first_index=_next_shard_index(manifest), max_bytes=cfg.shard_max_bytes
    )
    stats: dict[str, Any] = {}
    for _, done in staged:
        stats = _add_nested(
            stats, {k: v for k, v in done["run"]["stats"].items() if k != "elapsed_s"}
        )
    counts: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    histograms: dict[str, Counter[str]] = {
        k: Counter()
        for k in (
            "resolution_histogram",
            "source_short_side_histogram",
            "source_formats",
            "source_modes",
        )
    }
    changed: dict[str, dict] = {}  # source key -> fields replacing its staged report row

    def seen_before(source_key: str) -> bool:  # ingested by an earlier run (incremental mode)
        return (source_uri, source_key) in history.seen

    started = time.monotonic()
    try:
        for staging, done in staged:
            for shard in done["shards"]:
                for _, files in iter_shard_records(staging, shard["name"]):
                    sample = json.loads(files["json"])
                    if seen_before(sample["source_key"]):
                        continue
                    digest, phash = bytes.fromhex(sample["sha256"]), int(sample["phash"], 16)
                    match = history.index.find_exact(digest) or history.index.find_near(phash)
                    if match is not None:  # a duplicate of an image in another partition / run
                        changed[sample["source_key"]] = {
                            "outcome": "duplicate",
                            "reason": match.kind,
                            "duplicate_of": match.key,
                            "distance": match.distance,
                        }
                        continue
                    if sample["key"] in history.used_keys:
                        tag = hashlib.sha256(
                            f"{source_uri}\t{sample['source_key']}".encode()
                        ).hexdigest()[:8]
                        sample["key"] = f"{sample['key']}-{tag}"
                    history.used_keys.add(sample["key"])
                    image_ext = cfg.image_format
                    name = writer.add(sample["key"], image_ext, files[image_ext], sample)
                    history.index.add(sample["key"], digest, phash)
                    changed[sample["source_key"]] = {"key": sample["key"], "shard": name}
                    counts["captioned"] += sample["caption"] is not None
                    counts["paired"] += sample["paired"]
                    histograms["resolution_histogram"][f"{sample['width']}x{sample['height']}"] += 1
                    histograms["source_short_side_histogram"][
                        _short_side_bin(sample["source_width"], sample["source_height"])
                    ] += 1
                    histograms["source_formats"][sample["source_format"]] += 1
                    histograms["source_modes"][sample["source_mode"]] += 1
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()

    # One report for the run: the staged rows in partition order, with the merge's decisions;
    # the run's counts are those of the rows written.
    report_key, index_key = f"reports/ingest-{run_id}.jsonl", f"index/dedup-{run_id}.npz"
    with tempfile.TemporaryDirectory(prefix="lumos-merge-") as tmp:
        report_path = Path(tmp) / "report.jsonl"
        with open(report_path, "w", encoding="utf-8") as out:
            for staging, done in staged:
                with staging.open_read(done["run"]["report"]) as stream:
                    for line in stream:
                        row = json.loads(line)
                        if seen_before(row["source_key"]):
                            continue
                        update = (
                            changed.get(row["source_key"]) if row["outcome"] == "ingested" else None
                        )
                        if update is not None and update.get("outcome") == "duplicate":
                            row = {
                                k: v for k, v in row.items() if k not in ("key", "shard", "paired")
                            }
                        if update is not None:
                            row.update(update)
                        out.write(json.dumps(row, sort_keys=True) + "\n")
                        counts[row["outcome"]] += 1
                        counts["sidecars"] += len(row.get("sidecars", []))
                        if row["outcome"] == "rejected":
                            by_reason[row["reason"]] += 1
                        elif row["outcome"] == "duplicate":
                            by_kind[row["reason"]] += 1
        store.upload_file(report_path, report_key)
    store.write_bytes(index_key, history.index.to_bytes(start=index_start))
    listed = sum(done["run"]["counts"]["listed"] for _, done in staged)
    reported = sum(counts[k] for k in ("sidecars", "ingested", "duplicate", "rejected"))
    run_counts = {
        "listed": listed,
        "previously_seen": listed - reported,
        "sidecars": counts["sidecars"],
        "ingested": counts["ingested"],
        "duplicate": counts["duplicate"],
        "rejected": counts["rejected"],
        "duplicate_by_kind": dict(sorted(by_kind.items())),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "captioned": counts["captioned"],
        "paired": counts["paired"],
    }
    assert counts["ingested"] == sum(s.count for s in shards), "merge: report and shards disagree"
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
    committed = _commit(store, cfg, history, record, shards)
    return _result_from_manifest(store, committed, up_to_date=False)
