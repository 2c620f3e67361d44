"""Bad configs and inputs at every CLI entry point: one `lumos: ...` line on stderr naming the
field or path, exit status 1 or 2, no traceback, and nothing written to the output (the check
comes before the work). Each case runs the real `lumos.cli.main` in this process."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lumos.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """raw/ (images), ds/ (ingested, not featurized), fds/ (the same, featurized), bad/ (a
    checkpoint whose JSON is torn), torn/ (a checkpoint whose weight files are not safetensors),
    cfg.yaml (tiny data), config files with mistakes, and the deployment's ConfigMap with a
    mistake, as a file (configmap.yaml) and mounted (mounted/)."""
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "cfg.yaml").write_text("synth: {num_images: 8, num_objects: 0, num_clips: 0}\n")
    main(["data", "synth", "--config", str(root / "cfg.yaml"), "--out", str(root / "raw")])
    main(["ingest", "--config", str(root / "cfg.yaml"), "--source", str(root / "raw"),
          "--dataset", str(root / "ds")])  # fmt: skip
    shutil.copytree(root / "ds", root / "fds")
    main(["featurize", "--config", str(root / "cfg.yaml"), "--dataset", str(root / "fds")])
    (root / "bad").mkdir()
    (root / "bad" / "lumos_checkpoint.json").write_text('{"format": "lumos-checkpoint/1", ')
    sys.path.insert(0, str(Path(__file__).parent / "export"))
    from tiny_checkpoints import make_checkpoint

    torn = Path(make_checkpoint(root / "torn", "i2i", vae=False)[0])
    for weights in torn.rglob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    (root / "version.yaml").write_text("version: 2\n")
    (root / "field.yaml").write_text("pretrain: {stepz: 3}\n")
    (root / "value.yaml").write_text("pretrain: {batch_size: -4}\n")
    (root / "notyaml.yaml").write_text("pretrain: [unclosed\n")
    config_map = yaml.safe_load((REPO / "manifests/base/pipeline-config.yaml").read_text())
    config_map["data"]["deploy.yaml"] += "kfp_hots: http://typo\n"
    (root / "configmap.yaml").write_text(yaml.safe_dump(config_map))
    (root / "mounted").mkdir()
    (root / "mounted" / "preset").write_text("tiny\n")
    (root / "mounted" / "overrides.yaml").write_text("pretrain: {stepz: 3}\n")
    return root


# (argv with {root} for the inputs' directory, what the line must name)
CASES = {
    "config file missing": (["pretrain", "--config", "{root}/none.yaml", "--dataset", "{root}/ds",
                             "--out", "{root}/out"], "{root}/none.yaml"),
    "config of another version": (["pretrain", "--config", "{root}/version.yaml", "--dataset",
                                   "{root}/ds", "--out", "{root}/out"], "version"),
    "config with an unknown field": (["pretrain", "--config", "{root}/field.yaml", "--dataset",
                                      "{root}/ds", "--out", "{root}/out"], "pretrain.stepz"),
    "config with a bad value": (["pretrain", "--config", "{root}/value.yaml", "--dataset",
                                 "{root}/ds", "--out", "{root}/out"], "pretrain.batch_size"),
    "config that is not YAML": (["pretrain", "--config", "{root}/notyaml.yaml", "--dataset",
                                 "{root}/ds", "--out", "{root}/out"], "notyaml.yaml"),
    "--set of an unknown field": (["pretrain", "--set", "pretrain.nope=1", "--dataset",
                                   "{root}/ds", "--out", "{root}/out"], "pretrain.nope"),
    "ingest: source missing": (["ingest", "--source", "{root}/none", "--dataset", "{root}/out"],
                               "{root}/none"),
    "ingest: dataset in a missing bucket": (["ingest", "--source", "{root}/raw", "--dataset",
                                             "s3://{bucket}-missing/ds"], "{bucket}-missing"),
    "featurize: dataset missing": (["featurize", "--dataset", "{root}/none"], "{root}/none"),
    "featurize: not a dataset": (["featurize", "--dataset", "{root}/raw"], "{root}/raw"),
    "export: checkpoint weights unreadable": (["export", "--checkpoint", "{root}/torn", "--out",
                                               "{root}/out"], "{root}/torn"),
    "pretrain: dataset missing": (["pretrain", "--dataset", "{root}/none", "--out", "{root}/out"],
                                  "{root}/none"),
    "pretrain: dataset not featurized": (["pretrain", "--dataset", "{root}/ds", "--out",
                                          "{root}/out"], "lumos featurize"),
    "evaluate: checkpoint missing": (["evaluate", "--checkpoint", "{root}/none", "--dataset",
                                      "{root}/ds", "--out", "{root}/out"], "{root}/none"),
    "export: checkpoint missing": (["export", "--checkpoint", "{root}/none", "--out",
                                    "{root}/out"], "{root}/none"),
    "export: checkpoint unreadable": (["export", "--checkpoint", "{root}/bad", "--out",
                                       "{root}/out"], "{root}/bad/lumos_checkpoint.json"),
    "promote: evaluation missing": (["promote", "--export", "{root}/none", "--evaluation",
                                     "{root}/none-eval", "--out", "{root}/out"],
                                    "{root}/none-eval/eval.json"),
    "finetune: init checkpoint missing (said before the data's problems)": (
        ["finetune", "--head", "t2i", "--dataset", "{root}/ds", "--init", "{root}/none", "--out",
         "{root}/out"], "{root}/none"),
    "finetune: a dataset of the wrong kind for the head": (
        ["finetune", "--head", "novel_view", "--dataset", "{root}/fds", "--init",
         "{root}/torn/ckpt-i2i",
         "--out", "{root}/out"], "meta.group"),
    "run: run directory cannot be created": (["run", "--run-dir", "/proc/lumos-not-here"],
                                             "/proc/lumos-not-here"),
    "run: runs root in a missing bucket": (["run", "--runs-root", "s3://{bucket}-missing/runs",
                                            "--run-dir", "{root}/out"], "{bucket}-missing"),
    "compile: output directory missing": (["compile", "--out", "{root}/none/pipeline.yaml"],
                                          "{root}/none"),
    "deploy: ConfigMap file missing": (["deploy", "--config-map", "{root}/none.yaml"],
                                       "{root}/none.yaml"),
    "deploy: ConfigMap with an unknown deploy field": (["deploy", "--config-map",
                                                        "{root}/configmap.yaml"], "kfp_hots"),
    "trigger: ConfigMap not mounted": (["trigger", "--config-dir", "{root}/none"],
                                       "{root}/none"),
    "trigger: mounted config with an unknown field": (["trigger", "--config-dir",
                                                       "{root}/mounted"], "pretrain.stepz"),
    "data synth: output not writable": (["data", "synth", "--config", "{root}/cfg.yaml", "--out",
                                         "/proc/lumos-not-here"], "/proc/lumos-not-here"),
    "finetune: neither --init nor --from-scratch": (["finetune", "--head", "t2i", "--dataset",
                                                     "{root}/ds", "--out", "{root}/out"],
                                                    "--from-scratch"),
    "convert: checkpoint missing": (["convert", "--from", "lumos-i2i", "--checkpoint",
                                     "{root}/none.pth", "--output", "{root}/out"],
                                    "{root}/none.pth"),
    "convert: not a torch checkpoint": (["convert", "--from", "lumos-t2i", "--checkpoint",
                                         "{root}/cfg.yaml", "--output", "{root}/out"],
                                        "{root}/cfg.yaml"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_naming_it(case, inputs, s3_bucket, capsys):
    argv_template, names = CASES[case]
    fill = {"root": str(inputs), "bucket": s3_bucket}
    argv = [arg.format(**fill) for arg in argv_template]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code in (1, 2)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lumos: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert names.format(**fill) in err, err
    assert not (inputs / "out").exists()  # refused before any work
