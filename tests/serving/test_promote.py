"""Promotion on a local registry and on a real S3 server (moto, tests/conftest.py); the
InferenceService is validated against the KServe CRD in ../shared/crds."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper
from pydantic import ValidationError

from lumos.configs.encoders import EncodersConfig
from lumos.configs.serving import PromoteConfig
from lumos.evaluation.evaluate import EvalResult
from lumos.k8s.crd_validation import validate_resource
from lumos.serving.promote import (
    SERVING_RUNTIME_BYTES,
    PromotionError,
    current_promoted,
    promote,
    serving_memory,
)
from lumos.storage import Storage

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def crds() -> None:
    path = Path(os.environ.get("LUMOS_CRDS_DIR") or REPO_ROOT.parent / "shared" / "crds")
    if not path.is_dir():
        pytest.skip(f"CRD directory {path} not found (set LUMOS_CRDS_DIR)")


def make_export(root: Path, head: str = "t2i", encoders: dict | None = None) -> Path:
    """An export directory as `lumos export` writes it: a (tiny, real) ONNX graph + export.json,
    with tiny encoders unless `encoders` (an EncodersConfig as JSON) is given."""
    root.mkdir(parents=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "tiny", [x], [out])
    onnx.save(helper.make_model(graph), root / "model.onnx")
    inputs = [{"name": "x", "shape": ["batch", 4], "dtype": "float32"}]
    (root / "export.json").write_text(json.dumps({
        "format": "lumos-export/1",
        "head": head,
        "encoders": encoders or EncodersConfig.tiny().model_dump(mode="json"),
        "graphs": {"denoiser": {"file": "model.onnx", "files": ["model.onnx"], "inputs": inputs}},
        "checkpoint": {"uri": f"s3://lumos/runs/r1/checkpoints/{head}", "step": 500,
                       "parent": "s3://lumos/runs/r1/checkpoints/i2i",
                       "data": {"dataset_uri": "s3://lumos/runs/r1/datasets/images",
                                "manifest_sha256": "ab" * 32}},
    }))  # fmt: skip
    return root


def eval_result(head: str = "t2i", passed: bool = True, **kw) -> EvalResult:
    fields = dict(
        head=head, metrics={"clip_attribute_accuracy": 0.8, "fid_proxy": 12.5}, passed=passed,
        reasons=[] if passed else ["fid_proxy 55.0 > threshold 40.0"], num_samples=16,
        report_uri="/r/report.html", metrics_uri="/r/metrics.json", out_uri="/r",
        checkpoint_uri=f"s3://lumos/runs/r1/checkpoints/{head}", checkpoint_step=500,
        dataset_uri="s3://lumos/runs/r1/datasets/images", gates={"fid_proxy": {"margin": 1.0}},
        baseline=None,
    )  # fmt: skip
    fields.update(kw)
    return EvalResult(**fields)


def test_passed_model_is_registered_and_served(tmp_path: Path) -> None:
    export = make_export(tmp_path / "export")
    cfg = PromoteConfig(registry_uri=str(tmp_path / "registry"))
    result = promote(cfg, str(export), eval_result(), str(tmp_path / "promote"))

    assert result.promoted and result.version == "v0001" and result.reasons == []
    assert result.model_uri == str(export) and result.previous_version is None
    assert "KServe cannot fetch" in result.warnings[0]  # a local path: say so, do not hide it
    record = json.loads((tmp_path / "registry" / "t2i" / "v0001.json").read_text())
    assert record["model_uri"] == str(export)
    assert record["metrics"] == {"clip_attribute_accuracy": 0.8, "fid_proxy": 12.5}
    assert record["lineage"]["checkpoint_uri"] == "s3://lumos/runs/r1/checkpoints/t2i"
    assert record["lineage"]["dataset_uri"] == "s3://lumos/runs/r1/datasets/images"
    assert record["lineage"]["parent_checkpoint_uri"] == "s3://lumos/runs/r1/checkpoints/i2i"
    assert record["promoted_at"].endswith("Z")
    current = current_promoted(cfg.registry_uri, "t2i")
    assert current["version"] == "v0001" and current["record_uri"] == result.record_uri

    isvc = yaml.safe_load(Path(result.inference_service_uri).read_text())
    validate_resource(isvc)
    assert isvc["metadata"]["name"] == "lumos-t2i" == result.inference_service_name
    predictor = isvc["spec"]["predictor"]
    assert predictor["serviceAccountName"] == "lumos-serving"
    assert predictor["model"]["runtime"] == "lumos-onnx"
    assert predictor["model"]["storageUri"] == str(export)
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    saved = json.loads((tmp_path / "promote" / "promote.json").read_text())
    assert saved == result.model_dump(mode="json")


def test_memory_too_small_for_the_served_encoders_is_refused(tmp_path: Path) -> None:
    """The InferenceService's memory must hold what the head's server loads: T5 v1.1-XXL's
    encoder (4.76B parameters, counted from its config.json alone) is 17.7 GiB in float32, more
    than the default 16Gi, so a T2I promotion with it fails before any pod is OOM-killed."""
    from transformers import T5Config

    weights = tmp_path / "t5-v1_1-xxl"
    T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
             feed_forward_proj="gated-gelu").save_pretrained(weights)  # fmt: skip
    xxl = EncodersConfig.model_validate({"text_encoder": {"path": str(weights)}})
    export = make_export(tmp_path / "export", encoders=xxl.model_dump(mode="json"))
    need = serving_memory(
        Storage.from_uri(str(export)), json.loads((export / "export.json").read_text())
    )
    assert need["text_encoder"] == 4_762_310_656 * 4
    assert need["onnx graphs"] == (export / "model.onnx").stat().st_size
    assert need["server"] == SERVING_RUNTIME_BYTES and set(need) == {
        "text_encoder",
        "onnx graphs",
        "server",
    }

    cfg = PromoteConfig(registry_uri=str(tmp_path / "registry"))
    with pytest.raises(PromotionError, match=r"needs about 19.2 GiB .*text_encoder 17.74 GiB.*"
                       r"more than promote.resources.memory '16Gi'.*at least 20Gi"):  # fmt: skip
        promote(cfg, str(export), eval_result(), str(tmp_path / "promote"))
    assert not (tmp_path / "registry").exists()  # nothing registered
    bigger = cfg.model_copy(
        update={"resources": cfg.resources.model_copy(update={"memory": "20Gi"})}
    )
    assert promote(bigger, str(export), eval_result(), str(tmp_path / "promote")).promoted

    # Encoders the serving pod could not load either: refused with where they were looked for.
    missing = EncodersConfig.model_validate({"text_encoder": {"path": str(tmp_path / "nowhere")}})
    export = make_export(tmp_path / "export2", encoders=missing.model_dump(mode="json"))
    with pytest.raises(PromotionError, match="cannot read the text_encoder's config"):
        promote(cfg, str(export), eval_result(), str(tmp_path / "promote2"))


@pytest.mark.parametrize(
    ("head", "inputs", "parts"),
    [
        ("t2i", ["x", "t", "cond", "cond_mask"], ("text_encoder",)),
        ("i2i", ["x", "t", "cond"], ("image_encoder",)),
        ("novel_view", ["x", "t", "cond", "concat_latent", "camera"], ("image_encoder", "vae")),
    ],
)
def test_the_server_loads_the_encoders_its_head_conditions_on(head, inputs, parts) -> None:
    from lumos.serving.onnx_pipeline import served_encoders

    specs = [{"name": name} for name in inputs]
    assert served_encoders({"head": head, "graphs": {"denoiser": {"inputs": specs}}}) == parts


def test_kubernetes_quantities_read_as_numbers() -> None:
    from lumos.k8s.resources import quantity_value

    assert quantity_value("16Gi") == 16 * 2**30 and quantity_value("123Mi") == 128974848
    assert quantity_value("1.5G") == 1.5e9 and quantity_value("2e3") == 2000
    assert quantity_value("500m") == 0.5 and quantity_value("1E") == 1e18
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity_value("16 GB")


def test_xl_preset_serves_t2i_with_t5_xxl(tmp_path: Path) -> None:
    """The xl preset's serving memory holds its T2I model: T5 v1.1-XXL's encoder in float32
    (counted from its config), the XL/2 denoiser's weights in float32 and the server."""
    from transformers import T5Config

    from lumos.config import load_config
    from lumos.encoders.sizes import parameter_bytes
    from lumos.k8s.resources import quantity_value
    from lumos.models.lumos_dit import LumosDiT, lumos_dit_config

    weights = tmp_path / "t5-v1_1-xxl"
    T5Config(vocab_size=32128, d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
             feed_forward_proj="gated-gelu").save_pretrained(weights)  # fmt: skip
    cfg = load_config(preset="xl")
    encoders = cfg.featurize.encoders.model_copy(
        update={
            "text_encoder": cfg.featurize.encoders.text_encoder.model_copy(
                update={"path": str(weights)}
            )
        }
    )
    import torch

    with torch.device("meta"):
        denoiser = LumosDiT(
            **{
                **lumos_dit_config("XL/2"),
                "cond_kind": "text",
                "cond_dim": 4096,
                "cond_tokens": 120,
            }
        )
    graphs = 4 * sum(p.numel() for p in denoiser.parameters())
    need = parameter_bytes(encoders, "text_encoder") + graphs + SERVING_RUNTIME_BYTES
    assert need <= quantity_value(cfg.promote.resources.memory)


