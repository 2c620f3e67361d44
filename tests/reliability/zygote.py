"""A process that imports the stages once and forks each run of a stage's CLI from itself.

    python tests/reliability/zygote.py        # then one JSON request per line on stdin

Each run is a real process (a fork of this one, `lumos.cli.main(argv)` in it), so a SIGKILL
ends it exactly as the kernel ends an OOM-killed or preempted pod: no `finally`, no atexit, no
flush. A run is a process group with the workers it starts, killed together (a container's
processes die together). Forking saves each run the imports (torch and the stage modules: seconds each), which is
what makes many kill points per stage affordable. This process never runs a torch operation, so
its children start with no thread pools to inherit.

Request: {"argv": [...], "cwd": str, "env": {...}, "log": path, "kill_at_write": n | null,
"kill_how": "partial" | "after", "count_to": path | null}. Answers, one JSON line each:
{"pid": n} when the run starts, then {"pid": n, "status": code} (a negative code: the signal).

A write is an `os.replace` or `os.rename`: every atomic write in lumos ends in one. With
`kill_at_write=n` the run kills its group (SIGKILL) at its n-th write: "partial" first cuts the file
about to be renamed to half its size (the state a kill while writing it leaves), "after" kills
right after the rename. `count_to` receives the number of writes a run made.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile


def _install_write_hook(kill_at: int | None, how: str, count_to: str | None) -> None:
    real_replace, real_rename = os.replace, os.rename
    count = 0

    def hooked(real):
        def write(src, dst, *args, **kwargs):
            nonlocal count
            count += 1
            if count_to:  # atomically: a timed kill may land here (an empty file read as 0)
                with open(count_to + ".tmp", "w") as f:
                    f.write(str(count))
                real_replace(count_to + ".tmp", count_to)
            if count == kill_at:
                if how == "partial" and os.path.isfile(src):
                    with open(src, "r+b") as f:
                        f.truncate(os.path.getsize(src) // 2)
                    os.killpg(0, signal.SIGKILL)
                result = real(src, dst, *args, **kwargs)
                os.killpg(0, signal.SIGKILL)
                return result
            return real(src, dst, *args, **kwargs)

        return write

    os.replace = hooked(real_replace)
    os.rename = hooked(real_rename)


def _child(request: dict) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # the run and its workers: one group, killed together as a pod's are
        os.chdir(request["cwd"])
        os.environ.update(request.get("env") or {})
        tempfile.tempdir = None  # TMPDIR may be the run's own: not the one this process cached
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        sys.stdin.close()
        _install_write_hook(
            request.get("kill_at_write"), request.get("kill_how", "after"), request.get("count_to")
        )
        from lumos.cli import main

        main(request["argv"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # What export imports when it runs (the dynamo exporter, onnxscript, onnxruntime).
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import torch.onnx._internal.exporter._core  # noqa: F401

    import lumos.cli  # noqa: F401
    import lumos.data.ingest  # noqa: F401
    import lumos.evaluation.evaluate  # noqa: F401
    import lumos.export.onnx_export  # noqa: F401
    import lumos.serving.promote  # noqa: F401
    import lumos.training.featurize  # noqa: F401
    import lumos.training.train  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        with contextlib.suppress(OSError):  # also here: the group exists before its pid is sent
            os.setpgid(pid, pid)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        # What the run started and left running dies with it, as in a killed container.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        print(json.dumps({"pid": pid, "status": code}), flush=True)


if __name__ == "__main__":
    main()
