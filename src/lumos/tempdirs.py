"""Temporary directories that the next run removes when the run that made them was killed.

    with OwnedTemporaryDirectory("lumos-export-") as tmp:   # like tempfile.TemporaryDirectory
        ...

A SIGKILLed or OOM-killed process runs no `finally`, so `tempfile.TemporaryDirectory` leaves its
directory behind: an export's graphs, a checkpoint's downloaded weights, ingest's shards and
bookkeeping, gigabytes each on a node or a laptop that keeps its temp directory. Each directory
made here has a lock file beside it (`lumos-export-abc123.owner`, outside it: whatever uploads the
directory's files never sees it) on which its process keeps a POSIX record lock
(`fcntl.lockf`) for as long as it lives; the kernel drops the lock the moment the process ends,
however it ends (by the time its parent's `wait` returns). Forked workers do not inherit it, so a
killed run's directories are free once the run itself is gone, whatever its workers still do.
The CLI sweeps the temp directory when a command starts, and so does the first directory a
process makes (a stage called as a library function): every `lumos-*` directory whose
lock it can take belongs to no live process and is removed, with its lock file. (A POSIX lock
also ends when its process closes any descriptor of the file: nothing but this module opens the
lock files, and a sweep skips the directories of its own process.)

The lock file appears under its name already locked (made under a hidden temporary name, locked,
then hard-linked), so a sweep never takes the lock of a directory whose owner is still setting it
up. A directory without a lock file (a kill in the instant between making the directory and
locking it, or a version of lumos before this one) is never removed: nothing says its owner is
gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import weakref
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_SUFFIX = ".owner"  # the lock file of directory D is D + OWNER_SUFFIX, beside it
_PREFIX = "lumos-"
_swept: set[str] = set()  # temp directories this process has swept (once each)
_owned: set[str] = set()  # directories this process made and holds the locks of


def lock_file(directory: str | Path) -> Path:
    """The lock file of a directory made here (beside it)."""
    return Path(f"{directory}{OWNER_SUFFIX}")


def _hold_lock(directory: Path) -> int:
    """Create the directory's lock file, already locked by this process; returns its descriptor."""
    pending = directory.with_name(f".{directory.name}{OWNER_SUFFIX}")
    fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.link(pending, lock_file(directory))
    except BaseException:
        os.close(fd)
        raise
    finally:
        pending.unlink()
    return fd


def remove_abandoned(temp_root: str | Path | None = None) -> list[str]:
    """Remove the `lumos-*` directories under `temp_root` (the temp directory) whose owning
    process is gone, with their lock files; returns their names. Safe beside live runs: their
    locks are held."""
    root = Path(temp_root or tempfile.gettempdir())
    _swept.add(str(root))
    removed: list[str] = []
    try:
        locks = sorted(
            p for p in root.iterdir() if p.name.startswith(_PREFIX) and p.suffix == OWNER_SUFFIX
        )
    except OSError:
        return removed  # no temp directory to sweep: nothing can be left in it
    for lock in locks:
        path = lock.with_suffix("")
        if str(path) in _owned:
            continue  # this process's own (opening its lock file would drop the lock)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # another user's, or removed meanwhile
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its owner is alive
        try:
            shutil.rmtree(path, ignore_errors=True)  # gone already if killed while cleaning up
            lock.unlink(missing_ok=True)
            removed.append(path.name)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d temporary directories of killed runs: %s", len(removed), removed)
    return removed


def _cleanup(path: str, fd: int) -> None:
    _owned.discard(path)
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        lock_file(path).unlink()
    with contextlib.suppress(OSError):
        os.close(fd)


class OwnedTemporaryDirectory:
    """`tempfile.TemporaryDirectory(prefix=...)` whose directory a later run removes if this
    process is killed before `cleanup` (see the module doc). `prefix` starts with "lumos-"."""

    def __init__(self, prefix: str) -> None:
        if not prefix.startswith(_PREFIX):
            raise ValueError(f"prefix {prefix!r} must start with {_PREFIX!r} (the sweep's pattern)")
        root = tempfile.gettempdir()
        if root not in _swept:
            remove_abandoned(root)
        self.name = tempfile.mkdtemp(prefix=prefix, dir=root)
        # Own before its lock file appears: a sweep in another thread of this process would
        # take that lock as its own (POSIX locks do not conflict within a process).
        _owned.add(self.name)
        try:
            fd = _hold_lock(Path(self.name))
        except BaseException:
            _owned.discard(self.name)
            shutil.rmtree(self.name, ignore_errors=True)
            raise
        self._finalizer = weakref.finalize(self, _cleanup, self.name, fd)

    def __enter__(self) -> str:
        return self.name

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        """Remove the directory and release its lock (again: nothing)."""
        self._finalizer()
