"""The predictor's Prometheus metrics, exposed at KServe's `/metrics` (the default registry).

    from lumos.serving.metrics import PREDICTOR_METRICS as m
    m.requests.labels(model="lumos-t2i", protocol="v2").inc()

A PodMonitor (manifests/base/serving-podmonitor.yaml) scrapes them; `lumos.serving.rollout` reads
the same series from a canary to decide whether it is promoted or rolled back:

    lumos_serving_requests_total{model, protocol}           requests that reached the model
    lumos_serving_errors_total{model, reason}               failed requests, by reason (ERROR_REASONS)
    lumos_serving_request_latency_seconds{model}            histogram, queue wait included
    lumos_serving_batch_size{model}                         histogram of instances per model call
    lumos_serving_queue_depth{model}                        instances waiting for the model
    lumos_serving_bad_outputs_total{model, reason}          generated images failing the output check
    lumos_serving_process{process_id}                       1, naming this process (PROCESS_ID)

A canary is judged on two scrapes of its route: `process_id` tells whether both reached the same
pod (counters of two pods cannot be subtracted).
"""

from __future__ import annotations

import uuid

from prometheus_client import Counter, Gauge, Histogram

# invalid_input: the client's fault (4xx), not counted against a canary; overloaded: 429/503;
# bad_output: the model produced non-finite values (500); internal: anything else (500).
ERROR_REASONS = ("invalid_input", "overloaded", "bad_output", "internal")
MODEL_ERROR_REASONS = ("bad_output", "internal")  # what a canary's error rate counts
BAD_OUTPUT_REASONS = ("non_finite", "blank")

# Latency buckets from 10 ms (a small GPU batch) to 2 min (a CPU XL sample).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
PROCESS_ID = uuid.uuid4().hex[:12]  # one per server process (a pod, or a restart of one)


class PredictorMetrics:
    """The series above, registered once per process."""

    def __init__(self) -> None:
        self.requests = Counter(
            "lumos_serving_requests", "requests that reached the model", ["model", "protocol"]
        )
        self.errors = Counter(
            "lumos_serving_errors", "failed requests by reason", ["model", "reason"]
        )
        self.latency = Histogram(
            "lumos_serving_request_latency_seconds",
            "request latency in the predictor, queue wait included",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "lumos_serving_batch_size", "instances per model call", ["model"], buckets=BATCH_BUCKETS
        )
        self.queue_depth = Gauge(
            "lumos_serving_queue_depth", "instances waiting for the model", ["model"]
        )
        self.bad_outputs = Counter(
            "lumos_serving_bad_outputs", "generated images failing the output check",
            ["model", "reason"],
        )  # fmt: skip
        self.process = Gauge("lumos_serving_process", "this predictor process", ["process_id"])
        self.process.labels(process_id=PROCESS_ID).set(1)


PREDICTOR_METRICS = PredictorMetrics()
