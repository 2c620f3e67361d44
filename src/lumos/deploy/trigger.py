"""`lumos trigger`: start a retraining run through the KFP API when enough new data arrived.

    lumos trigger --config-dir /etc/lumos     # the trigger CronJob, the ConfigMap mounted there

For each configured source (`data.images_uri`, `data.views_uri`, `data.clips_uri`) it lists the
source and looks every item up in the record of seen objects that incremental ingest keeps in the
dataset under `data.datasets_root` (the run reports its manifest lists: lumos.data.manifest). When
the sources hold at least `trigger.min_new_items` items no run has seen (deploy.yaml), and no run
of the deployment's experiment is still going, it starts one run of the pipeline version
`lumos deploy` registered for this config, with the retraining parameters. Nothing new: it starts
nothing and does not even call KFP.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

from pydantic import BaseModel

from lumos.deploy.config import DeployError, Deployment

if TYPE_CHECKING:
    from lumos.configs.data import IngestConfig

# backend/api/v2beta1/run.proto RuntimeState: a run in one of these is not finished.
ACTIVE_STATES = {"PENDING", "RUNNING", "PAUSED", "CANCELING"}
KINDS = ("images", "views", "clips")


class SourceCount(BaseModel):
    kind: str
    source_uri: str
    dataset_uri: str
    listed: int
    new: int


class TriggerResult(BaseModel):
    new_items: int
    min_new_items: int
    sources: list[SourceCount]
    started: bool
    reason: str
    run_id: str | None = None


def count_new_items(cfg: IngestConfig, source_uri: str, dataset_uri: str) -> tuple[int, int]:
    """(items listed in the source, items of them no ingest into the dataset has seen), as
    incremental ingest decides it (lumos.data.ingest_run.unseen_items)."""
    from lumos.data.manifest import load_history, read_manifest
    from lumos.data.sources import Source, group_items
    from lumos.storage import Storage

    store = Storage.from_uri(dataset_uri)
    with Source(source_uri) as source:
        manifest = read_manifest(store)
        history = load_history(store, cfg.model_copy(update={"incremental": True}), manifest)
        try:
            listed = new = 0
            for item in group_items(source.list()):
                listed += 1
                new += history.seen_as(source.uri, item.source_key) is None
        finally:
            history.close()
    return listed, new


def count_sources(deployment: Deployment) -> list[SourceCount]:
    from lumos.pipeline.layout import join_uri

    cfg = deployment.pipeline
    sources = {kind: getattr(cfg.data, f"{kind}_uri") for kind in KINDS}
    if not sources["images"]:
        raise DeployError(
            "lumos trigger needs the sources: set data.images_uri (and data.views_uri, "
            "data.clips_uri for those heads) in the ConfigMap's overrides.yaml"
        )
    if not cfg.data.datasets_root:
        raise DeployError(
            "lumos trigger compares the sources with the datasets that persist across runs: set "
            "data.datasets_root in the ConfigMap's overrides.yaml"
        )
    counts = []
    for kind, source_uri in sources.items():
        if not source_uri:
            continue
        ingest_cfg = cfg.ingest if kind == "images" else cfg.multiframe_ingest()
        dataset_uri = join_uri(cfg.data.datasets_root, kind)
        listed, new = count_new_items(ingest_cfg, source_uri, dataset_uri)
        counts.append(SourceCount(kind=kind, source_uri=source_uri, dataset_uri=dataset_uri,
                                  listed=listed, new=new))  # fmt: skip
    return counts


def trigger(deployment: Deployment, now: datetime | None = None) -> TriggerResult:
    from lumos.deploy.kfp_api import (
        _api,
        experiment_id,
        kfp_client,
        registered_version,
        run_parameters,
    )

    deploy = deployment.deploy
    counts = count_sources(deployment)
    new_items = sum(c.new for c in counts)
    wanted = deploy.trigger.min_new_items

    def result(started: bool, reason: str, run_id: str | None = None) -> TriggerResult:
        return TriggerResult(new_items=new_items, min_new_items=wanted, sources=counts,
                             started=started, reason=reason, run_id=run_id)  # fmt: skip

    if new_items < wanted:
        return result(False, f"{new_items} new items, fewer than trigger.min_new_items={wanted}")
    client = kfp_client(deploy)
    pipeline_id, version_id = registered_version(client, deployment)
    experiment = experiment_id(client, deploy)
    recent = _api(
        "listing the experiment's runs",
        lambda: client.list_runs(
            experiment_id=experiment, sort_by="created_at desc", page_size=100
        ),  # fmt: skip
    )
    active = [r for r in recent.runs or [] if str(r.state) in ACTIVE_STATES]
    if active:
        return result(
            False,
            f"{new_items} new items, but run {active[0].display_name!r} ({active[0].run_id}) "
            f"is {active[0].state}: its ingest will take them",
        )
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    run = _api(
        "starting a run",
        lambda: client.run_pipeline(
            experiment_id=experiment,
            job_name=f"{deploy.trigger.run_name}-{stamp}",
            params=run_parameters(deployment.pipeline),
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=deploy.service_account,
        ),
    )
    return result(True, f"{new_items} new items (at least {wanted})", run.run_id)
