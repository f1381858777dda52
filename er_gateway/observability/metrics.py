"""Prometheus metrics of the gateway, one registry per process (summed across workers)."""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600)


class Metrics:
    """All gateway metrics. With --workers > 1 the CLI sets PROMETHEUS_MULTIPROC_DIR and every
    worker writes its values there; /metrics then sums them (prometheus-client multiprocess mode)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.requests = Counter(
            "er_requests_total",
            "Requests by route, model, status and key name",
            ["route", "model", "status", "key"],
            registry=r,
        )
        self.duration = Histogram(
            "er_request_duration_seconds",
            "Total request time in the gateway",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream = Histogram(
            "er_upstream_duration_seconds",
            "Time waiting for vLLM",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "er_queue_wait_seconds",
            "Time waiting for a concurrency slot",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "er_in_flight_requests", "Requests upstream now", registry=r, multiprocess_mode="livesum"
        )
        self.waiting = Gauge(
            "er_queued_requests", "Requests waiting for a concurrency slot", registry=r, multiprocess_mode="livesum"
        )
        self.rate_limited = Counter("er_rate_limited_total", "429 answers by key name", ["key"], registry=r)
        self.upstream_errors = Counter(
            "er_upstream_errors_total",
            "Upstream failures by model, replica and kind",
            ["model", "replica", "kind"],
            registry=r,
        )
        self.replica_healthy = Gauge(
            "er_replica_healthy",
            "1 when the replica takes traffic",
            ["model", "replica"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.replica_outstanding = Gauge(
            "er_replica_outstanding",
            "Requests in flight to a replica",
            ["model", "replica"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.tokens = Counter("er_tokens_total", "Tokens reported by vLLM", ["model", "key"], registry=r)
        self.storage_errors = Counter(
            "er_ratelimit_storage_errors_total", "Rate-limit storage (Redis) failures", registry=r
        )
        self.retries = Counter(
            "er_upstream_retries_total", "Requests retried on another replica", ["model"], registry=r
        )
        self.cache_hits = Counter(
            "er_cache_hits_total", "Inputs (rerank: pairs) answered from the result cache", ["model"], registry=r
        )
        self.cache_misses = Counter(
            "er_cache_misses_total",
            "Inputs (rerank: pairs) looked up in the result cache and sent to vLLM",
            ["model"],
            registry=r,
        )
        self.cache_bytes = Gauge(
            "er_cache_bytes", "Bytes the in-memory result cache holds", registry=r, multiprocess_mode="livesum"
        )
        self.coalesced = Histogram(
            "er_coalesced_requests",
            "Requests merged into one upstream call (only merged calls are observed)",
            ["model"],
            buckets=(2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """metric.labels(*labels), cached: prometheus-client's own lookup takes a lock each time."""
        key = (id(metric), labels)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*labels)
        return c

    def exposition(self) -> bytes:
        if self.multiprocess:
            from prometheus_client import multiprocess

            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)  # type: ignore[no-untyped-call]
            return generate_latest(merged)
        return generate_latest(self.registry)
