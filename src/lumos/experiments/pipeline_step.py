"""The claim experiment as a KFP step: run it, and hand the report to the UI as the run's artifact.

    claim_step("experiment-cpu", "{}", "s3://lumos/experiments/claim-1", report, results)

The component `components/experiment_claim` is a one-line call into this; the pipeline is
`pipelines/claim_pipeline.py`. The experiment runs in a local working directory (the training
stages read and write local datasets and checkpoints fastest); an `s3://` output URI gets the
report directory uploaded at the end. The UI's Markdown artifact carries the plots and sample
grids inline (as data URIs), since it cannot fetch the PNG files beside it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from lumos.configs.experiment import ExperimentConfig


class KfpArtifact(Protocol):
    path: str
    metadata: dict[str, Any]


def inline_images(markdown: str, folder: Path) -> str:
    """The report's Markdown with every `![alt](file.png)` of `folder` as a PNG data URI."""

    def embed(match: re.Match[str]) -> str:
        path = folder / match.group(2)
        if not path.is_file():
            return match.group(0)
        data = base64.b64encode(path.read_bytes()).decode()
        return f"![{match.group(1)}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)", embed, markdown)


def write_ui_artifacts(report_dir: Path, report: KfpArtifact, results: KfpArtifact) -> None:
    """The finished report (report.md, its PNGs, results.json) as the step's two artifacts."""
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(inline_images((report_dir / "report.md").read_text(), report_dir))
    Path(results.path).parent.mkdir(parents=True, exist_ok=True)
    Path(results.path).write_text((report_dir / "results.json").read_text())


def step_config(preset: str, overrides_json: str) -> ExperimentConfig:
    """The step's experiment config: the preset with the run form's JSON overrides on top; a bad
    preset, JSON or field is an ExperimentConfigError naming it (one line in the step's log)."""
    from pydantic import ValidationError

    from lumos.config import format_validation_error
    from lumos.configs.experiment import ExperimentConfig, ExperimentConfigError

    try:
        overrides = json.loads(overrides_json or "{}")
    except json.JSONDecodeError as err:
        raise ExperimentConfigError(
            f"overrides_json is not JSON ({err.msg} at character {err.pos}): give an object "
            'such as {"seeds": [0], "steps": {"t2i": 50}}'
        ) from err
    if not isinstance(overrides, dict):
        raise ExperimentConfigError(
            f"overrides_json must be a JSON object of config fields, got {type(overrides).__name__}"
        )
    try:
        return ExperimentConfig.from_preset(preset, overrides)
    except ValidationError as err:
        head, *problems = format_validation_error(err).split("\n  - ")
        raise ExperimentConfigError(f"overrides_json: {head} {'; '.join(problems)}") from err


def claim_step(
    preset: str, overrides_json: str, out_uri: str, report: KfpArtifact, results: KfpArtifact
) -> None:
    from lumos.configs.experiment import ExperimentConfigError
    from lumos.experiments.claim import run_claim
    from lumos.pipeline.run_guard import on_kubernetes
    from lumos.storage import Storage
    from lumos.tempdirs import OwnedTemporaryDirectory

    cfg = step_config(preset, overrides_json)
    remote = out_uri.startswith("s3://")
    if not remote and on_kubernetes():
        raise ExperimentConfigError(
            f"out_uri {out_uri!r} is a path inside the step's pod, which is deleted with the "
            "report: give an s3:// URI in the run form"
        )
    with contextlib.ExitStack() as stack:
        if remote:  # a killed step's directory: the next run removes it
            work = Path(stack.enter_context(OwnedTemporaryDirectory("lumos-claim-")))
        else:
            work = Path(out_uri).resolve()
        run_claim(cfg, work)
        if remote:
            Storage.from_uri(out_uri).upload_dir(work / "report", prefix="report")
        write_ui_artifacts(work / "report", report, results)
    where = f"{out_uri.rstrip('/')}/report" if remote else str(work / "report")
    for artifact in (report, results):
        artifact.metadata["uri"] = where
