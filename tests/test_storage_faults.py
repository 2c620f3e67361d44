"""Storage against a faulty object store: every S3 operation the project uses, through
`fault_proxy.FaultProxy` in front of the real S3 test server (moto), under seeded faults.

What is checked is what a user relies on: the operation ends as it would without faults (the
bytes stored and read are the right ones, nothing partial is visible, no multipart upload is left
open), transient faults are retried within a bound, and what is not transient (403, 404, a failed
condition) fails at once with an error that names it."""

from __future__ import annotations

import hashlib
import io
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fault_proxy import KINDS, TRANSIENT_KINDS, FaultProxy, Request, Schedule

from lumos.storage import (
    ObjectNotFound,
    PreconditionFailed,
    RetryPolicy,
    Storage,
    StorageError,
)

# stalls past the client timeout and retries with backoff: about a minute in all
pytestmark = pytest.mark.slow

MIB = 1 << 20


@pytest.fixture()
def direct(s3_bucket, s3_env):
    """A minio client talking to the server itself, to check what was really stored."""
    from minio import Minio

    return Minio(
        s3_env["LUMOS_S3_ENDPOINT"].removeprefix("http://"), "testing", "testing", secure=False
    )


def _through(proxy: FaultProxy, bucket: str, monkeypatch, timeout_s: float = 1.0) -> Storage:
    monkeypatch.setenv("LUMOS_S3_ENDPOINT", proxy.url)
    monkeypatch.setenv("LUMOS_S3_TIMEOUT_S", str(timeout_s))  # the proxy stalls for 2 s
    monkeypatch.setenv("LUMOS_S3_BACKOFF_S", "0.01")
    return Storage.from_uri(f"s3://{bucket}/data")


def _open_uploads(s3_endpoint: str, bucket: str) -> list[str]:
    """Multipart uploads the server still holds open (ListMultipartUploads)."""
    import urllib.request

    with urllib.request.urlopen(f"{s3_endpoint}/{bucket}?uploads") as response:
        root = ET.fromstring(response.read())
    return [el.text or "" for el in root.iter() if el.tag.endswith("UploadId")]


def _payload(n: int, seed: int) -> bytes:
    return (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]


def _every_operation(store: Storage, tmp_path: Path, seed: int) -> None:
    """List, get, ranged get (a resumed download or stream), put, multipart put, conditional
    put (create and compare-and-swap), exists and delete: what the stages do with a store."""
    small, big = _payload(3000, seed), _payload(6 * MIB + 123, seed)  # big: a 2-part upload
    store.write_bytes("a/small.bin", small)
    store.write_json("a/meta.json", {"seed": seed})
    store.write_json("reg/current.json", {"version": 1}, if_absent=True)
    record, version = store.read_json_versioned("reg/current.json")
    store.write_json("reg/current.json", {"version": record["version"] + 1}, if_version=version)
    (tmp_path / "big.bin").write_bytes(big)
    store.upload_file(tmp_path / "big.bin", "b/big.bin")
    assert [o.key for o in store.list()] == [
        "a/meta.json",
        "a/small.bin",
        "b/big.bin",
        "reg/current.json",
    ]
    assert store.read_bytes("a/small.bin") == small
    assert store.read_json("a/meta.json") == {"seed": seed}
    assert store.read_json("reg/current.json") == {"version": 2}
    store.download_file("b/big.bin", tmp_path / "down" / "big.bin")
    assert (tmp_path / "down" / "big.bin").read_bytes() == big
    assert [p.name for p in (tmp_path / "down").iterdir()] == ["big.bin"]  # no partial file
    with store.open_read("b/big.bin") as stream:
        assert hashlib.sha256(stream.read()).digest() == hashlib.sha256(big).digest()
    assert store.exists("a/small.bin") and not store.exists("a/none.bin")
    store.delete("a/small.bin")
    store.delete("a/small.bin")
    assert not store.exists("a/small.bin")
    with pytest.raises(PreconditionFailed):
        store.write_json("reg/current.json", {"version": 99}, if_version=version)  # stale


