"""Pipeline / PipelineVersion (KFP's Kubernetes-native mode) from a pipeline compiled here."""

# no `from __future__ import annotations`: kfp reads the component signatures at runtime

from pathlib import Path

import pytest
import yaml
from kfp import compiler, dsl, kubernetes

from lumos.config import validate_config
from lumos.k8s.crd_validation import validate_resource
from lumos.k8s.pipeline_resources import (
    PipelineResourceError,
    load_config_map,
    main,
    render_pipeline_resources,
    version_name,
)


@dsl.component(base_image="python:3.11-slim")
def greet(name: str) -> str:
    return f"hello {name}"


@dsl.pipeline(name="tiny-lumos", description="A two-parameter test pipeline.")
def tiny_pipeline(name: str = "lumos", runs_root: str = "s3://lumos/runs") -> str:
    task = greet(name=name)
    kubernetes.use_secret_as_env(task, secret_name="lumos-s3",
                                 secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"})  # fmt: skip
    return task.output


def compile_tiny(path: Path) -> Path:
    compiler.Compiler().compile(tiny_pipeline, package_path=str(path))
    return path


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_tiny(tmp_path_factory.mktemp("kfp") / "tiny.yaml")


def test_resources_are_valid_and_carry_the_pipeline(compiled: Path, crds_dir: Path) -> None:
    pipeline, version = render_pipeline_resources(compiled, "lumos", "0.2.0")
    for resource in (pipeline, version):
        validate_resource(resource, crds_dir)
    assert pipeline["spec"]["description"] == "A two-parameter test pipeline."
    # KFP keeps a PipelineVersion's spec immutable: its name ends with the compiled file's hash,
    # so another pipeline (or config) is a new version; the same one keeps its name, which is
    # the name `lumos deploy` uploads it under.
    assert version["metadata"]["name"] == version_name("lumos", "0.2.0", compiled.read_bytes())
    assert version["metadata"]["name"].startswith("lumos-v0-2-0-")
    _, again = render_pipeline_resources(compiled, "lumos", "0.2.0")
    assert again["metadata"]["name"] == version["metadata"]["name"]
    compiler.Compiler().compile(
        tiny_pipeline, package_path=str(compiled.parent / "renamed.yaml"), pipeline_name="renamed"
    )
    _, renamed = render_pipeline_resources(compiled.parent / "renamed.yaml", "lumos", "0.2.0")
    assert renamed["metadata"]["name"] != version["metadata"]["name"]
    assert version["spec"]["pipelineName"] == "lumos"
    assert version["spec"]["pipelineSpec"]["pipelineInfo"]["name"] == "tiny-lumos"
    # the kfp.kubernetes settings travel in the platform spec
    platform = version["spec"]["platformSpec"]["platforms"]["kubernetes"]
    assert "lumos-s3" in yaml.safe_dump(platform)


def test_bad_inputs(compiled: Path, tmp_path: Path) -> None:
    with pytest.raises(PipelineResourceError, match="compile the pipeline first"):
        render_pipeline_resources(tmp_path / "missing.yaml")
    not_a_pipeline = tmp_path / "cm.yaml"
    not_a_pipeline.write_text("apiVersion: v1\nkind: ConfigMap\n")
    with pytest.raises(PipelineResourceError, match="not a compiled KFP pipeline"):
        render_pipeline_resources(not_a_pipeline)
    with pytest.raises(ValueError, match="DNS-1123"):
        render_pipeline_resources(compiled, name="Lumos")


CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: lumos-pipeline-config
data:
  preset: tiny
  overrides.yaml: |
    cluster:
      image: example.org/lumos-train:test
      gpus_per_step: 2
    promote: {registry_uri: "s3://elsewhere/registry"}
"""


def write_config_map(path: Path, text: str = CONFIG_MAP) -> Path:
    path.write_text(text)
    return path


def test_config_map_is_read_like_config_show(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lumos.cli import main as lumos

    config_map = write_config_map(tmp_path / "cm.yaml")
    data = yaml.safe_load(config_map.read_text())["data"]
    overrides = write_config_map(tmp_path / "overrides.yaml", data["overrides.yaml"])
    cfg = load_config_map(config_map)
    assert cfg.cluster.image == "example.org/lumos-train:test" and cfg.preset == "tiny"
    lumos(["config", "show", "--preset", "tiny", "--config", str(overrides)])
    assert validate_config(yaml.safe_load(capsys.readouterr().out)) == cfg


def test_bad_config_maps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PipelineResourceError, match="not found"):
        load_config_map(tmp_path / "missing.yaml")
    with pytest.raises(PipelineResourceError, match="one ConfigMap named lumos-pipeline-config"):
        load_config_map(
            write_config_map(tmp_path / "other.yaml", CONFIG_MAP.replace("lumos-", "x-"))
        )
    only_preset = CONFIG_MAP.split("  overrides.yaml")[0]
    with pytest.raises(PipelineResourceError, match=r"lacks \['overrides.yaml'\]"):
        load_config_map(write_config_map(tmp_path / "partial.yaml", only_preset))
    bad = CONFIG_MAP.replace("gpus_per_step: 2", "gpus_per_step: -1")
    with pytest.raises(PipelineResourceError, match="cluster.gpus_per_step"):
        load_config_map(write_config_map(tmp_path / "bad.yaml", bad))


@pytest.mark.slow  # compiles the pipeline or trains: several seconds
def test_main_renders_the_config_maps_pipeline(tmp_path: Path, crds_dir: Path) -> None:
    from pipelines.lumos_pipeline import compiled_config

    """Images, GPUs and the default config all come from the ConfigMap."""
    config_map = write_config_map(tmp_path / "cm.yaml")
    out = tmp_path / "native" / "pipeline.yaml"
    main(["--config-map", str(config_map), "--out", str(out), "--version", "1.0.0"])
    assert out.read_text().startswith("# Generated by")
    pipeline, version = [d for d in yaml.safe_load_all(out.read_text()) if d]
    for resource in (pipeline, version):
        validate_resource(resource, crds_dir)
    cfg = load_config_map(config_map)
    executors = version["spec"]["pipelineSpec"]["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {cfg.cluster.image}
    assert compiled_config(version["spec"]["pipelineSpec"]) == cfg
    with pytest.raises(SystemExit, match="not found"):
        main(["--config-map", str(tmp_path / "nope.yaml"), "--out", str(out)])
