"""A fault-injecting HTTP proxy in front of the S3 test server, for tests.

    with FaultProxy(s3_endpoint, Schedule(seed=3, rate=0.3, kinds=("slowdown_503",))) as proxy:
        os.environ["LUMOS_S3_ENDPOINT"] = proxy.url     # every client request now goes through it
        ...
        proxy.injected()                                # {"slowdown_503": 4}

Each request the client sends is read whole, then either forwarded to the real server (moto) and
its answer passed back, or met with a fault the schedule picks for it:

- `drop_request`: the connection closes halfway through the request body (the server never sees
  the request; a body-less request is dropped after its headers).
- `error_500` / `slowdown_503`: S3's error answer, with the XML body AWS S3 sends
  (`InternalError`, `SlowDown`); the server never sees the request.
- `stall`: the request is forwarded and applied, then the answer stalls (after half its body,
  or before its headers if it has none) for `stall_s`, longer than the client's timeout, and the
  connection closes.
- `truncate`: the request is applied; the answer's headers promise the whole body, half of it
  is sent, and the connection closes.
- `drop_response`: the request is applied and the connection closes with no answer at all (the
  client cannot tell whether it was applied: the lost-answer case).
- `access_denied_403`: S3's `AccessDenied` answer; not a transient fault (for the tests that
  check it is not retried).

Every answer closes its connection (`Connection: close`), so each request is one connection and
the schedule sees requests in the order the client sends them. The proxy runs in threads of the
test process; `log` records each request with the fault it met.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import socketserver
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlparse

TRANSIENT_KINDS = (
    "drop_request",
    "error_500",
    "slowdown_503",
    "stall",
    "truncate",
    "drop_response",
)
KINDS = (*TRANSIENT_KINDS, "access_denied_403")

_ERRORS = {
    "error_500": (
        500,
        "Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "slowdown_503": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "access_denied_403": (403, "Forbidden", "AccessDenied", "Access Denied"),
}


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> str:
        return self.target.partition("?")[2]


@dataclass
class Schedule:
    """Which requests meet which fault: seeded, so a failing seed replays exactly.

    Each request matching `only` (all, if None) meets a fault with probability `rate`, of a kind
    drawn from `kinds`; at most `max_in_a_row` matching requests in a row meet one, so a client
    that retries a few times always gets through. `plan` pins faults to the n-th matching request
    (0-based) instead, e.g. {1: "truncate"}; `always` faults every matching request."""

    seed: int = 0
    rate: float = 0.0
    kinds: tuple[str, ...] = TRANSIENT_KINDS
    only: Callable[[Request], bool] | None = None
    plan: dict[int, str] = field(default_factory=dict)
    always: str | None = None
    max_in_a_row: int = 1

    def __post_init__(self) -> None:
        unknown = {*self.kinds, *self.plan.values(), self.always or KINDS[0]} - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}: use {KINDS}")
        self._rng = random.Random(self.seed)
        self._matched = 0
        self._in_a_row = 0
        self._lock = threading.Lock()

    def fault_for(self, request: Request) -> str | None:
        if self.only is not None and not self.only(request):
            return None
        with self._lock:
            n = self._matched
            self._matched += 1
            if self.always:
                return self.always
            if self.plan:
                return self.plan.get(n)
            draw, kind = self._rng.random(), self._rng.choice(self.kinds)
            if draw < self.rate and self._in_a_row < self.max_in_a_row:
                self._in_a_row += 1
                return kind
            self._in_a_row = 0
            return None


@dataclass(frozen=True)
class LogEntry:
    method: str
    target: str
    headers: dict[str, str]
    fault: str | None


class FaultProxy:
    def __init__(
        self,
        upstream: str,
        schedule: Schedule | None = None,
        stall_s: float = 2.0,
        delay_s: float = 0.0,
        hold: Callable[[Request], bool] | None = None,
    ):
        """`delay_s`: every request waits that long before it is forwarded (a slow link: no
        fault, only time). `hold`: a request it matches waits, unforwarded, until `release()`;
        `held` is set once one waits (to stop one of two concurrent runs at a chosen request,
        e.g. its commit, while the other runs)."""
        parsed = urlparse(upstream)
        self.delay_s = delay_s
        self.hold = hold
        self.held = threading.Event()
        self._released = threading.Event()
        self.upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self.schedule = schedule or Schedule()
        self.stall_s = stall_s
        self.log: list[LogEntry] = []
        self._log_lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        """Let held requests (and all later ones) through."""
        self._released.set()

    def injected(self) -> Counter[str]:
        """How many requests met each fault kind so far."""
        return Counter(e.fault for e in self.log if e.fault)

    def requests(self, method: str | None = None, contains: str = "") -> list[LogEntry]:
        return [
            e for e in self.log if (method is None or e.method == method) and contains in e.target
        ]

    # -- one connection, one request -----------------------------------------------------------
    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            head = _read_head(reader)
            if head is None:
                return
            method, target, headers = head
            length = int(headers.get("content-length", "0") or 0)
            if headers.get("expect", "").lower() == "100-continue":
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            request_body = b""
            fault: str | None = None
            if length:
                # Read half the body first: a dropped request dies here, mid-body.
                request_body = reader.read(length // 2)
            request = Request(method, target, headers, b"")
            fault = self.schedule.fault_for(request)
            with self._log_lock:
                self.log.append(LogEntry(method, target, headers, fault))
            if fault == "drop_request":
                _abort(conn)
                return
            request_body += reader.read(length - len(request_body))
            time.sleep(self.delay_s)
            if self.hold is not None and self.hold(request) and not self._released.is_set():
                self.held.set()
                self._released.wait()
            if fault in _ERRORS:
                conn.sendall(_error_answer(fault, method, target))
                return
            status, reason, answer_headers, body = self._forward(
                method, target, headers, request_body
            )
            if fault == "drop_response":
                _abort(conn)
                return
            head_bytes = _answer_head(status, reason, answer_headers, len(body))
            if fault == "truncate":
                conn.sendall(head_bytes + body[: len(body) // 2])
                _abort(conn)
                return
            if fault == "stall":
                if body and method != "HEAD":
                    conn.sendall(head_bytes + body[: len(body) // 2])
                time.sleep(self.stall_s)
                _abort(conn)
                return
            conn.sendall(head_bytes + (b"" if method == "HEAD" else body))
        except OSError:
            pass  # the client went away first
        finally:
            reader.close()
            conn.close()

    def _forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            send = {k: v for k, v in headers.items() if k not in ("connection", "expect")}
            upstream.request(method, target, body=body or None, headers=send)
            response = upstream.getresponse()
            answer = response.read()
            kept = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in ("connection", "transfer-encoding", "content-length")
            ]
            if method == "HEAD":  # a HEAD answer's Content-Length is the object's size: keep it
                kept += [(k, v) for k, v in response.getheaders() if k.lower() == "content-length"]
            return response.status, response.reason, kept, answer
        finally:
            upstream.close()


def _read_head(reader) -> tuple[str, str, dict[str, str]] | None:
    line = reader.readline(65536)
    if not line:
        return None
    method, target, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        raw = reader.readline(65536)
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target, headers


def _answer_head(status: int, reason: str, headers: list[tuple[str, str]], length: int) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if not any(k.lower() == "content-length" for k, _ in headers):
        lines.append(f"Content-Length: {length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _error_answer(kind: str, method: str, target: str) -> bytes:
    status, reason, code, message = _ERRORS[kind]
    request_id = uuid.uuid4().hex[:16].upper()
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{target.partition('?')[0]}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    headers = [("Content-Type", "application/xml"), ("x-amz-request-id", request_id)]
    if method == "HEAD":  # S3 answers a HEAD with the status alone
        return _answer_head(status, reason, headers, 0)
    return _answer_head(status, reason, headers, len(body)) + body


def _abort(conn: socket.socket) -> None:
    """Close at once; the client sees the connection end where it is (no answer, or half one)."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