@pytest.mark.parametrize("kind", TRANSIENT_KINDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_every_operation_survives_each_fault_kind(
    kind, seed, s3_endpoint, s3_bucket, direct, tmp_path, monkeypatch
):
    schedule = Schedule(seed=seed, rate=0.35, kinds=(kind,))
    with FaultProxy(s3_endpoint, schedule) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch)
        _every_operation(store, tmp_path, seed)
    assert proxy.injected()[kind] >= 2, proxy.injected()  # the faults really happened
    stored = sorted(o.object_name for o in direct.list_objects(s3_bucket, recursive=True))
    assert stored == ["data/a/meta.json", "data/b/big.bin", "data/reg/current.json"]
    assert direct.get_object(s3_bucket, "data/b/big.bin").read() == _payload(6 * MIB + 123, seed)
    assert len(_open_uploads(s3_endpoint, s3_bucket)) <= _lost_creates(proxy)


def _lost_creates(proxy: FaultProxy) -> int:
    """CreateMultipartUploads applied whose answer was lost: each may leave an empty upload
    open (what S3's AbortIncompleteMultipartUpload lifecycle rule is for); nothing else may."""
    applied_but_lost = ("stall", "truncate", "drop_response")
    return sum(e.fault in applied_but_lost for e in proxy.requests("POST", "?uploads"))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_every_operation_survives_mixed_faults(
    seed, s3_endpoint, s3_bucket, direct, tmp_path, monkeypatch
):
    with FaultProxy(s3_endpoint, Schedule(seed=seed, rate=0.4, max_in_a_row=2)) as proxy:
        _every_operation(_through(proxy, s3_bucket, monkeypatch), tmp_path, seed)
    assert sum(proxy.injected().values()) >= 5
    assert len(_open_uploads(s3_endpoint, s3_bucket)) <= _lost_creates(proxy)


