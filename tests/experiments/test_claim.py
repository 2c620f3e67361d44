"""`lumos experiment claim` end to end on the micro preset (about 20 s on 2 cores): the report's
structure, and that the arms really differ in their data (all pairs vs the few) and their
initialisation (from the I2I prior vs fresh), with C's and D's compute equal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lumos.checkpoints import read_checkpoint_meta
from lumos.cli import main
from lumos.experiments.claim import dataset_samples


@pytest.fixture(scope="module")
def claim_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("claim")
    main(["experiment", "claim", "--preset", "experiment-micro", "--out", str(out)])
    return out


def test_the_report_has_every_table(claim_run: Path) -> None:
    report = (claim_run / "report" / "report.md").read_text()
    for heading in (
        "## Arms",
        "## The condition encoder",
        "## T2I at the last step",
        "## Memorisation",
        "## Curves over training steps",
        "## Second claim",
        "## Samples",
    ):
        assert heading in report, heading
    for arm in "ABCD":  # one row per arm in each guidance table and the memorisation table
        assert len(re.findall(rf"^\| {arm} \| ", report, flags=re.M)) >= 4, arm
    assert re.search(r"^\| ssl \| [0-9.]+ \|", report, flags=re.M)
    assert re.search(r"^\| random \| [0-9.]+ \|", report, flags=re.M)
    for key in ("novel_view | i2i", "novel_view | t2i", "video | i2i", "video | t2i"):
        assert f"| {key} |" in report
    for png in ("grid-g4.5.png", "grid-g1.png", "curve-overall-g4.5.png", "curve-fd-g1.png"):
        assert (claim_run / "report" / png).stat().st_size > 100, png
        assert f"({png})" in report


def test_the_arms_differ_in_data_and_initialisation(claim_run: Path) -> None:
    results = json.loads((claim_run / "report" / "results.json").read_text())
    runs = results["seeds"]["0"]["runs"]
    counts = results["data"]
    # A trains on every pair, B-D on the few: the paired counts and the items trained on.
    assert counts["pairs_all"]["paired"] > 2 * counts["pairs_few"]["paired"] > 0
    assert runs["A"]["train_items"] > runs["B"]["train_items"] > 0
    assert runs["B"]["train_items"] == runs["C"]["train_items"] == runs["D"]["train_items"]
    # Only C starts from the I2I prior; A, B and D are fresh models.
    meta = {arm: read_checkpoint_meta(runs[arm]["checkpoint"]) for arm in "ABCD"}
    i2i_uri = read_checkpoint_meta(runs["i2i"]["checkpoint"])["uri"]
    assert meta["C"]["parent"] == i2i_uri
    assert meta["C"]["transfer_report"]["loaded"]
    for arm in "ABD":
        assert meta[arm]["parent"] is None and meta[arm]["transfer_report"] is None, arm
    # D gets C's total compute: the prior's steps plus the fine-tune's.
    assert runs["D"]["steps"] == runs["i2i"]["steps"] + runs["C"]["steps"]
    assert runs["D"]["total_steps"] == runs["C"]["total_steps"]
    # The multi-frame heads start from the I2I prior or from arm A's T2I model.
    for head in ("novel_view", "video"):
        from_i2i = read_checkpoint_meta(runs[f"{head}:i2i"]["checkpoint"])
        from_t2i = read_checkpoint_meta(runs[f"{head}:t2i"]["checkpoint"])
        assert from_i2i["parent"] == i2i_uri
        assert read_checkpoint_meta(from_t2i["parent"])["converted_from"] == meta["A"]["uri"]
    # Every measured arm has a curve with accuracy per guidance scale and a Fréchet distance.
    for arm in "ABCD":
        curve = results["seeds"]["0"]["t2i"][arm]
        assert [p["step"] for p in curve] == sorted(p["step"] for p in curve)
        assert set(curve[-1]["metrics"]) == {"1", "4.5"}
        assert {"overall", "fd", "copy_rate"} <= set(curve[-1]["metrics"]["4.5"])


def test_every_run_trains_with_the_presets_condition_fix(claim_run: Path) -> None:
    """The experiment's snr_gamma reaches every training run, and the preset's model_overrides
    (cond_init_std: null, xavier) reach every model: without both the tiny arms ignore their
    condition."""
    results = json.loads((claim_run / "report" / "results.json").read_text())
    runs = results["seeds"]["0"]["runs"]
    assert set(runs) >= {"i2i", *"ABCD", "novel_view:i2i", "video:t2i"}
    for name, run in runs.items():
        train_config = read_checkpoint_meta(run["checkpoint"])["train_config"]
        assert train_config["snr_gamma"] == 5.0, name
        assert train_config["model_overrides"]["cond_init_std"] is None, name
        model_config = json.loads(
            (Path(run["checkpoint"]) / "transformer" / "config.json").read_text()
        )
        assert model_config["cond_init_std"] is None, name


@pytest.mark.parametrize("preset", ["experiment-micro", "experiment-cpu", "experiment-gpu"])
def test_the_presets_set_the_condition_fix(preset: str) -> None:
    from lumos.configs.experiment import ExperimentConfig

    cfg = ExperimentConfig.from_preset(preset)
    assert cfg.snr_gamma == 5.0
    assert cfg.model_overrides["cond_init_std"] is None
    assert {"hidden_size", "depth", "num_heads", "patch_size"} <= set(cfg.model_overrides)
    assert ExperimentConfig.from_preset(preset, {"snr_gamma": None}).snr_gamma is None


def test_held_out_combinations_are_never_paired_for_training(claim_run: Path) -> None:
    for name in ("pairs-all", "pairs-few"):
        samples = dataset_samples(str(claim_run / "datasets" / name))
        train = [r for r, _ in samples if (r.get("meta") or {}).get("split") == "train"]
        held = [r for r in train if (r.get("meta") or {}).get("holdout")]
        assert held, "the micro set has held-out scenes in its unlabeled pool"
        assert not any(r.get("paired") for r in held)
        evals = [r for r, _ in samples if (r.get("meta") or {}).get("split") == "eval"]
        assert all(r.get("caption") for r in evals)


def test_the_kfp_step_reruns_into_the_same_directory_and_shows_the_report(
    claim_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's step on the finished run's directory: every stage reuses what is there
    (no training runs again), and the report becomes a Markdown artifact with inline images."""
    from types import SimpleNamespace

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # in a pod it wants s3://

    from lumos.experiments.pipeline_step import claim_step

    before = {p: p.stat().st_mtime for p in (claim_run / "checkpoints").rglob("*.safetensors")}
    report = SimpleNamespace(path=str(tmp_path / "report.md"), metadata={})
    results = SimpleNamespace(path=str(tmp_path / "results.json"), metadata={})
    claim_step("experiment-micro", "{}", str(claim_run), report, results)
    after = {p: p.stat().st_mtime for p in (claim_run / "checkpoints").rglob("*.safetensors")}
    assert before == after and before
    shown = Path(report.path).read_text()
    assert "## Second claim" in shown
    assert shown.count("](data:image/png;base64,") >= 4 and ".png)" not in shown
    assert json.loads(Path(results.path).read_text())["seeds"]["0"]["t2i"]["C"]
    assert report.metadata["uri"].endswith("/report")


