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
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

# Temporary files of atomic local writes, and staging directories, carry this marker; `list`
# never shows them.
_TMP_MARKER = ".lumos-tmp-"


class StorageError(RuntimeError):
    """A storage operation failed; the message names the URI and what to do."""


class ObjectNotFound(StorageError):
    """The object does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write (`write_bytes(..., if_version=...)` or `if_absent=True`) found the
    object changed, gone or present: another writer got there first."""


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

    def staging_dir(self) -> tempfile.TemporaryDirectory:
        """A temporary directory to assemble files in, then `upload_dir(staged, move=True)`."""
        return tempfile.TemporaryDirectory(prefix="lumos-stage-")

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

    def staging_dir(self) -> tempfile.TemporaryDirectory:
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
            raise StorageError(f"cannot {what} {src} to {dst}: {err}") from err


def s3_client_from_env():  # -> minio.Minio
    """A minio client for `LUMOS_S3_ENDPOINT` with credentials from `AWS_ACCESS_KEY_ID` / `..._SECRET_...`."""
    from minio import Minio

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
    return Minio(
        parsed.netloc,
        access_key=access_key,
        secret_key=secret_key,
        session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
        secure=parsed.scheme == "https",
        region=os.environ.get("LUMOS_S3_REGION") or None,
    )


class S3Storage(Storage):
    """`s3://bucket/prefix` through the minio client. A PUT (single or multipart) is atomic."""

    def __init__(self, bucket: str, prefix: str = "") -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = None  # created on first use, so a Storage pickles into worker processes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    @property
    def client(self):
        if self._client is None:
            self._client = s3_client_from_env()
        return self._client

    def child(self, sub: str) -> S3Storage:
        sub = sub.strip("/")
        return S3Storage(self.bucket, _join(self.prefix, _check_key(sub))) if sub else self

    def _name(self, key: str) -> str:
        return _join(self.prefix, _check_key(key))

    def _error(self, err: Exception, key: str, action: str) -> StorageError:
        """Translate a minio / urllib3 error into a StorageError naming the URI."""
        from minio.error import S3Error, ServerError

        uri = self.key_uri(key)
        if isinstance(err, ServerError) and err.status_code == 412:  # a HEAD's: no error body
            return PreconditionFailed(f"cannot {action} {uri}: it changed since it was listed")
        if isinstance(err, S3Error):
            if err.code in ("NoSuchKey", "NoSuchObject"):
                return ObjectNotFound(f"no object at {uri}")
            if err.code == "PreconditionFailed":
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
            return StorageError(f"cannot {action} {uri}: {err.code}: {err.message}")
        return StorageError(
            f"cannot {action} {uri}: {type(err).__name__}: {err} "
            f"(is LUMOS_S3_ENDPOINT={os.environ.get('LUMOS_S3_ENDPOINT')!r} reachable?)"
        )

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            # S3 lists keys in UTF-8 byte order, which is the sorted order the contract promises.
            for obj in self.client.list_objects(self.bucket, prefix=full_prefix, recursive=True):
                if obj.is_dir:
                    continue
                yield ObjectInfo(
                    key=obj.object_name[strip:],
                    size=int(obj.size or 0),
                    etag=(obj.etag or "").strip('"') or None,
                    mtime=obj.last_modified.timestamp() if obj.last_modified else None,
                )
        except StorageError:
            raise
        except Exception as err:
            raise self._error(err, prefix, "list") from err

    def read_bytes(self, key: str) -> bytes:
        return self.read_versioned(key)[0]

    def open_read(self, key: str) -> BinaryIO:
        try:
            return self.client.get_object(self.bucket, self._name(key))
        except StorageError:
            raise
        except Exception as err:
            raise self._error(err, key, "read") from err

    def write_bytes(
        self, key: str, data: bytes, if_version: str | None = None, if_absent: bool = False
    ) -> None:
        _check_condition(if_version, if_absent)
        try:
            if if_version is None and not if_absent:
                self.client.put_object(self.bucket, self._name(key), io.BytesIO(data), len(data))
                return
            # S3's conditional PUT (AWS S3 and MinIO both honour it). minio-py's public
            # put_object turns every header that is not x-amz-* into user metadata
            # (helpers.normalize_headers), so the condition goes through its PutObject call.
            if not hasattr(self.client, "_put_object"):
                raise StorageError(
                    f"cannot write {self.key_uri(key)} conditionally: this minio client has no "
                    "PutObject call that keeps If-Match headers (install minio>=7.2,<8)"
                )
            condition = {"If-None-Match": "*"} if if_absent else {"If-Match": f'"{if_version}"'}
            headers = {"Content-Type": "application/octet-stream", **condition}
            self.client._put_object(self.bucket, self._name(key), data, headers=headers)
        except StorageError:
            raise
        except Exception as err:
            from minio.error import S3Error

            code = err.code if isinstance(err, S3Error) else None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or (
                if_version is not None and code in ("NoSuchKey", "NoSuchObject")
            ):
                what = "it exists already" if if_absent else "it changed since it was read"
                raise PreconditionFailed(f"cannot write {self.key_uri(key)}: {what}") from err
            raise self._error(err, key, "write") from err

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        response = None
        try:
            response = self.client.get_object(self.bucket, self._name(key))
            return response.read(), response.headers.get("ETag", "").strip('"')
        except StorageError:
            raise
        except Exception as err:
            raise self._error(err, key, "read") from err
        finally:
            if response is not None:
                response.close()
                response.release_conn()

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, self._name(key))
            return True
        except StorageError:
            raise
        except Exception as err:
            translated = self._error(err, key, "check")
            if isinstance(translated, ObjectNotFound):
                return False
            raise translated from err

    def delete(self, key: str) -> None:
        try:
            self.client.remove_object(self.bucket, self._name(key))
        except StorageError:
            raise
        except Exception as err:
            translated = self._error(err, key, "delete")
            if not isinstance(translated, ObjectNotFound):
                raise translated from err

    def upload_file(self, local_path: str | Path, key: str, move: bool = False) -> None:
        if not Path(local_path).is_file():
            raise StorageError(f"cannot upload {local_path} to {self.key_uri(key)}: no such file")
        try:
            self.client.fput_object(self.bucket, self._name(key), str(local_path))
        except StorageError:
            raise
        except Exception as err:
            raise self._error(err, key, "upload to") from err

    def download_file(
        self, key: str, local_path: str | Path, if_version: str | None = None
    ) -> None:
        local_path = Path(local_path)
        tmp = local_path.with_name(f".{local_path.name}{_TMP_MARKER}{uuid.uuid4().hex[:8]}")
        # The GET itself carries the condition: no window between a check and the download.
        headers = {"If-Match": f'"{if_version}"'} if if_version is not None else None
        try:
            local_path.parent.mkdir(parents=True, exist_ok=True)
            self.client.fget_object(
                self.bucket,
                self._name(key),
                str(local_path),
                request_headers=headers,
                tmp_file_path=str(tmp),
            )
        except StorageError:
            raise
        except Exception as err:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise self._error(err, key, "download") from err
