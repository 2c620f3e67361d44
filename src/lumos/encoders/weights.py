"""Resolving a pretrained-weights location (local dir or object-store prefix) to a local dir."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lumos.errors import NotFoundError

MARKER = ".lumos-download-complete"


def default_cache_dir() -> Path:
    return Path(os.environ.get("LUMOS_CACHE_DIR", Path.home() / ".cache" / "lumos" / "encoders"))


def resolve_weights_dir(path: str, what: str, cache_dir: str | None = None) -> Path:
    """A local directory holding the weights at `path` (downloading an s3:// prefix once).

    `what` says what belongs there, for the error message when it is missing.
    """
    if path.startswith("s3://"):
        from lumos.storage import Storage  # the object store is only needed for s3:// weights

        digest = hashlib.sha256(path.encode()).hexdigest()[:16]
        local = Path(cache_dir) if cache_dir else default_cache_dir()
        local = local / digest
        if not (local / MARKER).exists():
            store = Storage.from_uri(path)
            store.download_dir("", str(local))
            downloaded = local.exists() and any(local.iterdir())
            if not downloaded:
                raise NotFoundError(
                    f"no files under {path}: upload {what} there (e.g. with Storage.upload_dir)"
                )
            (local / MARKER).write_text(path)
        return local
    local = Path(path.removeprefix("file://"))
    if not local.is_dir():
        raise NotFoundError(f"weights directory {str(local)!r} does not exist: put {what} there")
    return local
