"""Export a checkpoint's EMA denoiser (and the VAE decoder) to ONNX, checked on onnxruntime.

    result = export(ExportConfig(), "s3://lumos/runs/r1/checkpoints/t2i", "s3://lumos/runs/r1/export/t2i")

What is written to `out_uri` (self-describing: serving reads everything it needs from it):

    model.onnx (+ model.onnx.data)       the EMA denoiser, dynamic batch
    decoder.onnx (+ decoder.onnx.data)   the SD VAE decoder (latents -> pixels); absent in pixel space
    export.json                          head, model / encoders config, checkpoint lineage, diffusion
                                         settings, per-graph inputs / outputs, tolerance and the
                                         measured differences, TensorRT status
    model.plan, decoder.plan             TensorRT engines, only when TensorRT is installed

The denoiser graph takes LumosDiT's keyword arguments as positional inputs, named as in the
forward contract: `x, t, cond` then, as the head uses them, `cond_mask, frame_cond, concat_latent,
micro_cond`, and always `force_drop` (classifier-free guidance runs the conditional and the
unconditional rows in one batch; the null embedding lives inside the graph). One output, `out`.

Each graph is exported with `torch.onnx.export(..., dynamo=True)` on CPU in float32 and run on
onnxruntime CPU against PyTorch on fresh random inputs at `check_batch_sizes`. The tolerance is
elementwise, as `numpy.allclose`: |onnx - torch| <= atol + rtol * |torch|, default atol 1e-4 and
rtol 1e-4 on fp32 (the dynamo exporter measured ~1e-6 on an SD3-style transformer). A graph over
tolerance fails the export with the measured difference.
"""

from __future__ import annotations

import inspect
import json
import platform
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from lumos.configs.export import ExportConfig
from lumos.errors import LumosError
from lumos.export.tensorrt import (
    TensorRTResult,
    TensorRTUnavailable,
    build_engines,
    tensorrt_version,
)
from lumos.tempdirs import OwnedTemporaryDirectory

EXPORT_FORMAT = "lumos-export/1"
DENOISER_FILE = "model.onnx"
DECODER_FILE = "decoder.onnx"
EXPORT_JSON = "export.json"
OUTPUT_NAME = "out"

TOLERANCE_RULE = "|onnx - torch| <= atol + rtol * |torch| elementwise (numpy.allclose), fp32"


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | str]  # "batch" for the dynamic dim
    dtype: str  # numpy dtype name: float32, int64, bool


class GraphReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str  # the .onnx file
    files: list[str]  # the .onnx file and its external weight file, if any
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_abs_diff: dict[str, float]  # check batch size -> max |onnx - torch|
    export_seconds: float


class ExportResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    export_uri: str
    head: str
    files: list[str]
    max_abs_diff: dict[str, float]  # graph name -> worst difference over the check batches
    tolerance: dict[str, Any]  # atol, rtol, rule
    decoder: str  # "exported" or why not
    tensorrt: TensorRTResult


class ExportFormatError(LumosError, ValueError):
    """An export.json this version of lumos cannot read (another format, or not an export)."""


class ExportCheckError(LumosError, RuntimeError):
    """The ONNX graph does not reproduce PyTorch within tolerance."""


# ----------------------------------------------------------------------------- denoiser graph


def denoiser_input_names(model_config: dict) -> list[str]:
    """The denoiser graph's inputs, in order, for a LumosDiT config (which head inputs it uses)."""
    names = ["x", "t", "cond"]
    if model_config["cond_kind"] == "text":
        names.append("cond_mask")
    if model_config["frame_embed"] != "none":
        names.append("frame_cond")
    if model_config["concat_latent_channels"] > 0:
        names.append("concat_latent")
    if model_config["micro_conditions"]:
        names.append("micro_cond")
    names.append("force_drop")
    return names


def denoiser_input_shapes(model_config: dict) -> dict[str, tuple[list[int | str], str]]:
    """name -> (shape with "batch" for the dynamic dim, numpy dtype name)."""
    c, s, f = model_config["in_channels"], model_config["input_size"], model_config["num_frames"]
    x_shape: list[int | str] = ["batch", c, s, s] if f == 1 else ["batch", f, c, s, s]
    if model_config["cond_kind"] == "text":
        cond_shape: list[int | str] = [
            "batch",
            model_config["cond_tokens"],
            model_config["cond_dim"],
        ]
    else:
        cond_shape = ["batch", model_config["cond_dim"]]
    shapes: dict[str, tuple[list[int | str], str]] = {
        "x": (x_shape, "float32"),
        "t": (["batch"], "int64"),
        "cond": (cond_shape, "float32"),
        "cond_mask": (["batch", model_config["cond_tokens"]], "bool"),
        "frame_cond": (
            (["batch", f], "int64")
            if model_config["frame_embed"] == "index"
            else (["batch", f, model_config["camera_dim"]], "float32")
        ),
        "concat_latent": (["batch", model_config["concat_latent_channels"], s, s], "float32"),
        "micro_cond": (["batch", 2], "float32"),
        "force_drop": (["batch"], "bool"),
    }
    return {name: shapes[name] for name in denoiser_input_names(model_config)}


