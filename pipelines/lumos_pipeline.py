"""The Lumos pipeline: ingest -> featurize -> pretrain I2I -> fine-tune heads -> evaluate -> export
-> promote (behind the gate).

`build_pipeline(cfg)` bakes the cluster settings (image, GPUs, node selector, tolerations, the S3
secret) into the tasks (the pretrain task gets no GPU when `cluster.distributed` makes it launch a
TrainJob); the whole config also travels as the `config_json` parameter so a run from
the Kubeflow UI can change the recipe. `python -m pipelines.lumos_pipeline` compiles the `xl`
preset to `pipelines/lumos_pipeline.yaml` (a test fails when that file is stale).
"""

# No `from __future__ import annotations` here: kfp reads the pipeline signature's real types.
import argparse
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components.default_dataset.component import default_dataset
from components.evaluate.component import evaluate
from components.export.component import export
from components.featurize.component import featurize
from components.featurize_merge.component import featurize_merge
from components.featurize_partition.component import featurize_partition
from components.featurize_plan.component import featurize_plan
from components.finetune.component import finetune
from components.ingest.component import ingest
from components.ingest_merge.component import ingest_merge
from components.ingest_partition.component import ingest_partition
from components.ingest_plan.component import ingest_plan
from components.new_data.component import new_data
from components.pretrain.component import pretrain
from components.promote.component import promote
from lumos.config import FINETUNE_HEADS, PipelineConfig, load_config
from lumos.configs.k8s import FEATURE_CACHE_ENV, FEATURE_CACHE_PATH, IMAGE_UID
from lumos.pipeline.layout import HEAD_DATASET
from lumos.pipeline.run_form import RunForm
from lumos.storage import StorageError

COMPILED_PATH = Path(__file__).with_name("lumos_pipeline.yaml")
COMPILED_PRESET = "xl"
S3_ENV_KEYS = ("LUMOS_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def step_kind(component: str, cfg: PipelineConfig) -> str:
    """The kind of step (`cluster.steps`) a component's task is: what it needs to run."""
    if component == "pretrain" and cfg.cluster.pretrain_as_trainjob():
        return "control"  # it launches a TrainJob and waits: the TrainJob's pods train
    for kind in ("ingest", "featurize", "pretrain", "finetune", "evaluate", "export"):
        if component == kind or component.startswith(f"{kind}-"):
            return (
                "control" if component.endswith("-plan") or component == "featurize-merge" else kind
            )
    return "control"  # sources, plans, featurize's merge, the new-data check, promote


def _on_cluster(task: dsl.PipelineTask, cfg: PipelineConfig, gpu: bool) -> dsl.PipelineTask:
    """Image, object-store credentials, the requests and limits of the task's kind of step
    (`cluster.steps`, by component name), the image's non-root user and, for steps with GPUs,
    the accelerator and its nodes. KFP (2.17+, backend/src/v2/compiler/argocompiler/
    security_context.go) itself drops every capability, forbids privilege escalation and sets
    the RuntimeDefault seccomp profile on a step's containers; runAsNonRoot it leaves to the
    pipeline, set here: with it the step's pod meets the Restricted Pod Security profile.
    `gpu` only documents the call site: the GPUs come from the step kind's `gpus`."""
    cluster = cfg.cluster
    task.set_container_image(cluster.image)
    kubernetes.use_secret_as_env(
        task, secret_name=cluster.s3_secret, secret_key_to_env={k: k for k in S3_ENV_KEYS}
    )
    kubernetes.set_security_context(
        task, run_as_user=IMAGE_UID, run_as_group=IMAGE_UID, run_as_non_root=True
    )
    res = cluster.steps.resolve(step_kind(task.component_spec.name, cfg), cluster.gpus_per_step)
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory).set_memory_limit(res.memory_limit)
    if res.gpus > 0:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(res.gpus)
        for key, value in cluster.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for tol in cluster.gpu_tolerations:
            kubernetes.add_toleration(
                task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect
            )
        kubernetes.empty_dir_mount(
            task,
            volume_name="dshm",
            mount_path="/dev/shm",
            medium="Memory",
            size_limit=f"{cluster.shm_size_gib}Gi",
        )
        # Features of a dataset in the object store: copied once to node-local disk and
        # memory-mapped from there (lumos.features.cache).
        kubernetes.empty_dir_mount(
            task,
            volume_name="feature-cache",
            mount_path=FEATURE_CACHE_PATH,
            size_limit=f"{cluster.feature_cache_gib}Gi",
        )
        task.set_env_variable(FEATURE_CACHE_ENV, FEATURE_CACHE_PATH)
    return task


