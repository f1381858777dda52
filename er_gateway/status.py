"""Health and status views: /health, /status.json and the gauges refreshed for /metrics."""

from __future__ import annotations

import time
from typing import Any

from .cache import ResultCache
from .catalog import Catalog
from .concurrency import FairGate
from .errors import GatewayError
from .observability import Metrics, Recent
from .upstream import Upstreams


def health(catalog: Catalog, *, admin: bool = False, model: str | None = None) -> tuple[int, dict[str, Any]]:
    """Readiness per model and replica; replica URLs only for an admin key.

    200 while at least one model can serve (a host may serve only a reranker, and one model
    being down must not take the other out of a load balancer); 503 when none can. With
    `model`, that model's readiness alone: 200 if it can serve, 503 if not, 404 if unknown.
    """
    models: dict[str, Any] = {}
    all_up = True
    for name, pool in catalog.upstreams.pools.items():
        states = [r.state(i, with_url=admin) for i, r in enumerate(pool.replicas)]
        ready = any(s["healthy"] for s in states)
        models[name] = {"kind": pool.model.kind, "ready": ready, "replicas": states}
        all_up = all_up and all(s["healthy"] for s in states)
    if model is not None:
        config = catalog.lookup(model)
        if config is None:
            e: GatewayError = catalog.not_found(model)
            return 404, e.payload()
        entry = models[config.name]
        return (200 if entry["ready"] else 503), {"model": config.name, **entry}
    serving = any(m["ready"] for m in models.values())
    status = "healthy" if all_up and serving else "degraded" if serving else "unhealthy"
    return (200 if serving else 503), {"status": status, "model_loaded": serving, "models": models}


def snapshot(
    catalog: Catalog, gate: FairGate, recent: Recent, *, shared_limits: bool, admin: bool = False
) -> dict[str, Any]:
    """Everything the /status page shows: health plus the last minute of traffic."""
    _, body = health(catalog, admin=admin)
    traffic = recent.summary()
    for name, entry in body["models"].items():
        entry["traffic"] = traffic.get(name)
    return {
        **body,
        "in_flight": gate.in_flight,
        "queued": gate.waiting,
        "max_concurrency": gate.limit,
        "ratelimit_storage": "redis" if shared_limits else "memory",
        "time": time.time(),
    }


def refresh_gauges(m: Metrics, gate: FairGate, upstreams: Upstreams, cache: ResultCache | None = None) -> None:
    m.in_flight.set(gate.in_flight)
    if cache is not None:
        m.cache_bytes.set(cache.size)
    m.waiting.set(gate.waiting)
    now = time.monotonic()
    # Replicas come and go (DNS discovery, reloads): only the current ones are reported.
    m.replica_healthy.clear()
    m.replica_outstanding.clear()
    for name, pool in upstreams.pools.items():
        for i, r in enumerate(pool.replicas):
            m.replica_healthy.labels(name, str(i)).set(1 if r.healthy and now >= r.ejected_until else 0)
            m.replica_outstanding.labels(name, str(i)).set(r.outstanding)