def random_denoiser_inputs(model_config: dict, batch: int, generator) -> dict[str, Any]:
    """Fresh random torch inputs of the denoiser graph at `batch` (what the check feeds both sides)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, (shape, dtype) in denoiser_input_shapes(model_config).items():
        dims = [batch if d == "batch" else int(d) for d in shape]
        if name == "t":
            out[name] = torch.randint(0, 1000, dims, generator=generator)
        elif name == "frame_cond" and dtype == "int64":
            out[name] = torch.randint(0, model_config["num_frames"], dims, generator=generator)
        elif name == "cond_mask":
            mask = torch.rand(dims, generator=generator) < 0.7
            mask[:, 0] = True  # a row with no token attended has no defined attention output
            out[name] = mask
        elif name == "micro_cond":
            out[name] = torch.randint(128, 1025, dims, generator=generator).float()
        elif name == "force_drop":
            out[name] = torch.rand(dims, generator=generator) < 0.5
        else:
            out[name] = torch.randn(dims, generator=generator)
    return out


def _denoiser_graph_class():
    import torch

    class DenoiserGraph(torch.nn.Module):
        """LumosDiT with its keyword arguments fixed into positional graph inputs (ONNX has no kwargs)."""

        def __init__(self, model: torch.nn.Module, input_names: list[str]):
            super().__init__()
            self.model = model
            self.input_names = list(input_names)

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            kwargs = dict(zip(self.input_names, inputs, strict=True))
            x, t, cond = kwargs.pop("x"), kwargs.pop("t"), kwargs.pop("cond")
            cond_mask = kwargs.pop("cond_mask", None)
            return self.model(x, t, cond, cond_mask, **kwargs)  # (B, [F,] 2C, H, W)

    return DenoiserGraph


def denoiser_graph(model, model_config: dict):
    """The export wrapper around a LumosDiT (eval mode)."""
    return _denoiser_graph_class()(model, denoiser_input_names(model_config)).eval()


# ----------------------------------------------------------------------------- decoder graph


def _decoder_graph_class():
    import torch

    class DecoderGraph(torch.nn.Module):
        """Scaled latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], as FrozenEncoders decodes."""

        def __init__(self, vae: torch.nn.Module, scaling_factor: float):
            super().__init__()
            self.vae: Any = vae  # diffusers AutoencoderKL
            self.scaling_factor = scaling_factor

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            images = self.vae.decode(latents / self.scaling_factor).sample  # (B, 3, H, W)
            return images.clamp(-1, 1)  # (B, 3, H, W)

    return DecoderGraph


def encoders_config(meta_encoders: dict):
    """The checkpoint's recorded encoders as an `EncodersConfig` (validated, strict)."""
    from lumos.configs.encoders import EncodersConfig

    # FrozenEncoders.describe() wraps the config as {"config": {...}}; accept both spellings.
    if set(meta_encoders) == {"config"}:
        meta_encoders = meta_encoders["config"]
    return EncodersConfig.model_validate(meta_encoders)


# ----------------------------------------------------------------------------- export and check


