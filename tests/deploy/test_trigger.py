"""`lumos trigger` against the real moto S3 server (sources and datasets) and the stand-in of the
KFP API (tests/kfp_api_standin.py; a stand-in because no KFP server can run here, answering as
kubeflow/pipelines' backend/src/apiserver run_server.go / v2_template.go do).

The record of seen objects is the one real incremental ingest leaves in the dataset: the test
ingests with `lumos.data.ingest.ingest`, not a hand-written manifest.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from kfp_api_standin import kfp_api_standin
from PIL import Image

from lumos.cli import main
from lumos.config import validate_config
from lumos.deploy.config import load_deployment
from lumos.storage import Storage


def put_images(store: Storage, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        store.write_bytes(f"{name}.png", buffer.getvalue())


def write_config_map(path: Path, bucket: str, host: str) -> Path:
    overrides = {
        "data": {
            "images_uri": f"s3://{bucket}/incoming/images",
            "datasets_root": f"s3://{bucket}/datasets",
        },
        "cluster": {"s3_secret": "lumos-s3"},
    }
    deploy = {"kfp_host": host, "trigger": {"min_new_items": 3}}
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "lumos-pipeline-config"},
        "data": {
            "preset": "tiny",
            "overrides.yaml": yaml.safe_dump(overrides),
            "deploy.yaml": yaml.safe_dump(deploy),
        },
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    main(args)
    out = capsys.readouterr().out
    return json.loads(out[out.index("{\n") :])


def ingest_everything(cm: Path) -> None:
    """What the run's ingest step does: incremental ingest into the persistent dataset."""
    from lumos.data.ingest import ingest

    cfg = load_deployment(config_map=cm).pipeline
    ingest(
        cfg.ingest.model_copy(update={"incremental": True}),
        cfg.data.images_uri,
        f"{cfg.data.datasets_root}/images",
    )


@pytest.mark.slow  # ingests into S3, then several trigger rounds: about 10 s
def test_trigger_starts_one_run_for_new_objects_and_none_otherwise(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    source = Storage.from_uri(f"s3://{s3_bucket}/incoming/images")
    put_images(source, ["a", "b", "c", "d"], seed=0)
    with kfp_api_standin() as (url, api):
        cm = write_config_map(tmp_path / "cm.yaml", s3_bucket, url)
        deployed = run_cli(["deploy", "--config-map", str(cm)], capsys)

        # 4 items no ingest has seen (the dataset does not exist yet), 3 wanted: one run.
        first = run_cli(["trigger", "--config-map", str(cm)], capsys)
        assert first["started"] and first["new_items"] == 4, first
        [run] = api.runs.values()
        assert run["run_id"] == first["run_id"]
        assert run["pipeline_version_reference"]["pipeline_version_id"] == deployed["version_id"]
        assert run["experiment_id"] == deployed["experiment_id"]
        assert run["service_account"] == "lumos-pipeline"
        params = run["runtime_config"]["parameters"]
        assert validate_config(params["config_json"]).ingest.incremental is True

        # The run has not ingested them yet (it is PENDING): no second run for the same objects.
        again = run_cli(["trigger", "--config-map", str(cm)], capsys)
        assert not again["started"] and "PENDING" in again["reason"]
        assert len(api.runs) == 1

        # The run ingests them and finishes: nothing new, no run, and KFP is not even asked.
        ingest_everything(cm)
        run["state"] = "SUCCEEDED"
        calls = len(api.requests)
        nothing = run_cli(["trigger", "--config-map", str(cm)], capsys)
        assert not nothing["started"] and nothing["new_items"] == 0
        assert nothing["sources"][0]["listed"] == 4
        assert len(api.requests) == calls and len(api.runs) == 1

        # Two new objects: fewer than 3, no run. A third: one run.
        put_images(source, ["e", "f"], seed=1)
        few = run_cli(["trigger", "--config-map", str(cm)], capsys)
        assert not few["started"] and few["new_items"] == 2
        put_images(source, ["g"], seed=2)
        enough = run_cli(["trigger", "--config-map", str(cm)], capsys)
        assert enough["started"] and enough["new_items"] == 3
        assert len(api.runs) == 2


def test_trigger_without_persistent_datasets_or_sources_says_what_to_set(
    tmp_path: Path, capsys
) -> None:
    cm = tmp_path / "cm.yaml"
    cm.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "lumos-pipeline-config"},
                "data": {"preset": "tiny", "overrides.yaml": "data: {images_uri: s3://b/i}\n"},
            }
        )
    )
    with pytest.raises(SystemExit):
        main(["trigger", "--config-map", str(cm)])
    assert "set data.datasets_root" in capsys.readouterr().err
