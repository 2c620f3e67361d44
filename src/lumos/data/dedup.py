"""Exact and near-duplicate detection.

Exact duplicates: SHA-256 of the source bytes (checked before decoding, so a duplicate costs no
decode). Near duplicates: a 64-bit DCT perceptual hash (pHash) of the prepared image, compared by
Hamming distance. The index finds every stored hash within distance d of a query without a full
scan: split the 64 bits into d + 1 chunks; two hashes within distance d agree exactly on at least
one chunk (pigeonhole), so only hashes sharing a chunk value are compared.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

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


class DedupIndex:
    """Keys of kept images by content digest and perceptual hash; first seen wins."""

    def __init__(self, near_distance: int | None) -> None:
        self.near_distance = near_distance
        self._by_digest: dict[bytes, str] = {}
        self._keys: list[str] = []
        self._hashes: list[int] = []
        self._digests: list[bytes] = []
        self._chunks = self._chunk_bounds(near_distance)
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._chunks]

    @staticmethod
    def _chunk_bounds(near_distance: int | None) -> list[tuple[int, int]]:
        if near_distance is None:
            return []
        n = near_distance + 1
        edges = [round(i * 64 / n) for i in range(n + 1)]
        return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]

    def _chunk_values(self, phash: int) -> list[int]:
        return [(phash >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self._chunks]

    def __len__(self) -> int:
        return len(self._keys)

    def find_exact(self, digest: bytes) -> DuplicateMatch | None:
        key = self._by_digest.get(digest)
        return DuplicateMatch(key, "exact", 0) if key is not None else None

    def find_near(self, phash: int) -> DuplicateMatch | None:
        """The closest stored image within near_distance (ties: the earliest); None if disabled."""
        if self.near_distance is None:
            return None
        best: tuple[int, int] | None = None  # (distance, index)
        for table, value in zip(self._tables, self._chunk_values(phash), strict=True):
            for idx in table.get(value, ()):
                dist = hamming_distance(phash, self._hashes[idx])
                if dist <= self.near_distance and (best is None or (dist, idx) < best):
                    best = (dist, idx)
        if best is None:
            return None
        return DuplicateMatch(self._keys[best[1]], "near", best[0])

    def add(self, key: str, digest: bytes, phash: int) -> None:
        idx = len(self._keys)
        self._keys.append(key)
        self._hashes.append(phash)
        self._digests.append(digest)
        self._by_digest.setdefault(digest, key)
        for table, value in zip(self._tables, self._chunk_values(phash), strict=True):
            table.setdefault(value, []).append(idx)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def to_bytes(self, start: int = 0) -> bytes:
        """Serialise entries [start:] (keys, digests, hashes) as .npz, for later incremental runs."""
        buf = io.BytesIO()
        np.savez(
            buf,
            keys=np.array(self._keys[start:], dtype=np.str_),
            digests=np.array(self._digests[start:], dtype="S32"),
            phashes=np.array(self._hashes[start:], dtype=np.uint64),
        )
        return buf.getvalue()

    def load_bytes(self, data: bytes) -> None:
        """Add every entry of a serialised index (in its order)."""
        with np.load(io.BytesIO(data)) as arrays:
            keys, digests, phashes = arrays["keys"], arrays["digests"], arrays["phashes"]
            for key, digest, phash in zip(keys, digests, phashes, strict=True):
                self.add(str(key), bytes(digest).ljust(32, b"\0"), int(phash))