def test_second_promotion_becomes_current(tmp_path: Path) -> None:
    cfg = PromoteConfig(registry_uri=str(tmp_path / "registry"))
    first = promote(cfg, str(make_export(tmp_path / "e1")), eval_result(), str(tmp_path / "p1"))
    better = eval_result(
        metrics={"clip_attribute_accuracy": 0.9, "fid_proxy": 10.0},
        baseline=current_promoted(cfg.registry_uri, "t2i")["metrics"],
        baseline_version="v0001",
    )
    second = promote(cfg, str(make_export(tmp_path / "e2")), better, str(tmp_path / "p2"))
    assert (first.version, second.version, second.previous_version) == ("v0001", "v0002", "v0001")
    current = current_promoted(cfg.registry_uri, "t2i")
    assert current["version"] == "v0002" and current["metrics"]["fid_proxy"] == 10.0
    assert current_promoted(cfg.registry_uri, "video") is None


def test_model_evaluated_against_a_superseded_model_is_refused(tmp_path: Path) -> None:
    """Two runs evaluated while nothing was promoted both pass their gate; once the stronger is
    promoted, the weaker one's regression check no longer holds: promoting it fails."""
    cfg = PromoteConfig(registry_uri=str(tmp_path / "registry"))
    strong = eval_result(metrics={"clip_attribute_accuracy": 0.9, "fid_proxy": 10.0})
    weak = eval_result(metrics={"clip_attribute_accuracy": 0.5, "fid_proxy": 30.0})
    promote(cfg, str(make_export(tmp_path / "e1")), strong, str(tmp_path / "p1"))
    with pytest.raises(PromotionError, match="another model was promoted since this evaluation"):
        promote(cfg, str(make_export(tmp_path / "e2")), weak, str(tmp_path / "p2"))
    current = current_promoted(cfg.registry_uri, "t2i")
    assert current["version"] == "v0001" and current["metrics"]["fid_proxy"] == 10.0
    assert not (tmp_path / "registry" / "t2i" / "v0002.json").exists()

    # Both evaluated against v0001: the first promoted becomes v0002, the second is refused.
    v1 = {"baseline": current["metrics"], "baseline_version": "v0001"}
    a = eval_result(metrics={"clip_attribute_accuracy": 0.95, "fid_proxy": 9.0}, **v1)
    b = eval_result(metrics={"clip_attribute_accuracy": 0.91, "fid_proxy": 9.9}, **v1)
    assert (
        promote(cfg, str(make_export(tmp_path / "e3")), a, str(tmp_path / "p3")).version == "v0002"
    )
    with pytest.raises(PromotionError, match="compared it with version v0001, but another model"):
        promote(cfg, str(make_export(tmp_path / "e4")), b, str(tmp_path / "p4"))
    # An evaluation that recorded the baseline's metrics only (no version) is checked by them.
    metrics_only = {"head": "t2i", "passed": True, "metrics": {}, "baseline": current["metrics"]}
    with pytest.raises(PromotionError, match="v0002 is current"):
        promote(cfg, str(make_export(tmp_path / "e5")), metrics_only, str(tmp_path / "p5"))
    assert current_promoted(cfg.registry_uri, "t2i")["version"] == "v0002"
    # Compared with a model this registry never served: refused as well.
    other = eval_result(head="video", baseline={"psnr": 20.0}, baseline_version="v0007")
    with pytest.raises(PromotionError, match="no model of head 'video' is promoted"):
        promote(cfg, str(make_export(tmp_path / "e6", head="video")), other, str(tmp_path / "p6"))


