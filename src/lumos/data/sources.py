"""Raw sources for ingest: a directory, an `s3://` prefix, or a `.tar` archive (local or on S3).

A source lists objects in sorted key order. `group_items` turns that listing into `SourceItem`s:
an image with its sidecars (`name.json` / `name.txt` beside `name.png`), or a lone object that
ingest will reject (`orphan_sidecar`, `unsupported_extension`). Every listed object belongs to
exactly one item, which is what makes the ingest report complete.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lumos.data.decode import IMAGE_EXTENSIONS
from lumos.errors import DatasetError
from lumos.storage import LocalStorage, ObjectInfo, ObjectNotFound, Storage, StorageError
from lumos.tempdirs import OwnedTemporaryDirectory

SIDECAR_EXTENSIONS = (".json", ".txt")


def split_extension(key: str) -> tuple[str, str]:
    """("dir/name", ".png") for "dir/name.png"; ("dir/README", "") for "dir/README"."""
    slash = key.rfind("/")
    dot = key.rfind(".")
    if dot <= slash + 1:  # no dot in the base name, or a dotfile such as ".DS_Store"
        return key, ""
    return key[:dot], key[dot:].lower()


_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-/]")


def dataset_key(stem: str) -> str:
    """A webdataset-safe sample key from a source stem, readable and stable: "views/obj-0007-v03"
    -> "views__obj-0007-v03". No dots (webdataset splits the extension at the first dot of the
    base name) and no slashes (readers may key samples by base name)."""
    parts = [p for p in stem.split("/") if p not in ("", ".", "..")]
    key = "__".join(_UNSAFE_KEY_CHARS.sub("_", p) for p in parts)
    return key or "_"


@dataclass(frozen=True)
class SourceItem:
    """The unit of ingest: one image (with its sidecars), or one object to reject."""

    source_key: str
    size: int
    version: str  # changes when the object's content changes
    kind: str  # "image", "orphan_sidecar" or "unsupported_extension"
    key: str = ""  # the dataset key (images only)
    sidecars: tuple[str, ...] = ()
    sidecar_versions: tuple[str, ...] = ()  # the sidecars' versions, in the same order

    @property
    def all_keys(self) -> tuple[str, ...]:
        return (self.source_key, *self.sidecars)

    @property
    def version_tag(self) -> str:
        """16 hex digits that change when the item's object or any of its sidecars changes (the
        report records it, so a later incremental run can tell what changed since)."""
        versions = zip(self.all_keys, (self.version, *self.sidecar_versions), strict=True)
        text = "\n".join(f"{key}\t{version}" for key, version in versions)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _StemGroup:
    stem: str
    objects: list[ObjectInfo] = field(default_factory=list)


def _resolve_group(group: _StemGroup) -> list[SourceItem]:
    images = [o for o in group.objects if split_extension(o.key)[1] in IMAGE_EXTENSIONS]
    sidecars = [o for o in group.objects if split_extension(o.key)[1] in SIDECAR_EXTENSIONS]
    others = [o for o in group.objects if o not in images and o not in sidecars]
    items: list[SourceItem] = []
    for obj in images:
        key = dataset_key(group.stem)
        if len(images) > 1:  # name.png and name.jpg side by side: keep both, apart
            key = f"{key}_{split_extension(obj.key)[1].lstrip('.')}"
        items.append(
            SourceItem(
                source_key=obj.key,
                size=obj.size,
                version=obj.version,
                kind="image",
                key=key,
                sidecars=tuple(s.key for s in sidecars),
                sidecar_versions=tuple(s.version for s in sidecars),
            )
        )
    if not images:
        items += [SourceItem(o.key, o.size, o.version, "orphan_sidecar") for o in sidecars]
    items += [SourceItem(o.key, o.size, o.version, "unsupported_extension") for o in others]
    return sorted(items, key=lambda item: item.source_key)


def group_items(objects: Iterable[ObjectInfo]) -> Iterator[SourceItem]:
    """Group a sorted listing into items, streaming: a stem's objects ("stem.*") are contiguous
    in sorted order, so a group is complete as soon as a key outside "stem." arrives."""
    pending: list[_StemGroup] = []  # a stack: "a/b" may be open while "a/b.q" is grouped
    for obj in objects:
        stem, _ = split_extension(obj.key)
        while pending and not obj.key.startswith(pending[-1].stem + "."):
            yield from _resolve_group(pending.pop())
        if pending and pending[-1].stem == stem:
            pending[-1].objects.append(obj)
        else:
            pending.append(_StemGroup(stem, [obj]))
    while pending:
        yield from _resolve_group(pending.pop())


def group_boundaries(objects: Iterable[ObjectInfo]) -> Iterator[tuple[str, int]]:
    """(last key, objects so far) at every point where no stem group is open: safe partition ends."""
    pending: list[str] = []
    count = 0
    last = None
    for obj in objects:
        stem, _ = split_extension(obj.key)
        while pending and not obj.key.startswith(pending[-1] + "."):
            pending.pop()
        if not pending and last is not None:
            yield last, count
        if not pending or pending[-1] != stem:
            pending.append(stem)
        count += 1
        last = obj.key
    if last is not None:
        yield last, count


class Source:
    """Lists and reads the objects of a raw source URI (directory, s3:// prefix, or .tar)."""

    def __init__(self, uri: str) -> None:
        uri = uri.rstrip("/")
        self.is_tar = uri.endswith(".tar")
        if self.is_tar and not uri.startswith("s3://"):  # canonical: an absolute local path
            uri = str(Path(uri.removeprefix("file://")).expanduser().absolute())
        self.uri = uri
        self._tar: tarfile.TarFile | None = None
        self._tar_members: dict[str, tarfile.TarInfo] = {}
        self._tar_lock = threading.Lock()
        self._tmpdir: OwnedTemporaryDirectory | None = None
        if self.is_tar:
            self._open_tar()
            self.store = None
        else:
            self.store = Storage.from_uri(self.uri)
            self.uri = self.store.uri  # canonical, so re-runs recognise the same source
            if isinstance(self.store, LocalStorage) and not self.store.root.is_dir():
                raise StorageError(f"source directory {self.store.root} does not exist")

    def _open_tar(self) -> None:
        parent_uri, _, name = self.uri.rpartition("/")
        if self.uri.startswith("s3://"):
            # Stream the archive to local disk once (bounded memory), then read members by offset.
            self._tmpdir = OwnedTemporaryDirectory("lumos-ingest-tar-")
            path = Path(self._tmpdir.name) / name
            Storage.from_uri(parent_uri).download_file(name, path)
        else:
            path = Path(self.uri)
            if not path.is_file():
                raise StorageError(f"no tar archive at {self.uri}")
        try:
            self._tar = tarfile.open(path, "r:")  # noqa: SIM115 - closed by close()
            # Files, and links to files (tar stores a second name of a file as a hard link).
            members = [m for m in self._tar.getmembers() if m.isfile() or m.islnk() or m.issym()]
        except (tarfile.TarError, OSError) as err:
            raise StorageError(f"cannot read tar archive {self.uri}: {err}") from err
        for (
            member
        ) in members:  # a later member of the same name replaces an earlier one, as tar does
            self._tar_members[member.name.removeprefix("./")] = member

    def _tar_file(self, member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        """The file member a (chain of) link member(s) names, itself for a file; None when a
        link leads outside the archive or in a circle."""
        for _ in range(16):
            if member.isfile():
                return member
            target = member.linkname  # a hard link names an archive path; a symlink a relative one
            if member.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), target))
            found = self._tar_members.get(target.removeprefix("./"))
            if found is None:
                return None
            member = found
        return None

    def list(
        self, start_after: str | None = None, last_key: str | None = None
    ) -> Iterator[ObjectInfo]:
        """Objects in sorted key order with start_after < key <= last_key (None: unbounded)."""
        if self.is_tar:
            listing: Iterable[ObjectInfo] = (
                ObjectInfo(name, (self._tar_file(m) or m).size, None, float(m.mtime))
                for name, m in sorted(self._tar_members.items())
            )
        else:
            if self.store is None:
                raise RuntimeError("broken invariant: self.store is not None")
            listing = self.store.list()
        for obj in listing:
            if start_after is not None and obj.key <= start_after:
                continue
            if last_key is not None and obj.key > last_key:
                return
            yield obj

    def read(self, key: str) -> bytes:
        if not self.is_tar:
            if self.store is None:
                raise RuntimeError("broken invariant: self.store is not None")
            return self.store.read_bytes(key)
        member = self._tar_members.get(key)
        if member is None:
            raise ObjectNotFound(f"no member {key!r} in {self.uri}")
        if self._tar is None:
            raise RuntimeError(f"{self.uri} is closed")
        target = self._tar_file(member)
        if target is None:
            raise StorageError(
                f"member {key!r} of {self.uri} is a link to {member.linkname!r}, which is not a "
                "file in the archive"
            )
        with self._tar_lock:  # one file position: members are read one at a time
            try:
                stream = self._tar.extractfile(target)
                if stream is None:
                    raise StorageError(f"member {key!r} of {self.uri} is not a regular file")
                return stream.read()
            except (tarfile.TarError, OSError) as err:
                raise StorageError(f"cannot read member {key!r} of {self.uri}: {err}") from err

    @property
    def read_threads(self) -> int:
        """Concurrent reads worth having: many for object storage (each read waits on the network),
        two for local files (more only contend for the GIL), one for a tar archive (its reads share
        one file position).
        """
        if self.is_tar:
            return 1
        return 2 if isinstance(self.store, LocalStorage) else 16

    def key_uri(self, key: str) -> str:
        return f"{self.uri}#{key}" if self.is_tar else f"{self.uri}/{key}"

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_with_retries(
    read: Callable[[str], bytes],
    key: str,
    *,
    max_retries: int,
    backoff_s: float,
    sleep: Callable[[float], None] = time.sleep,
) -> bytes:
    """Read an object, retrying transient storage errors with exponential backoff.

    A missing object is not transient (no retry). The last error is raised after max_retries.
    """
    for attempt in range(max_retries + 1):
        try:
            return read(key)
        except ObjectNotFound:
            raise
        except StorageError:
            if attempt == max_retries:
                raise
            sleep(backoff_s * 2**attempt)
    raise AssertionError("unreachable")


def parse_sidecars(sidecars: dict[str, bytes]) -> tuple[dict, str | None]:
    """(meta, caption) from a JSON sidecar (its keys become `meta`) and/or a .txt caption.

    Raises ValueError with what is wrong when a sidecar is not valid.
    """
    meta: dict = {}
    caption: str | None = None
    for key, data in sorted(sidecars.items()):
        ext = split_extension(key)[1]
        if ext == ".json":
            try:
                obj = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                raise DatasetError(f"{key}: not valid UTF-8 JSON ({err})") from err
            if not isinstance(obj, dict):
                raise DatasetError(
                    f"{key}: a JSON sidecar must hold an object, got {type(obj).__name__}"
                )
            meta.update(obj)
            if isinstance(obj.get("caption"), str) and obj["caption"].strip():
                caption = obj["caption"].strip()
        elif ext == ".txt":
            try:
                text = data.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise DatasetError(f"{key}: caption is not UTF-8 text ({err})") from err
            if text and caption is None:
                caption = text
    return meta, caption
