"""The `lumos deploy` and `lumos trigger` subcommands (wired into lumos.cli)."""

from __future__ import annotations

import argparse
import json


def _deployment(args: argparse.Namespace):
    from lumos.deploy.config import load_deployment

    return load_deployment(config_map=args.config_map, config_dir=args.config_dir)


def cmd_deploy(args: argparse.Namespace) -> None:
    from lumos.deploy.kfp_api import deploy

    print(json.dumps(deploy(_deployment(args)).model_dump(mode="json"), indent=2))


def cmd_trigger(args: argparse.Namespace) -> None:
    from lumos.deploy.trigger import trigger

    print(json.dumps(trigger(_deployment(args)).model_dump(mode="json"), indent=2))


def add_commands(sub: argparse._SubParsersAction) -> None:
    where = argparse.ArgumentParser(add_help=False)
    given = where.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--config-map", help="the lumos-pipeline-config ConfigMap file (e.g. manifests/base/...)"
    )
    given.add_argument(
        "--config-dir", help="where a pod mounts that ConfigMap (one file per data key)"
    )
    p = sub.add_parser(
        "deploy",
        parents=[where],
        help="register the pipeline version and its recurring run through the KFP API",
    )
    p.set_defaults(func=cmd_deploy)
    p = sub.add_parser(
        "trigger",
        parents=[where],
        help="start a run through the KFP API when enough new source objects arrived",
    )
    p.set_defaults(func=cmd_trigger)
