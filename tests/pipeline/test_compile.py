"""The compiled pipeline: committed YAML is fresh, every component compiles, GPU settings show."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import yaml
from kfp import compiler

import components
from lumos.config import load_config
from pipelines.lumos_pipeline import COMPILED_PATH, COMPILED_PRESET, compile_pipeline


def test_committed_pipeline_yaml_is_fresh(tmp_path) -> None:
    fresh = compile_pipeline(load_config(preset=COMPILED_PRESET), tmp_path / "p.yaml")
    assert COMPILED_PATH.exists(), "run `make compile` and commit pipelines/lumos_pipeline.yaml"
    assert fresh.read_text() == COMPILED_PATH.read_text(), (
        "pipelines/lumos_pipeline.yaml is stale: run `make compile` and commit it"
    )


def test_every_component_compiles(tmp_path) -> None:
    names = [m.name for m in pkgutil.iter_modules(components.__path__) if m.ispkg]
    assert len(names) >= 10
    for name in names:
        module = importlib.import_module(f"components.{name}.component")
        comp = getattr(module, name)
        compiler.Compiler().compile(comp, package_path=str(tmp_path / f"{name}.yaml"))
        spec = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
        image = spec["deploymentSpec"]["executors"][f"exec-{name.replace('_', '-')}"]["container"][
            "image"
        ]
        assert image.startswith("ghcr.io/lumos-mlops/lumos-train")


def _docs(path):
    return list(yaml.safe_load_all(path.read_text()))


def _all_tasks(pipeline_spec: dict) -> dict[str, dict]:
    """Every task of the pipeline: the root DAG's and those inside conditions and loops."""
    dags = [pipeline_spec["root"]["dag"]]
    dags += [c["dag"] for c in pipeline_spec["components"].values() if "dag" in c]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