def test_mismatched_checkpoint_is_recorded_and_warned(tmp_path: Path) -> None:
    cfg = PromoteConfig(registry_uri=str(tmp_path / "registry"))
    other = eval_result(checkpoint_uri="s3://lumos/runs/r2/checkpoints/t2i")
    result = promote(cfg, str(make_export(tmp_path / "e")), other, str(tmp_path / "p"))
    assert any("check that they are the same checkpoint" in w for w in result.warnings)
    lineage = current_promoted(cfg.registry_uri, "t2i")["lineage"]
    assert lineage["checkpoint_uri"] == "s3://lumos/runs/r1/checkpoints/t2i"
    assert lineage["evaluated_checkpoint_uri"] == "s3://lumos/runs/r2/checkpoints/t2i"


def test_failed_model_is_not_promoted(tmp_path: Path) -> None:
    cfg = PromoteConfig(registry_uri=str(tmp_path / "registry"))
    failed = eval_result(passed=False)
    result = promote(cfg, str(make_export(tmp_path / "e")), failed, str(tmp_path / "p"))
    assert not result.promoted and result.version is None
    assert result.reasons == ["fid_proxy 55.0 > threshold 40.0"]
    assert not (tmp_path / "registry").exists()
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["promote.json"]
    assert current_promoted(cfg.registry_uri, "t2i") is None
    # a plain dict works as well, and an empty reason list still explains itself
    as_dict = {"head": "t2i", "passed": False, "metrics": {}, "reasons": []}
    result = promote(cfg, str(tmp_path / "e"), as_dict, str(tmp_path / "p"))
    assert result.reasons == ["the evaluation gate did not pass (no reason given)"]


