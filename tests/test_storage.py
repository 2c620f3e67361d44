"""Storage: the same behaviour on a local directory and on the S3 test server."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lumos.storage import (
    LocalStorage,
    ObjectNotFound,
    PreconditionFailed,
    S3Storage,
    Storage,
    StorageError,
)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage.from_uri(str(tmp_path / "root"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage.from_uri(f"s3://{bucket}/some/prefix")


def test_write_read_list_delete(store: Storage):
    store.write_bytes("b/two.bin", b"\x00\x01")
    store.write_bytes("a.txt", b"hello")
    store.write_bytes("b/c/three.txt", b"333")
    store.write_json("meta/info.json", {"x": [1, 2], "y": "z"})

    assert store.read_bytes("a.txt") == b"hello"
    assert store.read_json("meta/info.json") == {"x": [1, 2], "y": "z"}
    keys = [o.key for o in store.list()]
    assert keys == ["a.txt", "b/c/three.txt", "b/two.bin", "meta/info.json"]  # sorted, recursive
    sizes = {o.key: o.size for o in store.list()}
    assert sizes["b/two.bin"] == 2
    assert [o.key for o in store.list("b/")] == ["b/c/three.txt", "b/two.bin"]
    assert [o.key for o in store.list("b/t")] == ["b/two.bin"]  # S3 prefix semantics
    assert list(store.list("nothing/")) == []
    # The whole key's byte order, as S3 lists: "b-x" < "b.y" < "b/..." < "b0" ("-" < "." < "/" < "0").
    for key in ("b0", "b.y", "b-x"):
        store.write_bytes(key, b"")
    assert [o.key for o in store.list("b")] == ["b-x", "b.y", "b/c/three.txt", "b/two.bin", "b0"]

    assert store.exists("a.txt") and not store.exists("missing.txt")
    store.write_bytes("a.txt", b"replaced")  # overwrite is atomic and complete
    assert store.read_bytes("a.txt") == b"replaced"
    store.delete("a.txt")
    store.delete("a.txt")  # deleting a missing object is not an error
    assert not store.exists("a.txt")

    with store.open_read("b/c/three.txt") as stream:
        assert stream.read() == b"333"


def test_child_and_uri(store: Storage):
    child = store.child("sub/dir")
    child.write_bytes("x.txt", b"x")
    assert child.uri == store.uri + "/sub/dir"
    assert store.read_bytes("sub/dir/x.txt") == b"x"
    again = Storage.from_uri(child.uri)
    assert again.uri == child.uri and again.read_bytes("x.txt") == b"x"
    assert child.key_uri("x.txt") == child.uri + "/x.txt"


def test_missing_object_names_the_uri(store: Storage):
    with pytest.raises(ObjectNotFound, match="nope.bin"):
        store.read_bytes("nope.bin")
    with pytest.raises(ObjectNotFound) as info:
        store.read_json("dir/nope.json")
    assert store.uri in str(info.value)
    assert isinstance(info.value, StorageError)
    with pytest.raises(ObjectNotFound):
        store.download_file("nope.bin", "/tmp/never-written")


def test_files_and_dirs_round_trip(store: Storage, tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "top.txt").write_bytes(b"top")
    (src / "nested" / "deep.bin").write_bytes(bytes(range(256)) * 1000)
    store.upload_dir(src, prefix="up")
    assert [o.key for o in store.list("up/")] == ["up/nested/deep.bin", "up/top.txt"]

    out = tmp_path / "out"
    store.download_dir("up", out)
    assert (out / "top.txt").read_bytes() == b"top"
    assert (out / "nested" / "deep.bin").read_bytes() == bytes(range(256)) * 1000

    store.upload_file(src / "top.txt", "single/top.txt")
    store.download_file("single/top.txt", tmp_path / "one" / "t.txt")
    assert (tmp_path / "one" / "t.txt").read_bytes() == b"top"
    assert not list(tmp_path.glob("one/.*"))  # no temporary files left behind


def test_staged_files_are_moved_into_a_local_store_and_uploaded_to_s3(store: Storage):
    """`staging_dir` + `upload_dir(move=True)`, as a checkpoint is written: a local store takes
    the staged files by renaming them (written once, no second copy on disk); nothing staged
    is ever listed, and nothing is left behind."""
    parent = Storage.from_uri(str(store.root.parent)) if isinstance(store, LocalStorage) else None
    with store.staging_dir() as staged:
        (Path(staged) / "w").mkdir()
        (Path(staged) / "w" / "big.bin").write_bytes(b"\x01" * 4096)
        (Path(staged) / "meta.json").write_bytes(b"{}")
        inode = (Path(staged) / "w" / "big.bin").stat().st_ino
        assert list(store.list()) == []
        if parent is not None:  # the staging directory sits beside the store, hidden
            assert Path(staged).parent == store.root.parent
            assert list(parent.list()) == []
        store.upload_dir(staged, prefix="ckpt", move=True)
        assert [o.key for o in store.list()] == ["ckpt/meta.json", "ckpt/w/big.bin"]
        if parent is not None:
            assert (store.root / "ckpt" / "w" / "big.bin").stat().st_ino == inode  # renamed
            assert not (Path(staged) / "w" / "big.bin").exists()
    assert store.read_bytes("ckpt/w/big.bin") == b"\x01" * 4096
    if parent is not None:
        assert sorted(p.name for p in store.root.parent.iterdir()) == [store.root.name]
        with pytest.raises(StorageError, match="cannot move .*missing.bin"):
            store.upload_file(store.root / "missing.bin", "x.bin", move=True)


def test_staging_left_by_a_killed_writer_is_removed(store: Storage):
    """`remove_staging`, which a training run calls on its out_uri: a writer killed inside
    `staging_dir` leaves the directory beside the store's keys (locally); it is removed and
    nothing else is touched."""
    store.write_bytes("step-1/a.bin", b"1")
    with store.child("step-2").staging_dir() as killed:
        (Path(killed) / "big.bin").write_bytes(b"x" * 4096)
        removed = store.remove_staging()
        if isinstance(store, LocalStorage):  # an object store stages in the local temp dir
            assert removed == (Path(killed).name,) and not Path(killed).exists()
        else:
            assert removed == () and Path(killed).exists()
    assert [o.key for o in store.list()] == ["step-1/a.bin"]
    assert store.remove_staging() == ()
    assert Storage.from_uri(str(Path(killed).parent / "never-written")).remove_staging() == ()


@pytest.mark.skipif(
    not Path("/dev/shm").is_dir(), reason="needs a second filesystem (/dev/shm) to move across"
)
def test_a_move_across_filesystems_copies(tmp_path):
    import tempfile

    if Path("/dev/shm").stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test's directory here")
    store = Storage.from_uri(str(tmp_path / "root"))
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        (Path(other) / "a.bin").write_bytes(b"abc")
        store.upload_file(Path(other) / "a.bin", "a.bin", move=True)  # EXDEV: falls back to a copy
    assert store.read_bytes("a.bin") == b"abc"
    assert [o.key for o in store.list()] == ["a.bin"]


def test_conditional_writes_are_a_compare_and_swap(store: Storage):
    """`if_absent` creates only; `if_version` replaces only what was read: the second of two
    writers that read the same version fails and writes nothing (the registry's current.json)."""
    store.write_json("head/current.json", {"version": "v0001"}, if_absent=True)
    with pytest.raises(PreconditionFailed, match="exists already"):
        store.write_json("head/current.json", {"version": "other"}, if_absent=True)

    first, version = store.read_json_versioned("head/current.json")
    assert first == {"version": "v0001"}
    store.write_json("head/current.json", {"version": "v0002"}, if_version=version)  # A wins
    with pytest.raises(PreconditionFailed, match="changed"):  # B read the same version
        store.write_json("head/current.json", {"version": "v0003"}, if_version=version)
    data, latest = store.read_json_versioned("head/current.json")
    assert data == {"version": "v0002"} and latest != version
    store.write_json("head/current.json", {"version": "v0003"}, if_version=latest)
    assert store.read_json("head/current.json") == {"version": "v0003"}
    assert [o.key for o in store.list()] == ["head/current.json"]  # no lock or temp file listed

    store.delete("head/current.json")
    with pytest.raises(PreconditionFailed):  # gone since it was read
        store.write_bytes("head/current.json", b"x", if_version=latest)
    assert not store.exists("head/current.json")
    with pytest.raises(ObjectNotFound):
        store.read_versioned("head/missing.json")
    with pytest.raises(ValueError, match="if_version or if_absent, not both"):
        store.write_bytes("head/x.json", b"x", if_version=latest, if_absent=True)


def test_download_of_a_listed_version(store: Storage, tmp_path):
    """`if_version`: the version listed and no other (the feature cache names files after it)."""
    store.write_bytes("part.bin", b"old")
    [listed] = store.list()
    store.download_file("part.bin", tmp_path / "a", if_version=listed.version)
    assert (tmp_path / "a").read_bytes() == b"old"
    store.write_bytes("part.bin", b"new content")  # rewritten since it was listed
    with pytest.raises(PreconditionFailed, match="changed since it was listed"):
        store.download_file("part.bin", tmp_path / "b", if_version=listed.version)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "root") == ["a"]  # nothing else


