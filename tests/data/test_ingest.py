"""Ingest end to end: accounting, dedup, idempotence, incremental mode, fan-out, sources, metrics."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from dataset_samples import load_all_samples
from ingest_corpus import CORPUS_REJECTIONS, build_corpus, encode, scene, write_local
from PIL import Image

from lumos.configs.data import IngestConfig
from lumos.data.ingest import ingest, ingest_partition, merge_partitions, plan_partitions
from lumos.data.ingest_run import is_paired
from lumos.data.shards import iter_shard_records
from lumos.data.sources import Source, read_with_retries
from lumos.storage import ObjectNotFound, Storage, StorageError

CFG = IngestConfig(resolution=32, image_format="png", workers=1, retry_backoff_s=0.001)


def report_rows(dataset_uri: str) -> list[dict]:
    store = Storage.from_uri(dataset_uri)
    manifest = store.read_json("manifest.json")
    lines = store.read_bytes(manifest["runs"][-1]["report"]).decode().splitlines()
    return [json.loads(line) for line in lines]


def assert_report_names_the_shards(dataset_uri: str) -> None:
    """Each ingested row of the last run names the shard, listed in the manifest, that holds it."""
    store = Storage.from_uri(dataset_uri)
    names = {s["name"] for s in store.read_json("manifest.json")["shards"]}
    rows = [r for r in report_rows(dataset_uri) if r["outcome"] == "ingested"]
    assert rows and {r["shard"] for r in rows} <= names
    for shard in {r["shard"] for r in rows}:
        held = [key for key, _ in iter_shard_records(store, shard)]
        assert held == [r["key"] for r in rows if r["shard"] == shard]


def assert_every_object_once(rows: list[dict], listed_keys: set[str]) -> None:
    seen = [r["source_key"] for r in rows] + [s for r in rows for s in r.get("sidecars", [])]
    images = [r["source_key"] for r in rows]
    assert len(images) == len(set(images)), "an object reported twice"
    assert set(seen) == listed_keys, f"unaccounted: {listed_keys - set(seen)}"
    assert {r["outcome"] for r in rows} <= {"ingested", "duplicate", "rejected"}


def test_bad_corpus_from_s3_is_fully_accounted(s3_bucket, tmp_path):
    """Done-when: every bad-input kind, from the S3 server; nothing crashes, counts add up."""
    from lumos.storage import S3Storage

    raw = Storage.from_uri(f"s3://{s3_bucket}/raw")
    corpus = build_corpus()
    for key, data in corpus.items():
        raw.write_bytes(key, data)
    # An object that is listed but cannot be read: archived (GLACIER) objects refuse GET.
    assert isinstance(raw, S3Storage)
    raw.client.put_object(
        s3_bucket,
        "raw/bad/archived.png",
        io.BytesIO(encode(scene(50), "PNG")),
        length=len(encode(scene(50), "PNG")),
        metadata={"x-amz-storage-class": "GLACIER"},
    )
    dataset = f"s3://{s3_bucket}/datasets/images"
    cfg = CFG.model_copy(update={"workers": 2, "max_retries": 2})
    result = ingest(cfg, raw.uri, dataset, progress=False)

    listed = {o.key for o in raw.list()}
    rows = report_rows(dataset)
    assert_every_object_once(rows, listed)
    assert result.listed == len(listed) == result.accounted
    assert result.sidecars == 3  # jpeg.txt, png.json, badside.json (orphan.json is rejected)
    by_key = {r["source_key"]: r for r in rows}
    for key, reason in (CORPUS_REJECTIONS | {"bad/archived.png": "unreadable"}).items():
        assert by_key[key]["outcome"] == "rejected" and by_key[key]["reason"] == reason, by_key[key]
    assert by_key["later/copy_of_png.png"]["reason"] == "exact"
    assert by_key["later/copy_of_png.png"]["duplicate_of"] == "good__png"
    assert by_key["later/reencoded.jpg"]["reason"] == "near"
    assert by_key["later/reencoded.jpg"]["duplicate_of"] == "good__jpeg"
    ingested = {k for k, r in by_key.items() if r["outcome"] == "ingested"}
    assert len(ingested) == result.ingested == 14  # 6 formats + rotated + 7 modes

    manifest = Storage.from_uri(dataset).read_json("manifest.json")
    assert manifest["counts"]["rejected_by_reason"] == result.rejected_by_reason
    assert manifest["stats"]["resolution_histogram"] == {"32x32": 14}
    assert sum(manifest["stats"]["rejection_reasons"].values()) == result.rejected
    samples = {s.key: s for s in load_all_samples(dataset)}
    assert len(samples) == 14 and all(s.image.shape == (32, 32, 3) for s in samples.values())
    png = samples["good__png"].meta
    assert png["caption"] == "shapes on a gradient"
    assert png["meta"]["attributes"] == {"color": "red"} and png["meta"]["split"] == "eval"
    assert samples["good__jpeg"].meta["caption"] == "a photo with shapes"
    assert samples["modes__gray16"].meta["source_mode"] == "I;16"


def test_rerun_is_idempotent_and_a_changed_source_rebuilds(tmp_path):
    source = write_local(build_corpus(), tmp_path / "raw")
    first = ingest(CFG, str(source), str(tmp_path / "a"), progress=False)
    manifest_before = (tmp_path / "a" / "manifest.json").read_bytes()
    again = ingest(CFG, str(source), str(tmp_path / "a"), progress=False)
    assert again.up_to_date and again.ingested == first.ingested
    assert (tmp_path / "a" / "manifest.json").read_bytes() == manifest_before

    # The same source into a fresh dataset gives byte-identical shards.
    ingest(CFG, str(source), str(tmp_path / "b"), progress=False)
    shards_a = sorted((tmp_path / "a" / "shards").iterdir())
    shards_b = sorted((tmp_path / "b" / "shards").iterdir())
    assert [p.read_bytes() for p in shards_a] == [p.read_bytes() for p in shards_b]

    # A changed source: a full ingest replaces the dataset (new shard names; old ones removed).
    (source / "good" / "new.png").write_bytes(encode(scene(60), "PNG"))
    rebuilt = ingest(CFG, str(source), str(tmp_path / "a"), progress=False)
    assert not rebuilt.up_to_date and rebuilt.num_samples == first.num_samples + 1
    names = [p.name for p in sorted((tmp_path / "a" / "shards").iterdir())]
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert names == [s["name"] for s in manifest["shards"]]
    assert re.fullmatch(r"shard-00001-[0-9a-f]{16}\.tar", names[0]) and len(names) == 1
    assert len(manifest["runs"]) == 1


def test_incremental_processes_only_new_objects_and_dedups_against_old(tmp_path):
    corpus = build_corpus()
    first_half = {k: v for k, v in corpus.items() if k.startswith(("good/", "modes/"))}
    source = write_local(first_half, tmp_path / "raw")
    dataset = str(tmp_path / "ds")
    cfg = CFG.model_copy(update={"incremental": True})
    first = ingest(cfg, str(source), dataset, progress=False)
    assert first.ingested == 14 and first.previously_seen == 0

    write_local({k: v for k, v in corpus.items() if k.startswith("later/")}, source)
    (source / "new.png").write_bytes(encode(scene(61), "PNG"))
    second = ingest(cfg, str(source), dataset, progress=False)
    assert second.previously_seen == len(first_half)
    assert (second.ingested, second.duplicate, second.rejected) == (1, 2, 0)
    assert second.listed == second.accounted
    rows = {r["source_key"]: r for r in report_rows(dataset)}
    assert set(rows) == {"later/copy_of_png.png", "later/reencoded.jpg", "new.png"}
    assert rows["later/copy_of_png.png"]["duplicate_of"] == "good__png"  # from the first run
    assert rows["later/reencoded.jpg"]["duplicate_of"] == "good__jpeg"
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["num_samples"] == 15 and manifest["counts"]["ingested"] == 15
    assert len(manifest["runs"]) == 2 and len(manifest["shards"]) == 2
    assert len(load_all_samples(dataset)) == 15

    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    third = ingest(cfg, str(source), dataset, progress=False)
    assert third.up_to_date and third.ingested == 0
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before

    with pytest.raises(ValueError, match="output settings"):
        ingest(cfg.model_copy(update={"resolution": 64}), str(source), dataset, progress=False)


def changed_since_ingest(source) -> None:
    """Changes to a source that an incremental run must report: a caption added beside an
    ingested image, an ingested image rewritten, a caption removed; and one new image."""
    (source / "good" / "webp.txt").write_text("a caption added later\n")
    rewritten = source / "good" / "bmp.bmp"
    rewritten.write_bytes(encode(scene(62), "BMP"))
    os.utime(rewritten, (1e9, 1e9))  # a new mtime whatever the file system's resolution
    (source / "good" / "jpeg.txt").unlink()
    (source / "new.png").write_bytes(encode(scene(61), "PNG"))


CHANGES = {
    "good/webp.webp": "sidecars added since it was seen: ['good/webp.txt']",
    "good/bmp.bmp": "rewritten since it was seen",
    "good/jpeg.jpg": "sidecars removed since it was seen: ['good/jpeg.txt']",
}


def assert_changes_reported(rows: dict[str, dict]) -> None:
    for key, detail in CHANGES.items():
        assert rows[key]["outcome"] == "changed" and rows[key]["detail"].startswith(detail)


def test_incremental_reports_images_that_changed_since_they_were_ingested(tmp_path, caplog):
    """Incremental mode does not re-ingest a seen image, so a caption added beside it, or the
    image rewritten, is reported ("changed" rows, a count, a warning), never silently dropped;
    a full ingest then rebuilds the dataset with the changes."""
    corpus = {k: v for k, v in build_corpus().items() if k.startswith("good/")}
    source = write_local(corpus, tmp_path / "raw")
    dataset = str(tmp_path / "ds")
    cfg = CFG.model_copy(update={"incremental": True})
    first = ingest(cfg, str(source), dataset, progress=False)
    assert first.ingested == 7 and first.changed == 0

    changed_since_ingest(source)
    second = ingest(cfg, str(source), dataset, progress=False)
    assert (second.ingested, second.changed) == (1, 3)
    assert second.listed == second.accounted  # changed objects count as previously seen
    rows = {r["source_key"]: r for r in report_rows(dataset)}
    assert set(rows) == {"new.png", *CHANGES}
    assert_changes_reported(rows)
    assert "3 item(s) seen by earlier runs changed since" in caplog.text
    assert "run a full ingest (incremental: false)" in caplog.text

    # Nothing new: the dataset stays as it is, and the changes are still reported.
    caplog.clear()
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    third = ingest(cfg, str(source), dataset, progress=False)
    assert third.up_to_date and (third.ingested, third.changed) == (0, 3)
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before
    assert "3 item(s) seen by earlier runs changed since" in caplog.text

    # The remedy the message gives: a full ingest has the added caption and not the removed one.
    full = ingest(CFG, str(source), dataset, progress=False)
    assert full.changed == 0 and full.ingested == 8
    captions = {s.meta["source_key"]: s.meta.get("caption") for s in load_all_samples(dataset)}
    assert captions["good/webp.webp"] == "a caption added later"
    assert captions["good/jpeg.jpg"] is None


def test_fan_out_partitions_then_merge_matches_single_node(tmp_path):
    source = write_local(build_corpus(), tmp_path / "raw")
    single = ingest(CFG, str(source), str(tmp_path / "single"), progress=False)

    partitions = plan_partitions(str(source), 3)
    assert len(partitions) == 3
    descs = [json.loads(p) for p in partitions]
    assert sum(d["objects"] for d in descs) == single.listed
    staging = []
    for desc, partition in zip(descs, partitions, strict=True):
        uri = str(tmp_path / "staging" / str(desc["index"]))
        ingest_partition(CFG, str(source), uri, partition)
        staging.append(uri)
    with pytest.raises(ValueError, match="complete plan"):
        merge_partitions(CFG, staging[:2], str(tmp_path / "merged"))
    merged = merge_partitions(CFG, list(reversed(staging)), str(tmp_path / "merged"))

    fields = ("listed", "sidecars", "ingested", "duplicate", "rejected", "rejected_by_reason")
    assert {f: getattr(merged, f) for f in fields} == {f: getattr(single, f) for f in fields}
    outcome = ("outcome", "reason", "duplicate_of", "key")
    single_rows = {
        r["source_key"]: [r.get(f) for f in outcome] for r in report_rows(single.dataset_uri)
    }
    merged_rows = {
        r["source_key"]: [r.get(f) for f in outcome] for r in report_rows(merged.dataset_uri)
    }
    assert merged_rows == single_rows
    assert_report_names_the_shards(single.dataset_uri)
    assert_report_names_the_shards(merged.dataset_uri)
    # The exact copy sits in another partition than its original: found by the merge.
    part_of = {}
    for d in descs:
        for key in single_rows:
            if (d["start_after"] is None or key > d["start_after"]) and (
                d["last_key"] is None or key <= d["last_key"]
            ):
                part_of[key] = d["index"]
    assert part_of["later/copy_of_png.png"] != part_of["good/png.png"]
    keys = sorted(s.key for s in load_all_samples(merged.dataset_uri))
    assert keys == sorted(s.key for s in load_all_samples(single.dataset_uri))
    # The run's record in the manifest: the same counts and histograms of what was written.
    runs = [
        Storage.from_uri(uri).read_json("manifest.json")["runs"][-1]
        for uri in (merged.dataset_uri, single.dataset_uri)
    ]
    for name in ("captioned", "paired", "duplicate_by_kind", "rejected_by_reason"):
        assert runs[0]["counts"][name] == runs[1]["counts"][name], name
    for name in ("resolution_histogram", "source_short_side_histogram", "source_formats"):
        assert runs[0]["stats"][name] == runs[1]["stats"][name] != {}, name


def test_fan_out_matches_single_node_when_near_duplicates_chain_across_partitions(
    tmp_path, monkeypatch
):
    """a | b c d in two partitions: b is a near duplicate of a and c of b, but c is not near a,
    and d is b's exact copy. A single node keeps a and c (c is compared with kept images only); a
    partition cannot know b will not be kept, so the merge must decide c, and d's duplicate_of."""
    # The chain needs exact Hamming distances (a-b 4, b-c 4, a-c 8): the real pHash of generated
    # images cannot be placed that precisely, so flat grey images get a hash by their grey level
    # (workers=1 decodes in this process, where the patch applies).
    hashes = {10: 0x00, 100: 0x0F, 200: 0xFF}
    monkeypatch.setattr(
        "lumos.data.decode.perceptual_hash",
        lambda img: hashes[int(np.asarray(img.convert("L"))[0, 0])],
    )

    def grey(level: int, mark: int) -> bytes:  # `mark`: other bytes, the same hash
        pixels = np.full((32, 32, 3), level, np.uint8)
        pixels[31, 31, 0] = mark
        return encode(Image.fromarray(pixels), "PNG")

    files = {"a.png": grey(10, 0), "a1.md": b"x", "a2.md": b"y"}  # .md: a 3 | 3 plan
    files |= {"b.png": grey(100, 1), "c.png": grey(200, 2), "d.png": grey(100, 1)}
    source = write_local(files, tmp_path / "raw")
    cfg = CFG.model_copy(update={"near_duplicate_distance": 4})
    single = ingest(cfg, str(source), str(tmp_path / "single"), progress=False)
    partitions = plan_partitions(str(source), 2)
    assert [json.loads(p)["last_key"] for p in partitions] == ["a2.md", None]  # a | b c d
    staging = []
    for partition in partitions:
        uri = str(tmp_path / "staging" / str(json.loads(partition)["index"]))
        ingest_partition(cfg, str(source), uri, partition)
        staging.append(uri)
    merged = merge_partitions(cfg, staging, str(tmp_path / "merged"))

    outcome = ("outcome", "reason", "duplicate_of", "key")
    rows = [
        {r["source_key"]: tuple(r.get(f) for f in outcome) for r in report_rows(result.dataset_uri)}
        for result in (single, merged)
    ]
    assert rows[0]["c.png"] == ("ingested", None, None, "c")
    assert rows[0]["d.png"] == ("duplicate", "exact", "a", None)  # b's copy shares b's fate
    assert rows[1] == rows[0]
    keys = [sorted(s.key for s in load_all_samples(r.dataset_uri)) for r in (single, merged)]
    assert keys[1] == keys[0] == ["a", "c"]
    assert (merged.num_samples, merged.ingested, merged.duplicate) == (2, 2, 2)
    assert {row[2] for row in rows[1].values() if row[0] == "duplicate"} <= set(keys[1])


