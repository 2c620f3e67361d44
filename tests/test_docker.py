"""The images cannot be built here (no Docker engine): check what a build depends on instead.
Every COPY source exists and survives .dockerignore, the entrypoints name real code, and the
packages the images install agree with pyproject.toml (same specifiers; the documented swaps
onnxruntime -> onnxruntime-gpu and the CUDA/CPU torch builds of the same pinned version)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
# packages the images may leave out, and why
NOT_IN_SERVE_IMAGE = {
    "kfp",
    "kfp-kubernetes",
    "onnxscript",
    "opencv-python-headless",
}  # pipeline, exporter, ingest
SWAPS = {"onnxruntime": "onnxruntime-gpu"}  # same module, CUDA execution provider
EXTRA = {"serve": {"kserve"}, "train": {"tensorrt-cu12"}}  # TensorRT: engines at export


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def requirements(path: Path) -> dict[str, Requirement]:
    reqs = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            reqs[canonicalize_name(req.name)] = req
    return reqs


def pyproject_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def dockerignored(path: str) -> bool:
    patterns = [p.strip() for p in (REPO_ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        for candidate in candidates:
            if fnmatch.fnmatch(candidate, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(candidate.split("/")[-1], pattern[3:])
            ):
                return True
    return False


IMAGES = {"train": DOCKER / "train.Dockerfile", "serve": DOCKER / "serve.Dockerfile"}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_copy_sources_exist_and_are_not_ignored(image: str) -> None:
    copies = [args for kw, args in instructions(IMAGES[image]) if kw in ("COPY", "ADD")]
    assert copies, "the image copies nothing from the repository"
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        assert not args.startswith("--from"), "multi-stage copies are not expected here"
        for src in words[:-1]:
            assert (REPO_ROOT / src).exists(), (
                f"{image}: COPY source {src} is not in the repository"
            )
            assert not dockerignored(src), (
                f"{image}: COPY source {src} is excluded by .dockerignore"
            )


def entrypoint(image: str) -> list[str]:
    [args] = [a for kw, a in instructions(IMAGES[image]) if kw == "ENTRYPOINT"]
    return json.loads(args)  # exec form: signals reach the process


def test_train_entrypoint_is_the_lumos_cli() -> None:
    assert entrypoint("train") == ["lumos"]
    target = PYPROJECT["project"]["scripts"]["lumos"]
    module, func = target.split(":")
    source = REPO_ROOT / "src" / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"the `lumos` script points at {target}, but {source} is missing"
    assert re.search(rf"^def {func}\(", source.read_text(), re.MULTILINE), (
        f"{source} has no {func}()"
    )


def test_serve_entrypoint_module_exists() -> None:
    command = entrypoint("serve")
    assert command[:2] == ["python", "-m"]
    module = command[2]
    source = REPO_ROOT / "src" / (module.replace(".", "/") + ".py")
    assert source.is_file(), f"serve.Dockerfile runs `python -m {module}`, but {source} is missing"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_pip_installs_only_the_checked_requirement_files(image: str) -> None:
    """Every `pip install` takes a requirements file this test checks, or the project --no-deps
    (its own dependency list names the CPU onnxruntime)."""
    copied = {}
    for kw, args in instructions(IMAGES[image]):
        if kw == "COPY":
            words = shlex.split(args)
            copied[words[-1]] = words[0]
    installs = [a for kw, a in instructions(IMAGES[image]) if kw == "RUN" and "pip install" in a]
    assert installs
    for run in installs:
        for command in run.split("&&"):
            if "pip install" not in command:
                continue
            words = shlex.split(command.split("pip install", 1)[1])
            if "." in words:
                assert "--no-deps" in words, f"{image}: the project must be installed --no-deps"
                continue
            req_file = words[words.index("-r") + 1]
            assert (
                copied.get(req_file)
                == f"docker/requirements-{'train-gpu' if image == 'train' else 'serve'}.txt"
            )
            named = [w for i, w in enumerate(words)
                     if not w.startswith("-") and words[i - 1] not in ("-r", "-c", "--extra-index-url",
                                                                         "--index-url")]  # fmt: skip
            assert named == [], f"{image}: packages named outside the requirements file: {named}"


@pytest.mark.parametrize("image,req_file", [("train", "requirements-train-gpu.txt"),
                                            ("serve", "requirements-serve.txt")])  # fmt: skip
def test_image_packages_agree_with_pyproject(image: str, req_file: str) -> None:
    image_reqs = requirements(DOCKER / req_file)
    project = pyproject_requirements()
    assert "onnxruntime" not in image_reqs, "the CPU onnxruntime must not be in a GPU image"
    assert "onnxruntime-gpu" in image_reqs
    expected = set(project) - set(SWAPS) | set(SWAPS.values()) | EXTRA[image]
    if image == "serve":
        expected -= NOT_IN_SERVE_IMAGE
    assert set(image_reqs) == expected, (
        f"{req_file}: missing {sorted(expected - set(image_reqs))}, "
        f"unexpected {sorted(set(image_reqs) - expected)}"
    )
    for name, req in image_reqs.items():
        if name in project:
            assert req.specifier == project[name].specifier, (
                f"{req_file}: {req} but pyproject.toml says {project[name]}"
            )
    assert str(image_reqs["torch"].specifier) == "==2.13.0"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_both_images_carry_cuda_torch(image: str) -> None:
    """Training and serving use their GPU: the serving image runs the frozen encoders (T5 in
    bfloat16) on it, so it needs the CUDA build of torch as much as training does."""

    def arg(name: str) -> str:
        [value] = [
            a.split("=", 1)[1]
            for kw, a in instructions(IMAGES[image])
            if kw == "ARG" and a.startswith(f"{name}=")
        ]
        return value

    assert re.search(r"/whl/cu\d+$", arg("TORCH_INDEX"))
    base = arg("BASE_IMAGE")
    assert "cuda" in base and "2.13.0" in base, "the base image must carry CUDA torch 2.13.0"


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_build_checks_one_onnxruntime_and_cuda(image: str) -> None:
    """The build runs check_image.py for its kind, and that check fails a build with the CPU
    onnxruntime beside onnxruntime-gpu (one `onnxruntime` module) or a CPU torch."""
    runs = [a for kw, a in instructions(IMAGES[image]) if kw == "RUN"]
    assert any(f"check_image.py {image}" in r for r in runs)
    check = (DOCKER / "check_image.py").read_text()
    assert 'installed("onnxruntime")' in check and "CUDAExecutionProvider" in check
    assert "if torch.version.cuda is None:" in check  # for both kinds


def test_serving_image_caches_encoder_weights_where_the_runtime_mounts_them() -> None:
    env = " ".join(a for kw, a in instructions(IMAGES["serve"]) if kw == "ENV")
    runtime = (REPO_ROOT / "manifests" / "base" / "serving-runtime.yaml").read_text()
    cache = re.search(r"LUMOS_CACHE_DIR=(\S+)", env)
    assert cache and f"value: {cache.group(1)}" in runtime


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_images_record_their_version_and_commit(image: str) -> None:
    """The tag is the package version (what the compiled pipeline names); the commit travels as the
    OCI revision label, from a build argument the build command passes."""
    found = instructions(IMAGES[image])
    args = {a.split("=", 1)[0] for kw, a in found if kw == "ARG"}
    assert {"VERSION", "GIT_COMMIT"} <= args
    [label] = [a for kw, a in found if kw == "LABEL"]
    assert "org.opencontainers.image.revision=${GIT_COMMIT}" in label
    assert "org.opencontainers.image.version=${VERSION}" in label


def test_train_image_builds_tensorrt_engines() -> None:
    """export.tensorrt: auto builds engines only where `import tensorrt` works: the train image
    installs it and its build check fails when it does not import."""
    assert "tensorrt-cu12" in requirements(DOCKER / "requirements-train-gpu.txt")
    assert "import tensorrt" in (DOCKER / "check_image.py").read_text()