def test_a_download_resumes_where_it_broke(s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    """Progress is kept: after a body cut off halfway, the retry is a ranged GET from the bytes
    already on disk, pinned to the first answer's ETag."""
    data = _payload(4 * MIB, 7)
    Storage.from_uri(f"s3://{s3_bucket}/data").write_bytes("x.bin", data)
    only_gets = Schedule(plan={0: "truncate"}, only=lambda r: r.method == "GET")
    with FaultProxy(s3_endpoint, only_gets) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch)
        store.download_file("x.bin", tmp_path / "x.bin")
    assert (tmp_path / "x.bin").read_bytes() == data
    first, second = proxy.requests("GET", "x.bin")
    assert "range" not in first.headers
    start = int(second.headers["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < start <= 2 * MIB  # resumed, not restarted (half the body came through)
    assert second.headers["if-match"].strip('"') == hashlib.md5(data).hexdigest()


def test_a_stream_resumes_where_it_broke(s3_endpoint, s3_bucket, monkeypatch):
    data = _payload(3 * MIB, 8)
    Storage.from_uri(f"s3://{s3_bucket}/data").write_bytes("s.bin", data)
    only_gets = Schedule(plan={0: "stall"}, only=lambda r: r.method == "GET")
    with FaultProxy(s3_endpoint, only_gets) as proxy:
        stream = _through(proxy, s3_bucket, monkeypatch).open_read("s.bin")
        with stream:
            assert stream.read() == data
    assert [("range" in e.headers) for e in proxy.requests("GET", "s.bin")] == [False, True]


def test_a_multipart_upload_resends_only_the_failed_part(
    s3_endpoint, s3_bucket, direct, tmp_path, monkeypatch
):
    data = _payload(11 * MIB, 9)  # parts of 5, 5 and 1 MiB
    (tmp_path / "f.bin").write_bytes(data)
    part_2 = Schedule(plan={0: "drop_request"}, only=lambda r: "partNumber=2" in r.query)
    with FaultProxy(s3_endpoint, part_2) as proxy:
        _through(proxy, s3_bucket, monkeypatch).upload_file(tmp_path / "f.bin", "f.bin")
    sent = [e.target for e in proxy.requests("PUT", "partNumber=")]
    assert sorted(t.split("partNumber=")[1].split("&")[0] for t in sent) == ["1", "2", "2", "3"]
    assert len(proxy.requests("POST", "uploads")) == 1  # one multipart upload, not restarted
    assert direct.get_object(s3_bucket, "data/f.bin").read() == data


def test_a_multipart_upload_that_fails_is_aborted(
    s3_endpoint, s3_bucket, direct, tmp_path, monkeypatch
):
    (tmp_path / "f.bin").write_bytes(_payload(11 * MIB, 10))
    part_2 = Schedule(always="slowdown_503", only=lambda r: "partNumber=2" in r.query)
    with FaultProxy(s3_endpoint, part_2) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch)
        with pytest.raises(
            StorageError, match=r"upload to s3://.*/f.bin: SlowDown.*gave up after 4"
        ):
            store.upload_file(tmp_path / "f.bin", "f.bin")
    policy = RetryPolicy()
    assert len(proxy.requests("PUT", "partNumber=2")) == policy.attempts * (
        policy.request_retries + 1
    )
    assert _open_uploads(s3_endpoint, s3_bucket) == []  # minio aborted each failed upload
    assert list(direct.list_objects(s3_bucket, recursive=True)) == []


def test_a_lost_answer_to_a_conditional_put_is_not_a_conflict(
    s3_endpoint, s3_bucket, direct, monkeypatch
):
    """The create landed but its answer was lost; the resend fails If-None-Match against our
    own object, which holds exactly our bytes: that is success, not 'exists already'."""
    only_puts = Schedule(plan={0: "drop_response"}, only=lambda r: r.method == "PUT")
    with FaultProxy(s3_endpoint, only_puts) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch)
        store.write_json("reg/v1.json", {"v": 1}, if_absent=True)
        with pytest.raises(PreconditionFailed, match="exists already"):  # a real conflict still is
            store.write_json("reg/v1.json", {"v": "other"}, if_absent=True)
    assert len(proxy.requests("PUT", "reg/v1.json")) == 3
    assert direct.get_object(s3_bucket, "data/reg/v1.json").read() == b'{\n  "v": 1\n}\n'


@pytest.mark.parametrize(
    ("fault", "call", "error", "message"),
    [
        ("access_denied_403", "read", StorageError, "access denied \\(AccessDenied\\)"),
        ("access_denied_403", "write", StorageError, "access denied \\(AccessDenied\\)"),
        ("access_denied_403", "exists", StorageError, "access denied"),
        (None, "read_missing", ObjectNotFound, "no object at s3://.*/missing.bin"),
        (None, "stale_write", PreconditionFailed, "changed since it was read"),
    ],
)
def test_what_is_not_transient_is_not_retried(
    fault, call, error, message, s3_endpoint, s3_bucket, monkeypatch
):
    setup = Storage.from_uri(f"s3://{s3_bucket}/data")
    setup.write_bytes("k.bin", b"v1")
    _, stale = setup.read_versioned("k.bin")
    setup.write_bytes("k.bin", b"v2")
    with FaultProxy(s3_endpoint, Schedule(always=fault) if fault else Schedule()) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch)
        actions = {
            "read": lambda: store.read_bytes("k.bin"),
            "write": lambda: store.write_bytes("k.bin", b"x"),
            "exists": lambda: store.exists("k.bin"),
            "read_missing": lambda: store.read_bytes("missing.bin"),
            "stale_write": lambda: store.write_bytes("k.bin", b"v3", if_version=stale),
        }
        with pytest.raises(error, match=message):
            actions[call]()
    sent = [(e.method, e.target.rsplit("/", 1)[-1]) for e in proxy.log]
    if call == "stale_write":  # the PUT, then one HEAD to see whether the object is ours
        assert sent == [("PUT", "k.bin"), ("HEAD", "k.bin")]
    else:
        assert len(sent) == 1, sent


