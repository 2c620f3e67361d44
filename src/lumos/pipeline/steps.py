"""One function per pipeline step: validate the config, call the stage, describe the output.

The KFP components in `components/` are one-line calls into these, so every step also runs (and is
tested) without KFP. Artifacts passed between steps are small JSON descriptors (the stage's result)
whose `uri` points at the data in the run root: big data stays in the object store.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from lumos.config import ConfigError, PipelineConfig, validate_config
from lumos.pipeline.layout import RunLayout, join_uri


class KfpArtifact(Protocol):
    """What the steps use of a KFP artifact (`dsl.Output[...]` / `dsl.Input[...]`)."""

    path: str
    metadata: dict[str, Any]


def describe(artifact: KfpArtifact, uri: str, result: BaseModel | dict[str, Any]) -> None:
    """Write the stage's result as the artifact's content, and its URI into the metadata."""
    payload = result.model_dump(mode="json") if isinstance(result, BaseModel) else result
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps({"uri": uri, "result": payload}, indent=2))
    artifact.metadata["uri"] = uri


def described_uri(artifact: KfpArtifact) -> str:
    if "uri" in artifact.metadata:
        return str(artifact.metadata["uri"])
    return str(json.loads(Path(artifact.path).read_text())["uri"])


def described_result(artifact: KfpArtifact) -> dict[str, Any]:
    return json.loads(Path(artifact.path).read_text())["result"]


def start_run(
    config_json: str, compiled_config_json: str, runs_root: str, run_id: str, form: dict[str, Any]
) -> tuple[str, str, str, str, str, dict[str, bool]]:
    """The run's first step: (its config as JSON, its root, its three sources, the heads it
    fine-tunes). The config is the compiled one with the run form's values and `config_json`
    (the advanced override) on top, refused if it changes `cluster.*`; the sources are the
    configured ones or, not on a cluster, the embedded default dataset generated into the run
    root. Images are needed; views and clips only for their heads."""
    from lumos.data.synthetic import generate_default_dataset
    from lumos.pipeline.run_form import RunForm, heads_to_run, resolve_config
    from lumos.pipeline.run_guard import RunConfigError, require_real_sources

    cfg = resolve_config(validate_config(compiled_config_json), RunForm(**form), config_json)
    run_root = join_uri(runs_root, run_id)
    layout = RunLayout(run_root)
    given = (cfg.data.images_uri, cfg.data.views_uri, cfg.data.clips_uri)
    require_real_sources(given)
    if not any(given):
        generate_default_dataset(cfg.synth, join_uri(run_root, "source"))
        sources = {kind: layout.source(kind) for kind in ("images", "views", "clips")}
        cfg = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={f"{k}_uri": v for k, v in sources.items()})}
        )
    elif not cfg.data.images_uri:
        raise RunConfigError(
            "data.images_uri is empty: pretraining learns from images; give them (views and "
            "clips are only needed for the novel-view and video heads)"
        )
    heads = heads_to_run(cfg, str(form.get("heads", "auto")))
    data = cfg.data
    return (cfg.model_dump_json(), run_root, data.images_uri, data.views_uri, data.clips_uri, heads)


def _dataset_uri(cfg: PipelineConfig, run_root: str, kind: str) -> str:
    if cfg.data.datasets_root:
        return join_uri(cfg.data.datasets_root, kind)
    return RunLayout(run_root).dataset(kind)


def _ingest_config(cfg: PipelineConfig, kind: str):
    return cfg.ingest if kind == "images" else cfg.multiframe_ingest()


def ingest_step(
    config_json: str, source_uri: str, run_root: str, kind: str, dataset: KfpArtifact
) -> None:
    """Ingest one source (views or clips); no source: nothing to ingest, and its head does not
    run (lumos.pipeline.run_form.heads_to_run)."""
    from lumos.data.ingest import ingest

    cfg = validate_config(config_json)
    if not source_uri:
        print(f"no {kind} source (data.{kind}_uri): nothing to ingest", flush=True)
        describe(dataset, "", {"ingested": 0, "no_source": True})
        return
    dataset_uri = _dataset_uri(cfg, run_root, kind)
    result = ingest(_ingest_config(cfg, kind), source_uri, dataset_uri)
    describe(dataset, dataset_uri, result)


def ingest_plan_step(config_json: str, source_uri: str, run_root: str, kind: str) -> list[str]:
    """One self-contained work item per key partition. Each carries its partition, staging and
    dataset URIs and the run's config, so the ParallelFor body needs nothing but the item
    (kfp.local 2.17 resolves other upstream task outputs inside a ParallelFor to the loop item,
    and the run's config is the first step's output)."""
    from lumos.data.ingest import plan_partitions

    cfg = validate_config(config_json)
    items = []
    for partition in plan_partitions(source_uri, cfg.data.ingest_partitions):
        index = int(json.loads(partition)["index"])
        work = {
            "source_uri": source_uri,
            "partition": partition,
            "kind": kind,
            "staging_uri": RunLayout(run_root).staging(kind, index),
            "dataset_uri": _dataset_uri(cfg, run_root, kind),
            "config_json": config_json,
        }
        items.append(json.dumps(work))
    return items


def ingest_partition_step(config_json: str, work_item: str) -> str:
    from lumos.data.ingest import ingest_partition

    work = json.loads(work_item)
    cfg = validate_config(work.get("config_json") or config_json)
    ingest_partition(
        _ingest_config(cfg, work["kind"]),
        work["source_uri"],
        work["staging_uri"],
        work["partition"],
        dataset_uri=work["dataset_uri"],
    )
    return work["staging_uri"]


def ingest_merge_step(
    config_json: str, staging_uris: list[str], run_root: str, kind: str, dataset: KfpArtifact
) -> None:
    from lumos.data.ingest import merge_partitions

    cfg = validate_config(config_json)
    dataset_uri = _dataset_uri(cfg, run_root, kind)
    result = merge_partitions(_ingest_config(cfg, kind), list(staging_uris), dataset_uri)
    describe(dataset, dataset_uri, result)


def new_data_step(datasets: dict[str, KfpArtifact], metrics: Any = None, report: Any = None) -> int:
    """Items this run's ingests added, over every dataset; 0 ends the run here (the pipeline's
    `dsl.If`), green, with nothing trained: there is nothing new to learn from. For the UI: each
    ingest's counts and rejections by reason as metrics and a Markdown table."""
    from lumos.pipeline.run_guard import new_items
    from lumos.pipeline.ui_artifacts import ingest_counts, ingest_markdown, log_metrics, write_text

    results = {kind: described_result(a) for kind, a in datasets.items()}
    counts = {kind: new_items(result) for kind, result in results.items()}
    for kind, result in results.items():
        log_metrics(metrics, ingest_counts(kind, result))
    write_text(report, ingest_markdown(results, counts))
    total = sum(counts.values())
    shown = ", ".join(f"{kind}: {n}" for kind, n in counts.items())
    if total:
        print(f"new data since the last run ({shown}): training", flush=True)
    else:
        print(f"nothing new since the last run ({shown}): skipping training", flush=True)
    return total


