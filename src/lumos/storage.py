"""One interface over a local directory and an S3 / MinIO prefix.

    store = Storage.from_uri("s3://bucket/prefix")   # or "/local/dir" or "file:///local/dir"
    store.write_json("manifest.json", {...})          # atomic: readers see the old object or the new one
    for obj in store.list("shards/"):                 # recursive, sorted by key
        data = store.read_bytes(obj.key)

Keys are "/"-separated paths relative to the store's root. S3 endpoint and credentials come from the
environment, as a Kubernetes secret provides them: `LUMOS_S3_ENDPOINT` (e.g. http://minio:9000),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and optionally `LUMOS_S3_REGION`.

Every failure is a `StorageError` (or its subclass `ObjectNotFound`) whose message names the URI.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar, cast
from urllib.parse import urlparse

from lumos.errors import LumosError
from lumos.tempdirs import OwnedTemporaryDirectory

_T = TypeVar("_T")

# Temporary files of atomic local writes, and staging directories, carry this marker; `list`
# never shows them.
_TMP_MARKER = ".lumos-tmp-"


class StorageError(LumosError, RuntimeError):
    """A storage operation failed; the message names the URI and what to do."""


class ObjectNotFound(StorageError):
    """The object does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write (`write_bytes(..., if_version=...)` or `if_absent=True`) found the
    object changed, gone or present: another writer got there first."""


class DiskFull(StorageError):
    """A local write ran out of disk space. The message names the path, the bytes the write
    needed and the bytes free; nothing partial was left under the name a reader trusts."""


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC as Python raises it, and as torch.save (RuntimeError) and safetensors (its own
    error type) word it."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return "No space left on device" in text or "StorageFull" in text or "os error 28" in text


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def disk_full_error(
    path: str | Path, needed: int | None, err: BaseException, at_least: bool = False
) -> DiskFull:
    """The `DiskFull` for `err` raised writing `path` (`needed` bytes, None if unknown; with
    `at_least`, a lower bound)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
        free = f"{_human(st.f_bavail * st.f_frsize)} free"
    except OSError:
        free = "free space unknown"
    need = "size needed unknown"
    if needed is not None:
        need = f"{'at least ' if at_least else ''}{_human(needed)} needed"
    return DiskFull(
        f"no space left on device writing {path}: {need}, {free} on the filesystem of {probe}; "
        "free space there or point the output elsewhere"
    )


@contextlib.contextmanager
def reporting_disk_full(
    path: str | Path, needed: int | None = None, at_least: bool = False
) -> Iterator[None]:
    """Turn a disk-full error raised inside into a `DiskFull` naming `path` and `needed` bytes."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as err:
        if _is_disk_full(err):
            raise disk_full_error(path, needed, err, at_least) from err
        raise


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store's root, "/"-separated
    size: int  # bytes
    etag: str | None = None  # S3 ETag (None for local files)
    mtime: float | None = None  # seconds since the epoch

    @property
    def version(self) -> str:
        """A string that changes when the object's content changes (ETag, else size and mtime)."""
        return self.etag or f"{self.size}:{self.mtime}"


def _check_condition(if_version: str | None, if_absent: bool) -> None:
    if if_absent and if_version is not None:
        raise ValueError("a conditional write takes if_version or if_absent, not both")


def _file_version(st: os.stat_result) -> str:
    """A local file's version: every write replaces the file (a new inode), so this changes."""
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in key.split("/")):
        raise StorageError(
            f"invalid storage key {key!r}: use a non-empty relative '/'-separated path "
            "without '.', '..' or empty parts"
        )
    return key


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}/{key}" if prefix else key


