"""Malformed requests against a real predictor process: every one gets a 4xx that says what was
wrong, the server stays up, and good V1 and V2 requests still succeed afterwards. Overload gets
429 with Retry-After. The server serves a tiny novel-view model: it takes an image and cameras,
so the image, camera and sampler checks are all reachable (the t2i prompt checks: test_server)."""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import urllib.request
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from predictor_process import MODEL, post, serve, tiny_export

V1 = f"/v1/models/{MODEL}:predict"
V2 = f"/v2/models/{MODEL}/infer"
VIEWS = 3  # the tiny novel-view model's views (tiny_checkpoints: num_views=3)


def _png(size: tuple[int, int] = (6, 4), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 90).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height with one row of data: a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (min(width, 100000) + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


GOOD_PNG = base64.b64encode(_png()).decode()
CAMERAS = [[0.0, 20.0, 2.5], [120.0, 20.0, 2.5], [240.0, 20.0, 2.5]]


def good_v1(**fields: Any) -> dict:
    return {"instances": [{"image_b64": GOOD_PNG, "seed": 1, "steps": 2, **fields}]}


def good_v2(batch: int = 1) -> dict:
    return {
        "inputs": [
            {"name": "image_b64", "datatype": "BYTES", "shape": [batch], "data": [GOOD_PNG] * batch},
            {"name": "cameras", "datatype": "FP32", "shape": [batch, VIEWS, 3],
             "data": CAMERAS * batch},
            {"name": "steps", "datatype": "INT64", "shape": [batch], "data": [2] * batch},
            {"name": "seed", "datatype": "INT64", "shape": [batch], "data": list(range(batch))},
        ]
    }  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    export_dir = tiny_export(tmp_path_factory.mktemp("fuzz"), "novel_view")
    yield from serve(export_dir, "--max_batch_size", "4", "--max_queue", "16")


# ----------------------------------------------------------------------------- generated requests

BAD_VALUES: dict[str, list[Any]] = {
    "seed": [-1, 2**63, 2**70, 1.5, "1", True, None, [], {}],
    "steps": [0, -1, -20, 201, 10**9, 2.5, "20", False, None, [2]],
    "guidance_scale": [0, -1.0, 0.5, 51, 1e308, "4.5", True, None, [4.5]],
    "cameras": [
        "front", [], [[0, 20, 2.5]], CAMERAS[:2], CAMERAS + [[0, 0, 1]], [[0, 20]] * VIEWS,
        [[0, 20, 2.5, 1]] * VIEWS, [["a", 20, 2.5]] * VIEWS, [[0, 20, None]] * VIEWS, [1, 2, 3],
        [[1e400, 0, 1]] * VIEWS,
    ],
    "image_b64": [
        "", "***not base64***", "aGVsbG8=", base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),
        base64.b64encode(_png()[:40]).decode(),  # truncated PNG
        base64.b64encode(_bomb_png(20000, 20000)).decode(),  # PIL's decompression bomb
        base64.b64encode(_bomb_png(5000, 5000)).decode(),  # above our pixel limit
        base64.b64encode(b"GIF89a" + bytes(20)).decode(), GOOD_PNG[:-3], 17, None, [GOOD_PNG],
    ],
    "prompt": ["a cat"],  # an image head takes no prompt
    "colour": ["red"],  # not a field
}  # fmt: skip


def v1_requests(rng: random.Random) -> Iterator[tuple[str, bytes | dict | list | str | None, str]]:
    """(what, body, content type) of malformed V1 requests."""
    json_type = "application/json"
    for field, values in BAD_VALUES.items():
        for value in values:
            yield f"v1 {field}={str(value)[:40]}", good_v1(**{field: value}), json_type
    for body in (None, [], "instances", 3, {}, {"instances": {}}, {"instances": "x"},
                 {"instances": []}, {"instances": [1]}, {"instances": [[GOOD_PNG]]},
                 {"instances": [{}]}, {"instance": good_v1()["instances"]},
                 {"instances": good_v1()["instances"] * 17}):  # fmt: skip
        yield f"v1 body {str(body)[:40]}", body, json_type
    for raw in (b"", b"{", b'{"instances": [', b"\xff\xfe\x00", b'{"instances": [{"seed": NaN}]}',
                b'{"instances": [{"guidance_scale": Infinity}]}', b"null", b"[1,2,3]"):  # fmt: skip
        yield f"v1 raw {raw[:20]!r}", raw, json_type
    yield "v1 text/plain", json.dumps(good_v1()).encode(), "text/plain"
    # Random mixtures: several bad fields at once, on random instances of a batch.
    for _ in range(60):
        instances = [dict(good_v1()["instances"][0]) for _ in range(rng.randint(1, 4))]
        bad = rng.choice(instances)
        for field in rng.sample(sorted(BAD_VALUES), rng.randint(1, 3)):
            bad[field] = rng.choice(BAD_VALUES[field])
        yield f"v1 mixed {sorted(bad)}", {"instances": instances}, json_type


