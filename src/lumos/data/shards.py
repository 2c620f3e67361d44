"""Webdataset tar shards: `key.jpg|key.png` + `key.json` per sample, written and read as streams.

Shards are written to a local temporary file and uploaded whole in the background (an S3 PUT, a
local rename), so a shard object is always complete. Tar headers carry fixed metadata (mtime 0, no
owner), so the same samples give byte-identical shards: re-running an ingest is idempotent to the
byte.

A shard's name is its position and a hash of its bytes (`shard-00003-<sha256[:16]>.tar`), so a
name always stands for the same bytes: two ingests that build on one manifest at once and bring
different images write different names, and the one that loses the manifest's commit never
replaces a shard the winner's manifest names (identical names are identical bytes). The name is
known when the shard is finished; until then a sample's shard goes by its position
(`pending_name`), which `final_name` maps to the name.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lumos.storage import Storage
from lumos.tempdirs import OwnedTemporaryDirectory

SHARD_PREFIX = "shards"


_NAME_DIGITS = 16  # hex digits of the SHA-256 in a name: 64 bits, no collision in practice


def pending_name(index: int) -> str:
    """What a sample's shard is called until that shard is finished (see `ShardWriter`)."""
    return f"shard-{index:05d}.tar"


def shard_name(index: int, sha256_hex: str) -> str:
    return f"shard-{index:05d}-{sha256_hex[:_NAME_DIGITS]}.tar"


_INDEX_IN_NAME = re.compile(r"shard-(\d+)(?:-[0-9a-f]+)?\.tar")


def shard_index(name: str) -> int:
    """The position in a shard's name (`shard-00003-<hash>.tar`, or `shard-00003.tar` as
    datasets written before names carried a hash call it)."""
    match = _INDEX_IN_NAME.fullmatch(name)
    if match is None:
        raise ValueError(f"{name!r} is not a shard name")
    return int(match.group(1))


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to <dataset>/shards/
    count: int
    bytes: int

    def to_json(self) -> dict:
        return {"name": self.name, "count": self.count, "bytes": self.bytes}


_BLOCK = 512
_END_OF_ARCHIVE = b"\0" * (2 * _BLOCK)


def _ustar_header(name: bytes, size: int) -> bytes:
    """A POSIX ustar header for a regular file (mode 0444, mtime 0, no owner), built directly:
    several times cheaper than tarfile's general TarInfo.tobuf."""
    header = bytearray(_BLOCK)
    header[0 : len(name)] = name
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def tar_member_bytes(name: str, data: bytes) -> bytes:
    """One complete tar member (header, data, padding to 512 bytes) in a single buffer, so a
    sample costs one write instead of tarfile's several. Fixed metadata: mtime 0, no owner."""
    encoded = name.encode("utf-8")
    if len(encoded) < 100 and encoded.isascii() and len(data) < 8**11:
        header = _ustar_header(encoded, len(data))
    else:  # long or non-ASCII names need a PAX extended header
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o444
        info.mtime = 0
        info.uname = info.gname = ""
        header = info.tobuf(format=tarfile.PAX_FORMAT)
    return header + data + b"\0" * (-len(data) % _BLOCK)


class ShardWriter:
    """Writes samples into numbered shards of at most `max_bytes` each and uploads them.

    `add` returns the shard's pending name; once the shard is finished, `final_name` maps it to
    the name the shard is uploaded as (`close` finishes the last one)."""

    def __init__(self, store: Storage, *, first_index: int, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.next_index = first_index
        self.written: list[ShardInfo] = []
        self._final: dict[str, str] = {}  # pending name -> name, of every finished shard
        self._tmpdir = OwnedTemporaryDirectory("lumos-shards-")
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._count = 0
        self._bytes = 0
        self._hash = hashlib.sha256()
        # Uploads run in the background, one at a time, while the next shard fills: a 1 GB PUT
        # does not stall decoding, and at most two shards sit on local disk.
        self._uploader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lumos-shard-upload")
        self._upload: Future | None = None

    def add(self, key: str, image_ext: str, image: bytes, meta: dict) -> str:
        """Append one sample; returns the pending name of the shard it went into."""
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
            self._path = Path(self._tmpdir.name) / pending_name(self.next_index)
            self._file = open(self._path, "wb", buffering=1 << 20)  # noqa: SIM115 - closed in _finish_shard
        self._file.write(record)
        self._hash.update(record)
        self._count += 1
        self._bytes += len(record)
        return pending_name(self.next_index)

    def _finish_shard(self) -> None:
        if self._file is None or self._path is None:
            raise RuntimeError(
                "broken invariant: self._file is not None and self._path is not None"
            )
        self._file.write(_END_OF_ARCHIVE)
        self._file.close()
        self._hash.update(_END_OF_ARCHIVE)
        name, path = shard_name(self.next_index, self._hash.hexdigest()), self._path
        self._final[pending_name(self.next_index)] = name
        self.written.append(ShardInfo(name, self._count, path.stat().st_size))
        self._wait_for_upload()
        self._upload = self._uploader.submit(self._upload_and_remove, path, name)
        self._file, self._path = None, None
        self._count, self._bytes, self._hash = 0, 0, hashlib.sha256()
        self.next_index += 1

    def final_name(self, pending: str) -> str:
        """The name of the finished shard `add` called `pending`."""
        return self._final[pending]

    def _upload_and_remove(self, path: Path, name: str) -> None:
        self.store.upload_file(path, f"{SHARD_PREFIX}/{name}")
        path.unlink()

    def _wait_for_upload(self) -> None:
        if self._upload is not None:
            self._upload.result()  # raises the upload's StorageError, if any
            self._upload = None

    def close(self) -> list[ShardInfo]:
        """Upload the last shard and wait for every upload; returns every shard written."""
        if self._file is not None:
            self._finish_shard()
        self._wait_for_upload()
        self._uploader.shutdown()
        self._tmpdir.cleanup()
        return self.written

    def abort(self) -> None:
        """Drop the shard in progress (after an error); uploaded shards stay unreferenced."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._uploader.shutdown(wait=True, cancel_futures=True)
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
