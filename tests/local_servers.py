"""Real server processes on 127.0.0.1 for tests: start one, wait until it answers, stop it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(
    command: Callable[[int], list[str]], ready_path: str = "/", timeout_s: float = 30
) -> Iterator[str]:
    """Run `command(port)` on a free port; yield its base URL once `ready_path` answers."""
    port = free_port()
    proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                urllib.request.urlopen(url + ready_path, timeout=1)
                break
            except OSError as err:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{command(port)[0]} did not start on {url}") from err
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