@pytest.mark.parametrize("gpus", [0, 1])
def test_the_claim_pipeline_compiles(tmp_path: Path, gpus: int) -> None:
    import yaml

    from pipelines.claim_pipeline import compile_claim_pipeline

    spec = yaml.safe_load(compile_claim_pipeline(tmp_path / "claim.yaml", gpus).read_text())
    container = spec["deploymentSpec"]["executors"]["exec-experiment-claim"]["container"]
    assert ("accelerator" in container.get("resources", {})) == bool(gpus)
    outputs = spec["components"]["comp-experiment-claim"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.Markdown"
    # ... and the run's own output, shown on the run's page
    [selector] = spec["root"]["dag"]["outputs"]["artifacts"]["Output"]["artifactSelectors"]
    assert selector == {"outputArtifactKey": "report", "producerSubtask": "experiment-claim"}


def test_runs_of_other_seeds_merge_into_one_report(claim_run: Path, tmp_path: Path) -> None:
    from lumos.configs.experiment import ExperimentConfigError
    from lumos.experiments.report import merge_runs

    main(["experiment", "report", "--runs", str(claim_run), "--out", str(tmp_path / "m")])
    merged = json.loads((tmp_path / "m" / "results.json").read_text())
    assert list(merged["seeds"]) == ["0"] and (tmp_path / "m" / "grid-g4.5.png").exists()
    with pytest.raises(ExperimentConfigError, match="more than one run"):
        merge_runs([claim_run, claim_run], tmp_path / "twice")
