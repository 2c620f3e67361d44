"""Evaluation: exact attribute checks, PSNR / SSIM, the HTML report and the promotion gate.

Heavy imports (torch, the model) happen inside `evaluate.evaluate`, so the gate and the metrics
stay cheap to import.
"""

from lumos.evaluation.attributes import Measurement, attribute_accuracy, measure
from lumos.evaluation.gate import GateError, decide
from lumos.evaluation.image_metrics import psnr, ssim

__all__ = ["GateError", "Measurement", "attribute_accuracy", "decide", "measure", "psnr", "ssim"]
