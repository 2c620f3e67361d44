"""Webdataset tar shards: `key.jpg|key.png` + `key.json` per sample, written and read as streams.

Shards are written to a local temporary file and then uploaded whole (an S3 PUT, a local rename),
so a shard object is always complete. Tar headers carry fixed metadata (mtime 0, no owner), so
the same samples give byte-identical shards: re-running an ingest is idempotent to the byte.
"""

from __future__ import annotations

import json
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lumos.storage import Storage

SHARD_PREFIX = "shards"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.tar"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to <dataset>/shards/
    count: int
    bytes: int

    def to_json(self) -> dict:
        return {"name": self.name, "count": self.count, "bytes": self.bytes}


_BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)


def tar_member_bytes(name: str, data: bytes) -> bytes:
    """One complete tar member (PAX header, data, padding to 512 bytes) in a single buffer, so
    a sample costs one write instead of tarfile's several. Fixed metadata: mtime 0, no owner."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0
    info.uname = info.gname = ""
    header = info.tobuf(format=tarfile.PAX_FORMAT)
    return header + data + b"\0" * (-len(data) % _BLOCK)


class ShardWriter:
    """Writes samples into numbered shards of at most `max_bytes` each and uploads them."""

    def __init__(self, store: Storage, *, first_index: int, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.next_index = first_index
        self.written: list[ShardInfo] = []
        self._tmpdir = tempfile.TemporaryDirectory(prefix="lumos-shards-")
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._count = 0
        self._bytes = 0

    @property
    def current_name(self) -> str:
        """The name of the shard the next sample goes to (if it fits)."""
        return shard_name(self.next_index)

    def add(self, key: str, image_ext: str, image: bytes, meta: dict) -> str:
        """Append one sample; returns the name of the shard it went into."""
        meta_bytes = json.dumps(meta, sort_keys=True).encode("utf-8")
        record = tar_member_bytes(f"{key}.{image_ext}", image) + tar_member_bytes(
            f"{key}.json", meta_bytes
        )
        if (
            self._file is not None
            and self._bytes + len(record) + len(_END_OF_ARCHIVE) > self.max_bytes
        ):
            self._finish_shard()
        if self._file is None:
            self._path = Path(self._tmpdir.name) / shard_name(self.next_index)
            self._file = open(self._path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in _finish_shard
        self._file.write(record)
        self._count += 1
        self._bytes += len(record)
        return shard_name(self.next_index)

    def _finish_shard(self) -> None:
        assert self._file is not None and self._path is not None
        self._file.write(_END_OF_ARCHIVE)
        self._file.close()
        name = shard_name(self.next_index)
        self.store.upload_file(self._path, f"{SHARD_PREFIX}/{name}")
        self.written.append(ShardInfo(name, self._count, self._path.stat().st_size))
        self._path.unlink()
        self._file, self._path = None, None
        self._count, self._bytes = 0, 0
        self.next_index += 1

    def close(self) -> list[ShardInfo]:
        """Upload the last shard; returns every shard written."""
        if self._file is not None:
            self._finish_shard()
        self._tmpdir.cleanup()
        return self.written

    def abort(self) -> None:
        """Drop the shard in progress (after an error); uploaded shards stay unreferenced."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmpdir.cleanup()


def _split_member_name(name: str) -> tuple[str, str]:
    """("dir/key", "jpg") for "dir/key.jpg": the key ends at the first dot of the base name."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def iter_shard_records(store: Storage, name: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream (key, {extension: bytes}) from one shard, without reading it whole."""
    stream = store.open_read(f"{SHARD_PREFIX}/{name}")
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            key, files = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = _split_member_name(member.name)
                if key is not None and member_key != key:
                    yield key, files
                    files = {}
                key = member_key
                data = tar.extractfile(member)
                files[ext] = data.read() if data is not None else b""
            if key is not None:
                yield key, files
    finally:
        stream.close()
