"""`lumos deploy`: register the pipeline and its recurring run through the KFP API (`kfp.Client`).

    lumos deploy --config-dir /etc/lumos          # the deploy Job, the ConfigMap mounted there
    lumos deploy --config-map manifests/base/pipeline-config.yaml   # from a laptop, KFP
        port-forwarded: kubectl -n kubeflow port-forward svc/ml-pipeline 8888 and
        deploy.yaml's kfp_host: http://127.0.0.1:8888

1. The pipeline is compiled from the deployment's config; its version is named
   `<pipeline>-v<lumos version>-<8 hex digits of the compiled spec's sha256>`.
2. The pipeline is looked up by name and created when missing; the version is uploaded only when
   the pipeline has none of that name, so deploying the same config twice uploads nothing.
3. The recurring run (cron, max concurrency 1, no catch-up, service account) runs that version
   with the retraining parameters (`run_parameters`). KFP's API cannot update a recurring run
   (backend/api/v2beta1/recurring_run.proto has create, get, list, enable, disable, delete): one
   whose version, schedule, account or parameters differ is replaced, the new one created before
   the old one is deleted, so a failure leaves a schedule in place.

Why not a ScheduledWorkflow applied with kubectl: KFP's scheduledworkflow controller
(backend/src/crd/controller/scheduledworkflow/controller.go, submitNewWorkflowIfNotAlreadySubmitted)
takes a non-empty `spec.workflow.spec` as a v1 workflow and unmarshals it as an Argo Workflow in
JSON (backend/src/common/util/workflow.go, NewWorkflowFromScheduleWorkflowSpecBytesJSON), which
fails for the pipeline's IR YAML at every resync; and a recurring run exists for the API server
and its UI only as the row `ResourceManager.CreateJob` (backend/src/apiserver/resource/
resource_manager.go) writes when the API creates it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from lumos.deploy.config import DeployConfig, DeployError, Deployment, RecurringRunConfig

if TYPE_CHECKING:
    import kfp

    from lumos.config import PipelineConfig

# Scheduled and triggered runs ingest incrementally into the datasets that persist across runs.
RETRAINING_OVERRIDES = {"ingest": {"incremental": True}}
MAX_CONCURRENCY = 1  # promotions must not race (lumos.serving.promote)
NO_CATCHUP = True  # after downtime, run once, not once per missed period
EQUALS = 1  # backend/api/v2beta1/filter.proto Predicate.Operation.EQUALS, as kfp.Client sends it

T = TypeVar("T")


class DeployResult(BaseModel):
    pipeline_id: str
    pipeline_created: bool
    version_name: str
    version_id: str
    version_uploaded: bool
    experiment_id: str
    recurring_run_id: str | None = None
    # "created", "unchanged", "replaced", "deleted" or "none"
    recurring_run: str = "none"


def _api(what: str, call: Callable[[], T]) -> T:
    """Call the KFP API; its errors (status and the server's message) as a DeployError."""
    import kfp_server_api
    import urllib3

    try:
        return call()
    except kfp_server_api.ApiException as err:
        body = err.body.decode() if isinstance(err.body, bytes) else str(err.body or "")
        try:
            parsed = json.loads(body)
            message = parsed.get("message") or parsed.get("error_message") or body
        except ValueError:
            message = body
        raise DeployError(
            f"KFP API: {what} failed ({err.status} {err.reason}): {message}"
        ) from None
    except (urllib3.exceptions.HTTPError, TimeoutError, OSError) as err:
        # kfp.Client's health check gives up with a TimeoutError after 5 attempts
        raise DeployError(f"KFP API: {what} failed: cannot reach the API server: {err}") from None


def kfp_client(deploy: DeployConfig) -> kfp.Client:
    """A client of the deployment's KFP API server. In a pod with the projected token KFP's
    multi-user mode reads (/var/run/secrets/kubeflow/pipelines/token, audience
    pipelines.kubeflow.org), it authenticates with it."""
    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    token = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    credentials = ServiceAccountTokenVolumeCredentials() if Path(token).is_file() else None
    # kfp.Client's default namespace is "kubeflow"; that value means "not set" to it.
    return _api(
        f"connecting to {deploy.kfp_host}",
        lambda: kfp.Client(
            host=deploy.kfp_host,
            namespace=deploy.namespace or "kubeflow",
            credentials=credentials,
        ),
    )


def _equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": EQUALS, "key": key, "stringValue": value}]})


def compile_for_deployment(cfg: PipelineConfig, directory: Path, name: str) -> tuple[Path, str]:
    """The compiled pipeline, and its version name (project version and the spec's hash)."""
    from lumos.k8s.pipeline_resources import version_name
    from pipelines.lumos_pipeline import compile_pipeline  # the KFP wiring (imports kfp)

    path = compile_pipeline(cfg, directory / f"{name}.yaml")
    return path, version_name(name, metadata.version("lumos"), path.read_bytes())


def run_parameters(cfg: PipelineConfig) -> dict[str, Any]:
    """The parameters of a scheduled or triggered run: the deployment's config, ingesting
    incrementally."""
    from lumos.config import deep_merge, validate_config

    retraining = deep_merge(cfg.model_dump(mode="json"), RETRAINING_OVERRIDES)
    return {"config_json": validate_config(retraining).model_dump_json()}


def find_pipeline(client: kfp.Client, deploy: DeployConfig) -> str | None:
    found = _api(
        f"listing pipelines named {deploy.pipeline_name!r}",
        lambda: client.list_pipelines(
            filter=_equals("display_name", deploy.pipeline_name),
            namespace=deploy.namespace or None,
            page_size=2,
        ),
    )
    pipelines = found.pipelines or []
    if len(pipelines) > 1:
        raise DeployError(f"KFP has several pipelines named {deploy.pipeline_name!r}: keep one")
    return pipelines[0].pipeline_id if pipelines else None


def find_version(client: kfp.Client, pipeline_id: str, version_name: str) -> str | None:
    found = _api(
        f"listing versions named {version_name!r}",
        lambda: client.list_pipeline_versions(
            pipeline_id=pipeline_id, filter=_equals("display_name", version_name), page_size=1
        ),
    )
    versions = found.pipeline_versions or []
    return versions[0].pipeline_version_id if versions else None


def register_pipeline(
    client: kfp.Client, deployment: Deployment, workdir: Path
) -> tuple[str, bool, str, str, bool]:
    """(pipeline id, created, version name, version id, uploaded) of the deployment's config:
    the pipeline created and the version uploaded only when missing."""
    import kfp_server_api

    deploy = deployment.deploy
    path, version_name = compile_for_deployment(deployment.pipeline, workdir, deploy.pipeline_name)
    description = _description(path)
    pipeline_id = find_pipeline(client, deploy)
    created = pipeline_id is None
    if pipeline_id is None:
        body = kfp_server_api.V2beta1Pipeline(
            name=deploy.pipeline_name,
            display_name=deploy.pipeline_name,
            description=description,
            namespace=deploy.namespace or None,
        )
        pipeline_id = _api(
            f"creating pipeline {deploy.pipeline_name!r}",
            lambda: client.pipelines.pipeline_service_create_pipeline(pipeline=body),
        ).pipeline_id
    version_id = find_version(client, pipeline_id, version_name)
    uploaded = version_id is None
    if version_id is None:
        version_id = _api(
            f"uploading version {version_name!r}",
            lambda: client.upload_pipeline_version(
                str(path), version_name, pipeline_id=pipeline_id, description=description
            ),
        ).pipeline_version_id
    return pipeline_id, created, version_name, version_id, uploaded


def _description(compiled: Path) -> str:
    import yaml

    spec = next(yaml.safe_load_all(compiled.read_text()))
    return str(spec["pipelineInfo"].get("description") or spec["pipelineInfo"]["name"])


def registered_version(client: kfp.Client, deployment: Deployment) -> tuple[str, str]:
    """(pipeline id, version id) that `lumos deploy` registered for this config; a clear error
    when it has not."""
    deploy = deployment.deploy
    with tempfile.TemporaryDirectory() as tmp:
        _, version_name = compile_for_deployment(
            deployment.pipeline, Path(tmp), deploy.pipeline_name
        )
    pipeline_id = find_pipeline(client, deploy)
    version_id = find_version(client, pipeline_id, version_name) if pipeline_id else None
    if pipeline_id is None or version_id is None:
        raise DeployError(
            f"KFP has no pipeline version {version_name!r} of {deploy.pipeline_name!r} (this "
            "config's): run `lumos deploy` with the same ConfigMap first"
        )
    return pipeline_id, version_id


def experiment_id(client: kfp.Client, deploy: DeployConfig) -> str:
    """The deployment's experiment, created when missing (kfp.Client.create_experiment looks it
    up by name first)."""
    return _api(
        f"getting experiment {deploy.experiment!r}",
        lambda: client.create_experiment(
            deploy.experiment,
            description="Lumos retraining: scheduled and new-data runs",
            namespace=deploy.namespace or None,
        ),
    ).experiment_id


def _same_recurring_run(
    run: Any, version_id: str, deploy: DeployConfig, rr: RecurringRunConfig, params: dict[str, Any]
) -> bool:
    cron = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else None
    reference = run.pipeline_version_reference
    return (
        reference is not None
        and reference.pipeline_version_id == version_id
        and cron == rr.cron
        and run.service_account == deploy.service_account
        and str(run.max_concurrency) == str(MAX_CONCURRENCY)
        and bool(run.no_catchup) == NO_CATCHUP
        and run.mode == ("ENABLE" if rr.enabled else "DISABLE")
        and (run.runtime_config.parameters if run.runtime_config else None) == params
    )


def ensure_recurring_run(
    client: kfp.Client,
    deployment: Deployment,
    experiment: str,
    pipeline_id: str,
    version_id: str,
) -> tuple[str | None, str]:
    """(recurring run id, what was done) for the deployment's schedule."""
    deploy = deployment.deploy
    rr = deploy.recurring_run
    name = rr.name if rr is not None else "lumos-retrain"
    listed = _api(
        f"listing recurring runs named {name!r}",
        lambda: client.list_recurring_runs(
            experiment_id=experiment, filter=_equals("display_name", name), page_size=100
        ),
    )
    existing = list(listed.recurring_runs or [])
    if rr is None:
        for run in existing:
            _delete_recurring_run(client, run.recurring_run_id)
        return None, "deleted" if existing else "none"
    params = run_parameters(deployment.pipeline)
    keep = next(
        (r for r in existing if _same_recurring_run(r, version_id, deploy, rr, params)), None
    )
    if keep is not None:
        for run in existing:
            if run is not keep:
                _delete_recurring_run(client, run.recurring_run_id)
        return keep.recurring_run_id, "unchanged"
    created = _api(
        f"creating recurring run {name!r}",
        lambda: client.create_recurring_run(
            experiment_id=experiment,
            job_name=name,
            description=f"Lumos retraining on the schedule {rr.cron!r} (6 fields, seconds first)",
            cron_expression=rr.cron,
            max_concurrency=MAX_CONCURRENCY,
            no_catchup=NO_CATCHUP,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            enabled=rr.enabled,
            service_account=deploy.service_account,
        ),
    )
    for run in existing:  # replaced: deleted once the new one exists
        _delete_recurring_run(client, run.recurring_run_id)
    return created.recurring_run_id, "replaced" if existing else "created"


def _delete_recurring_run(client: kfp.Client, recurring_run_id: str) -> None:
    _api(
        f"deleting recurring run {recurring_run_id}",
        lambda: client.delete_recurring_run(recurring_run_id),
    )


def deploy(deployment: Deployment) -> DeployResult:
    """Register the deployment's pipeline version and its recurring run; idempotent."""
    client = kfp_client(deployment.deploy)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_id, created, version_name, version_id, uploaded = register_pipeline(
            client, deployment, Path(tmp)
        )
    experiment = experiment_id(client, deployment.deploy)
    recurring_id, action = ensure_recurring_run(
        client, deployment, experiment, pipeline_id, version_id
    )
    return DeployResult(
        pipeline_id=pipeline_id,
        pipeline_created=created,
        version_name=version_name,
        version_id=version_id,
        version_uploaded=uploaded,
        experiment_id=experiment,
        recurring_run_id=recurring_id,
        recurring_run=action,
    )