def test_retries_are_bounded_and_the_error_names_the_fault(s3_endpoint, s3_bucket, monkeypatch):
    Storage.from_uri(f"s3://{s3_bucket}/data").write_bytes("k.bin", b"v")
    with FaultProxy(s3_endpoint, Schedule(always="slowdown_503")) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch)
        start = time.monotonic()
        with pytest.raises(StorageError, match=r"read s3://.*/k.bin: SlowDown: Please reduce"):
            store.read_bytes("k.bin")
        elapsed = time.monotonic() - start
    policy = RetryPolicy()
    assert len(proxy.log) == policy.attempts * (policy.request_retries + 1)
    assert elapsed < 10


def test_a_stall_past_the_timeout_is_retried_then_named(s3_endpoint, s3_bucket, monkeypatch):
    Storage.from_uri(f"s3://{s3_bucket}/data").write_bytes("k.bin", b"v" * 10000)
    gets = Schedule(plan={0: "stall"}, only=lambda r: r.method == "GET")
    with FaultProxy(s3_endpoint, gets) as proxy:
        assert _through(proxy, s3_bucket, monkeypatch).read_bytes("k.bin") == b"v" * 10000
    assert len(proxy.requests("GET")) == 2


def test_a_listing_resumes_after_the_last_key(s3_endpoint, s3_bucket, direct, monkeypatch):
    """A listing broken after its first page (1000 keys) continues from the last key it
    returned (start-after) instead of listing again from the start."""
    from concurrent.futures import ThreadPoolExecutor

    empty = lambda i: direct.put_object(s3_bucket, f"data/k/{i:05d}", io.BytesIO(b""), 0)  # noqa: E731
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(empty, range(1003)))
    pages = lambda r: r.method == "GET" and "list-type=2" in r.query  # noqa: E731
    schedule = Schedule(
        plan={1: "truncate", 2: "truncate", 3: "truncate", 4: "truncate"}, only=pages
    )
    with FaultProxy(s3_endpoint, schedule) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch, timeout_s=10)  # moto lists slowly
        keys = [o.key for o in store.list("k/")]
    assert keys == [f"k/{i:05d}" for i in range(1003)]
    sent = [
        (e.fault, e.target.partition("start-after=")[2])
        for e in proxy.requests("GET", "list-type=2")
    ]
    # page 1; page 2 broken 4 times (urllib3's 3 retries, then the operation's retry), then
    # page 2, starting after the last key returned before it
    assert sent == [(None, "")] + [("truncate", "data%2Fk%2F00999")] * 4 + [
        (None, "data%2Fk%2F00999")
    ]


def test_schedule_is_seeded():
    request = Request("GET", "/b/k", {}, b"")
    draws = [[Schedule(seed=s, rate=0.5).fault_for(request) for _ in range(30)] for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]
    assert set(KINDS) > set(TRANSIENT_KINDS)
    with pytest.raises(ValueError, match="unknown fault kinds"):
        Schedule(kinds=("earthquake",))


def test_a_500_on_a_put_is_resent(s3_endpoint, s3_bucket, monkeypatch):
    puts = Schedule(plan={0: "error_500"}, only=lambda r: r.method == "PUT")
    with FaultProxy(s3_endpoint, puts) as proxy:
        store = _through(proxy, s3_bucket, monkeypatch)
        store.write_bytes("w.bin", b"abc")
        assert store.read_bytes("w.bin") == b"abc"
    assert [e.fault for e in proxy.requests("PUT")] == ["error_500", None]
