"""The claim pipeline run by KFP itself (`kfp.local`, the step as a subprocess, as `lumos run`
runs the main pipeline) on the micro preset (about 12 s each on 2 cores): what KFP recorded for
the step (its status, its executor output, the Markdown artifact in the pipeline root) and the
report under a local out_uri or, as on a cluster, in the object store; and a step that fails says
why in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lumos.configs.experiment import ExperimentConfigError
from lumos.experiments.pipeline_step import claim_step, inline_images, step_config
from pipelines.claim_pipeline import main, run_claim_local

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(autouse=True)
def not_in_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CI job in a pod would have the step refuse its local out_uri (the last test)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_kfp_runs_the_claim_pipeline_and_records_its_report(tmp_path: Path, capfd) -> None:
    out = tmp_path / "experiment"
    run = run_claim_local(tmp_path / "run", "experiment-micro", "{}", str(out))
    captured = capfd.readouterr()
    log = ANSI.sub("", captured.out + captured.err)
    assert "Task 'experiment-claim' finished with status SUCCESS" in log
    assert "Pipeline 'lumos-claim' finished with status SUCCESS" in log

    # KFP's own record of the step, in its pipeline root
    [step_dir] = (tmp_path / "run" / "kfp").glob("lumos-claim-*/experiment-claim")
    assert run.report == step_dir / "report"
    recorded = json.loads((step_dir / "executor_output.json").read_text())["artifacts"]
    [report_entry] = recorded["report"]["artifacts"]
    [results_entry] = recorded["results"]["artifacts"]
    assert report_entry["uri"] == str(step_dir / "report")
    assert results_entry["uri"] == str(step_dir / "results")
    assert report_entry["metadata"]["uri"] == str(out / "report")

    # The Markdown artifact is the report, its tables and its plots inline
    shown = (step_dir / "report").read_text()
    for heading in (
        "## Arms",
        "## The condition encoder",
        "## T2I at the last step",
        "## Memorisation",
        "## Second claim",
        "## Samples",
    ):
        assert heading in shown, heading
    for arm in "ABCD":
        assert len(re.findall(rf"^\| {arm} \| ", shown, flags=re.M)) >= 4, arm
    for key in ("novel_view | i2i", "novel_view | t2i", "video | i2i", "video | t2i"):
        assert f"| {key} |" in shown
    assert shown.count("](data:image/png;base64,") >= 4 and ".png)" not in shown

    # ... the one the step wrote under out_uri, with results.json beside it
    report_dir = out / "report"
    assert shown == inline_images((report_dir / "report.md").read_text(), report_dir)
    results = json.loads((report_dir / "results.json").read_text())
    assert json.loads((step_dir / "results").read_text()) == results
    assert results["config"]["name"] == "experiment-micro"
    assert set(results["seeds"]["0"]["t2i"]) == set("ABCD")
    assert (report_dir / "grid-g4.5.png").stat().st_size > 100


def test_a_bad_override_fails_the_kfp_step_with_a_one_line_error(tmp_path: Path, capfd) -> None:
    with pytest.raises(SystemExit, match="claim pipeline: Pipeline 'lumos-claim' finished with"):
        main(["--run-local", str(tmp_path), "--preset", "experiment-micro", "--set", "steps.t2i=0"])
    captured = capfd.readouterr()
    log = ANSI.sub("", captured.out + captured.err)
    assert (
        "ExperimentConfigError: overrides_json: invalid config (1 problem(s)): steps.t2i: Input"
        in log
    )
    assert "Task 'experiment-claim' finished with status FAILURE" in log
    assert not (tmp_path / "out").exists()  # refused before running anything


def test_the_step_names_what_is_wrong_before_running(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ExperimentConfigError, match=r"not JSON \(Expecting property name"):
        step_config("experiment-micro", "{steps: 1}")
    with pytest.raises(ExperimentConfigError, match="must be a JSON object.*got list"):
        step_config("experiment-micro", "[1]")
    with pytest.raises(ExperimentConfigError, match="unknown experiment preset 'micro'"):
        step_config("micro", "")
    assert step_config("experiment-micro", '{"seeds": [3]}').seeds == [3]
    # In a pod a local out_uri would vanish with the pod: refused before anything runs.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    artifact = SimpleNamespace(path=str(tmp_path / "a"), metadata={})
    with pytest.raises(ExperimentConfigError, match="give an s3:// URI"):
        claim_step("experiment-micro", "{}", str(tmp_path / "out"), artifact, artifact)
    assert not (tmp_path / "out").exists()


def test_kfp_runs_the_claim_into_the_object_store_as_in_a_pod(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, capfd
) -> None:
    """The cluster's path: out_uri in the object store (the step's pod sees KUBERNETES_SERVICE_HOST
    and the S3 secret's env, both inherited by the local runner's subprocess): the experiment runs
    in a temporary directory and only its report is uploaded; KFP's artifact is that report."""
    from lumos.storage import Storage

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    out_uri = f"s3://{s3_bucket}/claim-1"
    run = run_claim_local(tmp_path / "run", "experiment-micro", '{"seeds": [0]}', out_uri)
    captured = capfd.readouterr()
    log = ANSI.sub("", captured.out + captured.err)
    assert "Task 'experiment-claim' finished with status SUCCESS" in log
    [step_dir] = (tmp_path / "run" / "kfp").glob("lumos-claim-*/experiment-claim")
    recorded = json.loads((step_dir / "executor_output.json").read_text())["artifacts"]
    assert recorded["report"]["artifacts"][0]["metadata"]["uri"] == f"{out_uri}/report"

    store = Storage.from_uri(out_uri)
    keys = {o.key for o in store.list()}
    assert {"report/report.md", "report/results.json", "report/grid-g4.5.png"} <= keys
    assert all(k.startswith("report/") for k in keys)  # datasets, checkpoints stayed in the pod
    uploaded = tmp_path / "uploaded"
    store.download_dir("report", uploaded)
    assert run.report.read_text() == inline_images((uploaded / "report.md").read_text(), uploaded)
    assert "## Second claim" in run.report.read_text()
    assert json.loads((step_dir / "results").read_text()) == store.read_json("report/results.json")
