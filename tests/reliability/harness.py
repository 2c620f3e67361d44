"""Kill a stage's CLI at seeded points, run it again, and compare with an uninterrupted run.

    with Zygote() as zygote:
        ref = zygote.run(["ingest", ...], cwd=ref_dir, count_writes=True)      # ref.writes: 14
        for point in kill_points(seed=0, n=20, writes=ref.writes, seconds=ref.seconds):
            killed = zygote.run(argv, cwd=work, **point.run_kwargs())           # SIGKILLed
            again = zygote.run(argv, cwd=work)                                  # completes
            assert snapshot(work / "ds", work) == snapshot(ref_dir / "ds", ref_dir)

A kill point is either the n-th write of the run (`os.replace`/`os.rename`, the end of every
atomic write; "partial": the file being written is cut to half first, "after": just after it
lands) or a time after the start (anywhere: inside a torch.save, between writes, in imports the
stage does late). `snapshot` reads a store as the next stage would (`Storage.list`, which
ignores what a killed writer left under a temporary name) and makes run ids, timestamps and the
run's own directory comparable.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lumos.storage import Storage

_ZYGOTE = Path(__file__).with_name("zygote.py")
_RUN_ID = re.compile(rb"\d{8}T\d{6,12}Z")
_ISO_TIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)?")
# Measured durations and rates ("elapsed_s", "objects_per_s", ...): they differ in every run.
_TIMING = re.compile(rb'"(\w*(?:elapsed|per_s|seconds|_s))": -?[\d.eE+-]+')


@dataclass
class Run:
    status: int  # exit code; -9 when SIGKILLed
    seconds: float
    writes: int
    log: str

    @property
    def killed(self) -> bool:
        return self.status == -signal.SIGKILL


@dataclass(frozen=True)
class KillPoint:
    at_write: int | None = None
    how: str = "after"
    after_s: float | None = None

    def run_kwargs(self) -> dict[str, Any]:
        if self.at_write is not None:
            return {"kill_at_write": self.at_write, "kill_how": self.how}
        return {"kill_after_s": self.after_s}

    def __str__(self) -> str:
        if self.at_write is not None:
            return f"write {self.at_write} ({self.how})"
        return f"{self.after_s:.2f} s"


def kill_points(seed: int, n: int, writes: int, seconds: float) -> list[KillPoint]:
    """`n` seeded kill points: two thirds at writes (spread over all of them), a third in time."""
    rng = random.Random(seed)
    at_writes = n - n // 3
    slots = [w for w in range(1, writes + 1) for _ in ("partial", "after")]
    picks = sorted(rng.sample(range(len(slots)), min(at_writes, len(slots))))
    points = [KillPoint(at_write=slots[i], how=("partial", "after")[i % 2]) for i in picks]
    while len(points) < n:
        points.append(KillPoint(after_s=rng.uniform(0.05, 0.95) * seconds))
    return points


class Zygote:
    """tests/reliability/zygote.py as a subprocess: each `run` is a fork of it."""

    def __init__(self) -> None:
        # One thread per run: the models are tiny, and on a shared CI machine torch's threads only
        # contend with each other and with the other tests (docs/benchmarks.md has the cost).
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self._proc = subprocess.Popen(
            [sys.executable, str(_ZYGOTE)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        if json.loads(self._readline()) != {"ready": True}:
            raise RuntimeError("the zygote did not start")

    def __enter__(self) -> Zygote:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()

    def _readline(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote exited ({self._proc.poll()})")
        return line

    def run(
        self,
        argv: list[str],
        cwd: Path,
        env: dict[str, str] | None = None,
        kill_at_write: int | None = None,
        kill_how: str = "after",
        kill_after_s: float | None = None,
        timeout_s: float = 300,
    ) -> Run:
        cwd.mkdir(parents=True, exist_ok=True)
        log, count = cwd / ".run.log", cwd / ".run.writes"
        count.unlink(missing_ok=True)
        request = {
            "argv": argv,
            "cwd": str(cwd),
            "env": env or {},
            "log": str(log),
            "kill_at_write": kill_at_write,
            "kill_how": kill_how,
            "count_to": str(count),
        }
        assert self._proc.stdin is not None
        start = time.monotonic()
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        pid = json.loads(self._readline())["pid"]
        timers = [threading.Timer(timeout_s, _kill_group, (pid,))]
        if kill_after_s is not None:
            timers.append(threading.Timer(kill_after_s, _kill_group, (pid,)))
        for timer in timers:
            timer.start()
        try:
            status = json.loads(self._readline())["status"]
        finally:
            for timer in timers:
                timer.cancel()
        seconds = time.monotonic() - start
        writes = int(count.read_text()) if count.exists() else 0
        return Run(status, seconds, writes, log.read_text(errors="replace"))


def _kill_group(pid: int) -> None:
    """SIGKILL the run and the workers it started (its process group)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended first
    except PermissionError:  # not yet its own group (the first instant after fork)
        os.kill(pid, signal.SIGKILL)


def snapshot(uri: str | Path, workdir: str | Path | None = None) -> dict[str, bytes]:
    """What the next stage sees under `uri`: each listed key and its bytes, with run ids,
    timestamps, measured durations and the run's directory (`workdir`, else `uri`) written the
    same way in every run."""
    store = Storage.from_uri(str(uri))
    root = str(workdir or uri).encode()
    out: dict[str, bytes] = {}
    for obj in store.list():
        data = store.read_bytes(obj.key)
        if obj.key.endswith(".gz"):
            data = gzip.decompress(data)
        if obj.key.endswith((".json", ".jsonl", ".gz", ".yaml", ".txt", ".html")):
            data = _ISO_TIME.sub(b"<time>", _RUN_ID.sub(b"<run>", data.replace(root, b"<root>")))
            data = _TIMING.sub(rb'"\1": <measured>', data)
        out[_RUN_ID.sub(b"<run>", obj.key.encode()).decode()] = data
    return out


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    out = [f"missing {k}" for k in sorted(set(want) - set(got))]
    out += [f"extra {k}" for k in sorted(set(got) - set(want))]
    out += [f"differs {k}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    return out
