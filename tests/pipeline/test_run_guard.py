"""What a run checks first: the compiled cluster shape, real sources in a pod, and new data.

The nothing-new path runs the real pipeline through `kfp.local`: after every source has been
ingested into the persistent datasets, a run ingests nothing new and ends green at the `new-data`
gate without featurizing or training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lumos.config import load_config
from lumos.pipeline.run_guard import RunConfigError
from lumos.pipeline.steps import default_sources
from pipelines.lumos_pipeline import COMPILED_PATH, COMPILED_PRESET


def test_a_run_changing_cluster_fields_is_refused_at_its_first_step(tmp_path: Path) -> None:
    compiled = load_config(preset=COMPILED_PRESET)
    cluster_json = compiled.cluster.model_dump_json()
    edited = load_config(
        preset=COMPILED_PRESET,
        overrides=["cluster.distributed=null", "cluster.gpus_per_step=2"],
    )
    with pytest.raises(RunConfigError) as refused:
        default_sources(edited.model_dump_json(), str(tmp_path), "run-1", cluster_json)
    message = str(refused.value)
    assert "cluster.gpus_per_step" in message
    assert "changes cluster.distributed, cluster.gpus_per_step," in message  # only those
    nodes = load_config(preset=COMPILED_PRESET, overrides=["cluster.distributed.num_nodes=1"])
    with pytest.raises(RunConfigError, match=r"changes cluster\.distributed\.num_nodes, which"):
        default_sources(nodes.model_dump_json(), str(tmp_path), "run-1", cluster_json)
    # The compiled pipeline hands its cluster to that first step as a constant, not a parameter.
    spec = next(yaml.safe_load_all(COMPILED_PATH.read_text()))
    inputs = spec["root"]["dag"]["tasks"]["default-dataset"]["inputs"]["parameters"]
    constant = inputs["compiled_cluster_json"]["runtimeValue"]["constant"]
    assert json.loads(constant) == json.loads(cluster_json)
    assert "compiled_cluster_json" not in spec["root"]["inputDefinitions"]["parameters"]


def test_an_unchanged_cluster_runs(tmp_path: Path) -> None:
    cfg = load_config(
        preset="tiny",
        overrides=[f"data.{k}_uri={tmp_path / k}" for k in ("images", "views", "clips")],
    )
    run_root, *sources = default_sources(
        cfg.model_dump_json(), str(tmp_path), "run-1", cfg.cluster.model_dump_json()
    )
    assert run_root == str(tmp_path / "run-1")
    assert sources == [str(tmp_path / k) for k in ("images", "views", "clips")]


def test_in_a_pod_a_run_needs_real_sources(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # what the kubelet sets in a pod
    cfg = load_config(preset="tiny")
    with pytest.raises(RunConfigError, match="on a cluster a run needs its data"):
        default_sources(cfg.model_dump_json(), str(tmp_path), "run-1")
    assert not (tmp_path / "run-1").exists()  # no toy data generated


@pytest.mark.slow
def test_nothing_new_skips_training_and_ends_green(tmp_path: Path) -> None:
    from lumos.data.ingest import ingest
    from lumos.data.synthetic import generate_default_dataset
    from lumos.pipeline.local_run import run_local

    sources = tmp_path / "sources"
    overrides = [f"data.{k}_uri={sources / k}" for k in ("images", "views", "clips")]
    overrides += [f"data.datasets_root={tmp_path / 'datasets'}", "ingest.incremental=true"]
    overrides += ["synth.num_images=24", "synth.num_objects=4", "synth.num_clips=4"]
    cfg = load_config(preset="tiny", overrides=overrides)
    generate_default_dataset(cfg.synth, str(sources))
    for kind in ("images", "views", "clips"):  # an earlier run ingested everything
        ingest_cfg = cfg.ingest if kind == "images" else cfg.multiframe_ingest()
        ingest(ingest_cfg, str(sources / kind), str(tmp_path / "datasets" / kind))

    summary = run_local(cfg, tmp_path / "run")
    assert summary.succeeded, summary.error
    log = (tmp_path / "run" / "steps.log").read_text()
    assert "nothing new since the last run (images: 0, views: 0, clips: 0)" in log
    executed = {line.split("'")[1] for line in log.splitlines() if "Executing task" in line}
    assert {"default-dataset", "ingest-merge", "new-data"} <= executed
    assert not {t for t in executed if t.startswith(("featurize", "pretrain", "finetune"))}
    assert all(h.passed is None for h in summary.heads)  # nothing evaluated
    assert not (Path(summary.run_root) / "checkpoints").exists()