def test_a_file_in_the_way_is_a_storage_error(tmp_path):
    store = Storage.from_uri(str(tmp_path / "root"))
    store.write_bytes("a/b", b"a file where a directory would go")
    with pytest.raises(StorageError, match="cannot write"):
        store.write_bytes("a/b/c", b"x")
    with pytest.raises(StorageError, match="cannot upload"):
        store.upload_file(tmp_path / "root" / "a" / "b", "a/b/d")
    with pytest.raises(StorageError, match="cannot download"):
        store.download_file("a/b", tmp_path / "root" / "a" / "b" / "e")


def test_invalid_keys_are_rejected(store: Storage):
    for bad in ["", "/abs", "a/../b", "a//b"]:
        with pytest.raises(StorageError, match="invalid storage key"):
            store.write_bytes(bad, b"x")


def test_from_uri_forms(tmp_path):
    assert isinstance(Storage.from_uri(str(tmp_path)), LocalStorage)
    assert Storage.from_uri(f"file://{tmp_path}").uri == str(tmp_path)
    s3 = Storage.from_uri("s3://bucket/a/b/")
    assert isinstance(s3, S3Storage) and s3.uri == "s3://bucket/a/b"
    assert Storage.from_uri("s3://bucket").uri == "s3://bucket"
    with pytest.raises(StorageError, match="unsupported storage URI"):
        Storage.from_uri("gs://bucket/x")
    with pytest.raises(StorageError, match="no bucket"):
        Storage.from_uri("s3:///x")


def test_local_write_is_atomic_no_tmp_visible(tmp_path):
    store = Storage.from_uri(str(tmp_path))
    (tmp_path / ".x.bin.lumos-tmp-deadbeef").write_bytes(b"partial")  # a crashed writer's leftover
    store.write_bytes("x.bin", b"full")
    assert [o.key for o in store.list()] == ["x.bin"]


def test_s3_errors_are_clear(s3_env, s3_bucket, monkeypatch):
    store = Storage.from_uri(f"s3://{s3_bucket}-does-not-exist/p")
    with pytest.raises(StorageError, match="does not exist"):
        store.write_bytes("x", b"x")
    monkeypatch.delenv("LUMOS_S3_ENDPOINT")
    with pytest.raises(StorageError, match="LUMOS_S3_ENDPOINT is not set"):
        Storage.from_uri(f"s3://{s3_bucket}").read_bytes("x")


def test_s3_storage_pickles_for_worker_processes(s3_bucket):
    store = Storage.from_uri(f"s3://{s3_bucket}/p")
    store.write_bytes("k", b"v")  # the client exists now
    clone = pickle.loads(pickle.dumps(store))
    assert clone.read_bytes("k") == b"v"