def test_tar_archive_source_local_and_s3(tmp_path, s3_bucket):
    files = {k: v for k, v in build_corpus().items() if k.startswith("good/")}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, data in sorted(files.items(), reverse=True):  # tar order is not sorted order
            info = tarfile.TarInfo(f"./{key}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "raw.tar").write_bytes(buf.getvalue())
    local = ingest(CFG, str(tmp_path / "raw.tar"), str(tmp_path / "from_tar"), progress=False)
    assert (local.ingested, local.sidecars, local.listed) == (7, 2, 9)

    Storage.from_uri(f"s3://{s3_bucket}").write_bytes("archives/raw.tar", buf.getvalue())
    remote = ingest(
        CFG, f"s3://{s3_bucket}/archives/raw.tar", str(tmp_path / "s3tar"), progress=False
    )
    assert (remote.ingested, remote.sidecars, remote.listed) == (7, 2, 9)
    samples = {s.key: s.meta for s in load_all_samples(str(tmp_path / "s3tar"))}
    assert samples["good__jpeg"]["caption"] == "a photo with shapes"


def test_tar_links_are_listed_and_read_as_their_files(tmp_path):
    """tar stores a file's second name as a hard link (and may hold symlinks): both are objects
    of the source, read as the file they name; a link out of the archive fails when read."""
    image = encode(scene(7, (64, 48)), "PNG")
    with tarfile.open(tmp_path / "raw.tar", mode="w") as tar:

        def add(info: tarfile.TarInfo, data: bytes = b"") -> None:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(tarfile.TarInfo("./a.png"), image)
        add(tarfile.TarInfo("./a.txt"), b"a caption")
        add(tarfile.TarInfo("./b.png"), encode(scene(8, (64, 48)), "PNG"))
        for name, kind, target in [
            ("./b.txt", tarfile.LNKTYPE, "./a.txt"),  # hard link: an archive path
            ("./sub/c.png", tarfile.SYMTYPE, "../a.png"),  # symlink: relative to its directory
            ("./d.png", tarfile.SYMTYPE, "/etc/passwd"),  # outside the archive
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            add(info)
    with Source(str(tmp_path / "raw.tar")) as source:
        listed = {obj.key: obj.size for obj in source.list()}
        assert listed == {"a.png": len(image), "a.txt": 9, "b.png": listed["b.png"], "b.txt": 9,
                          "d.png": 0, "sub/c.png": len(image)}  # fmt: skip
        assert source.read("b.txt") == b"a caption" and source.read("sub/c.png") == image
        with pytest.raises(StorageError, match="a link to '/etc/passwd'"):
            source.read("d.png")
    result = ingest(CFG, str(tmp_path / "raw.tar"), str(tmp_path / "ds"), progress=False)
    samples = {s.key: s.meta for s in load_all_samples(str(tmp_path / "ds"))}
    assert samples["b"]["caption"] == "a caption"  # b's caption is a link to a's
    assert result.listed == 6 and result.rejected_by_reason == {"unreadable": 1}  # d.png


def test_read_retries_transient_errors_then_reports_unreadable(tmp_path):
    calls, sleeps = [], []

    def flaky(key: str) -> bytes:
        calls.append(key)
        if len(calls) < 3:
            raise StorageError(f"connection reset reading {key}")
        return b"data"

    assert (
        read_with_retries(flaky, "k", max_retries=3, backoff_s=0.5, sleep=sleeps.append) == b"data"
    )
    assert sleeps == [0.5, 1.0]  # exponential backoff

    def missing(key: str) -> bytes:
        calls.append(key)
        raise ObjectNotFound(key)

    calls.clear()
    with pytest.raises(ObjectNotFound):
        read_with_retries(missing, "k", max_retries=3, backoff_s=0.5, sleep=sleeps.append)
    assert len(calls) == 1  # a missing object is not retried

    # A listed object that cannot be read (a dangling link) is reported, not dropped.
    source = write_local({"a.png": encode(scene(1), "PNG")}, tmp_path / "raw")
    os.symlink(tmp_path / "nowhere.png", source / "b.png")
    result = ingest(CFG, str(source), str(tmp_path / "ds"), progress=False)
    assert (result.ingested, result.rejected_by_reason) == (1, {"unreadable": 1})


def test_paired_subset_is_seeded_stable_and_the_configured_fraction():
    keys = [f"images/img-{i:05d}.png" for i in range(20_000)]
    chosen = [k for k in keys if is_paired(0, k, 0.1)]
    assert 0.09 < len(chosen) / len(keys) < 0.11
    assert chosen == [k for k in keys if is_paired(0, k, 0.1)]
    assert chosen != [k for k in keys if is_paired(1, k, 0.1)]
    # Growing the fraction only adds pairs: a smaller subset is kept inside a larger one.
    assert set(chosen) <= {k for k in keys if is_paired(0, k, 0.2)}


def test_metrics_are_pushed_to_the_pushgateway(tmp_path):
    received: list[tuple[str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self):  # noqa: N802 - http.server's naming
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        do_POST = do_PUT

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        corpus = {k: v for k, v in build_corpus().items() if k.startswith(("good/", "bad/"))}
        source = write_local(corpus, tmp_path / "raw")
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = CFG.model_copy(update={"pushgateway_url": url})
        result = ingest(cfg, str(source), str(tmp_path / "ds"), progress=False)
    finally:
        server.shutdown()
    path, body = received[-1]
    assert path.startswith(f"/metrics/job/lumos-ingest/run/{result.run_id}")
    text = body.decode()
    assert f"lumos_ingest_objects_ingested_total {float(result.ingested)}" in text
    assert 'lumos_ingest_objects_rejected_total{reason="too_small"} 1.0' in text
    assert f"lumos_ingest_objects_seen_total {float(result.listed)}" in text
    assert "lumos_ingest_bytes_per_second" in text


def test_missing_source_and_dataset_errors_are_clear(tmp_path):
    with pytest.raises(StorageError, match="no tar archive"):
        ingest(CFG, str(tmp_path / "missing.tar"), str(tmp_path / "ds"), progress=False)
    with pytest.raises(StorageError, match="does not exist"):
        ingest(CFG, str(tmp_path / "typo"), str(tmp_path / "ds"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no objects under"):
        ingest(CFG, str(tmp_path / "empty"), str(tmp_path / "ds"), progress=False)
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_fan_out_incremental_merge_skips_what_the_dataset_has(tmp_path):
    corpus = build_corpus()
    source = write_local(
        {k: v for k, v in corpus.items() if k.startswith("good/")}, tmp_path / "raw"
    )
    cfg = CFG.model_copy(update={"incremental": True})
    dataset = str(tmp_path / "ds")

    def fan_out(run: str):
        staging = []
        for partition in plan_partitions(str(source), 2):
            uri = str(tmp_path / run / str(json.loads(partition)["index"]))
            ingest_partition(cfg, str(source), uri, partition)  # no dataset_uri: merge filters
            staging.append(uri)
        return merge_partitions(cfg, staging, dataset)

    first = fan_out("one")
    assert first.ingested == 7
    write_local({k: v for k, v in corpus.items() if k.startswith("later/")}, source)
    second = fan_out("two")
    assert second.previously_seen == first.listed
    assert (second.ingested, second.duplicate, second.listed) == (0, 2, second.accounted)
    rows = {r["source_key"]: r for r in report_rows(dataset)}
    assert set(rows) == {"later/copy_of_png.png", "later/reencoded.jpg"}
    assert len(load_all_samples(dataset)) == 7

    # Changed images are reported by the merge, whether or not the partitions read the dataset.
    changed_since_ingest(source)
    third = fan_out("three")
    assert (third.ingested, third.changed, third.listed) == (1, 3, third.accounted)
    rows = {r["source_key"]: r for r in report_rows(dataset)}
    assert set(rows) == {"new.png", *CHANGES}
    assert_changes_reported(rows)
    staging = []
    for partition in plan_partitions(str(source), 2):
        uri = str(tmp_path / "four" / str(json.loads(partition)["index"]))
        ingest_partition(cfg, str(source), uri, partition, dataset_uri=dataset)
        staging.append(uri)
    before = (tmp_path / "ds" / "manifest.json").read_bytes()
    fourth = merge_partitions(cfg, staging, dataset)
    assert (fourth.ingested, fourth.changed, fourth.listed) == (0, 3, fourth.accounted)
    # Nothing new: as on a single node, the dataset is left as it was (no empty run recorded).
    assert fourth.up_to_date and (tmp_path / "ds" / "manifest.json").read_bytes() == before
    # A merge retried after it committed finds its images seen: it changes nothing either.
    retried = merge_partitions(cfg, [str(tmp_path / "three" / str(i)) for i in range(2)], dataset)
    assert retried.up_to_date and retried.ingested == 0
    assert (tmp_path / "ds" / "manifest.json").read_bytes() == before
