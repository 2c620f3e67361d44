"""`lumos <stage>`: every pipeline step as a command that runs on a laptop, and `lumos run`.

    lumos run                                   # the whole pipeline locally, embedded dataset
    lumos config show --preset xl               # the resolved config as YAML
    lumos config schema                         # its JSON schema
    lumos data synth --out DIR                  # the embedded default dataset
    lumos ingest --source URI --dataset URI
    lumos featurize --dataset URI
    lumos pretrain --dataset URI --out URI
    lumos finetune --head t2i --dataset URI --init URI --out URI
    lumos finetune --head t2i --dataset URI --from-scratch --out URI   # T2I without the prior
    lumos convert --from lumos-i2i --checkpoint Lumos_I2I.pth --output URI   # authors' weights
    lumos evaluate --checkpoint URI --dataset URI --out URI
    lumos export --checkpoint URI --out URI
    lumos promote --export URI --evaluation URI --out URI
    lumos rollback --head t2i                   # the previous promoted version serves again
    lumos experiment claim --preset experiment-cpu   # the paper's claims, arms A-D, a report
    lumos experiment report --runs DIR1 DIR2 --out DIR  # one report over runs of other seeds

Each takes --preset (tiny | xl), --config FILE and --set key.path=value (repeatable); the config is
validated before any work starts. An error a user can cause (a `lumos.errors.LumosError`) prints one
line and exits 1 (2 for a bad config); `-v` adds its traceback (and, for `run`, every step's log).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel


def _print_result(result: Any) -> None:
    if isinstance(result, BaseModel):
        result = result.model_dump(mode="json")
    print(json.dumps(result, indent=2, default=str))


def _config(args: argparse.Namespace):
    from lumos.config import load_config, validate_config

    if getattr(args, "config_json", None):
        return validate_config(args.config_json)
    return load_config(preset=args.preset, config_file=args.config, overrides=args.set)


def cmd_config(args: argparse.Namespace) -> None:
    import yaml

    from lumos.config import config_schema

    if args.action == "schema":
        print(json.dumps(config_schema(), indent=2))
    else:
        print(yaml.safe_dump(_config(args).model_dump(mode="json"), sort_keys=False))


def cmd_synth(args: argparse.Namespace) -> None:
    from lumos.data.synthetic import generate_default_dataset

    _print_result(generate_default_dataset(_config(args).synth, args.out))


def cmd_ingest(args: argparse.Namespace) -> None:
    from lumos.data.ingest import ingest

    cfg = _config(args)
    ingest_cfg = cfg.multiframe_ingest() if args.multiframe else cfg.ingest
    _print_result(ingest(ingest_cfg, args.source, args.dataset))


def cmd_featurize(args: argparse.Namespace) -> None:
    from lumos.training.featurize import featurize

    _print_result(featurize(_config(args).featurize, args.dataset))


def cmd_pretrain(args: argparse.Namespace) -> None:
    from lumos.training.world import check_launched_world

    check_launched_world()  # in a TrainJob: refuse to train outside the world it configured
    from lumos.training.train import train

    _print_result(
        train(_config(args).pretrain, args.dataset, args.out, continue_from=args.continue_from)
    )


def cmd_finetune(args: argparse.Namespace) -> None:
    from lumos.training.world import check_launched_world

    check_launched_world()
    from lumos.config import ConfigError
    from lumos.training.train import train

    train_cfg = getattr(_config(args).finetune, args.head)
    if args.from_scratch:
        train_cfg = train_cfg.model_copy(update={"init": "scratch"})
    if train_cfg.init == "prior" and not args.init:
        raise ConfigError(
            f"finetune --head {args.head} starts from a checkpoint: give --init URI (the I2I "
            "prior, e.g. from `lumos pretrain` or `lumos convert`), or --from-scratch"
        )
    _print_result(train(train_cfg, args.dataset, args.out, init_from=args.init))


def cmd_convert(args: argparse.Namespace) -> None:
    from lumos.models.convert import convert_checkpoint

    _print_result(convert_checkpoint(args.source, args.checkpoint, args.output))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from lumos.checkpoints import read_checkpoint_meta
    from lumos.evaluation.evaluate import evaluate
    from lumos.serving.promote import promoted_baseline

    cfg = _config(args)
    baseline: dict[str, Any] = {}
    if args.compare_promoted:
        head = read_checkpoint_meta(args.checkpoint)["head"]
        baseline = promoted_baseline(cfg.promote.registry_uri, head)
    _print_result(evaluate(cfg.evaluate, args.checkpoint, args.dataset, args.out, **baseline))


def cmd_export(args: argparse.Namespace) -> None:
    from lumos.export.onnx_export import export

    _print_result(export(_config(args).export, args.checkpoint, args.out))


def cmd_promote(args: argparse.Namespace) -> None:
    from lumos.evaluation.evaluate import EvalResult
    from lumos.serving.promote import promote
    from lumos.storage import Storage

    cfg = _config(args)
    eval_result = EvalResult.model_validate(
        Storage.from_uri(args.evaluation).read_json("eval.json")
    )
    _print_result(promote(cfg.promote, args.export, eval_result, args.out))


def cmd_rollback(args: argparse.Namespace) -> None:
    from lumos.serving.rollout import rollback

    _print_result(rollback(_config(args).promote, args.head))


def cmd_run(args: argparse.Namespace) -> None:
    from lumos.pipeline.local_run import run_local

    cfg = _config(args)
    run_dir = Path(args.run_dir or Path("runs") / datetime.now(UTC).strftime("%Y%m%d-%H%M%S"))
    summary = run_local(cfg, run_dir, runs_root=args.runs_root, verbose=args.verbose)
    print(summary.render())
    if args.json:
        Path(args.json).write_text(summary.model_dump_json(indent=2))
    if not summary.succeeded:
        raise SystemExit(1)


def cmd_compile(args: argparse.Namespace) -> None:
    from pipelines.lumos_pipeline import compile_pipeline

    print(compile_pipeline(_config(args), Path(args.out)))


def cmd_experiment_claim(args: argparse.Namespace) -> None:
    from lumos.config import parse_set
    from lumos.configs.experiment import ExperimentConfig
    from lumos.experiments.claim import run_claim

    cfg = ExperimentConfig.from_preset(args.preset, parse_set(args.set))
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("runs") / f"claim-{args.preset}-{stamp}")
    results = run_claim(cfg, out)
    print(f"report: {results['report']}")


def cmd_experiment_report(args: argparse.Namespace) -> None:
    from lumos.experiments.report import merge_runs

    print(f"report: {merge_runs([Path(d) for d in args.runs], Path(args.out))}")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--preset", default="tiny", help="tiny (CPU, minutes) or xl (paper recipe)")
    common.add_argument("--config", help="YAML file of overrides on top of the preset")
    common.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one field"
    )
    common.add_argument("--config-json", help=argparse.SUPPRESS)  # a whole config (TrainJobs)
    # SUPPRESS: `lumos -v <command>` stays verbose when the command's parser sees no -v.
    verbose_help = "show the traceback of an error (run: also every step's full log)"
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help
    )

    parser = argparse.ArgumentParser(prog="lumos", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", parents=[common], help="show the resolved config or its schema")
    p.add_argument("action", choices=["show", "schema"])
    p.set_defaults(func=cmd_config)

    data = sub.add_parser("data", help="the embedded default dataset")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("synth", parents=[common], help="generate the embedded default dataset")
    p.add_argument("--out", required=True, help="directory or s3:// URI")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("ingest", parents=[common], help="raw images -> sharded dataset")
    p.add_argument("--source", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument(
        "--multiframe", action="store_true", help="views/clips: no near-duplicate detection"
    )
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("featurize", parents=[common], help="cache latents and embeddings")
    p.add_argument("--dataset", required=True)
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("pretrain", parents=[common], help="pretrain the I2I model")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True, help="checkpoint URI (resumes if one is there)")
    p.add_argument(
        "--continue-from", help="an I2I checkpoint to continue (weights and EMA; fresh optimizer)"
    )
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", parents=[common], help="fine-tune a head from I2I")
    p.add_argument("--head", required=True, choices=["t2i", "novel_view", "video"])
    p.add_argument("--dataset", required=True)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", help="the checkpoint URI to start from (the I2I prior)")
    start.add_argument(
        "--from-scratch", action="store_true", help="fresh weights, no prior (sets init: scratch)"
    )
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "convert", parents=[common], help="the authors' Lumos-I2I / Lumos-T2I -> a checkpoint"
    )
    p.add_argument(
        "--from", dest="source", required=True, choices=["lumos-i2i", "lumos-t2i"],
        help="the released model the file holds",
    )  # fmt: skip
    p.add_argument("--checkpoint", required=True, help="the released .pth (path or s3:// URI)")
    p.add_argument("--output", required=True, help="the Lumos checkpoint directory to write")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("evaluate", parents=[common], help="metrics, report and gate verdict")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--compare-promoted", action="store_true", help="gate against the promoted model too"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", parents=[common], help="ONNX (+TensorRT) export, checked")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("promote", parents=[common], help="registry record + InferenceService")
    p.add_argument("--export", required=True)
    p.add_argument("--evaluation", required=True, help="the evaluate step's output URI")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser(
        "rollback", parents=[common], help="serve the head's previous promoted version again"
    )
    p.add_argument("--head", required=True, choices=["t2i", "i2i", "novel_view", "video"])
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("run", parents=[common], help="the whole pipeline through kfp.local")
    p.add_argument("--run-dir", help="where everything goes (default runs/<timestamp>)")
    p.add_argument("--runs-root", help="store data under this URI instead (e.g. s3://bucket/runs)")
    p.add_argument("--json", help="also write the summary as JSON to this file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("compile", parents=[common], help="compile the pipeline to IR YAML")
    p.add_argument("--out", default="lumos_pipeline.yaml")
    p.set_defaults(func=cmd_compile)

    experiment = sub.add_parser("experiment", help="experiments that test the paper's claims")
    experiment_sub = experiment.add_subparsers(dest="experiment_command", required=True)
    p = experiment_sub.add_parser(
        "claim", help="arms A-D and the multi-frame priors over seeds, into one report"
    )
    p.add_argument(
        "--preset", default="experiment-cpu",
        help="experiment-cpu (this machine), experiment-gpu (one H100/H200), experiment-micro",
    )  # fmt: skip
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one field"
    )
    p.add_argument("--out", help="output directory (default runs/claim-<preset>-<timestamp>)")
    p.set_defaults(func=cmd_experiment_claim)
    p = experiment_sub.add_parser(
        "report", help="one report over claim runs of the same preset with different seeds"
    )
    p.add_argument("--runs", nargs="+", required=True, help="the runs' --out directories")
    p.add_argument("--out", required=True, help="where the merged report goes")
    p.set_defaults(func=cmd_experiment_report)

    from lumos.deploy.commands import add_commands  # deploy, trigger: through the KFP API

    add_commands(sub)
    return parser


def _error(message: str) -> None:
    """One line on stderr, in one write: the processes of a multi-process run print theirs at
    once, and unbuffered `print` writes the text and its newline separately, which interleaves."""
    sys.stderr.write(f"lumos: {message}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> None:
    from pydantic import ValidationError

    from lumos.config import ConfigError, format_validation_error
    from lumos.errors import LumosError

    args = build_parser().parse_args(argv)
    from lumos.tempdirs import remove_abandoned

    remove_abandoned()  # what killed runs left in the temp directory (lumos.tempdirs)
    try:
        try:
            args.func(args)
        except ValidationError as err:  # a model built from a user's file or flags
            raise ConfigError(format_validation_error(err)) from err
    except LumosError as err:
        # It says what was wrong and what to do: show that; the traceback only on request.
        # Anything else escaping the library is a bug, and keeps its traceback.
        if args.verbose:
            raise
        if isinstance(err, ConfigError):
            _error(str(err))
            raise SystemExit(2) from None
        _error(f"{type(err).__name__}: {err}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
