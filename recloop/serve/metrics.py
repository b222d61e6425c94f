"""Prometheus metrics of one service process (its own registry, so tests can run several)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

# Latency buckets around the targets (p99 under 25 ms / 50 ms), fine below 10 ms.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.035, 0.05, 0.075,
    0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Histogram(
            "recloop_request_seconds",
            "HTTP request latency by route template and status code",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "recloop_batch_size", "requests per micro-batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "recloop_batch_seconds",
            "encode + top-k time per micro-batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter("recloop_cache_hits", "result cache hits", registry=r)
        self.cache_misses = Counter("recloop_cache_misses", "result cache misses", registry=r)
        self.fallbacks = Counter(
            "recloop_fallbacks", "answers from the popularity fallback", registry=r
        )
        self.rejected = Counter(
            "recloop_rejected", "requests refused with 503 (queue full)", registry=r
        )
        self.events = Counter("recloop_events", "events accepted by POST /v1/events", registry=r)
        self.model_swaps = Counter("recloop_model_swaps", "hot swaps of the model", registry=r)
        self.queue_depth = Gauge("recloop_queue_depth", "requests waiting for a batch", registry=r)
        self.state_connected = Gauge(
            "recloop_state_connected", "1 when the state store backend is reachable", registry=r
        )
        self.model = Info("recloop_model", "the model version being served", registry=r)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).observe(seconds)

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def set_model(self, version: str) -> None:
        self.model.info({"version": version})

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4  # what scrapers negotiate
