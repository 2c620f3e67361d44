"""lumos.tempdirs: a killed run's temporary directories are removed by the next run, never a live
run's. The owners are real processes, killed with SIGKILL (no `finally`, no atexit)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lumos.tempdirs import OwnedTemporaryDirectory, lock_file, remove_abandoned

# A process that makes a directory (its workers forked after it), says where, and waits.
OWNER = textwrap.dedent(
    """
    import os, sys, time
    from lumos.tempdirs import OwnedTemporaryDirectory
    tmp = OwnedTemporaryDirectory("lumos-test-")
    open(os.path.join(tmp.name, "big.bin"), "wb").write(b"x" * 1000)
    workers = []
    for _ in range(int(sys.argv[1])):
        pid = os.fork()
        if pid == 0:  # a worker: it holds the parent's descriptors and outlives it
            time.sleep(60)
            os._exit(0)
        workers.append(pid)
    print(tmp.name, " ".join(map(str, workers)), flush=True)
    time.sleep(60)
    """
)


def _start_owner(tmp_path: Path, workers: int = 0) -> tuple[subprocess.Popen, Path, list[int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(workers)],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    name, *pids = proc.stdout.readline().split()
    return proc, Path(name), [int(p) for p in pids]


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_killed_owners_directory_is_removed_a_live_ones_is_not(tmp_path):
    live, live_dir, _ = _start_owner(tmp_path)
    killed, killed_dir, _ = _start_owner(tmp_path)
    try:
        assert live_dir.parent == tmp_path and lock_file(live_dir).is_file()
        assert sorted(p.name for p in live_dir.iterdir()) == ["big.bin"]  # only what was put there
        assert remove_abandoned(tmp_path) == []  # both owners alive: nothing is touched
        _kill(killed)
        assert killed_dir.is_dir()  # SIGKILL: the owner could not clean up
        assert remove_abandoned(tmp_path) == [killed_dir.name]
        assert not killed_dir.exists() and (live_dir / "big.bin").is_file()
    finally:
        _kill(live)
    assert remove_abandoned(tmp_path) == [live_dir.name]
    assert list(tmp_path.iterdir()) == []  # the lock files too


def test_workers_that_outlive_a_killed_owner_do_not_keep_its_directory(tmp_path):
    owner, directory, workers = _start_owner(tmp_path, workers=2)
    try:
        _kill(owner)
        assert all(_alive(pid) for pid in workers)
        assert remove_abandoned(tmp_path) == [directory.name]
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_next_directory_a_process_makes_sweeps_the_temp_directory(tmp_path):
    owner, directory, _ = _start_owner(tmp_path)
    _kill(owner)
    sweeper = subprocess.run(
        [sys.executable, "-c", OWNER.replace("time.sleep(60)", "pass"), "0"],
        env={**os.environ, "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    )
    assert not directory.exists()
    made = Path(sweeper.stdout.split()[0])
    assert not made.exists()  # removed by its own finaliser at exit
    assert list(tmp_path.iterdir()) == []


def test_what_no_lock_file_vouches_for_is_left_alone(tmp_path):
    foreign = [tmp_path / "lumos-old-version", tmp_path / "other-tool"]
    for path in foreign:
        path.mkdir()
        (path / "data").write_bytes(b"x")
    (tmp_path / "lumos-file").write_bytes(b"not a directory")
    (tmp_path / ".lumos-new.owner").write_bytes(b"")  # a lock file not yet under its name
    assert remove_abandoned(tmp_path) == []
    assert all(path.is_dir() for path in foreign)


def test_own_directories_are_never_swept_and_cleanup_removes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    with OwnedTemporaryDirectory("lumos-test-") as name:
        assert Path(name).parent == tmp_path
        assert remove_abandoned(tmp_path) == []  # the lock this process holds is not dropped
        assert remove_abandoned(tmp_path) == []
    assert not Path(name).exists()
    with pytest.raises(ValueError, match="must start with 'lumos-'"):
        OwnedTemporaryDirectory("other-")
