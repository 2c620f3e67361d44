"""Training metrics for Prometheus, pushed to a Pushgateway.

A training job is a batch job: Prometheus cannot scrape it reliably (pods come and go, a short
fine-tune may end between two scrapes), so the loop *pushes* its gauges to a Pushgateway when
one is configured. Each `TrainingMetrics` owns its own `CollectorRegistry`, so two runs in one
process (tests, a pipeline run in-process) never collide in the global registry.

    metrics = TrainingMetrics(job="lumos-train", run="i2i", pushgateway_url="http://pgw:9091")
    metrics.update(step=100, loss=0.12, images_per_second=850.0)
    metrics.push()          # a failure is a warning: monitoring must never stop a training run
"""

from __future__ import annotations

import warnings

import torch
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway


class TrainingMetrics:
    """Gauges of one training run: step, loss, images/s and peak GPU memory."""

    def __init__(
        self,
        job: str = "lumos-train",
        run: str = "",
        head: str = "",
        pushgateway_url: str | None = None,
    ) -> None:
        self.job = job
        # The grouping key separates runs on the gateway: a new run of the same head replaces
        # the previous run's values instead of mixing with them.
        self.grouping_key = {"run": run or "default", "head": head or "unknown"}
        self.pushgateway_url = pushgateway_url
        self.registry = CollectorRegistry()
        self.step = Gauge("lumos_train_step", "Optimizer steps done", registry=self.registry)
        self.loss = Gauge(
            "lumos_train_loss", "Diffusion loss, mean since the last log", registry=self.registry
        )
        self.images_per_second = Gauge(
            "lumos_train_images_per_second",
            "Training throughput over all processes, in images (frames) per second",
            registry=self.registry,
        )
        self.gpu_memory_bytes = Gauge(
            "lumos_train_gpu_memory_bytes",
            "Peak GPU memory allocated by this process (0 on CPU)",
            registry=self.registry,
        )
        self.push_failures = 0

    def update(self, step: int, loss: float, images_per_second: float) -> None:
        self.step.set(step)
        self.loss.set(loss)
        self.images_per_second.set(images_per_second)
        self.gpu_memory_bytes.set(gpu_memory_bytes())

    def push(self) -> bool:
        """Push every gauge to the Pushgateway; False (with a warning) if that failed."""
        if not self.pushgateway_url:
            return False
        try:
            push_to_gateway(
                self.pushgateway_url,
                job=self.job,
                registry=self.registry,
                grouping_key=self.grouping_key,
                timeout=5,
            )
            return True
        except Exception as err:  # network errors of any kind: report, keep training
            self.push_failures += 1
            warnings.warn(
                f"could not push training metrics to the Pushgateway at {self.pushgateway_url}: "
                f"{type(err).__name__}: {err} (training goes on)",
                RuntimeWarning,
                stacklevel=2,
            )
            return False


def gpu_memory_bytes() -> int:
    """Peak memory allocated on the current CUDA device since the start, 0 without CUDA."""
    if not torch.cuda.is_available():
        return 0
    return int(torch.cuda.max_memory_allocated())
