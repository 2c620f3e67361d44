"""The whole pipeline through the real kfp local runner, on the embedded dataset.

Two runs: the tiny preset as `lumos run` trains it, and the same pipeline with untrained models
(steps=0) on the S3 test server. Every head is evaluated beside its baselines and exported; a head
is promoted exactly when it passed its gate. The untrained models are rejected, so nothing they
produce reaches the registry.

The trained heads pass the tiny gate (margins over the best trivial baseline at the lower end of
their bootstrap intervals) and are promoted: the T2I head draws its captions' colours, the
novel-view head the input's box turned, the video head the first frame's object moved right
frame by frame (closer to the true frames than the first frame copied; docs/benchmarks.md,
"The video head learns the motion").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lumos.config import FINETUNE_HEADS, load_config
from lumos.k8s.crd_validation import validate_resource
from lumos.pipeline.local_run import run_local
from lumos.storage import Storage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, registry):
    run_dir = tmp_path_factory.mktemp("trained")
    cfg = load_config(preset="tiny", overrides=[f"promote.registry_uri={registry}"])
    return run_local(cfg, run_dir)


def test_every_head_is_judged_exported_and_promoted_only_if_it_passed(trained, registry) -> None:
    assert trained.succeeded, trained.error
    assert [h.head for h in trained.heads] == list(FINETUNE_HEADS)
    for head in trained.heads:
        assert head.passed is not None, f"{head.head} was not evaluated"
        assert head.metrics, f"{head.head} reports no metrics"
        assert head.export_max_abs_diff is not None and head.export_max_abs_diff < 1e-3
        if not head.passed:
            assert head.reasons, "a rejection says why"
            assert head.serving_manifest_uri is None
            assert not (registry / head.head / "current.json").exists()
            continue
        manifest = Path(head.serving_manifest_uri)
        isvc = yaml.safe_load(manifest.read_text())
        validate_resource(isvc)
        assert isvc["kind"] == "InferenceService"
        current = json.loads((registry / head.head / "current.json").read_text())
        assert current["metrics"] == pytest.approx(head.metrics)
    # Every trained head passes (module docstring).
    passed = {h.head: h.passed for h in trained.heads}
    assert all(passed.values()), [(h.head, h.reasons) for h in trained.heads]
    # every artifact under the run directory: KFP's and the data
    run_dir = Path(trained.run_dir)
    assert (run_dir / "kfp").is_dir() and Path(trained.run_root).is_relative_to(run_dir)
    assert "gate: " in trained.render()


def test_untrained_models_are_rejected_and_nothing_is_promoted(
    trained, registry, tmp_path, s3_bucket
) -> None:
    def current(head: str) -> str | None:
        path = registry / head / "current.json"
        return path.read_text() if path.exists() else None

    before = {h: current(h) for h in FINETUNE_HEADS}
    steps = [f"{s}.steps=0" for s in ("pretrain", "finetune.t2i", "finetune.novel_view")]
    cfg = load_config(
        preset="tiny",
        overrides=[*steps, "finetune.video.steps=0", f"promote.registry_uri={registry}"],
    )
    summary = run_local(cfg, tmp_path / "untrained", runs_root=f"s3://{s3_bucket}/runs")
    assert summary.succeeded, summary.error
    assert summary.run_root.startswith(f"s3://{s3_bucket}/runs/")
    for head in summary.heads:
        assert head.passed is False, f"{head.head} passed untrained: {head.metrics}"
        assert head.reasons, "a rejection says why"
        assert head.serving_manifest_uri is None
        assert head.export_uri is not None  # exported, but not promoted
    # What the trained novel-view head passes, the untrained one does not (its samples are noise).
    novel_view = next(h for h in summary.heads if h.head == "novel_view")
    assert any(r.startswith("fd_dino") for r in novel_view.reasons), novel_view.reasons
    after = {h: current(h) for h in FINETUNE_HEADS}
    assert after == before
    # the data went to the object store
    keys = [o.key for o in Storage.from_uri(summary.run_root).list("eval/")]
    assert any(k.endswith("report.html") for k in keys)


def test_a_failing_step_fails_the_run_with_a_pointer_to_its_log(tmp_path) -> None:
    cfg = load_config(preset="tiny", overrides=["data.images_uri=/nonexistent/images"])
    summary = run_local(cfg, tmp_path / "bad")
    assert not summary.succeeded
    assert "steps.log" in summary.error
    log = (tmp_path / "bad" / "steps.log").read_text()
    assert "source directory /nonexistent/images does not exist" in log