def _v2_with(change: dict[str, Any], name: str = "steps") -> dict:
    body = good_v2()
    for tensor in body["inputs"]:
        if tensor["name"] == name:
            tensor.update(change)
    return body


def v2_requests(rng: random.Random) -> Iterator[tuple[str, bytes | dict | list | str | None, str]]:
    json_type = "application/json"
    changes: list[tuple[str, dict[str, Any]]] = [
        ("steps", {"datatype": "FP32", "data": [2.0]}),
        ("steps", {"datatype": "BYTES", "data": ["2"]}),
        ("steps", {"datatype": "BOOL", "data": [True]}),
        ("steps", {"data": [0]}), ("steps", {"data": [-5]}), ("steps", {"data": [10**6]}),
        ("steps", {"data": [2.5]}), ("steps", {"data": ["two"]}), ("steps", {"data": [None]}),
        ("steps", {"shape": [2]}), ("steps", {"shape": [1, 1]}), ("steps", {"shape": [-1]}),
        ("steps", {"shape": [0], "data": []}), ("steps", {"data": [2, 3]}),
        ("steps", {"datatype": "FP16", "data": [2]}), ("steps", {"name": "stepz"}),
        ("steps", {"datatype": "NOT_A_TYPE"}),
        ("seed", {"data": [-1]}), ("seed", {"data": [2**64]}), ("seed", {"data": ["0"]}),
        ("image_b64", {"datatype": "FP32", "data": [1.0]}), ("image_b64", {"data": [7]}),
        ("image_b64", {"data": ["***"]}), ("image_b64", {"shape": [1, 1]}),
        ("image_b64", {"data": [base64.b64encode(_bomb_png(20000, 20000)).decode()]}),
        ("image_b64", {"data": [base64.b64encode(b"not an image").decode()]}),
        ("cameras", {"shape": [1, VIEWS - 1, 3], "data": CAMERAS[:2]}),
        ("cameras", {"shape": [1, VIEWS, 2], "data": [c[:2] for c in CAMERAS]}),
        ("cameras", {"shape": [1, VIEWS * 3], "data": sum(CAMERAS, [])}),
        ("cameras", {"data": CAMERAS[:2]}), ("cameras", {"datatype": "BYTES"}),
        ("cameras", {"data": [[0, 20, "x"]] * VIEWS}),
        ("cameras", {"shape": [2, VIEWS, 3]}),
    ]  # fmt: skip
    for name, change in changes:
        yield f"v2 {name} {change}", _v2_with(change, name), json_type
    body = good_v2()
    body["inputs"].append({"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["cat"]})
    yield "v2 prompt to an image head", body, json_type
    body = good_v2()
    body["inputs"].append(dict(body["inputs"][0]))
    yield "v2 duplicated input", body, json_type
    yield "v2 17 instances", good_v2(17), json_type
    yield "v2 guidance NaN", json.dumps(good_v2()).replace(
        '"inputs": [', '"inputs": [{"name": "guidance_scale", "datatype": "FP64", "shape": [1], '
        '"data": [NaN]}, ').encode(), json_type  # fmt: skip
    for body in ({}, {"inputs": []}, {"inputs": "x"}, {"inputs": [{}]}, [],
                 {"inputs": [{"name": "steps", "datatype": "INT64", "shape": [1]}]},
                 {"inputs": [{"name": "steps", "datatype": "INT64", "shape": "1", "data": [1]}]},
                 {"inputs": good_v2()["inputs"], "parameters": "x"}):  # fmt: skip
        yield f"v2 body {str(body)[:40]}", body, json_type
    for raw in (b"", b"{", b"\x00\x01", b'{"inputs": [{"name": "steps", "data": [1e999]}]}'):
        yield f"v2 raw {raw[:20]!r}", raw, json_type
    for _ in range(40):  # random mixtures of two changes
        body = good_v2()
        for name, change in rng.sample(changes, 2):
            for tensor in body["inputs"]:
                if tensor["name"] == name:
                    tensor.update(change)
        yield "v2 mixed", body, json_type


def test_malformed_requests_get_4xx_and_the_server_survives(server: str) -> None:
    rng = random.Random(0)
    requests = [(V1, *r) for r in v1_requests(rng)] + [(V2, *r) for r in v2_requests(rng)]
    assert len(requests) >= 200
    failures = []
    for path, what, body, content_type in requests:
        status, answer, _ = post(server + path, body, content_type)
        reason = answer.get("error") or answer.get("detail")
        if not (400 <= status < 500 and reason):
            failures.append(f"{what}: HTTP {status} {str(answer)[:200]}")
    assert not failures, f"{len(failures)} of {len(requests)} requests:\n" + "\n".join(failures)

    # The server is still up and serves good requests in both protocols.
    status, answer, _ = post(server + V1, good_v1(cameras=CAMERAS))
    assert status == 200, answer
    frames = answer["predictions"][0]["images_b64"]
    assert len(frames) == VIEWS
    with Image.open(io.BytesIO(base64.b64decode(frames[0]))) as img:
        assert img.size == (8, 8)
    status, answer, _ = post(server + V2, good_v2(batch=2))
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["image_b64"]["shape"] == [2, VIEWS] and outputs["seed"]["data"] == [0, 1]
    # V1 and V2 give the same image for the same fields.
    _, v1_answer, _ = post(server + V1, good_v1(cameras=CAMERAS, seed=0))
    assert outputs["image_b64"]["data"][:VIEWS] == v1_answer["predictions"][0]["images_b64"]


def test_probe_endpoints_of_the_serving_runtime_answer(server: str) -> None:
    """The ServingRuntime's probes (manifests/base/serving-runtime.yaml) name endpoints that
    answer 200 on a ready server: this one became ready only after its first sample."""
    import yaml

    runtime = Path(__file__).resolve().parents[2] / "manifests" / "base" / "serving-runtime.yaml"
    [container] = yaml.safe_load(runtime.read_text())["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        with urllib.request.urlopen(server + path, timeout=10) as resp:
            assert resp.status == 200, (probe, path)


def test_reasons_name_the_problem(server: str) -> None:
    cases = [
        (V1, good_v1(steps=0), "steps"),
        (V1, good_v1(guidance_scale="4.5"), "guidance_scale"),
        (V1, good_v1(cameras=CAMERAS[:2]), "'cameras' must be 3 views"),
        (V1, good_v1(image_b64=base64.b64encode(_bomb_png(20000, 20000)).decode()), "too large"),
        (V1, good_v1(image_b64=base64.b64encode(_png()[:40]).decode()), "not a readable image"),
        (V1, good_v1(image_b64="A" * (23 << 20)), "characters, the limit is 16777216 bytes"),
        (V2, _v2_with({"shape": [2]}, "image_b64"), "holds 2 values, data has 1"),
        (V2, _v2_with({"datatype": "FP32", "data": [2.0]}), "datatype FP32 is not accepted"),
        (V2, _v2_with({"shape": [1, VIEWS, 2], "data": [c[:2] for c in CAMERAS]}, "cameras"),
         "camera is [azimuth_deg, elevation_deg, radius]"),
    ]  # fmt: skip
    for path, body, expected in cases:
        status, answer, _ = post(server + path, body)
        assert status == 400 and expected in answer["error"], (expected, status, answer)


def test_overload_gets_429_with_retry_after(server: str) -> None:
    """Queue limit 16 instances: concurrent 16-instance requests beyond the one being queued are
    refused at once with Retry-After, not left to time out; the admitted ones succeed."""
    body = {"instances": [{"image_b64": GOOD_PNG, "seed": i, "steps": 30} for i in range(16)]}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(server + V1, body), range(8)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for status, answer, headers in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and "overloaded" in answer["detail"]
    # The metrics count the refusals by reason (KServe's /metrics, the default registry).
    with urllib.request.urlopen(f"{server}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    refused = statuses.count(429)
    line = f'lumos_serving_errors_total{{model="{MODEL}",reason="overloaded"}} {float(refused)}'
    assert line in text
    assert "lumos_serving_batch_size_bucket" in text and "lumos_serving_queue_depth" in text