class Storage:
    """Base class: `from_uri` picks the backend. Subclasses implement the primitive operations."""

    uri: str

    @staticmethod
    def from_uri(uri: str) -> Storage:
        """`s3://bucket/prefix` -> S3Storage; `/dir`, `relative/dir` or `file:///dir` -> LocalStorage."""
        if not isinstance(uri, str) or not uri:
            raise StorageError(f"storage URI must be a non-empty string, got {uri!r}")
        if uri.startswith("s3://"):
            rest = uri[len("s3://") :]
            bucket, _, prefix = rest.partition("/")
            if not bucket:
                raise StorageError(f"S3 URI {uri!r} has no bucket: use s3://bucket/prefix")
            return S3Storage(bucket, prefix.strip("/"))
        if uri.startswith("file://"):
            parsed = urlparse(uri)
            if parsed.netloc not in ("", "localhost"):
                raise StorageError(f"file URI {uri!r} names a host: use file:///absolute/path")
            return LocalStorage(Path(parsed.path))
        if "://" in uri:
            raise StorageError(
                f"unsupported storage URI {uri!r}: use s3://bucket/prefix, a local path or file:///path"
            )
        return LocalStorage(Path(uri))

    # -- primitives, per backend ---------------------------------------------------------------
    def child(self, sub: str) -> Storage:
        raise NotImplementedError

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def open_read(self, key: str) -> BinaryIO:
        """A readable binary stream of the object (close it after use); for large objects."""
        raise NotImplementedError

    def write_bytes(
        self, key: str, data: bytes, if_version: str | None = None, if_absent: bool = False
    ) -> None:
        """Write an object whole. A compare-and-swap with a condition: `if_version` writes only
        if the object is still the version `read_versioned` returned, `if_absent` only if there
        is no object yet; else `PreconditionFailed`, and nothing is written."""
        raise NotImplementedError

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and a token of exactly that version, for `write_bytes(if_version=)`."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        """Delete an object; deleting a missing object is not an error (as in S3)."""
        raise NotImplementedError

    def upload_file(self, local_path: str | Path, key: str, move: bool = False) -> None:
        """Store a local file as `key`. `move=True` says the caller is done with the file: a
        local store on the same filesystem then renames it into place instead of copying it."""
        raise NotImplementedError

    def download_file(
        self, key: str, local_path: str | Path, if_version: str | None = None
    ) -> None:
        """Copy `key` to a local file (written under a temporary name, then renamed). With
        `if_version` (an `ObjectInfo.version`) only that version: `PreconditionFailed` if the
        object changed since it was listed, and nothing is written."""
        raise NotImplementedError

    def staging_dir(self) -> tempfile.TemporaryDirectory | OwnedTemporaryDirectory:
        """A temporary directory to assemble files in, then `upload_dir(staged, move=True)`.
        For an object store, in the local temp directory, where the next run removes it if this
        one is killed (`lumos.tempdirs`)."""
        return OwnedTemporaryDirectory("lumos-stage-")

    def local_path(self, key: str) -> Path | None:
        """The object's own file when the store is a local directory (to memory-map it), else
        None: the caller downloads it."""
        return None

    def remove_staging(self) -> tuple[str, ...]:
        """Delete the staging directories (`staging_dir`) that writers killed mid-write left
        directly under this store, and return their names. Call it only where nothing else is
        staging now: a training run on its own out_uri. An object store's staging directories
        are in the local temp directory, not in the store: nothing to do."""
        return ()

    # -- shared on top of the primitives -------------------------------------------------------
    def key_uri(self, key: str) -> str:
        """The full URI of `key` (for messages and for handing to other stages)."""
        return f"{self.uri}/{key}" if key else self.uri

    def read_json(self, key: str) -> Any:
        return self.read_json_versioned(key)[0]

    def write_json(
        self, key: str, obj: Any, if_version: str | None = None, if_absent: bool = False
    ) -> None:
        data = json.dumps(obj, indent=2, sort_keys=False).encode("utf-8") + b"\n"
        self.write_bytes(key, data, if_version=if_version, if_absent=if_absent)

    def read_json_versioned(self, key: str) -> tuple[Any, str]:
        """`read_json` and the version token of what was read (see `read_versioned`)."""
        data, version = self.read_versioned(key)
        try:
            return json.loads(data), version
        except ValueError as err:
            raise StorageError(f"{self.key_uri(key)} is not valid JSON: {err}") from err

    def upload_dir(self, local_dir: str | Path, prefix: str = "", move: bool = False) -> None:
        """Upload every file under `local_dir` to `prefix/<relative path>` (`move`: as in
        `upload_file`)."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"cannot upload {local_dir}: not a directory")
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            self.upload_file(path, _join(prefix.strip("/"), rel), move=move)

    def download_dir(self, prefix: str, local_dir: str | Path) -> None:
        """Download every object under `prefix` into `local_dir`, keeping relative paths."""
        local_dir = Path(local_dir)
        prefix = prefix.strip("/")
        list_prefix = f"{prefix}/" if prefix else ""
        found = False
        for obj in self.list(list_prefix):
            found = True
            self.download_file(obj.key, local_dir / obj.key[len(list_prefix) :])
        if not found:
            raise ObjectNotFound(f"nothing to download under {self.key_uri(prefix)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LocalStorage(Storage):
    """A directory on the local filesystem. Writes go to a temporary file, then `os.replace`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def child(self, sub: str) -> LocalStorage:
        sub = sub.strip("/")
        return LocalStorage(self.root / _check_key(sub)) if sub else self

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # Walk only the directory part of the prefix; the rest filters names (S3 prefix semantics).
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.is_dir():
            return iter(())
        return self._infos(self._sorted_keys(base, prefix))

    def _sorted_keys(self, directory: Path, prefix: str) -> Iterator[str]:
        """Keys under `directory` that start with `prefix`, in S3's order (the whole key's),
        streamed: only one directory's entries per level are in memory. A directory sorts as
        its name + "/", which puts its keys exactly where the whole-key order has them."""
        with os.scandir(directory) as scan:
            entries = sorted(
                (e.name + "/" if e.is_dir(follow_symlinks=True) else e.name, e.path) for e in scan
            )
        for name, path in entries:
            key = Path(path).relative_to(self.root).as_posix()
            if name.endswith("/"):
                if _TMP_MARKER in name:
                    continue  # a staging directory (`staging_dir`), not part of the store
                if (key + "/").startswith(prefix) or prefix.startswith(key + "/"):
                    yield from self._sorted_keys(Path(path), prefix)
            elif _TMP_MARKER not in name and key.startswith(prefix):
                yield key

    def _infos(self, keys: Iterable[str]) -> Iterator[ObjectInfo]:
        for key in keys:
            path = self.root / key
            try:
                st = path.stat()
            except FileNotFoundError:
                try:  # a dangling link is still listed: reading it will fail, loudly
                    st = path.lstat()
                except FileNotFoundError:
                    continue  # deleted since the directory walk
            yield ObjectInfo(key=key, size=st.st_size, etag=None, mtime=st.st_mtime)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as err:
            raise ObjectNotFound(f"no object at {path}") from err
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err}") from err

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")  # noqa: SIM115 - the caller closes the stream
        except FileNotFoundError as err:
            raise ObjectNotFound(f"no object at {path}") from err
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err}") from err

    def _tmp_path(self, path: Path) -> Path:
        return path.with_name(f".{path.name}{_TMP_MARKER}{uuid.uuid4().hex[:8]}")

    def write_bytes(
        self, key: str, data: bytes, if_version: str | None = None, if_absent: bool = False
    ) -> None:
        path = self._path(key)
        _check_condition(if_version, if_absent)
        if if_version is None and not if_absent:
            self._replace(path, data)
        else:
            self._replace_if(path, data, if_version, if_absent)

    def _replace_if(self, path: Path, data: bytes, if_version: str | None, if_absent: bool) -> None:
        # Conditional writes hold an exclusive lock on a file beside the object, so two of them
        # cannot both pass the check (a plain write does not take it: it is last-writer-wins).
        lock_path = path.with_name(f".{path.name}{_TMP_MARKER}lock")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                try:
                    current = _file_version(os.stat(path))
                except FileNotFoundError:
                    current = None
                if if_absent and current is not None:
                    raise PreconditionFailed(f"cannot create {path}: it exists already")
                if if_version is not None and current != if_version:
                    state = "is gone" if current is None else "has changed"
                    raise PreconditionFailed(f"cannot replace {path}: it {state} since it was read")
                self._replace(path, data)
        except OSError as err:
            raise StorageError(f"cannot write {path}: {err}") from err

    def _replace(self, path: Path, data: bytes) -> None:
        tmp = self._tmp_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):  # e.g. path's parent is a file: report that
                tmp.unlink(missing_ok=True)
            if _is_disk_full(err):
                raise disk_full_error(path, len(data), err) from err
            raise StorageError(f"cannot write {path}: {err}") from err

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        path = self._path(key)
        try:
            with open(path, "rb") as f:  # the version of the very file read: fstat, not stat
                return f.read(), _file_version(os.fstat(f.fileno()))
        except FileNotFoundError as err:
            raise ObjectNotFound(f"no object at {path}") from err
        except OSError as err:
            raise StorageError(f"cannot read {path}: {err}") from err

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise StorageError(f"cannot delete {path}: {err}") from err

    def upload_file(self, local_path: str | Path, key: str, move: bool = False) -> None:
        src, dst = Path(local_path), self._path(key)
        if move:
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)  # the whole file appears at once, as after a copy
                return
            except OSError as err:
                if err.errno != errno.EXDEV:  # another filesystem: copy instead
                    raise StorageError(f"cannot move {src} to {dst}: {err}") from err
        self._copy_atomically(src, dst, "upload")

    def staging_dir(self) -> tempfile.TemporaryDirectory | OwnedTemporaryDirectory:
        """Beside the store's directory, so `upload_dir(..., move=True)` renames each file into
        place: a multi-GB checkpoint is written once instead of written and then copied (which
        also needed twice its size of free disk). Its name keeps it out of `list`."""
        try:
            self.root.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create {self.root.parent}: {err}") from err
        return tempfile.TemporaryDirectory(
            prefix=f".{self.root.name}{_TMP_MARKER}", dir=self.root.parent
        )

    def remove_staging(self) -> tuple[str, ...]:
        if not self.root.is_dir():
            return ()
        stale = sorted(p for p in self.root.iterdir() if _TMP_MARKER in p.name and p.is_dir())
        for path in stale:
            try:
                shutil.rmtree(path)
            except OSError as err:
                msg = f"cannot remove the stale staging directory {path}: {err}"
                raise StorageError(msg) from err
        return tuple(path.name for path in stale)

    def download_file(
        self, key: str, local_path: str | Path, if_version: str | None = None
    ) -> None:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object at {path}")
        st = path.stat()
        listed = ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)
        if if_version is not None and listed.version != if_version:
            raise PreconditionFailed(f"cannot download {path}: it changed since it was listed")
        self._copy_atomically(path, Path(local_path), "download")

    def _copy_atomically(self, src: Path, dst: Path, what: str) -> None:
        """Copy to a temporary name beside `dst`, then rename: no reader sees half a file."""
        tmp = self._tmp_path(dst)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as err:
            with contextlib.suppress(OSError):  # e.g. dst's parent is a file: report that
                tmp.unlink(missing_ok=True)
            if _is_disk_full(err):
                raise disk_full_error(dst, _size(src), err) from err
            raise StorageError(f"cannot {what} {src} to {dst}: {err}") from err


# -- retries: the one place that decides which S3 faults are retried --------------------------

# S3 error codes that name a transient fault: the same request may succeed later.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "XMinioServerNotInitialized",
    }
)
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise StorageError(f"{name}={raw!r} must be greater than 0")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """Which S3 faults are retried, how often, and how long between tries.

    Two layers, both configured here and nowhere else:

    * **Each HTTP request** is retried by urllib3, which minio sends every request through
      (`request_retries` times): a refused or reset connection, a read timeout or a broken
      response of an idempotent request (GET, HEAD, PUT, DELETE), and the statuses 500, 502, 503
      and 504. Each part of a multipart upload is one request, so a fault in part 7 resends part
      7 only: the parts already stored are kept. A POST is resent too: the only ones sent here
      start a multipart upload (a lost answer leaves an empty upload behind: give the bucket an
      AbortIncompleteMultipartUpload lifecycle rule) and complete one (a resend after success
      finds the upload gone: `upload_file` then checks that the object is the file's bytes).
      After the last try the 5xx answer itself is handed to minio (`raise_on_status=False`), so
      the error names S3's code (`SlowDown`).
    * **Each operation** (`S3Storage._call`) is retried (`attempts` times in all) for what one
      request's retry cannot see: a body cut off while it streams (urllib3 has returned by then)
      and a transient fault the request layer gave up on. A download resumes
      at the byte it reached (a ranged GET pinned to the first answer's ETag), a listing after
      the last key it returned, a stream where its reader stopped; a multipart upload that fails
      as a whole is aborted by minio (`put_object` aborts on any error) and starts over.

    Never retried, because retrying cannot change the answer: 403 (AccessDenied,
    InvalidAccessKeyId, SignatureDoesNotMatch), 404 (NoSuchKey, NoSuchBucket), 412 and 409 (a
    condition failed: another writer got there first), 400 and any other 4xx.

    The wait before retry n is `backoff_s * 2**(n-1)`, at most `max_backoff_s`, times a random
    factor in [0.5, 1) so that many clients throttled at once do not retry in step. `timeout_s`
    bounds the connect and each socket read: a server that stalls longer is a read timeout, which
    the layers above retry. `LUMOS_S3_TIMEOUT_S` and `LUMOS_S3_BACKOFF_S` override the defaults.
    """

    attempts: int = 4
    request_retries: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(
            timeout_s=_env_float("LUMOS_S3_TIMEOUT_S", cls.timeout_s),
            backoff_s=_env_float("LUMOS_S3_BACKOFF_S", cls.backoff_s),
        )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...) of an operation."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)) * random.uniform(0.5, 1)

    def urllib3_retry(self):  # -> urllib3.Retry
        from urllib3 import Retry

        n = self.request_retries
        return Retry(
            total=n,
            connect=n,
            read=n,
            status=n,
            other=n,
            backoff_factor=self.backoff_s,
            backoff_max=self.max_backoff_s,
            backoff_jitter=self.backoff_s,
            status_forcelist=sorted(_TRANSIENT_STATUSES),
            allowed_methods=Retry.DEFAULT_ALLOWED_METHODS | {"POST"},
            raise_on_status=False,
        )


def is_transient(err: BaseException) -> bool:
    """True for a fault that the same request may not meet again: see `RetryPolicy`."""
    import http.client

    import urllib3.exceptions
    from minio.error import InvalidResponseError, S3Error, ServerError

    if isinstance(err, S3Error):
        status = getattr(err.response, "status", None)
        return err.code in _TRANSIENT_CODES or status in _TRANSIENT_STATUSES
    if isinstance(err, ServerError):
        return err.status_code in _TRANSIENT_STATUSES
    if isinstance(err, InvalidResponseError):  # a non-XML answer, e.g. a proxy's 502 page
        return getattr(err, "_code", None) in _TRANSIENT_STATUSES
    if isinstance(err, urllib3.exceptions.MaxRetryError):
        return err.reason is None or is_transient(err.reason)
    return isinstance(
        err,
        (
            urllib3.exceptions.ProtocolError,  # connection dropped, body cut short
            urllib3.exceptions.TimeoutError,  # stalled past timeout_s
            urllib3.exceptions.NewConnectionError,
            urllib3.exceptions.ResponseError,
            http.client.IncompleteRead,
            ConnectionError,  # reset, refused, broken pipe
            TimeoutError,
        ),
    )


def s3_client_from_env(policy: RetryPolicy | None = None):  # -> minio.Minio
    """A minio client for `LUMOS_S3_ENDPOINT` with credentials from `AWS_ACCESS_KEY_ID` /
    `..._SECRET_...`, whose requests time out and are retried as `policy` says."""
    import certifi
    import urllib3
    from minio import Minio

    policy = policy or RetryPolicy.from_env()
    endpoint = os.environ.get("LUMOS_S3_ENDPOINT", "").strip()
    if not endpoint:
        raise StorageError(
            "LUMOS_S3_ENDPOINT is not set: set it to the S3 / MinIO endpoint, e.g. http://minio:9000"
        )
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise StorageError(
            f"LUMOS_S3_ENDPOINT={endpoint!r} is not an http(s) endpoint: use e.g. http://minio:9000"
        )
    access_key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not access_key or not secret_key:
        raise StorageError(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set for S3 access "
            f"(endpoint {endpoint}): mount the object-store secret as environment variables"
        )
    # minio's own pool (Minio.__init__) waits 5 minutes for a stalled server and retries with
    # its own numbers; this one takes both from the policy, as minio's documentation invites.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=policy.timeout_s, read=policy.timeout_s),
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        retries=policy.urllib3_retry(),
    )
    return Minio(
        parsed.netloc,
        access_key=access_key,
        secret_key=secret_key,
        session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        secure=parsed.scheme == "https",
        region=os.environ.get("LUMOS_S3_REGION") or None,
        http_client=http,
    )


class S3Storage(Storage):
    """`s3://bucket/prefix` through the minio client. A PUT (single or multipart) is atomic.
    Every call goes through `_call`: transient faults retried as `RetryPolicy` says, every
    other error translated once (`_error`) into a `StorageError` naming the URI."""

    def __init__(self, bucket: str, prefix: str = "", policy: RetryPolicy | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._policy = policy
        self._client = None  # created on first use, so a Storage pickles into worker processes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def policy(self) -> RetryPolicy:
        if self._policy is None:
            self._policy = RetryPolicy.from_env()
        return self._policy

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client_from_env(self.policy)
        return self._client

    def child(self, sub: str) -> S3Storage:
        sub = sub.strip("/")
        if not sub:
            return self
        return S3Storage(self.bucket, _join(self.prefix, _check_key(sub)), self._policy)

    def _name(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    def _call(self, action: str, key: str, operation: Callable[[], _T]) -> _T:
        """Run `operation` (one S3 operation, safe to run again), retrying transient faults."""
        attempts = self.policy.attempts
        for attempt in range(1, attempts + 1):
            try:
                return operation()
            except StorageError:
                raise
            except Exception as err:
                if attempt < attempts and is_transient(err):
                    time.sleep(self.policy.delay(attempt))
                    continue
                raise self._error(err, key, action, attempt) from err
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def _error(self, err: Exception, key: str, action: str, attempts: int = 1) -> StorageError:
        """Translate a minio / urllib3 error into a StorageError naming the URI: the one place."""
        from minio.error import S3Error, ServerError

        uri = self.key_uri(key)
        tries = f" (gave up after {attempts} attempts)" if attempts > 1 else ""
        if isinstance(err, ServerError) and err.status_code == 412:  # a HEAD's: no error body
            return PreconditionFailed(f"cannot {action} {uri}: it changed since it was listed")
        if isinstance(err, S3Error):
            if err.code in ("NoSuchKey", "NoSuchObject"):
                return ObjectNotFound(f"no object at {uri}")
            if err.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return PreconditionFailed(f"cannot {action} {uri}: it changed since it was listed")
            if err.code == "NoSuchBucket":
                return StorageError(
                    f"cannot {action} {uri}: bucket {self.bucket!r} does not exist; create it first"
                )
            if err.code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(
                    f"cannot {action} {uri}: access denied ({err.code}); check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY"
                )
            return StorageError(f"cannot {action} {uri}: {err.code}: {err.message}{tries}")
        if is_transient(err):
            return StorageError(
                f"cannot {action} {uri}: {type(err).__name__}: {err}{tries} "
                f"(is LUMOS_S3_ENDPOINT={os.environ.get('LUMOS_S3_ENDPOINT')!r} reachable?)"
            )
        return StorageError(f"cannot {action} {uri}: {type(err).__name__}: {err}")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        last: str | None = None  # a retried listing starts after the last key it returned

        def page() -> list[ObjectInfo]:
            # One S3 page per call: a retry starts after the last key of the pages before.
            infos = []
            for obj in self.client.list_objects(
                self.bucket,
                prefix=full_prefix,
                recursive=True,
                start_after=last,
            ):
                if obj.is_dir:
                    continue
                infos.append(
                    ObjectInfo(
                        key=obj.object_name[strip:],
                        size=int(obj.size or 0),
                        etag=(obj.etag or "").strip('"') or None,
                        mtime=obj.last_modified.timestamp() if obj.last_modified else None,
                    )
                )
                if len(infos) == _LIST_PAGE:
                    break
            return infos

        # S3 lists keys in UTF-8 byte order, which is the sorted order the contract promises.
        while True:
            infos = self._call("list", prefix, page)
            yield from infos
            if len(infos) < _LIST_PAGE:
                return
            last = _join(self.prefix, infos[-1].key)

    def read_bytes(self, key: str) -> bytes:
        return self.read_versioned(key)[0]

    def open_read(self, key: str) -> BinaryIO:
        stream = _ResumingStream(self, key)
        stream.open()
        return cast(BinaryIO, io.BufferedReader(stream, buffer_size=1 << 20))

    def _get(self, key: str, offset: int = 0, etag: str | None = None):  # -> urllib3 response
        """GET from `offset` (a ranged GET when > 0), only the version `etag` when given."""
        headers = {"If-Match": f'"{etag}"'} if etag else None
        return self.client.get_object(
            self.bucket, self._name(key), offset=offset, request_headers=headers
        )

    def write_bytes(
        self, key: str, data: bytes, if_version: str | None = None, if_absent: bool = False
    ) -> None:
        _check_condition(if_version, if_absent)
        if if_version is None and not if_absent:
            self._call(
                "write",
                key,
                lambda: self.client.put_object(
                    self.bucket, self._name(key), io.BytesIO(data), len(data)
                ),
            )
            return
        # S3's conditional PUT (AWS S3 and MinIO both honour it). minio-py 7.2 has no public call
        # that sends it: `put_object` turns every header that is not x-amz-* or one of five
        # content headers into user metadata (helpers.normalize_headers), so If-Match would
        # arrive as x-amz-meta-if-match and be ignored. `_put_object` is its PutObject request
        # with the headers as given; minio-py 7.2 is pinned below 8 in pyproject.toml for it.
        if not hasattr(self.client, "_put_object"):
            raise StorageError(
                f"cannot write {self.key_uri(key)} conditionally: this minio client has no "
                "PutObject call that keeps If-Match headers (install minio>=7.2,<8)"
            )
        condition = {"If-None-Match": "*"} if if_absent else {"If-Match": f'"{if_version}"'}
        headers = {"Content-Type": "application/octet-stream", **condition}

        def put() -> None:
            self.client._put_object(self.bucket, self._name(key), data, headers=dict(headers))

        try:
            self._call("write", key, put)
        except (ObjectNotFound, PreconditionFailed) as err:
            # A PUT whose answer was lost may have landed, and its resend (by urllib3 or by
            # `_call`) then fails the condition against our own write: the object holding
            # exactly our bytes is success. (The ETag of a single PUT is the MD5 of its bytes.)
            if self._etag(key) == hashlib.md5(data).hexdigest():
                return
            what = "it exists already" if if_absent else "it changed since it was read"
            raise PreconditionFailed(f"cannot write {self.key_uri(key)}: {what}") from err

    def _etag(self, key: str) -> str | None:
        try:
            stat = self._call(
                "check", key, lambda: self.client.stat_object(self.bucket, self._name(key))
            )
        except ObjectNotFound:
            return None
        return (stat.etag or "").strip('"') or None

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        def read() -> tuple[bytes, str]:
            response = self._get(key)
            try:
                return response.read(), response.headers.get("ETag", "").strip('"')
            finally:
                response.close()
                response.release_conn()

        return self._call("read", key, read)

    def exists(self, key: str) -> bool:
        try:
            self._call("check", key, lambda: self.client.stat_object(self.bucket, self._name(key)))
            return True
        except ObjectNotFound:
            return False

    def delete(self, key: str) -> None:
        with contextlib.suppress(ObjectNotFound):
            self._call(
                "delete", key, lambda: self.client.remove_object(self.bucket, self._name(key))
            )

    def upload_file(self, local_path: str | Path, key: str, move: bool = False) -> None:
        if not Path(local_path).is_file():
            raise StorageError(f"cannot upload {local_path} to {self.key_uri(key)}: no such file")
        # A file over one part is sent as a multipart upload: urllib3 retries each part alone,
        # and minio aborts the upload if it fails as a whole (no orphaned parts are left).
        size = Path(local_path).stat().st_size
        part_size = max(_MIN_PART, -(-size // _MAX_PARTS))

        def put() -> None:
            from minio.error import S3Error

            try:
                self.client.fput_object(
                    self.bucket, self._name(key), str(local_path), part_size=part_size
                )
            except S3Error as err:
                # The answer to CompleteMultipartUpload was lost and its resend found the upload
                # gone: it completed if the object now is exactly this file.
                if err.code != "NoSuchUpload" or self._etag(key) != _upload_etag(
                    Path(local_path), part_size
                ):
                    raise

        self._call("upload to", key, put)

    def download_file(
        self, key: str, local_path: str | Path, if_version: str | None = None
    ) -> None:
        local_path = Path(local_path)
        tmp = local_path.with_name(f".{local_path.name}{_TMP_MARKER}{uuid.uuid4().hex[:8]}")
        # Every GET carries the version as If-Match: `if_version`, else the ETag the first answer
        # had, so a retry resumes (ranged GET from the bytes kept) only on the same object.
        etag = if_version
        size = 0  # the object's, once an answer says it

        def fetch() -> None:
            nonlocal etag, size
            offset = tmp.stat().st_size if tmp.exists() else 0
            response = self._get(key, offset, etag)
            try:
                etag = etag or response.headers.get("ETag", "").strip('"') or None
                size = size or offset + int(response.headers.get("Content-Length") or 0)
                with reporting_disk_full(local_path, size or None), open(tmp, "ab") as out:
                    for chunk in response.stream(1 << 20):
                        out.write(chunk)
            finally:
                response.close()
                response.release_conn()

        try:
            local_path.parent.mkdir(parents=True, exist_ok=True)
            self._call("download", key, fetch)
            os.replace(tmp, local_path)
        except PreconditionFailed as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            if if_version is None:  # rewritten between two tries of ours: name what happened
                raise PreconditionFailed(
                    f"cannot download {self.key_uri(key)}: it was rewritten while downloading"
                ) from err
            raise
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StorageError(
                f"cannot download {self.key_uri(key)} to {local_path}: {err}"
            ) from err
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


_LIST_PAGE = 1000  # keys per ListObjectsV2 answer (minio asks for S3's most)
_MIN_PART = 5 * 1024 * 1024  # S3's smallest part (but the last)
_MAX_PARTS = 10_000  # S3's most parts in one upload


def _upload_etag(path: Path, part_size: int) -> str:
    """The ETag S3 gives `path` uploaded in parts of `part_size`: the MD5 of a single PUT, else
    the MD5 of the parts' MD5s and the part count."""
    digests = []
    with open(path, "rb") as f:
        while chunk := f.read(part_size):
            digests.append(hashlib.md5(chunk).digest())
    if len(digests) <= 1:
        return (digests[0] if digests else hashlib.md5(b"").digest()).hex()
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"


class _ResumingStream(io.RawIOBase):
    """An S3 object read as a stream that, when the connection breaks mid-body, reopens at the
    byte it reached (a ranged GET pinned to the first answer's ETag) instead of failing."""

    def __init__(self, store: S3Storage, key: str) -> None:
        self._store, self._key = store, key
        self._response: Any = None
        self._etag: str | None = None
        self._pos = 0
        self._faults = 0

    def open(self) -> None:
        def get():
            return self._store._get(self._key, self._pos, self._etag)

        self._response = self._store._call("read", self._key, get)
        self._etag = self._etag or self._response.headers.get("ETag", "").strip('"') or None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        while True:
            try:
                n = self._response.readinto(buffer)
                self._pos += n
                return n
            except Exception as err:
                self._faults += 1
                if not is_transient(err) or self._faults >= self._store.policy.attempts:
                    raise self._store._error(err, self._key, "read", self._faults) from err
                self._release()
                time.sleep(self._store.policy.delay(self._faults))
                self.open()

    def _release(self) -> None:
        if self._response is not None:
            with contextlib.suppress(Exception):
                self._response.close()
                self._response.release_conn()
            self._response = None

    def close(self) -> None:
        self._release()
        super().close()
