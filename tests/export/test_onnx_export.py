"""ONNX export: files, self-description, onnxruntime check, TensorRT handling."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydantic
import pytest
import torch
from tiny_checkpoints import make_checkpoint

from lumos.configs.export import ExportConfig
from lumos.export.onnx_export import (
    EXPORT_JSON,
    ExportCheckError,
    ExportResult,
    check_graph,
    denoiser_graph,
    export,
    export_graph,
    random_denoiser_inputs,
    read_export,
)
from lumos.export.tensorrt import (
    TensorRTUnavailable,
    build_engines,
    select_providers,
    tensorrt_version,
)
from lumos.models.lumos_dit import lumos_dit

needs_no_tensorrt = pytest.mark.skipif(
    tensorrt_version() is not None, reason="checks the behaviour without TensorRT"
)


def test_t2i_export_writes_checked_denoiser_and_decoder(t2i_vae_export):
    result, out = t2i_vae_export.result, Path(t2i_vae_export.export_dir)
    assert {"model.onnx", "decoder.onnx", "export.json"} <= set(result.files)
    assert sorted(p.name for p in out.iterdir()) == result.files
    assert result.decoder == "exported"
    assert set(result.max_abs_diff) == {"denoiser", "decoder"}
    assert all(d <= result.tolerance["atol"] for d in result.max_abs_diff.values())
    # The result is what the KFP component outputs: it must survive JSON.
    assert ExportResult.model_validate_json(result.model_dump_json()) == result


def test_export_json_describes_itself(t2i_vae_export):
    meta = read_export(t2i_vae_export.export_dir)
    assert meta["head"] == "t2i"
    assert meta["model_config"]["cond_kind"] == "text"
    assert meta["encoders"] == t2i_vae_export.encoders.model_dump(mode="json")
    assert meta["checkpoint"]["uri"] == t2i_vae_export.checkpoint_uri
    assert meta["checkpoint"]["step"] == 10
    assert meta["decoder"] == {"kind": "vae", "scaling_factor": 0.18215, "file": "decoder.onnx"}
    assert meta["tolerance"]["atol"] == 1e-4
    denoiser = meta["graphs"]["denoiser"]
    assert [i["name"] for i in denoiser["inputs"]] == [
        "x",
        "t",
        "cond",
        "cond_mask",
        "micro_cond",
        "force_drop",
    ]
    assert denoiser["inputs"][2] == {"name": "cond", "shape": ["batch", 8, 32], "dtype": "float32"}
    assert denoiser["outputs"] == [{"name": "out", "shape": ["batch", 8, 8, 8], "dtype": "float32"}]
    assert set(denoiser["max_abs_diff"]) == {"1", "3"}
    assert meta["max_abs_diff"] == t2i_vae_export.result.max_abs_diff
    decoder = meta["graphs"]["decoder"]
    assert decoder["inputs"][0]["shape"] == ["batch", 4, 8, 8]
    assert decoder["outputs"][0]["shape"] == ["batch", 3, 16, 16]


def test_exported_graph_has_dynamic_batch(t2i_vae_export):
    session = ort.InferenceSession(
        str(Path(t2i_vae_export.export_dir) / "decoder.onnx"), providers=["CPUExecutionProvider"]
    )
    for batch in (1, 5):
        (out,) = session.run(None, {"latents": np.zeros((batch, 4, 8, 8), np.float32)})
        assert out.shape == (batch, 3, 16, 16)


def test_pixel_space_export_says_there_is_no_decoder(i2i_pixel_export):
    result = i2i_pixel_export.result
    assert "decoder.onnx" not in result.files
    assert result.decoder.startswith("none: pixel-space")
    assert read_export(i2i_pixel_export.export_dir)["decoder"] == {"kind": "pixel", "file": None}
    names = [
        i["name"] for i in read_export(i2i_pixel_export.export_dir)["graphs"]["denoiser"]["inputs"]
    ]
    assert names == ["x", "t", "cond", "force_drop"]


def test_multi_frame_export_inputs(novel_view_pixel_export):
    inputs = read_export(novel_view_pixel_export.export_dir)["graphs"]["denoiser"]["inputs"]
    shapes = {i["name"]: i["shape"] for i in inputs}
    assert shapes == {
        "x": ["batch", 3, 3, 8, 8],
        "t": ["batch"],
        "cond": ["batch", 32],
        "frame_cond": ["batch", 3, 4],
        "concat_latent": ["batch", 3, 8, 8],
        "force_drop": ["batch"],
    }


def test_video_denoiser_graph_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = lumos_dit(
        "tiny",
        input_size=8,
        cond_dim=16,
        num_frames=3,
        frame_embed="index",
        concat_latent_channels=4,
    ).eval()
    with torch.no_grad():  # open the zero-initialised output paths
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config = dict(model.config)
    graph = denoiser_graph(model, config)
    gen = torch.Generator().manual_seed(0)
    export_graph(
        graph,
        random_denoiser_inputs(config, 2, gen),
        tmp_path / "m.onnx",
        opset=18,
        dynamic_batch=True,
    )
    diffs = check_graph(
        graph,
        tmp_path / "m.onnx",
        lambda b: random_denoiser_inputs(config, b, gen),
        [1, 4],
        atol=1e-4,
        rtol=1e-4,
    )
    assert set(diffs) == {"1", "4"} and max(diffs.values()) < 1e-4


def test_check_fails_with_the_measured_difference(tmp_path):
    torch.manual_seed(0)
    exported, other = torch.nn.Linear(4, 3).eval(), torch.nn.Linear(4, 3).eval()
    export_graph(
        exported, {"x": torch.randn(2, 4)}, tmp_path / "lin.onnx", opset=18, dynamic_batch=True
    )
    with pytest.raises(
        ExportCheckError, match=r"max \|onnx - torch\| = \d\.\d+e[-+]\d+.*atol=0.0001"
    ):
        check_graph(
            other, tmp_path / "lin.onnx", lambda b: {"x": torch.randn(b, 4)}, [3], atol=1e-4, rtol=0
        )
    # and passes against the module it came from
    assert check_graph(
        exported,
        tmp_path / "lin.onnx",
        lambda b: {"x": torch.randn(b, 4)},
        [1, 3],
        atol=1e-4,
        rtol=0,
    )


def test_export_config_is_strict():
    with pytest.raises(pydantic.ValidationError):
        ExportConfig(opset=18, atoll=1e-3)
    with pytest.raises(pydantic.ValidationError):
        ExportConfig(tensorrt="yes")
    with pytest.raises(pydantic.ValidationError):
        ExportConfig(check_batch_sizes=[])


@needs_no_tensorrt
def test_tensorrt_modes_without_tensorrt(tmp_path):
    auto = build_engines("auto", {"denoiser": tmp_path / "model.onnx"})
    assert (auto.status, auto.reason) == ("skipped", "skipped: tensorrt not installed")
    assert auto.serving_providers[-1] == "CPUExecutionProvider"
    assert build_engines("off", {}).status == "off"
    with pytest.raises(TensorRTUnavailable, match="tensorrt is not installed"):
        build_engines("require", {"denoiser": tmp_path / "model.onnx"})


@needs_no_tensorrt
def test_export_requiring_tensorrt_fails_before_exporting(tmp_path):
    with pytest.raises(TensorRTUnavailable, match="'require' but tensorrt is not installed"):
        export(
            ExportConfig(tensorrt="require"), str(tmp_path / "no-checkpoint"), str(tmp_path / "out")
        )
    assert not (tmp_path / "out").exists()


def _tensorrt_without_a_cuda_device() -> types.ModuleType:
    """A stand-in `tensorrt` module: it imports, but creating a Builder fails as the real
    bindings do on a node without a usable CUDA device. A stand-in, because TensorRT cannot be
    installed on the CPU test machines (its libraries come from NVIDIA, not a package index)."""

    class Logger:
        WARNING = 2

        def __init__(self, severity: int) -> None:
            pass

    class Builder:
        def __init__(self, logger: Logger) -> None:
            raise TypeError("pybind11::init(): factory function returned nullptr")

    module = types.ModuleType("tensorrt")
    module.__version__ = "10.0.0"  # type: ignore[attr-defined]
    module.Logger = Logger  # type: ignore[attr-defined]
    module.Builder = Builder  # type: ignore[attr-defined]
    return module


def test_tensorrt_build_failure_skips_in_auto_and_raises_in_require(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", _tensorrt_without_a_cuda_device())
    uri, _ = make_checkpoint(tmp_path, "i2i", vae=False)
    # "auto": the ONNX export stands; export.json says why there is no engine.
    result = export(ExportConfig(check_batch_sizes=[1]), uri, str(tmp_path / "auto"))
    trt = read_export(str(tmp_path / "auto"))["tensorrt"]
    assert result.tensorrt.status == trt["status"] == "skipped"
    assert trt["reason"] == (
        "skipped: building the denoiser engine failed: "
        "TypeError: pybind11::init(): factory function returned nullptr"
    )
    assert trt["tensorrt_version"] == "10.0.0" and trt["engines"] == {}
    assert not list((tmp_path / "auto").glob("*.plan"))
    # "require": the failure is the export's failure.
    with pytest.raises(TypeError, match="factory function returned nullptr"):
        export(ExportConfig(check_batch_sizes=[1], tensorrt="require"), uri, str(tmp_path / "req"))
    assert not (tmp_path / "req").exists()


def test_export_json_round_trips_through_json(i2i_pixel_export):
    text = (Path(i2i_pixel_export.export_dir) / "export.json").read_text()
    assert json.loads(text)["format"] == "lumos-export/1"


@pytest.mark.parametrize(
    ("available", "chosen"),
    [
        (
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
            ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        (
            ["CPUExecutionProvider", "CUDAExecutionProvider", "AzureExecutionProvider"],
            ["CUDAExecutionProvider", "CPUExecutionProvider"],
        ),
        (["AzureExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ],
)
def test_select_providers_prefers_tensorrt_then_cuda_then_cpu(available, chosen):
    assert select_providers(available) == chosen


def test_select_providers_needs_cpu():
    with pytest.raises(ValueError, match="no CPUExecutionProvider"):
        select_providers(["CUDAExecutionProvider"])


def test_select_providers_on_this_onnxruntime():
    assert select_providers(ort.get_available_providers())[-1] == "CPUExecutionProvider"


def test_read_export_of_another_format_is_one_clear_error(tmp_path: Path) -> None:
    from lumos.errors import LumosError

    (tmp_path / EXPORT_JSON).write_text('{"format": "lumos-export/0"}')
    with pytest.raises(LumosError, match="re-export the checkpoint"):
        read_export(str(tmp_path))
