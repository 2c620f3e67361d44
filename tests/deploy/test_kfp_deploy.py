"""`lumos deploy` against a stand-in of the KFP API server (tests/kfp_api_standin.py: a real HTTP
server answering as kubeflow/pipelines' backend/src/apiserver handlers do; a stand-in because no
KFP server can run here). The command runs as a user runs it, `lumos deploy --config-map FILE`,
with kfp.Client 2.17 making the HTTP calls.

Encoded upstream behaviour: pipeline_upload_server.go (upload_version), pipeline_server.go,
job_server.go + api_converter.go toModelJob (recurring runs), v2_template.go
validatePipelineJobInputs (parameters), and the reason a kubectl-applied ScheduledWorkflow does
not work: backend/src/crd/controller/scheduledworkflow/controller.go (see lumos.deploy.kfp_api).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kfp_api_standin import kfp_api_standin

from lumos.cli import main
from lumos.config import validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG_MAP = REPO_ROOT / "manifests" / "base" / "pipeline-config.yaml"


def config_map(path: Path, host: str, overrides: str = "", deploy: dict | None = None) -> Path:
    """The base's ConfigMap with deploy.yaml pointing at the stand-in, plus overrides."""
    doc = yaml.safe_load(BASE_CONFIG_MAP.read_text())
    doc["data"]["overrides.yaml"] += overrides
    doc["data"]["deploy.yaml"] = yaml.safe_dump({"kfp_host": host, **(deploy or {})})
    path.write_text(yaml.safe_dump(doc))
    return path


def _result(out: str) -> dict:
    return json.loads(out[out.index("{\n") :])


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # kfp.Client keeps a context file under ~/.config/kfp: not the user's.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def run_deploy(path: Path, capsys: pytest.CaptureFixture) -> dict:
    capsys.readouterr()
    main(["deploy", "--config-map", str(path)])
    return _result(capsys.readouterr().out)


@pytest.mark.slow  # compiles the pipeline for each deploy: about 15 s
def test_deploy_uploads_once_then_versions_and_replaces_the_schedule(home, capsys) -> None:
    with kfp_api_standin() as (url, api):
        cm = config_map(home / "cm.yaml", url)
        first = run_deploy(cm, capsys)
        assert first["pipeline_created"] and first["version_uploaded"]
        assert first["recurring_run"] == "created"
        [pipeline] = api.pipelines.values()
        assert pipeline["display_name"] == "lumos"
        [version] = api.versions.values()
        assert version["name"] == first["version_name"]
        assert version["name"].startswith("lumos-v") and len(version["name"].split("-")[-1]) == 8
        # The uploaded file is the compiled pipeline: its spec, with the platform spec after it.
        assert version["pipeline_spec"]["pipelineInfo"]["name"] == "lumos"
        assert version["platform_spec"]["platforms"]["kubernetes"]
        [schedule] = api.recurring_runs.values()
        assert schedule["display_name"] == "lumos-retrain"
        assert schedule["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * 0"}}
        assert schedule["max_concurrency"] == "1" and schedule["no_catchup"] is True
        assert schedule["service_account"] == "lumos-pipeline"
        assert schedule["mode"] == "ENABLE"
        assert schedule["pipeline_version_reference"] == {
            "pipeline_id": pipeline["pipeline_id"],
            "pipeline_version_id": version["pipeline_version_id"],
        }
        scheduled_cfg = validate_config(schedule["runtime_config"]["parameters"]["config_json"])
        assert scheduled_cfg.ingest.incremental is True
        [experiment] = api.experiments.values()
        assert schedule["experiment_id"] == experiment["experiment_id"]

        # The same config again: nothing is written.
        writes = len(api.writes())
        second = run_deploy(cm, capsys)
        assert not second["pipeline_created"] and not second["version_uploaded"]
        assert second["recurring_run"] == "unchanged"
        assert second["version_name"] == first["version_name"]
        assert len(api.writes()) == writes, [w.path for w in api.writes()[writes:]]

        # A changed config: a new version, and the schedule now runs it (replaced: the API has
        # no update of a recurring run).
        changed = config_map(home / "cm2.yaml", url, "\nevaluate: {num_samples: 9}\n")
        third = run_deploy(changed, capsys)
        assert third["version_uploaded"] and not third["pipeline_created"]
        assert third["version_name"] != first["version_name"]
        assert third["recurring_run"] == "replaced"
        assert len(api.pipelines) == 1 and len(api.versions) == 2
        [schedule] = api.recurring_runs.values()
        assert schedule["recurring_run_id"] == third["recurring_run_id"]
        assert schedule["pipeline_version_reference"]["pipeline_version_id"] == third["version_id"]
        deletes = [r.path for r in api.writes() if r.method == "DELETE"]
        assert deletes == [f"/apis/v2beta1/recurringruns/{first['recurring_run_id']}"]

        # Only the schedule changed: no new version, the recurring run replaced.
        rescheduled = config_map(
            home / "cm3.yaml",
            url,
            "\nevaluate: {num_samples: 9}\n",
            {"recurring_run": {"cron": "0 30 1 * * 6"}},
        )
        fourth = run_deploy(rescheduled, capsys)
        assert not fourth["version_uploaded"] and fourth["recurring_run"] == "replaced"
        [schedule] = api.recurring_runs.values()
        assert schedule["trigger"]["cron_schedule"]["cron"] == "0 30 1 * * 6"

        # No schedule configured: the recurring run is deleted.
        unscheduled = config_map(
            home / "cm4.yaml", url, "\nevaluate: {num_samples: 9}\n", {"recurring_run": None}
        )
        assert run_deploy(unscheduled, capsys)["recurring_run"] == "deleted"
        assert api.recurring_runs == {}


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
def test_the_api_refuses_what_the_server_refuses(home, capsys) -> None:
    """The stand-in answers errors as the server does, and deploy reports them in one line."""
    with kfp_api_standin() as (url, api):
        cm = config_map(home / "cm.yaml", url)
        run_deploy(cm, capsys)
        [version] = api.versions.values()
        # The same version name uploaded twice: 409, as CreatePipelineVersion's AlreadyExists.
        import kfp

        client = kfp.Client(host=url)
        with pytest.raises(Exception, match="409"):
            compiled = home / "p.yaml"
            compiled.write_text(yaml.safe_dump(version["pipeline_spec"]))
            client.upload_pipeline_version(
                str(compiled), version["name"], pipeline_id=version["pipeline_id"]
            )
        # A parameter the pipeline does not declare: 400 (validatePipelineJobInputs).
        with pytest.raises(Exception, match="not required by pipeline: nope"):
            client.run_pipeline(
                experiment_id=next(iter(api.experiments)),
                job_name="x",
                params={"nope": 1},
                pipeline_id=version["pipeline_id"],
                version_id=version["pipeline_version_id"],
            )


def test_a_bad_deploy_config_is_a_one_line_error(home, capsys) -> None:
    cm = config_map(
        home / "cm.yaml", "http://127.0.0.1:9", deploy={"recurring_run": {"cron": "@daily"}}
    )
    with pytest.raises(SystemExit):
        main(["deploy", "--config-map", str(cm)])
    err = capsys.readouterr().err
    assert "cron '@daily' must have 6 fields" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
def test_an_unreachable_api_is_a_one_line_error(home, capsys) -> None:
    cm = config_map(home / "cm.yaml", "http://127.0.0.1:9", deploy={"namespace": "team"})
    with pytest.raises(SystemExit):
        main(["deploy", "--config-map", str(cm)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lumos: DeployError: KFP API: listing pipelines named 'lumos'")
    assert "cannot reach the API server" in err[-1]