def build_pipeline(cfg: PipelineConfig):
    """The `@dsl.pipeline` for this config (defaults of its parameters come from `cfg`)."""
    default_config_json = cfg.model_dump_json()
    # The run form: typed parameters whose defaults are the compiled config's values, and
    # config_json, the advanced override (lumos.pipeline.run_form).
    form = RunForm.defaults(cfg)

    @dsl.pipeline(
        name=cfg.name,
        description="Lumos: I2I pretraining on unlabeled images, fine-tuned T2I / novel-view / "
        "video heads, evaluated, exported to ONNX and promoted to KServe.",
    )
    def lumos_pipeline(
        images_uri: str = form.images_uri,
        views_uri: str = form.views_uri,
        clips_uri: str = form.clips_uri,
        heads: str = form.heads,
        pretrain_steps: int = form.pretrain_steps,
        finetune_steps: int = form.finetune_steps,
        paired_fraction: float = form.paired_fraction,
        runs_root: str = cfg.runs_root,
        config_json: str = "",
    ) -> str:
        """Train, evaluate and promote Lumos on new data.

        Args:
            images_uri: Raw images (s3:// prefix), caption sidecars beside them: I2I and T2I.
            views_uri: Multi-view objects, for the novel-view head (empty: no such head).
            clips_uri: Video clips, for the video head (empty: no such head).
            heads: Heads to fine-tune: auto (those whose source is given) or e.g. t2i,video.
            pretrain_steps: I2I pretraining steps.
            finetune_steps: Steps of every fine-tune; 0 keeps each head's own.
            paired_fraction: Share of images whose captions are used (T2I pairs).
            runs_root: Where each run writes (runs_root/<run id>).
            config_json: Advanced: config fields to override, as JSON, applied last.
        """

        def cpu(task):
            return _on_cluster(task, cfg, gpu=False)

        def gpu(task):
            return _on_cluster(task, cfg, gpu=True)

        def resumable(task):  # a training step: rerun on failure, it resumes its checkpoint
            if cfg.cluster.train_retries:
                task.set_retry(num_retries=cfg.cluster.train_retries, backoff_duration="60s")
            return task

        sources = cpu(
            default_dataset(
                config_json=config_json,
                # the compiled config; its cluster shape is fixed: a run changing it is refused
                compiled_config_json=default_config_json,
                runs_root=runs_root,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                images_uri=images_uri,
                views_uri=views_uri,
                clips_uri=clips_uri,
                heads=heads,
                pretrain_steps=pretrain_steps,
                finetune_steps=finetune_steps,
                paired_fraction=paired_fraction,
            )
        ).set_display_name("sources")
        run_root = sources.outputs["run_root"]
        config_json = sources.outputs["config_json"]  # the run's config, for every later step

        # Images fan out over key partitions; views and clips are small and ingest in one step.
        plan = cpu(
            ingest_plan(
                config_json=config_json,
                source_uri=sources.outputs["images_uri"],
                run_root=run_root,
                kind="images",
            )
        )
        with dsl.ParallelFor(plan.output) as work_item:
            part = cpu(ingest_partition(config_json=config_json, work_item=work_item))
        datasets = {
            "images": cpu(
                ingest_merge(
                    config_json=config_json,
                    staging_uris=dsl.Collected(part.output),
                    run_root=run_root,
                    kind="images",
                )
            )
        }
        for kind in ("views", "clips"):
            datasets[kind] = cpu(
                ingest(
                    config_json=config_json,
                    source_uri=sources.outputs[f"{kind}_uri"],
                    run_root=run_root,
                    kind=kind,
                )
            ).set_display_name(f"ingest-{kind}")

        # Nothing new since the last run (incremental ingest into data.datasets_root added no
        # item): the run ends here, green, without training on what it already learned from.
        fresh = cpu(
            new_data(
                images=datasets["images"].outputs["dataset"],
                views=datasets["views"].outputs["dataset"],
                clips=datasets["clips"].outputs["dataset"],
            )
        )
        with dsl.If(fresh.outputs["Output"] > 0, name="new-data"):
            # Images featurize in a fan-out over shard ranges (one GPU pod each), then a merge that
            # writes features.json; views and clips featurize in their head's branch.
            featurize_work = cpu(
                featurize_plan(
                    config_json=config_json, dataset=datasets["images"].outputs["dataset"]
                )
            )
            with dsl.ParallelFor(featurize_work.output) as work_item:
                featurized = gpu(featurize_partition(config_json=config_json, work_item=work_item))
            features = {"images": cpu(featurize_merge(work_items=dsl.Collected(featurized.output)))}

            # As a TrainJob, pretraining runs in the TrainJob's pods: this step only launches it
            # and waits (days), on a CPU pod, so it holds no GPU a TrainJob pod may need.
            pretrain_resources = cpu if cfg.cluster.pretrain_as_trainjob() else gpu
            i2i = resumable(
                pretrain_resources(
                    pretrain(
                        config_json=config_json,
                        run_root=run_root,
                        features=features["images"].output,
                    )
                )
            )
            for head in FINETUNE_HEADS:  # the heads the run form selects (sources given)
                with dsl.If(sources.outputs[f"run_{head}"] == True, name=f"head-{head}"):  # noqa: E712
                    kind = HEAD_DATASET[head]
                    if kind not in features:  # views, clips: featurized for their head only
                        features[kind] = gpu(
                            featurize(
                                config_json=config_json, dataset=datasets[kind].outputs["dataset"]
                            )
                        ).set_display_name(f"featurize-{kind}")
                    feats = features[kind].output
                    tuned = resumable(
                        gpu(
                            finetune(
                                config_json=config_json,
                                head=head,
                                run_root=run_root,
                                features=feats,
                                pretrained=i2i.outputs["checkpoint"],
                            )
                        )
                    ).set_display_name(f"finetune-{head}")
                    judged = gpu(
                        evaluate(
                            config_json=config_json,
                            head=head,
                            run_root=run_root,
                            checkpoint=tuned.outputs["checkpoint"],
                            features=feats,
                        )
                    ).set_display_name(f"evaluate-{head}")
                    exported = gpu(
                        export(
                            config_json=config_json,
                            head=head,
                            run_root=run_root,
                            checkpoint=tuned.outputs["checkpoint"],
                        )
                    ).set_display_name(f"export-{head}")
                    with dsl.If(judged.outputs["Output"] == True, name=f"gate-{head}"):  # noqa: E712
                        cpu(
                            promote(
                                config_json=config_json,
                                head=head,
                                run_root=run_root,
                                exported=exported.outputs["exported"],
                                evaluation=judged.outputs["evaluation"],
                            )
                        ).set_display_name(f"promote-{head}")
        return run_root

    return lumos_pipeline


def compiled_config(pipeline_spec: dict) -> PipelineConfig:
    """The config a compiled pipeline was compiled from (its first step's constant input)."""
    from lumos.config import validate_config

    inputs = pipeline_spec["root"]["dag"]["tasks"]["default-dataset"]["inputs"]["parameters"]
    return validate_config(inputs["compiled_config_json"]["runtimeValue"]["constant"])


def compile_pipeline(cfg: PipelineConfig, path: Path) -> Path:
    if not path.parent.is_dir():  # said before compiling, not as the compiler's traceback
        raise StorageError(
            f"cannot write the compiled pipeline to {path}: no directory {path.parent}"
        )
    compiler.Compiler().compile(build_pipeline(cfg), package_path=str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=COMPILED_PRESET)
    parser.add_argument("--out", type=Path, default=COMPILED_PATH)
    args = parser.parse_args(argv)
    print(compile_pipeline(load_config(preset=args.preset), args.out))


if __name__ == "__main__":
    main()
