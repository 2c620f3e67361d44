"""TensorRT engines from the exported ONNX graphs, and execution-provider choice for serving.

TensorRT is optional: it cannot be installed from the package registries (its libraries come from
NVIDIA's site), so the GPU image brings it. `build_engine` detects it (`import tensorrt`):

    mode "off"      do nothing (status "off")
    mode "auto"     build when TensorRT is importable, else record "skipped: tensorrt not installed";
                    a build that fails (no usable CUDA device, a graph TensorRT cannot parse) is
                    recorded as "skipped: <error>" and the ONNX export stands
    mode "require"  build, or raise `TensorRTUnavailable` saying how to get TensorRT

Serving never needs a TensorRT engine file: onnxruntime's TensorrtExecutionProvider (in the
onnxruntime-gpu build) compiles the ONNX graph itself. `select_providers` picks the best provider
onnxruntime offers: TensorRT > CUDA > CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from lumos.configs.export import TensorRTMode
from lumos.errors import LumosError

# Best first. onnxruntime falls back along this list for nodes a provider cannot run.
PROVIDER_PREFERENCE = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "CPUExecutionProvider",
)


class TensorRTUnavailable(LumosError, RuntimeError):
    """TensorRT was required but cannot be used here."""


class TensorRTResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["built", "skipped", "off"]
    reason: str  # "" when built; why not otherwise, e.g. "skipped: tensorrt not installed"
    tensorrt_version: str | None = None
    engines: dict[str, str] = {}  # graph name -> engine file name (next to the ONNX file)
    onnxruntime_providers: list[str] = []  # what this onnxruntime build offers
    serving_providers: list[str] = []  # what `select_providers` picks from them


def select_providers(available: Sequence[str]) -> list[str]:
    """The providers a serving session should use, best first: TensorRT > CUDA > CPU.

    Providers outside the preference list (e.g. Azure) are never chosen. CPU is always last, as the
    fallback for nodes the accelerated providers cannot run.
    """
    chosen = [p for p in PROVIDER_PREFERENCE if p in available]
    if "CPUExecutionProvider" not in chosen:
        raise ValueError(
            f"onnxruntime offers no CPUExecutionProvider (available: {list(available)}); "
            "the onnxruntime installation is broken: reinstall onnxruntime or onnxruntime-gpu"
        )
    return chosen


def onnxruntime_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def tensorrt_version() -> str | None:
    """TensorRT's version when `import tensorrt` works, else None."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(getattr(tensorrt, "__version__", "unknown"))


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    min_batch: int = 1,
    opt_batch: int = 2,
    max_batch: int = 8,
    fp16: bool = True,
    workspace_gib: float = 8.0,
) -> None:
    """Build and serialize a TensorRT engine for an ONNX graph whose inputs have a dynamic batch dim 0.

    One optimization profile covers batches `min_batch..max_batch` (CFG doubles the batch: the
    denoiser runs at 2x the number of images). Raises `TensorRTUnavailable` without TensorRT and
    `RuntimeError` with the parser's messages when TensorRT cannot parse or build the graph.
    """
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailable(
            "tensorrt is not installed: use the GPU image (docker/) that ships TensorRT, "
            "or set export.tensorrt to 'auto' or 'off'"
        ) from err
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(
            f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
        )

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch (the only mode in TensorRT 10)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves external weight files (model.onnx.data) next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = list(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise RuntimeError(
                f"input {tensor.name!r} of {onnx_path} has dynamic non-batch dims {shape}: "
                "only the batch dim may be dynamic"
            )
        profile.set_shape(
            tensor.name,
            [min_batch, *shape[1:]],
            [opt_batch, *shape[1:]],
            [max_batch, *shape[1:]],
        )
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(
            f"TensorRT failed to build an engine for {onnx_path} (see its log above)"
        )
    Path(engine_path).write_bytes(bytes(serialized))


def build_engines(
    mode: TensorRTMode,
    onnx_files: dict[str, Path],
    *,
    max_batch: int = 8,
) -> TensorRTResult:
    """Build one engine per graph (`name -> model.onnx path`) as `mode` says; see the module doc.

    Engines are written next to their ONNX file as `<stem>.plan`.
    """
    available = onnxruntime_providers()
    serving = select_providers(available)

    def result(**fields: Any) -> TensorRTResult:
        return TensorRTResult(onnxruntime_providers=available, serving_providers=serving, **fields)

    if mode == "off":
        return result(status="off", reason="off: export.tensorrt is 'off'")
    version = tensorrt_version()
    if version is None:
        if mode == "require":
            raise TensorRTUnavailable(
                "export.tensorrt is 'require' but tensorrt is not installed: run the export in "
                "the GPU image (docker/) that ships TensorRT, or set export.tensorrt to 'auto'"
            )
        return result(status="skipped", reason="skipped: tensorrt not installed")
    engines: dict[str, str] = {}
    for name, onnx_path in onnx_files.items():
        engine_path = onnx_path.with_suffix(".plan")
        try:
            build_engine(onnx_path, engine_path, max_batch=max_batch)
        except Exception as err:
            if mode == "require":
                raise
            # e.g. the GPU image on a node without a usable CUDA device: trt.Builder fails with
            # "TypeError: pybind11::init(): factory function returned nullptr". The engines are
            # optional (onnxruntime's TensorRT provider compiles the ONNX graph itself).
            for built in engines.values():
                onnx_path.with_name(built).unlink(missing_ok=True)
            return result(
                status="skipped",
                reason=f"skipped: building the {name} engine failed: {type(err).__name__}: {err}",
                tensorrt_version=version,
            )
        engines[name] = engine_path.name
    return result(status="built", reason="", tensorrt_version=version, engines=engines)
