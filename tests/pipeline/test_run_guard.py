"""What a run's first step decides: its config from the run form (typed parameters, then the
advanced config_json), refusing a changed cluster shape; its sources, real ones in a pod; the
heads it fine-tunes. And the nothing-new path, through `kfp.local`: after every source has been
ingested into the persistent datasets, a run ingests nothing new and ends green at the `new-data`
gate without featurizing or training anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lumos.config import ConfigError, load_config
from lumos.pipeline.run_form import RunForm
from lumos.pipeline.run_guard import RunConfigError
from lumos.pipeline.steps import start_run
from pipelines.lumos_pipeline import COMPILED_PATH, COMPILED_PRESET, compiled_config


def form(cfg, **changes) -> dict:
    return {**RunForm.defaults(cfg).model_dump(), **changes}


def test_a_run_changing_cluster_fields_is_refused_at_its_first_step(tmp_path: Path) -> None:
    compiled = load_config(preset=COMPILED_PRESET)
    override = json.dumps({"cluster": {"distributed": None, "gpus_per_step": 2}})
    with pytest.raises(RunConfigError) as refused:
        start_run(override, compiled.model_dump_json(), str(tmp_path), "run-1", form(compiled))
    message = str(refused.value)
    assert "changes cluster.distributed, cluster.gpus_per_step," in message  # only those
    nested = json.dumps({"cluster": {"distributed": {"num_nodes": 1}}})
    with pytest.raises(RunConfigError, match=r"changes cluster\.distributed\.num_nodes, which"):
        start_run(nested, compiled.model_dump_json(), str(tmp_path), "run-1", form(compiled))
    # The compiled pipeline hands its config to that first step as a constant, not a parameter.
    spec = next(yaml.safe_load_all(COMPILED_PATH.read_text()))
    assert compiled_config(spec) == compiled
    assert "compiled_config_json" not in spec["root"]["inputDefinitions"]["parameters"]


def test_the_run_form_sets_the_config(tmp_path: Path) -> None:
    compiled = load_config(preset="tiny")
    sources = {f"{k}_uri": str(tmp_path / k) for k in ("images", "views", "clips")}
    changed = form(compiled, **sources, pretrain_steps=7, finetune_steps=3, paired_fraction=0.5)
    override = "evaluate: {num_samples: 5}\n"  # YAML is accepted too
    cfg_json, run_root, *given, heads = start_run(
        override, compiled.model_dump_json(), str(tmp_path), "run-1", changed
    )
    cfg = load_config(preset=None, config_text=("run", cfg_json))
    assert run_root == str(tmp_path / "run-1")
    assert given == [sources["images_uri"], sources["views_uri"], sources["clips_uri"]]
    assert heads == {"t2i": True, "novel_view": True, "video": True}
    assert cfg.pretrain.steps == 7 and cfg.ingest.paired_fraction == 0.5
    assert {cfg.finetune.t2i.steps, cfg.finetune.novel_view.steps, cfg.finetune.video.steps} == {3}
    assert cfg.evaluate.num_samples == 5
    # config_json is applied last
    last = json.dumps({"pretrain": {"steps": 9}})
    cfg_json, *_ = start_run(last, compiled.model_dump_json(), str(tmp_path), "run-1", changed)
    assert load_config(preset=None, config_text=("run", cfg_json)).pretrain.steps == 9
    # a bad field is named
    with pytest.raises(ConfigError, match="pretrain.steps"):
        start_run('{"pretrain": {"steps": -1}}', compiled.model_dump_json(), "r", "x", changed)


def test_images_alone_run_i2i_and_t2i(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a pod: real data required
    compiled = load_config(preset="tiny")
    images = form(compiled, images_uri="s3://bucket/images")
    *_, heads = start_run("", compiled.model_dump_json(), str(tmp_path), "run-1", images)
    assert heads == {"t2i": True, "novel_view": False, "video": False}
    for asked, message in (
        ("t2i,video", r"head video needs data\.clips_uri"),
        ("t2i,3d", r"\['3d'\] are not heads"),
    ):
        with pytest.raises(RunConfigError, match=message):
            start_run("", compiled.model_dump_json(), "r", "x", {**images, "heads": asked})
    with pytest.raises(RunConfigError, match="on a cluster a run needs its data"):
        start_run("", compiled.model_dump_json(), str(tmp_path), "run-2", form(compiled))
    assert not (tmp_path / "run-2").exists()  # no toy data generated
    only_views = form(compiled, views_uri="s3://bucket/views")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    with pytest.raises(RunConfigError, match="data.images_uri is empty"):
        start_run("", compiled.model_dump_json(), str(tmp_path), "run-3", only_views)


def test_the_compiled_form_and_head_branches() -> None:
    """The KFP UI's form: typed parameters with the compiled config's values as defaults and a
    description each; each head's steps run only when the form selects it."""
    cfg = load_config(preset=COMPILED_PRESET)
    spec = next(yaml.safe_load_all(COMPILED_PATH.read_text()))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["pretrain_steps"]["parameterType"] == "NUMBER_INTEGER"
    assert params["pretrain_steps"]["defaultValue"] == cfg.pretrain.steps
    assert params["paired_fraction"]["defaultValue"] == cfg.ingest.paired_fraction
    assert params["heads"]["defaultValue"] == "auto"
    assert params["config_json"]["defaultValue"] == ""
    assert all(p.get("description") for p in params.values())
    branch_conditions = {
        t["triggerPolicy"]["condition"]
        for c in spec["components"].values()
        if "dag" in c
        for t in c["dag"]["tasks"].values()
        if "run_" in t.get("triggerPolicy", {}).get("condition", "")
    }
    assert branch_conditions == {
        f"inputs.parameter_values['pipelinechannel--default-dataset-run_{head}'] == true"
        for head in ("t2i", "novel_view", "video")
    }


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
    # The UI shows what the ingests did (a Markdown artifact of the new-data step)
    [report] = (tmp_path / "run" / "kfp").glob("*/new-data/ingest_report")
    text = report.read_text()
    assert (
        "| images | 48 | 0 | 48 |" in text
    )  # 24 images and their 24 caption sidecars and "nothing to train on, skipped" in text
