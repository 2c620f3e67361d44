"""The claim experiment as a KFP pipeline: one step, whose Markdown report is the run's artifact.

`python -m pipelines.claim_pipeline --out claim_pipeline.yaml` compiles it with one GPU for the
step (`--gpus 0` for a CPU node and the experiment-cpu preset); upload it to KFP and start a run.
The step writes the report under `out_uri` and shows it in the UI as a Markdown artifact.

`python -m pipelines.claim_pipeline --run-local runs/claim-kfp --preset experiment-micro` runs the
same pipeline here through KFP's local runner (`kfp.local`, the step as a subprocess of this
environment): KFP's record of the step (its artifacts and executor output) lands under
`<run dir>/kfp`, the experiment's datasets, checkpoints and report under `<run dir>/out` (or
`--out-uri`).
"""

# No `from __future__ import annotations` here: kfp reads the pipeline signature's real types.
import argparse
import json
import re
import warnings
from pathlib import Path
from typing import NamedTuple

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
    ) -> dsl.Markdown:
        task = experiment_claim(preset=preset, overrides_json=overrides_json, out_uri=out_uri)
        task.set_caching_options(False)  # a rerun is a new measurement
        task.set_display_name("experiment claim")
        if gpus:
            task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(gpus)
        return task.outputs["report"]  # the run's output: the report, on the run's page

    return claim_pipeline


def compile_claim_pipeline(path: Path, gpus: int = 1) -> Path:
    compiler.Compiler().compile(build_claim_pipeline(gpus), package_path=str(path))
    return path


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the local runner's colours


class LocalClaimRun(NamedTuple):
    report: Path  # the Markdown artifact KFP recorded (images inline)
    out_uri: str  # where the step wrote the experiment (its report under <out_uri>/report)


def run_claim_local(
    run_dir: Path, preset: str, overrides_json: str = "{}", out_uri: str | None = None
) -> LocalClaimRun:
    """The claim pipeline through `kfp.local` (as `lumos run` runs the main one): KFP's pipeline
    root is `<run_dir>/kfp`, the experiment goes to `out_uri` (default `<run_dir>/out`). A failed
    step raises RuntimeError; the step's own error is in its output above."""
    from kfp import local

    run_dir = run_dir.resolve()
    out_uri = out_uri or str(run_dir / "out")
    if "://" not in out_uri:  # the run's record names the directory, wherever it was started
        out_uri = str(Path(out_uri).resolve())
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run_dir / "kfp"),
        raise_on_error=True,
    )
    with warnings.catch_warnings():
        # The local runner ignores display names and accelerators and runs the step in this
        # environment instead of the cluster image; both are expected here.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        report = build_claim_pipeline(gpus=0)(
            preset=preset, overrides_json=overrides_json, out_uri=out_uri
        ).output
    return LocalClaimRun(report=Path(report.path), out_uri=out_uri)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("claim_pipeline.yaml"))
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the step (0: a CPU node)")
    parser.add_argument(
        "--run-local",
        type=Path,
        metavar="RUN_DIR",
        help="run the pipeline here through kfp.local into RUN_DIR instead of compiling it",
    )
    parser.add_argument("--preset", default="experiment-cpu", help="with --run-local: the preset")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --run-local: a config override, as for `lumos experiment claim` (repeatable)",
    )
    parser.add_argument("--out-uri", help="with --run-local: where the experiment goes")
    args = parser.parse_args(argv)
    if args.run_local is None:
        print(compile_claim_pipeline(args.out, args.gpus))
        return
    from lumos.config import parse_set
    from lumos.errors import LumosError

    try:
        overrides_json = json.dumps(parse_set(args.set))
        run = run_claim_local(args.run_local, args.preset, overrides_json, args.out_uri)
    except (LumosError, RuntimeError) as err:  # a failed step: its error is in its output above
        raise SystemExit(f"claim pipeline: {_ANSI.sub('', str(err))}") from None
    print(f"KFP report artifact: {run.report}")
    print(f"experiment: {run.out_uri}")


if __name__ == "__main__":
    main()
