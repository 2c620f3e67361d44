"""Exact and near-duplicate detection.

Exact duplicates: SHA-256 of the source bytes (checked before decoding, so a duplicate costs no
decode). Near duplicates: a 64-bit DCT perceptual hash (pHash) of the prepared image, compared by
Hamming distance. The index finds every stored hash within distance d of a query without a full
scan: split the 64 bits into d + 1 chunks; two hashes within distance d agree exactly on at least
one chunk (pigeonhole), so only hashes sharing a chunk value are compared. The index lives on
local disk (lumos.data.scratch), so ingest's memory does not grow with the dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from lumos.data.scratch import ScratchDB

_HASH_SIZE = 8  # 8x8 low-frequency DCT coefficients -> 64 bits
_DCT_SIZE = 32  # the image is reduced to 32x32 grayscale before the DCT


def _dct_matrix(n: int) -> np.ndarray:
    # Unnormalised DCT-II basis (as scipy.fftpack.dct): a common scale does not change the median test.
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * k * (2 * i + 1) / (2 * n))  # (n, n)


# (8, 32): only the low frequencies are kept. float32: the hash needs signs against a median.
_DCT_LOW = _dct_matrix(_DCT_SIZE)[:_HASH_SIZE].astype(np.float32)


def sha256_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def perceptual_hash(img: Image.Image) -> int:
    """64-bit pHash: 32x32 grayscale, 2D DCT, the 8x8 lowest frequencies above their median."""
    # reducing_gap=1: an integer box reduction first (Image.reduce, several times faster than a
    # box resize over the whole image), then the box resize of what is left; for an exact
    # multiple of 32 (256 px) the result is the same box average.
    small = img.convert("L").resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.BOX, reducing_gap=1.0)
    pixels = np.asarray(small, dtype=np.float32)  # (32, 32)
    low = (_DCT_LOW @ pixels @ _DCT_LOW.T).ravel()  # (64,), rows: vertical frequency
    bits = low > np.median(low)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming_distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


@dataclass(frozen=True)
class DuplicateMatch:
    key: str  # the dataset key of the earlier image
    kind: str  # "exact" or "near"
    distance: int  # Hamming distance of the perceptual hashes (0 for exact)


def _signed(value: int) -> int:
    """An unsigned 64-bit value as the signed integer SQLite stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _unsigned(value: int) -> int:
    """The unsigned 64-bit value of a signed integer SQLite returns."""
    return value & ((1 << 64) - 1)


class DedupIndex:
    """Keys of kept images by content digest and perceptual hash; first seen wins.

    Held in a ScratchDB (local disk, SQLite) rather than in memory, so that it stays bounded
    whatever the dataset size: `entries` in insertion order, and one posting per hash chunk
    for the near-duplicate lookups. Its entries are saved with each run as gzip'd JSON lines
    (`export`) and loaded back by later incremental runs (`load`).
    """

    def __init__(self, near_distance: int | None, db: ScratchDB | None = None) -> None:
        self.near_distance = near_distance
        # Without a db (a standalone index): its own, removed when the index is collected.
        self._db = db if db is not None else ScratchDB()
        self._conn = self._db.conn
        self._conn.execute(
            "CREATE TABLE entries (idx INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, "
            "digest BLOB NOT NULL, phash INTEGER NOT NULL)"
        )
        self._conn.execute("CREATE INDEX entries_digest ON entries (digest, idx)")
        # Postings carry the whole hash, so a lookup reads only this table's own B-tree.
        self._conn.execute(
            "CREATE TABLE chunks (part INTEGER, value INTEGER, idx INTEGER, phash INTEGER, "
            "PRIMARY KEY (part, value, idx)) WITHOUT ROWID"
        )
        self._chunks = self._chunk_bounds(near_distance)
        # Every stored image sharing a chunk value with the query, in one statement.
        self._near_query = "SELECT idx, phash FROM chunks WHERE " + " OR ".join(
            ["(part = ? AND value = ?)"] * len(self._chunks)
        )
        self._count = 0

    @staticmethod
    def _chunk_bounds(near_distance: int | None) -> list[tuple[int, int]]:
        if near_distance is None:
            return []
        n = near_distance + 1
        edges = [round(i * 64 / n) for i in range(n + 1)]
        return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    def _chunk_values(self, phash: int) -> list[int]:
        return [_signed((phash >> lo) & ((1 << (hi - lo)) - 1)) for lo, hi in self._chunks]

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: str) -> bool:
        """Whether a kept image has this dataset key."""
        return (
            self._conn.execute("SELECT 1 FROM entries WHERE key = ?", (key,)).fetchone() is not None
        )

    def find_exact(self, digest: bytes) -> DuplicateMatch | None:
        row = self._conn.execute(
            "SELECT key FROM entries WHERE digest = ? ORDER BY idx LIMIT 1", (digest,)
        ).fetchone()
        return DuplicateMatch(row[0], "exact", 0) if row is not None else None

    def find_near(self, phash: int) -> DuplicateMatch | None:
        """The closest stored image within near_distance (ties: the earliest); None if disabled."""
        if self.near_distance is None:
            return None
        params = [v for part, value in enumerate(self._chunk_values(phash)) for v in (part, value)]
        best: tuple[int, int] | None = None  # (distance, idx)
        for idx, stored in self._conn.execute(self._near_query, params):
            dist = hamming_distance(phash, _unsigned(stored))
            if dist <= self.near_distance and (best is None or (dist, idx) < best):
                best = (dist, idx)
        if best is None:
            return None
        (key,) = self._conn.execute("SELECT key FROM entries WHERE idx = ?", (best[1],)).fetchone()
        return DuplicateMatch(key, "near", best[0])

    def add(self, key: str, digest: bytes, phash: int) -> None:
        idx = self._count
        self._conn.execute(
            "INSERT INTO entries (idx, key, digest, phash) VALUES (?, ?, ?, ?)",
            (idx, key, digest, _signed(phash)),
        )
        self._conn.executemany(
            "INSERT INTO chunks (part, value, idx, phash) VALUES (?, ?, ?, ?)",
            [
                (part, value, idx, _signed(phash))
                for part, value in enumerate(self._chunk_values(phash))
            ],
        )
        self._count += 1

    def export(self, path: Path, start: int = 0) -> None:
        """Write entries [start:] (key, SHA-256, pHash) to `path` as gzip'd JSON lines, streamed."""
        with gzip.open(path, "wt", encoding="utf-8") as out:
            rows = self._conn.execute(
                "SELECT key, digest, phash FROM entries WHERE idx >= ? ORDER BY idx", (start,)
            )
            for key, digest, phash in rows:
                out.write(
                    json.dumps(
                        {"key": key, "sha256": digest.hex(), "phash": f"{_unsigned(phash):016x}"}
                    )
                    + "\n"
                )

    def load(self, stream: BinaryIO, name: str) -> None:
        """Add every entry of an exported index (in its order); `name` ending in .npz reads the
        in-memory format of datasets written before the index moved to disk."""
        if name.endswith(".npz"):
            with np.load(io.BytesIO(stream.read())) as arrays:
                entries = zip(arrays["keys"], arrays["digests"], arrays["phashes"], strict=True)
                for key, digest, phash in entries:
                    self.add(str(key), bytes(digest).ljust(32, b"\0"), int(phash))
            return
        with gzip.open(stream, "rt", encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                self.add(row["key"], bytes.fromhex(row["sha256"]), int(row["phash"], 16))
