"""What a pipeline run checks before it does anything, and how it tells new data from none.

    check_cluster_unchanged(cfg, compiled_cluster_json)   # the first step: cluster.* is compile-time
    require_real_sources(given)                            # in a pod: real images at least
    new_items(ingest_result)                               # 0: nothing new since the last run

The cluster settings (images, GPUs, node pools, the pretraining TrainJob's shape, the S3 secret)
are baked into the compiled pipeline's pods; a run's `config_json` cannot change them, and one
that tries is refused at its first step with the fields it changed, instead of running a config
its pods do not have (e.g. `cluster.distributed: null` would leave XL pretraining on a CPU pod).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from lumos.errors import LumosError

if TYPE_CHECKING:
    from lumos.config import PipelineConfig


class RunConfigError(LumosError):
    """A run's config that the compiled pipeline cannot run."""


def changed_fields(before: Any, after: Any, path: str) -> list[str]:
    """Dotted paths where `after` differs from `before` (nested dicts compared key by key)."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[str] = []
        for key in sorted(set(before) | set(after)):
            out += changed_fields(before.get(key), after.get(key), f"{path}.{key}")
        return out
    return [] if before == after else [path]


def check_cluster_unchanged(cfg: PipelineConfig, compiled_cluster_json: str) -> None:
    compiled = json.loads(compiled_cluster_json)
    fields = changed_fields(compiled, cfg.cluster.model_dump(mode="json"), "cluster")
    if fields:
        raise RunConfigError(
            f"this run's config_json changes {', '.join(fields)}, which the compiled pipeline "
            "fixes (images, GPUs, nodes, the TrainJob, secrets are in its pods): edit the "
            "deployment's ConfigMap and run `lumos deploy` (or `make compile`) instead"
        )


def on_kubernetes() -> bool:
    """Whether this step runs in a Kubernetes pod (the kubelet sets this in every container)."""
    return "KUBERNETES_SERVICE_HOST" in os.environ


def require_real_sources(given: tuple[str, str, str]) -> None:
    """(images, views, clips) URIs: in a pod at least the images must be given."""
    if on_kubernetes() and not given[0]:
        raise RunConfigError(
            "on a cluster a run needs its data: set images_uri (and views_uri, clips_uri for "
            "the novel-view and video heads) in the run form, or data.*_uri in the deployment's "
            "ConfigMap; the embedded toy dataset is for `lumos run` on a laptop"
        )


def new_items(ingest_result: dict[str, Any]) -> int:
    """Items an ingest added to its dataset: 0 when the dataset was already up to date (a full
    ingest of an unchanged source) or an incremental one found nothing new."""
    return 0 if ingest_result.get("up_to_date") else int(ingest_result.get("ingested", 0))
