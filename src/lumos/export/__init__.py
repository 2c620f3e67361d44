"""ONNX export of a checkpoint (denoiser + VAE decoder), checked on onnxruntime; TensorRT if present."""

from lumos.export.onnx_export import ExportCheckError, ExportResult, export, read_export
from lumos.export.tensorrt import TensorRTResult, TensorRTUnavailable, select_providers

__all__ = [
    "ExportCheckError",
    "ExportResult",
    "TensorRTResult",
    "TensorRTUnavailable",
    "export",
    "read_export",
    "select_providers",
]