def featurize_step(config_json: str, dataset: KfpArtifact, features: KfpArtifact) -> None:
    from lumos.training.featurize import featurize

    cfg = validate_config(config_json)
    dataset_uri = described_uri(dataset)
    result = featurize(cfg.featurize, dataset_uri)
    describe(features, dataset_uri, result)


def featurize_plan_step(config_json: str, dataset: KfpArtifact) -> list[str]:
    """One self-contained work item (JSON) per shard range of the dataset, with the run's config
    (see ingest_plan_step)."""
    from lumos.training.featurize import plan_featurize

    cfg = validate_config(config_json)
    plan = plan_featurize(described_uri(dataset), cfg.data.featurize_partitions)
    return [json.dumps({**item, "config_json": config_json}) for item in plan]


def featurize_partition_step(config_json: str, work_item: str) -> str:
    """Featurize one shard range; returns its work item, for the merge."""
    from lumos.training.featurize import featurize

    partition = json.loads(work_item)
    cfg = validate_config(partition.pop("config_json", None) or config_json)
    featurize(cfg.featurize, partition["dataset_uri"], partition=partition)
    return json.dumps(partition)


def featurize_merge_step(work_items: list[str], features: KfpArtifact) -> None:
    from lumos.training.featurize import merge_featurize

    partitions = [json.loads(item) for item in work_items]
    if not partitions:
        raise ValueError("featurize_merge got no partitions: the plan was empty")
    dataset_uri = partitions[0]["dataset_uri"]
    describe(features, dataset_uri, merge_featurize(dataset_uri, partitions))


def _train_config(cfg: PipelineConfig, head: str):
    return cfg.pretrain if head == "i2i" else getattr(cfg.finetune, head)


