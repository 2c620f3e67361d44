"""The claim experiment as a KFP pipeline: one step, whose Markdown report is the run's artifact.

`python -m pipelines.claim_pipeline --out claim_pipeline.yaml` compiles it with one GPU for the
step (`--gpus 0` for a CPU node and the experiment-cpu preset); upload it to KFP and start a run.
The step writes the report under `out_uri` and shows it in the UI as a Markdown artifact.
"""

# No `from __future__ import annotations` here: kfp reads the pipeline signature's real types.
import argparse
from pathlib import Path

from kfp import compiler, dsl

from components.experiment_claim.component import experiment_claim


def build_claim_pipeline(gpus: int = 1):
    @dsl.pipeline(
        name="lumos-claim",
        description="Lumos's claims: T2I arms A-D and novel-view/video priors, over seeds",
    )
    def claim_pipeline(
        preset: str = "experiment-gpu",
        overrides_json: str = "{}",
        out_uri: str = "s3://lumos/experiments/claim",
    ) -> None:
        task = experiment_claim(preset=preset, overrides_json=overrides_json, out_uri=out_uri)
        task.set_caching_options(False)  # a rerun is a new measurement
        task.set_display_name("experiment claim")
        if gpus:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)

    return claim_pipeline


def compile_claim_pipeline(path: Path, gpus: int = 1) -> Path:
    compiler.Compiler().compile(build_claim_pipeline(gpus), package_path=str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("claim_pipeline.yaml"))
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the step (0: a CPU node)")
    args = parser.parse_args(argv)
    print(compile_claim_pipeline(args.out, args.gpus))


if __name__ == "__main__":
    main()
