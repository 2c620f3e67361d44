"""Export's config: the ONNX opset, the check against PyTorch and whether TensorRT is built.

    ExportConfig(atol=1e-3, tensorrt="off")

Read by `lumos.export.onnx_export.export`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# off: no engines; auto: build when TensorRT is importable; require: fail without it
# (lumos.export.tensorrt).
TensorRTMode = Literal["auto", "off", "require"]


class ExportConfig(BaseModel):
    """How to export and check. Defaults are the production settings."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    opset: int = Field(18, ge=18, description="ONNX opset (the dynamo exporter needs >= 18)")
    dynamic_batch: bool = Field(True, description="batch dim 0 of every input is dynamic")
    atol: float = Field(1e-4, gt=0, description="absolute tolerance, onnxruntime vs PyTorch")
    rtol: float = Field(1e-4, ge=0, description="relative tolerance, onnxruntime vs PyTorch")
    export_decoder: bool = Field(True, description="also export the SD VAE decoder")
    tensorrt: TensorRTMode = Field(
        "auto", description="auto: build engines when TensorRT is installed; require: fail without"
    )
    tensorrt_max_batch: int = Field(8, ge=1, description="largest batch of the TensorRT profile")
    check_batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 3],
        description="batch sizes of the onnxruntime check (differ from the export batch, 2)",
    )
    seed: int = Field(0, description="seed of the random check inputs")

    @field_validator("check_batch_sizes")
    @classmethod
    def _check_batches(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"check_batch_sizes must be a non-empty list of batches >= 1, got {v}")
        return v