def test_inputs_that_disagree_fail_loudly(tmp_path: Path) -> None:
    cfg = PromoteConfig(registry_uri=str(tmp_path / "registry"))
    video_export = make_export(tmp_path / "video", head="video")
    with pytest.raises(PromotionError, match="head 'video' but the evaluation is of head 't2i'"):
        promote(cfg, str(video_export), eval_result(), str(tmp_path / "p"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromotionError, match="export.json not found"):
        promote(cfg, str(tmp_path / "empty"), eval_result(), str(tmp_path / "p"))
    with pytest.raises(PromotionError, match="lacks passed"):
        promote(cfg, str(video_export), {"head": "t2i", "metrics": {}}, str(tmp_path / "p"))
    with pytest.raises(PromotionError, match="not one of"):
        promote(cfg, str(video_export), {"head": "x", "passed": True, "metrics": {}}, str(tmp_path))
    assert not (tmp_path / "registry").exists()


def test_config_is_strict() -> None:
    with pytest.raises(ValidationError, match="extra"):
        PromoteConfig(min_replica=1)
    with pytest.raises(ValidationError, match="DNS-1123"):
        PromoteConfig(model_name_prefix="Lumos")
    with pytest.raises(ValidationError, match="Kubernetes quantity"):
        PromoteConfig(resources={"memory": "16 GB"})
    with pytest.raises(ValidationError, match=r"min_replicas \(3\) is above max_replicas \(2\)"):
        PromoteConfig(min_replicas=3, max_replicas=2)
    assert PromoteConfig(min_replicas=2, max_replicas=2).min_replicas == 2


def test_promotion_to_s3_copies_the_model(tmp_path: Path, s3_bucket: str) -> None:
    export = make_export(tmp_path / "export", head="novel_view")
    cfg = PromoteConfig(registry_uri=f"s3://{s3_bucket}/registry",
                        storage_uri_base=f"s3://{s3_bucket}/models", min_replicas=0,
                        resources={"cpu": "2", "memory": "8Gi", "gpu": 0})  # fmt: skip
    ev = {"head": "novel_view", "passed": True, "metrics": {"psnr": 21.0}, "reasons": []}
    result = promote(cfg, str(export), ev, f"s3://{s3_bucket}/runs/r1/promote")

    assert result.model_uri == f"s3://{s3_bucket}/models/novel_view/v0001"
    assert result.warnings == [] and result.inference_service_name == "lumos-novel-view"
    models = Storage.from_uri(result.model_uri)
    assert sorted(o.key for o in models.list()) == ["export.json", "model.onnx"]
    assert models.read_bytes("model.onnx") == (export / "model.onnx").read_bytes()
    runs = Storage.from_uri(f"s3://{s3_bucket}/runs/r1/promote")
    isvc = yaml.safe_load(runs.read_bytes("inferenceservice.yaml"))
    validate_resource(isvc)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == result.model_uri
    assert isvc["spec"]["predictor"]["minReplicas"] == 0
    assert current_promoted(cfg.registry_uri, "novel_view")["metrics"] == {"psnr": 21.0}


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_promotions_of_one_head_fail_loudly(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another promotion of the head lands while this one copies its model: this one's swap of
    current.json fails (it would point back to an older version), and a promotion that picked
    a version someone has just registered fails before it copies anything."""
    import lumos.serving.promote as promote_module

    root = str(tmp_path) if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}"
    cfg = PromoteConfig(registry_uri=f"{root}/registry", storage_uri_base=f"{root}/models")
    real_copy, others = promote_module._copy_export, []

    def copy_while_another_lands(export: Storage, target: Storage) -> None:
        real_copy(export, target)
        if not others:
            others.append("running")  # the other one copies without a third
            others[0] = promote(cfg, str(make_export(tmp_path / "e2")), eval_result(), root + "/p2")

    monkeypatch.setattr(promote_module, "_copy_export", copy_while_another_lands)
    with pytest.raises(PromotionError, match="made v0002 current while this one ran: v0001 is"):
        promote(cfg, str(make_export(tmp_path / "e1")), eval_result(), root + "/p1")
    assert others[0].version == "v0002" and others[0].previous_version is None
    assert current_promoted(cfg.registry_uri, "t2i")["version"] == "v0002"
    registry = Storage.from_uri(cfg.registry_uri)
    assert sorted(o.key for o in registry.list()) == [
        "t2i/current.json", "t2i/v0001.json", "t2i/v0002.json",
    ]  # fmt: skip

    # Later promotions evaluated against the model now current (v0002).
    against_v2 = eval_result(baseline=eval_result().metrics, baseline_version="v0002")
    monkeypatch.setattr(promote_module, "_next_version", lambda registry, head: "v0002")
    with pytest.raises(PromotionError, match="version v0002 of head 't2i' was registered by"):
        promote(cfg, str(make_export(tmp_path / "e3")), against_v2, root + "/p3")
    assert registry.read_json("t2i/v0002.json")["lineage"]["export_uri"].endswith("e2")

    def failing_copy(export: Storage, target: Storage) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(promote_module, "_next_version", lambda registry, head: "v0003")
    monkeypatch.setattr(promote_module, "_copy_export", failing_copy)
    with pytest.raises(OSError, match="disk full"):
        promote(cfg, str(make_export(tmp_path / "e4")), against_v2, root + "/p4")
    assert not registry.exists("t2i/v0003.json")  # not promoted: the version is free again
    assert current_promoted(cfg.registry_uri, "t2i")["version"] == "v0002"
