"""A real full disk for tests: a tmpfs of a few hundred KiB mounted on a test's directory.

    with small_disk(tmp_path / "disk", 300_000) as disk:   # writes past 300 kB fail: ENOSPC
        ...
        disk.resize(10_000_000)                            # room again, contents kept

Mounting needs root with CAP_SYS_ADMIN (the project's dev and CI machines run tests as root);
elsewhere the test is skipped with the reason, never faked.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


class SmallDisk:
    def __init__(self, path: Path) -> None:
        self.path = path

    def resize(self, size_bytes: int) -> None:
        _mount(["-o", f"remount,size={size_bytes}", "tmpfs", str(self.path)])


def _mount(args: list[str]) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"mount {' '.join(args)}: {done.stderr.strip()}")


@contextlib.contextmanager
def small_disk(path: Path, size_bytes: int) -> Iterator[SmallDisk]:
    path.mkdir(parents=True, exist_ok=True)
    try:
        _mount(["-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)])
    except (OSError, FileNotFoundError) as err:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {err}")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
