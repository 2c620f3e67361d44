"""Prometheus metrics of an ingest run, pushed to a Pushgateway when one is configured."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class IngestMetrics:
    """Prometheus counters for one run; pushed to a Pushgateway when configured."""

    def __init__(self, pushgateway_url: str | None, run_id: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.url = pushgateway_url
        self.run_id = run_id
        self.registry = CollectorRegistry()
        self.seen = Counter("lumos_ingest_objects_seen", "Objects listed", registry=self.registry)
        self.ingested = Counter(
            "lumos_ingest_objects_ingested", "Images written to shards", registry=self.registry
        )
        self.duplicate = Counter(
            "lumos_ingest_objects_duplicate", "Duplicates", ["kind"], registry=self.registry
        )
        self.rejected = Counter(
            "lumos_ingest_objects_rejected", "Rejected objects", ["reason"], registry=self.registry
        )
        self.bytes_read = Counter(
            "lumos_ingest_bytes_read", "Bytes read from the source", registry=self.registry
        )
        self.bytes_per_second = Gauge(
            "lumos_ingest_bytes_per_second", "Source read throughput", registry=self.registry
        )
        self.images_per_second = Gauge(
            "lumos_ingest_images_per_second", "Images processed per second", registry=self.registry
        )
        self._last_push = time.monotonic()

    def push(self, force: bool = False) -> None:
        if not self.url or (not force and time.monotonic() - self._last_push < 15):
            return
        from prometheus_client import push_to_gateway

        self._last_push = time.monotonic()
        try:
            push_to_gateway(
                self.url,
                job="lumos-ingest",
                grouping_key={"run": self.run_id},
                registry=self.registry,
            )
        except Exception as err:  # metrics are best effort; the ingest itself must not fail
            log.warning("could not push ingest metrics to %s: %s", self.url, err)
