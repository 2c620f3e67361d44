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
import json
import re
from pathlib import Path
from typing import Any, Protocol


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


def claim_step(
    preset: str, overrides_json: str, out_uri: str, report: KfpArtifact, results: KfpArtifact
) -> None:
    from lumos.configs.experiment import ExperimentConfig
    from lumos.experiments.claim import run_claim
    from lumos.storage import Storage
    from lumos.tempdirs import OwnedTemporaryDirectory

    cfg = ExperimentConfig.from_preset(preset, json.loads(overrides_json or "{}"))
    remote = out_uri.startswith("s3://")
    with OwnedTemporaryDirectory("lumos-claim-") as tmp:  # a killed step's: the next run removes it
        work = Path(tmp) if remote else Path(out_uri)
        run_claim(cfg, work)
        if remote:
            Storage.from_uri(out_uri).upload_dir(work / "report", prefix="report")
        write_ui_artifacts(work / "report", report, results)
    for artifact in (report, results):
        artifact.metadata["uri"] = f"{out_uri.rstrip('/')}/report"
