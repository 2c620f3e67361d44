"""`lumos run`: the real KFP pipeline through `kfp.local`, then a summary read from the run root.

Everything lands under one run directory: `<run_dir>/kfp` (KFP's artifacts and step logs) and
`<run_dir>/data/<run id>` (datasets, checkpoints, reports, exports, serving manifests), unless
`runs_root` puts the data in an object store instead.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from pydantic import BaseModel

from lumos.config import FINETUNE_HEADS, PipelineConfig
from lumos.pipeline.layout import RunLayout
from lumos.storage import ObjectNotFound, Storage, StorageError


class HeadSummary(BaseModel):
    head: str
    metrics: dict[str, float] = {}
    passed: bool | None = None
    reasons: list[str] = []
    report_uri: str | None = None
    export_uri: str | None = None
    export_max_abs_diff: float | None = None
    serving_manifest_uri: str | None = None


class RunSummary(BaseModel):
    run_dir: str
    run_root: str
    seconds: float
    succeeded: bool
    error: str | None = None
    heads: list[HeadSummary] = []

    def render(self) -> str:
        lines = [
            "",
            f"Lumos run {'finished' if self.succeeded else 'FAILED'} in {self.seconds:.0f} s",
            f"  run directory: {self.run_dir}",
            f"  data:          {self.run_root}",
        ]
        if self.error:
            lines.append(f"  error: {self.error}")
        for h in self.heads:
            verdict = {True: "PASS", False: "REJECT", None: "not evaluated"}[h.passed]
            shown = ", ".join(f"{k}={v:.3g}" for k, v in sorted(h.metrics.items()))
            lines.append(f"  [{h.head}] gate: {verdict}   {shown}")
            for reason in h.reasons:
                lines.append(f"      - {reason}")
            if h.report_uri:
                lines.append(f"      report:  {h.report_uri}")
            if h.export_uri:
                diff = (
                    f" (max |onnx - torch| = {h.export_max_abs_diff:.2g})"
                    if h.export_max_abs_diff is not None
                    else ""
                )
                lines.append(f"      export:  {h.export_uri}{diff}")
            if h.serving_manifest_uri:
                lines.append(f"      serving: {h.serving_manifest_uri}")
        return "\n".join(lines)


def _read_json(store: Storage, key: str) -> dict[str, Any] | None:
    try:
        return store.read_json(key)
    except ObjectNotFound:
        return None


def summarize(run_dir: Path, run_root: str, seconds: float, error: str | None) -> RunSummary:
    layout = RunLayout(run_root)
    heads = []
    for head in FINETUNE_HEADS:
        h = HeadSummary(head=head)
        evaluation = _read_json(Storage.from_uri(layout.evaluation(head)), "eval.json")
        if evaluation:
            h.metrics = {k: float(v) for k, v in evaluation["metrics"].items()}
            h.passed = bool(evaluation["passed"])
            h.reasons = list(evaluation.get("reasons", []))
            h.report_uri = evaluation.get("report_uri")
        exported = _read_json(Storage.from_uri(layout.export(head)), "export.json")
        if exported:
            h.export_uri = layout.export(head)
            diffs = exported.get("max_abs_diff") or {}
            h.export_max_abs_diff = max(diffs.values()) if diffs else None
        serving = Storage.from_uri(layout.serving(head))
        if serving.exists("inferenceservice.yaml"):
            h.serving_manifest_uri = f"{serving.uri.rstrip('/')}/inferenceservice.yaml"
        heads.append(h)
    return RunSummary(
        run_dir=str(run_dir),
        run_root=run_root,
        seconds=seconds,
        succeeded=error is None,
        error=error,
        heads=heads,
    )


class _StepLog(io.TextIOBase):
    """Keeps the KFP executor chatter in a log file and shows one line per step start/finish."""

    def __init__(self, log_file: Path, echo_all: bool) -> None:
        self._file = log_file.open("a")
        self._echo_all = echo_all
        self._t0 = time.monotonic()
        self._pending = ""

    def write(self, text: str) -> int:
        self._file.write(text)
        self._file.flush()
        if self._echo_all:
            _console().write(text)
            return len(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            if "Pipeline" in line or not (
                "Executing task" in line or "finished with status" in line
            ):
                continue
            clean = _ANSI.sub("", line.split(" - ", 2)[-1]).strip()
            _console().write(f"  [{time.monotonic() - self._t0:6.1f}s] {clean}\n")
            _console().flush()
        return len(text)


def _console() -> TextIO:
    """The terminal, even while stdout is redirected into the step log."""
    return sys.__stdout__ or sys.stderr


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_local(
    cfg: PipelineConfig, run_dir: Path, runs_root: str | None = None, verbose: bool = False
) -> RunSummary:
    from kfp import local

    from pipelines.lumos_pipeline import build_pipeline

    run_dir = run_dir.resolve()
    if runs_root is not None:  # a wrong bucket or endpoint: said now, not by the first step
        next(iter(Storage.from_uri(runs_root).list()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot create the run directory {run_dir}: {err.strerror}") from err
    runs_root = runs_root or str(run_dir / "data")
    log_file = run_dir / "steps.log"
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run_dir / "kfp"),
        raise_on_error=True,
    )
    # Cluster settings do not apply here; retries would only rerun a failed training as it was.
    # The run's config is the compiled one: its first step refuses a different cluster.*.
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"train_retries": 0})})
    pipeline = build_pipeline(cfg)
    print(f"lumos run: {run_dir} (step logs: {log_file})", flush=True)
    start = time.monotonic()
    error = None
    run_root = None
    step_log = _StepLog(log_file, echo_all=verbose)
    try:
        with (
            contextlib.redirect_stdout(step_log),
            contextlib.redirect_stderr(step_log),
            warnings.catch_warnings(),
        ):
            # The local runner ignores display names and runs steps in this environment instead
            # of the cluster image; both are expected here.
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            run_root = pipeline(runs_root=runs_root, config_json=cfg.model_dump_json()).output
    except Exception as err:  # the pipeline failed: summarise what exists and say where
        error = f"{_ANSI.sub('', str(err))} (see {log_file})"
    if run_root is None:
        run_root = _latest_run_root(runs_root)
    return summarize(run_dir, run_root or runs_root, time.monotonic() - start, error)


def _latest_run_root(runs_root: str) -> str | None:
    root = Path(runs_root)
    if not root.is_dir():
        return None
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return str(runs[-1]) if runs else None