def test_gpu_steps_request_gpus_nodes_and_tolerations() -> None:
    cfg = load_config(preset=COMPILED_PRESET)
    pipeline_spec, platform = _docs(COMPILED_PATH)
    executors = pipeline_spec["deploymentSpec"]["executors"]
    train = executors["exec-finetune"]["container"]
    assert train["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(train["resources"]["accelerator"]["resourceCount"]) == cfg.cluster.gpus_per_step
    assert train["image"] == cfg.cluster.image
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    pre = k8s["exec-finetune"]
    assert pre["nodeSelector"]["labels"] == cfg.cluster.gpu_node_selector
    assert pre["tolerations"][0]["key"] == cfg.cluster.gpu_tolerations[0].key
    assert pre["secretAsEnv"][0]["secretName"] == cfg.cluster.s3_secret
    mounts = {m["volumeName"]: m for m in pre["emptyDirMounts"]}
    assert mounts["dshm"]["mountPath"] == "/dev/shm"
    # Node-local disk for the features of a dataset in the object store, and the variable that
    # points lumos.features.cache at it.
    cache = mounts["feature-cache"]
    assert cache["sizeLimit"] == f"{cfg.cluster.feature_cache_gib}Gi"
    env = {e["name"]: e["value"] for e in train["env"]}
    assert env["LUMOS_FEATURE_CACHE"] == cache["mountPath"]
    # CPU steps get the secret but no GPU
    assert "accelerator" not in executors["exec-ingest-plan"]["container"].get("resources", {})
    assert "nodeSelector" not in k8s["exec-ingest-plan"]


def _pretrain_executor(path) -> tuple[dict, dict]:
    pipeline_spec, platform = _docs(path)
    container = pipeline_spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-pretrain"]
    return container, k8s


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
def test_pretrain_launching_a_trainjob_holds_no_gpu(tmp_path) -> None:
    """With `cluster.distributed` (the xl preset) the pretrain step only launches the TrainJob and
    waits for it: a CPU pod with the S3 secret, no GPU, GPU nodes, /dev/shm or feature cache.
    Without it the step trains itself, on a GPU."""
    cfg = load_config(preset=COMPILED_PRESET)
    assert cfg.cluster.distributed is not None
    container, k8s = _pretrain_executor(COMPILED_PATH)
    assert "accelerator" not in container.get("resources", {})
    assert "env" not in container  # no LUMOS_FEATURE_CACHE: there is no cache volume
    assert sorted(k8s) == ["secretAsEnv", "securityContext"]  # and the image's non-root user
    assert container["resources"]["cpuRequest"] == 0.5  # cluster.steps.control
    assert k8s["secretAsEnv"][0]["secretName"] == cfg.cluster.s3_secret

    single_node = cfg.model_copy(
        update={"cluster": cfg.cluster.model_copy(update={"distributed": None})}
    )
    container, k8s = _pretrain_executor(compile_pipeline(single_node, tmp_path / "p.yaml"))
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert k8s["nodeSelector"]["labels"] == cfg.cluster.gpu_node_selector
    assert {m["volumeName"] for m in k8s["emptyDirMounts"]} == {"dshm", "feature-cache"}


def test_pipeline_shape_fan_out_parallel_heads_and_gate() -> None:
    pipeline_spec, _ = _docs(COMPILED_PATH)
    root = pipeline_spec["root"]["dag"]["tasks"]
    text = yaml.safe_dump(pipeline_spec)
    assert "parameterIterator" in text  # ParallelFor over ingest partitions
    for head in ("t2i", "novel_view", "video"):
        assert any(t.startswith("condition") or "gate" in t for t in root) or "gate" in text
        assert f"finetune-{head}" in text.replace("_", "-") or f"finetune-{head}" in text
    # Image featurize fans out over shard ranges on GPU pods; the merge (CPU) feeds pretraining.
    executors = pipeline_spec["deploymentSpec"]["executors"]
    assert "accelerator" in executors["exec-featurize-partition"]["container"]["resources"]
    for step in ("exec-featurize-plan", "exec-featurize-merge"):
        assert "accelerator" not in executors[step]["container"].get("resources", {}), step
    tasks = _all_tasks(pipeline_spec)
    loops = [t for t in tasks.values() if "parameterIterator" in t]
    assert len(loops) == 2  # ingest and featurize
    assert "featurize-merge" in tasks["pretrain"]["dependentTasks"]
    # Featurizing and training happen only when the run's ingest found new data.
    [gate] = [t for t in root.values() if "triggerPolicy" in t]
    assert "new-data" in gate["dependentTasks"]
    condition = gate["triggerPolicy"]["condition"]
    assert condition == "int(inputs.parameter_values['pipelinechannel--new-data-Output']) > 0"
    assert "pretrain" not in root and "featurize-plan" not in root
    # fine-tunes (each in its head's branch) take pretraining's checkpoint and nothing of
    # another fine-tune, so they run in parallel
    finetunes = [t for name, t in tasks.items() if name.startswith("finetune")]
    assert len(finetunes) == 3
    for t in finetunes:
        pretrained = t["inputs"]["artifacts"]["pretrained"]["componentInputArtifact"]
        assert pretrained == "pipelinechannel--pretrain-checkpoint"
        assert not any(d.startswith("finetune") for d in t.get("dependentTasks", []))


def test_training_steps_are_retried_and_nothing_else() -> None:
    """A failed pretrain / fine-tune step (a preempted GPU node) reruns and resumes its
    checkpoint; a failed evaluation or export would only fail again."""
    cfg = load_config(preset=COMPILED_PRESET)
    pipeline_spec, _ = _docs(COMPILED_PATH)
    retried = {
        name: t["retryPolicy"]
        for name, t in _all_tasks(pipeline_spec).items()
        if "retryPolicy" in t
    }
    assert sorted(retried) == ["finetune", "finetune-2", "finetune-3", "pretrain"]
    for policy in retried.values():
        assert policy["maxRetryCount"] == cfg.cluster.train_retries == 2
        assert policy["backoffDuration"] == "60s"
