"""Local copies of the feature parts of a dataset in the object store, shared by a node.

    files = FeatureFiles(Storage.from_uri("s3://lumos/datasets/images").child("features"))
    path = files("part-00000.safetensors")  # downloaded once, then memory-mapped from disk

A local dataset's own files are used in place. Copies go to `$LUMOS_FEATURE_CACHE` (default
`<tmp>/lumos-features`; on the cluster an emptyDir shared by the node's processes), named by the
object's version (ETag), so a re-featurized part is fetched again and a changed one is never read
half old, half new.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lumos.errors import LumosError
from lumos.features.format import FeaturesNotFound
from lumos.storage import PreconditionFailed, Storage

CACHE_ENV = "LUMOS_FEATURE_CACHE"


class FeaturesChanged(LumosError, RuntimeError):
    """The features in the object store changed while a run was loading them."""


def feature_cache_dir() -> Path:
    """Where the features of datasets in the object store are kept on local disk."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "lumos-features")


class FeatureFiles:
    """Local paths of a features directory's files: its own files when it is local, else copies
    in the cache, downloaded once per node and again only when the object changed. A lock file
    per object makes the processes of a node wait for one download instead of each fetching
    its own; the download lands under a temporary name first, so no reader sees half a file."""

    def __init__(self, store: Storage) -> None:
        self.store = store
        self.versions: dict[str, str] = {}
        if store.local_path("features.json") is None:
            self.versions = {info.key: info.version for info in store.list()}
            self.cache = feature_cache_dir() / hashlib.sha256(store.uri.encode()).hexdigest()[:16]

    def __call__(self, key: str) -> Path:
        own = self.store.local_path(key)
        if own is not None:
            if not own.is_file():
                raise FeaturesNotFound(f"missing feature file {own}: re-run `lumos featurize`")
            return own
        if key not in self.versions:
            raise FeaturesNotFound(
                f"missing feature file {self.store.key_uri(key)}: re-run `lumos featurize`"
            )
        version = hashlib.sha256(self.versions[key].encode()).hexdigest()[:12]
        path = self.cache / f"{version}-{key}"
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not path.is_file():  # another process may have fetched it meanwhile
                try:  # the version listed, which names the file, and no other
                    self.store.download_file(key, path, if_version=self.versions[key])
                except PreconditionFailed as err:
                    raise FeaturesChanged(
                        f"{self.store.key_uri(key)} changed while this run was loading the "
                        "features (re-featurized?): start the run again to read the new ones"
                    ) from err
        return path

    def fetch_all(self, keys: list[str], threads: int = 16) -> list[Path]:
        """`self(key)` for every key, `threads` at a time (object-store latency, not bandwidth,
        bounds one download of a small part)."""
        if not self.versions:  # local: nothing to fetch
            return [self(key) for key in keys]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(self, keys))
