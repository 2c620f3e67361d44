"""The image tag is written once: the package version (pyproject.toml), in `lumos.configs.k8s`.

Everything else that names a Lumos image (configs, components, the compiled pipeline, the
Dockerfiles' build commands, manifests, docs) must name that tag.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

import components
from lumos.config import PRESETS, PipelineConfig, load_config
from lumos.configs.k8s import SERVE_IMAGE, TRAIN_IMAGE, VERSION, DistributedConfig

ROOT = Path(__file__).resolve().parents[1]
# `<anything>/lumos-train:<tag>` or `lumos-serve:<tag>`, as written in YAML, Dockerfiles, docs.
IMAGE_REF = re.compile(r"(?P<repo>[\w.\-/<>]*/)?lumos-(?P<kind>train|serve):(?P<tag>[\w.\-]+)")


def test_the_tag_is_the_package_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == VERSION, "reinstall the package: its metadata is stale"
    assert TRAIN_IMAGE.endswith(f"/lumos-train:{VERSION}")
    assert SERVE_IMAGE.endswith(f"/lumos-serve:{VERSION}")


def test_configs_and_components_use_the_one_image() -> None:
    assert PipelineConfig().cluster.image == TRAIN_IMAGE
    assert DistributedConfig().image == TRAIN_IMAGE
    for preset in PRESETS:
        cfg = load_config(preset)
        assert cfg.cluster.image == TRAIN_IMAGE, preset
        assert cfg.cluster.distributed is None or cfg.cluster.distributed.image == TRAIN_IMAGE
    assert components.LUMOS_IMAGE == TRAIN_IMAGE


def _references() -> dict[str, list[re.Match[str]]]:
    files = [
        *ROOT.glob("docker/*Dockerfile"),
        *ROOT.glob("manifests/**/*.yaml"),
        *ROOT.glob("pipelines/*.yaml"),
        *ROOT.glob("docs/*.md"),
        ROOT / "README.md",
    ]
    refs = {}
    for path in files:
        found = list(IMAGE_REF.finditer(path.read_text()))
        if found:
            refs[str(path.relative_to(ROOT))] = found
    return refs


def test_every_file_names_the_packages_tag() -> None:
    refs = _references()
    # The places that must name an image: the build commands and the runtimes that run them.
    for required in (
        "docker/train.Dockerfile",
        "docker/serve.Dockerfile",
        "manifests/base/training-runtime.yaml",
        "manifests/base/serving-runtime.yaml",
    ):
        assert required in refs, f"{required} no longer names a Lumos image"
    wrong = [
        f"{path}: {m.group(0)}"
        for path, found in refs.items()
        for m in found
        if m.group("tag") != VERSION
        or (
            m.group("repo") == "ghcr.io/lumos-mlops/"
            and m.group(0) != {"train": TRAIN_IMAGE, "serve": SERVE_IMAGE}[m.group("kind")]
        )
    ]
    assert wrong == [], f"tags other than {VERSION} (lumos.configs.k8s.VERSION): {wrong}"


def test_the_compiled_pipeline_runs_every_step_in_the_one_image() -> None:
    docs = yaml.safe_load_all((ROOT / "pipelines" / "lumos_pipeline.yaml").read_text())
    [spec] = [d for d in docs if "deploymentSpec" in d]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {TRAIN_IMAGE}
