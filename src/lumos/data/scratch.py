"""Ingest's bookkeeping on local disk, so that its memory stays bounded whatever the dataset size.

Everything ingest must remember per object (the dedup index, the source keys earlier runs have
seen, the first copy of each digest in this run and its outcome, the merge's decisions) lives in
a SQLite database in a temporary directory: a few hundred bytes per image on disk instead of in
memory, with SQLite's page cache (`CACHE_KIB`) as the only memory it takes. The database is
scratch space: rebuilt from the dataset's own files by every run, written without a journal or
fsync, and deleted when ingest closes it.

    db = ScratchDB()
    seen = DiskMap(db, "seen")
    seen["s3://raw\tphotos/a.jpg"] = None
    "s3://raw\tphotos/a.jpg" in seen          # True
    db.close()
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lumos.tempdirs import OwnedTemporaryDirectory

_MISSING = object()
CACHE_KIB = 64 * 1024  # SQLite's page cache per database: the memory the bookkeeping may use


class ScratchDB:
    """A private SQLite database in a temporary directory, removed by close()."""

    def __init__(self) -> None:
        self._dir = OwnedTemporaryDirectory("lumos-ingest-state-")
        # One thread uses it (ingest's main thread); decoding processes forked later never do.
        self.conn = sqlite3.connect(Path(self._dir.name) / "state.sqlite", isolation_level=None)
        for pragma in (
            "journal_mode = OFF",  # scratch: nothing to recover after a crash
            "synchronous = OFF",
            "locking_mode = EXCLUSIVE",
            "temp_store = MEMORY",
            f"cache_size = -{CACHE_KIB}",
        ):
            self.conn.execute(f"PRAGMA {pragma}")

    def close(self) -> None:
        self.conn.close()
        self._dir.cleanup()


class DiskMap:
    """A str -> JSON-value mapping in a ScratchDB table (a set, with None values)."""

    def __init__(self, db: ScratchDB, name: str) -> None:
        if not name.isidentifier():
            raise ValueError(name)
        self._conn = db.conn
        self._conn.execute(
            f"CREATE TABLE {name} (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID"
        )
        self._get = f"SELECT value FROM {name} WHERE key = ?"
        self._put = f"INSERT OR REPLACE INTO {name} (key, value) VALUES (?, ?)"

    def __contains__(self, key: str) -> bool:
        return self._conn.execute(self._get, (key,)).fetchone() is not None

    def get(self, key: str, default: Any = None) -> Any:
        row = self._conn.execute(self._get, (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._conn.execute(self._put, (key, json.dumps(value)))

    def update(self, items: Iterable[tuple[str, Any]]) -> None:
        self._conn.executemany(self._put, ((k, json.dumps(v)) for k, v in items))
