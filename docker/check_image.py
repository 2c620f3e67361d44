"""Checks run at the end of an image build: fail the build, not the first pipeline step.

python docker/check_image.py train|serve
"""

from __future__ import annotations

import importlib.metadata as metadata
import shutil
import sys


def installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False


def main(kind: str) -> None:
    problems = []
    # onnxruntime and onnxruntime-gpu install the same module: with both, whichever came last wins.
    if installed("onnxruntime"):
        problems.append("the CPU package onnxruntime is installed: only onnxruntime-gpu may be")
    if not installed("onnxruntime-gpu"):
        problems.append("onnxruntime-gpu is not installed")
    else:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            problems.append(f"onnxruntime has no CUDA provider: {ort.get_available_providers()}")
    import torch

    if torch.version.cuda is None:  # training, and the serving image's encoders on the GPU
        problems.append(f"torch {torch.__version__} is a CPU build: the {kind} image needs CUDA")
    if kind == "serve" and not installed("kserve"):
        problems.append("kserve is not installed")
    # A TrainJob's command is `torchrun --no-python lumos ...` (lumos.k8s.trainjob.LAUNCHER).
    for command in ("torchrun", "lumos") if kind == "train" else ():
        if shutil.which(command) is None:
            problems.append(f"{command} is not on PATH: TrainJobs run `torchrun --no-python lumos`")
    if kind == "train":  # export.tensorrt: auto builds engines only where tensorrt imports
        try:
            import tensorrt  # noqa: F401
        except ImportError as e:
            problems.append(f"tensorrt does not import ({e}): export would skip its engines")
    import lumos  # noqa: F401  the project itself

    if problems:
        sys.exit("image check failed:\n" + "\n".join(f"  - {p}" for p in problems))
    print(f"{kind} image ok: torch {torch.__version__} (cuda {torch.version.cuda})")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("train", "serve"):
        sys.exit("usage: python docker/check_image.py train|serve")
    main(sys.argv[1])