def export_graph(
    module,
    inputs: dict[str, Any],
    path: Path,
    *,
    opset: int,
    dynamic_batch: bool,
) -> list[str]:
    """torch.onnx.export (dynamo) of a module with positional `inputs`; returns the files written."""
    import torch

    names = list(inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=4096)
        per_input = tuple({0: batch} for _ in names)
        # A `forward(*inputs)` takes one argument, the tuple: its spec is nested one level deeper.
        params = inspect.signature(module.forward).parameters.values()
        varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
        dynamic_shapes = (per_input,) if varargs else per_input
    with torch.no_grad(), warnings.catch_warnings():
        # Known noise of torch 2.13's exporter (pytree deprecation, axis renaming); not our inputs.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
        program = torch.onnx.export(
            module,
            tuple(inputs.values()),
            dynamo=True,
            input_names=names,
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            external_data=True,
            verbose=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {path.name}")
    program.save(str(path), external_data=True)
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def onnx_tensor_specs(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX file as recorded in the graph (dynamic dims by name)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims: list[int | str] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        return TensorSpec(name=value.name, shape=dims, dtype=dtype)

    return [spec(v) for v in model.graph.input], [spec(v) for v in model.graph.output]


def check_graph(
    module,
    path: Path,
    make_inputs: Callable[[int], dict[str, Any]],
    batch_sizes: list[int],
    *,
    atol: float,
    rtol: float,
) -> dict[str, float]:
    """Run the ONNX file on onnxruntime CPU and the module in PyTorch on the same fresh inputs.

    Returns `batch -> max |onnx - torch|`; raises ExportCheckError past the tolerance.
    """
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diffs: dict[str, float] = {}
    for batch in batch_sizes:
        inputs = make_inputs(batch)
        with torch.no_grad():
            expected = module(*inputs.values()).float().numpy()
        (actual,) = session.run([OUTPUT_NAME], {k: v.numpy() for k, v in inputs.items()})
        if actual.shape != expected.shape:
            raise ExportCheckError(
                f"{path.name}: onnxruntime output shape {actual.shape} != PyTorch {expected.shape} "
                f"at batch {batch}"
            )
        diff = np.abs(actual - expected)
        diffs[str(batch)] = float(diff.max())
        excess = diff - (atol + rtol * np.abs(expected))
        if not np.isfinite(actual).all() or (excess > 0).any():
            raise ExportCheckError(
                f"{path.name} does not match PyTorch at batch {batch}: max |onnx - torch| = "
                f"{diffs[str(batch)]:.3e}, tolerance atol={atol:g} rtol={rtol:g} "
                f"({TOLERANCE_RULE}); {int((excess > 0).sum())} of {diff.size} elements over"
            )
    return diffs


def _export_and_check(
    module,
    make_inputs: Callable[[int], dict[str, Any]],
    path: Path,
    cfg: ExportConfig,
) -> GraphReport:
    start = time.perf_counter()
    # Export at batch 2, check at other batches: a batch baked into the graph shows up in the check.
    files = export_graph(
        module, make_inputs(2), path, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch
    )
    seconds = time.perf_counter() - start
    batches = cfg.check_batch_sizes if cfg.dynamic_batch else [2]
    diffs = check_graph(module, path, make_inputs, batches, atol=cfg.atol, rtol=cfg.rtol)
    inputs, outputs = onnx_tensor_specs(path)
    return GraphReport(
        file=path.name,
        files=files,
        inputs=inputs,
        outputs=outputs,
        max_abs_diff=diffs,
        export_seconds=round(seconds, 3),
    )


def _decoder_info(encoders_cfg) -> dict[str, Any]:
    """How serving turns latents into pixels in [-1, 1], from the checkpoint's encoders."""
    if encoders_cfg.vae.kind == "pixel":
        # Pixel space: the "latents" are the image itself in [-1, 1]; nothing to decode.
        return {"kind": "pixel", "file": None}
    return {"kind": "vae", "scaling_factor": encoders_cfg.vae.scaling_factor, "file": None}


def _diffusion_settings(meta: dict, prediction_type: str) -> dict[str, Any]:
    """The noise schedule the model was trained with (what the sampler needs), from the checkpoint."""
    from lumos.diffusion.gaussian import GaussianDiffusion

    train_cfg = meta.get("train_config") or {}
    recorded = train_cfg.get("diffusion") if isinstance(train_cfg, dict) else None
    default = GaussianDiffusion()
    settings = {
        "num_timesteps": default.num_timesteps,
        "beta_start": default.beta_start,
        "beta_end": default.beta_end,
    }
    if isinstance(recorded, dict):
        settings.update({k: recorded[k] for k in settings if k in recorded})
    return {**settings, "beta_schedule": "linear", "prediction": prediction_type}


def export(cfg: ExportConfig, checkpoint_uri: str, out_uri: str) -> ExportResult:
    """Export the checkpoint's EMA denoiser (and VAE decoder) to `out_uri`; see the module doc."""
    import onnxruntime as ort
    import torch

    from lumos.checkpoints import load_checkpoint
    from lumos.storage import Storage, reporting_disk_full

    if cfg.tensorrt == "require" and tensorrt_version() is None:
        # Fail before minutes of export, not after.
        raise TensorRTUnavailable(
            "export.tensorrt is 'require' but tensorrt is not installed: run the export in the "
            "GPU image (docker/) that ships TensorRT, or set export.tensorrt to 'auto'"
        )
    loaded = load_checkpoint(checkpoint_uri, raw=False)
    ema, meta = loaded.ema_model, loaded.meta
    head = meta["head"]
    model_config = dict(ema.config)
    # from_pretrained records the directory it read: for a checkpoint in an object store, a
    # temporary copy that is gone after this run. The checkpoint's own weights are the source.
    model_config["_name_or_path"] = Storage.from_uri(loaded.uri).key_uri("transformer_ema")
    ema = ema.cpu().float().eval()
    generator = torch.Generator().manual_seed(cfg.seed)

    graphs: dict[str, GraphReport] = {}
    decoder_status = "off: export.export_decoder is false"
    # The graphs hold at least the float32 weights: a full temporary disk says so, naming it.
    weights = sum(t.numel() * 4 for t in ema.state_dict().values())
    with (
        OwnedTemporaryDirectory("lumos-export-") as tmp,
        reporting_disk_full(tmp, weights, at_least=True),
    ):
        tmp_dir = Path(tmp)
        denoiser = denoiser_graph(ema, model_config)
        graphs["denoiser"] = _export_and_check(
            denoiser,
            lambda b: random_denoiser_inputs(model_config, b, generator),
            tmp_dir / DENOISER_FILE,
            cfg,
        )

        from lumos.encoders import FrozenEncoders

        encoders_cfg = encoders_config(meta["encoders"])
        decoder_info = _decoder_info(encoders_cfg)
        if cfg.export_decoder and decoder_info["kind"] == "vae":
            # The decoder is exported in float32 whatever dtype the encoders run in.
            encoders = FrozenEncoders(encoders_cfg.model_copy(update={"dtype": "float32"}))
            decoder = _decoder_graph_class()(encoders.vae, encoders_cfg.vae.scaling_factor).eval()
            channels, size = model_config["in_channels"], model_config["input_size"]
            graphs["decoder"] = _export_and_check(
                decoder,
                lambda b: {"latents": torch.randn(b, channels, size, size, generator=generator)},
                tmp_dir / DECODER_FILE,
                cfg,
            )
            decoder_info["file"] = DECODER_FILE
            decoder_status = "exported"
        elif decoder_info["kind"] == "pixel":
            decoder_status = (
                "none: pixel-space model, images are the latents (no decoder to export)"
            )

        worst_diffs = {name: max(r.max_abs_diff.values()) for name, r in graphs.items()}
        onnx_files = {name: tmp_dir / report.file for name, report in graphs.items()}
        trt = build_engines(cfg.tensorrt, onnx_files, max_batch=cfg.tensorrt_max_batch)

        export_json = {
            "format": EXPORT_FORMAT,
            "head": head,
            "model_config": model_config,
            "encoders": encoders_cfg.model_dump(mode="json"),
            "decoder": decoder_info,
            "diffusion": _diffusion_settings(meta, model_config.get("prediction_type", "epsilon")),
            "checkpoint": {
                "uri": loaded.uri,
                "step": meta.get("step"),
                "parent": meta.get("parent"),
                "data": meta.get("data"),
            },
            "graphs": {name: report.model_dump() for name, report in graphs.items()},
            # graph -> worst difference over the check batches (the run summary shows it)
            "max_abs_diff": worst_diffs,
            "tolerance": {"atol": cfg.atol, "rtol": cfg.rtol, "rule": TOLERANCE_RULE},
            "tensorrt": trt.model_dump(),
            "export_config": cfg.model_dump(),
            "versions": {
                "torch": torch.__version__,
                "onnxruntime": ort.__version__,
                "python": platform.python_version(),
            },
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp_dir / EXPORT_JSON).write_text(json.dumps(export_json, indent=2, default=str))

        out = Storage.from_uri(out_uri)
        files = sorted(p.name for p in tmp_dir.iterdir())
        # export.json last: a reader that finds it finds every graph it names.
        for name in files:
            if name != EXPORT_JSON:
                out.upload_file(tmp_dir / name, name)
        out.upload_file(tmp_dir / EXPORT_JSON, EXPORT_JSON)

    return ExportResult(
        export_uri=out.uri,
        head=head,
        files=files,
        max_abs_diff=worst_diffs,
        tolerance={"atol": cfg.atol, "rtol": cfg.rtol, "rule": TOLERANCE_RULE},
        decoder=decoder_status,
        tensorrt=trt,
    )


def read_export(export_uri: str) -> dict:
    """The export.json of an export, checked for format."""
    from lumos.storage import Storage

    meta = Storage.from_uri(export_uri).read_json(EXPORT_JSON)
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportFormatError(
            f"{export_uri}/{EXPORT_JSON} has format {meta.get('format')!r}, expected "
            f"{EXPORT_FORMAT!r}: re-export the checkpoint with this version of lumos"
        )
    return meta