def train_step(
    config_json: str,
    head: str,
    run_root: str,
    features: KfpArtifact,
    checkpoint: KfpArtifact,
    init_from: KfpArtifact | None = None,
    metrics: Any = None,
    loss_curve: KfpArtifact | None = None,
) -> None:
    """Pretrain (head i2i) or fine-tune a head. On a cluster with `cluster.distributed` set the
    pretraining runs as a Kubeflow Trainer TrainJob; with several local GPUs, under accelerate.
    Retraining (`ingest.incremental`) pretrains on from the current I2I checkpoint (the one the
    last finished pretraining recorded in the registry) instead of from scratch."""
    cfg = validate_config(config_json)
    dataset_uri = described_uri(features)
    out_uri = RunLayout(run_root).checkpoint(head)
    # A fine-tune with init: scratch (T2I from scratch) ignores the prior it is wired to.
    starts_from_prior = _train_config(cfg, head).init == "prior"
    init_uri = described_uri(init_from) if init_from is not None and starts_from_prior else None
    continue_uri = current_i2i(cfg) if head == "i2i" and cfg.ingest.incremental else None
    cli_args = ["--dataset", dataset_uri, "--out", out_uri]
    if init_uri:
        cli_args += ["--init", init_uri]
    if continue_uri:
        print(f"i2i: continues the current I2I checkpoint {continue_uri}", flush=True)
        cli_args += ["--continue-from", continue_uri]
    result: BaseModel | dict[str, Any]
    if head == "i2i" and cfg.cluster.pretrain_as_trainjob():
        result = _train_as_trainjob(cfg, config_json, head, cli_args, out_uri)
    elif _local_gpu_count() > 1:
        result = _train_with_accelerate(config_json, head, cli_args, out_uri)
    else:
        from lumos.training.train import train

        result = train(
            _train_config(cfg, head),
            dataset_uri,
            out_uri,
            init_from=init_uri,
            continue_from=continue_uri,
        )
    if head == "i2i":
        record_current_i2i(cfg, out_uri)
    _training_artifacts(head, result, metrics, loss_curve)
    describe(checkpoint, out_uri, result)


def _training_artifacts(head: str, result: Any, metrics: Any, loss_curve: Any) -> None:
    """The UI's view of a training step: final loss, throughput and the loss curve."""
    from lumos.pipeline.ui_artifacts import log_metrics, loss_curve_html, write_text

    data = result.model_dump(mode="json") if isinstance(result, BaseModel) else dict(result)
    meta: dict[str, Any] = data["checkpoint"] if isinstance(data.get("checkpoint"), dict) else {}
    losses = [(int(s), float(v)) for s, v in data.get("losses") or []]
    values = {
        "step": data.get("step", meta.get("step")),
        "final_loss": data.get("final_loss", meta.get("loss")),
        "images_per_second": data.get("last_images_per_second"),
    }
    log_metrics(metrics, {k: float(v) for k, v in values.items() if v is not None})
    write_text(loss_curve, loss_curve_html(head, losses, values["images_per_second"]))


CURRENT_I2I = "current.json"


def _i2i_record_store(cfg: PipelineConfig):
    from lumos.storage import Storage

    return Storage.from_uri(join_uri(cfg.promote.registry_uri, "i2i"))


def current_i2i(cfg: PipelineConfig) -> str | None:
    """The I2I checkpoint the last finished pretraining left (`<registry>/i2i/current.json`)."""
    from lumos.storage import ObjectNotFound

    try:
        return str(_i2i_record_store(cfg).read_json(CURRENT_I2I)["checkpoint_uri"])
    except ObjectNotFound:
        return None


def record_current_i2i(cfg: PipelineConfig, out_uri: str) -> None:
    """Make this run's final I2I checkpoint the one the next retraining continues."""
    from lumos.checkpoints import read_checkpoint_meta

    meta = read_checkpoint_meta(out_uri)
    record = {"checkpoint_uri": meta["uri"], "step": meta.get("step"), "parent": meta.get("parent")}
    _i2i_record_store(cfg).write_json(CURRENT_I2I, record)


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _stage_command(head: str, cli_args: list[str]) -> list[str]:
    return ["pretrain", *cli_args] if head == "i2i" else ["finetune", "--head", head, *cli_args]


def _train_with_accelerate(config_json: str, head: str, cli_args: list[str], out_uri: str):
    """One process per local GPU under `accelerate launch`. A SIGTERM to this step (its pod
    preempted) reaches the training processes, which stop with a checkpoint."""
    from lumos.checkpoints import latest_checkpoint, read_checkpoint_meta
    from lumos.training.stopping import TrainingStopped, run_passing_sigterm_on

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(_local_gpu_count()), "-m", "lumos.cli",
        *_stage_command(head, cli_args), "--config-json", config_json,
    ]  # fmt: skip
    returncode, signalled = run_passing_sigterm_on(cmd, os.environ)
    if signalled:
        raise TrainingStopped(
            f"SIGTERM: the {head} training stopped (exit code {returncode}); its latest "
            f"checkpoint is {latest_checkpoint(out_uri)}, from which a rerun of this step resumes"
        )
    if returncode != 0:
        raise RuntimeError(
            f"the {head} training processes failed (accelerate launch exited with {returncode}): "
            "their errors are in the output above"
        )
    return read_checkpoint_meta(out_uri)


def _train_as_trainjob(
    cfg: PipelineConfig, config_json: str, head: str, cli_args: list[str], out_uri: str
) -> dict[str, Any]:
    """Run the same `lumos` command on N nodes x M GPUs as a Kubeflow Trainer TrainJob (the
    torch-distributed runtime starts it under torchrun), wait for it, and read its checkpoint."""
    from lumos.checkpoints import read_checkpoint_meta
    from lumos.k8s.trainjob import launch_and_wait, render_trainjob

    dist = cfg.cluster.distributed
    if dist is None:
        raise ConfigError("a TrainJob needs cluster.distributed")
    command = ["lumos", *_stage_command(head, cli_args), "--config-json", config_json]
    # The run root ends with the KFP run id: one TrainJob per run and head. PipelineConfig.name
    # is short enough for this name (NAME_MAX_LENGTH) with up to 100 nodes.
    run_id = out_uri.rstrip("/").split("/")[-3][-8:]
    name = f"{cfg.name}-{head.replace('_', '-')}-{run_id}".lower()
    job = render_trainjob(dist, command, name)
    print(f"launching TrainJob {name}: {dist.num_nodes} x {dist.gpus_per_node} GPUs", flush=True)
    outcome = launch_and_wait(
        job, timeout_s=dist.timeout_s, poll_s=dist.poll_s, start_timeout_s=dist.start_timeout_s
    )
    return {
        "trainjob": outcome.model_dump(mode="json"),
        "checkpoint": read_checkpoint_meta(out_uri),
    }


def evaluate_step(
    config_json: str,
    head: str,
    run_root: str,
    checkpoint: KfpArtifact,
    features: KfpArtifact,
    metrics: Any,
    report: KfpArtifact,
    evaluation: KfpArtifact,
) -> bool:
    """Evaluate a head against the eval split, compare with the promoted model, gate it."""
    from lumos.evaluation.evaluate import evaluate
    from lumos.serving.promote import promoted_baseline

    cfg = validate_config(config_json)
    out_uri = RunLayout(run_root).evaluation(head)
    result = evaluate(
        cfg.evaluate,
        described_uri(checkpoint),
        described_uri(features),
        out_uri,
        **promoted_baseline(cfg.promote.registry_uri, head),
    )
    for name, value in result.metrics.items():
        metrics.log_metric(name, float(value))
    metrics.log_metric("passed", 1.0 if result.passed else 0.0)
    _copy_report(result, report)
    describe(evaluation, out_uri, result)
    return bool(result.passed)


def _copy_report(result: Any, report: KfpArtifact) -> None:
    from lumos.storage import Storage

    uri = str(result.report_uri)
    parent, _, name = uri.rpartition("/")
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_bytes(Storage.from_uri(parent).read_bytes(name))
    report.metadata["uri"] = uri


def export_step(
    config_json: str,
    head: str,
    run_root: str,
    checkpoint: KfpArtifact,
    exported: KfpArtifact,
    metrics: Any = None,
) -> None:
    from lumos.export.onnx_export import export

    cfg = validate_config(config_json)
    out_uri = RunLayout(run_root).export(head)
    result = export(cfg.export, described_uri(checkpoint), out_uri)
    from lumos.pipeline.ui_artifacts import log_metrics

    # export parity for the UI: each graph's worst |onnx - torch| and the tolerance it met
    parity = {f"max_abs_diff_{graph}": diff for graph, diff in result.max_abs_diff.items()}
    atol = result.tolerance.get("atol")
    log_metrics(metrics, {**parity, **({"atol": float(atol)} if atol is not None else {})})
    describe(exported, out_uri, result)


def promote_step(
    config_json: str,
    head: str,
    run_root: str,
    exported: KfpArtifact,
    evaluation: KfpArtifact,
    manifest: KfpArtifact,
    decision: KfpArtifact | None = None,
) -> None:
    """Promote a head that passed its gate; `decision` (for the UI) says what was decided, on
    which metrics."""
    from lumos.evaluation.evaluate import EvalResult
    from lumos.pipeline.ui_artifacts import promotion_markdown, write_text
    from lumos.serving.promote import promote

    cfg = validate_config(config_json)
    out_uri = RunLayout(run_root).serving(head)
    eval_result = EvalResult.model_validate(described_result(evaluation))
    result = promote(cfg.promote, described_uri(exported), eval_result, out_uri)
    write_text(
        decision,
        promotion_markdown(result.model_dump(mode="json"), eval_result.model_dump(mode="json")),
    )
    describe(manifest, out_uri, result)


__all__ = [
    "start_run",
    "describe",
    "described_uri",
    "evaluate_step",
    "export_step",
    "featurize_merge_step",
    "featurize_partition_step",
    "featurize_plan_step",
    "featurize_step",
    "ingest_merge_step",
    "ingest_partition_step",
    "ingest_plan_step",
    "ingest_step",
    "new_data_step",
    "promote_step",
    "train_step",
]
