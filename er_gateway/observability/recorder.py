"""Turns a finished request into metrics, an access-log line and a status-page sample."""

from __future__ import annotations

import time
from typing import Any

from .context import RequestInfo
from .logs import Logs, now_text
from .metrics import Metrics
from .recent import Recent


class Recorder:
    """Turns a finished request into metrics, an access-log line and a status-page sample."""

    def __init__(self, logs: Logs, metrics: Metrics, recent: Recent, usage: Any = None) -> None:
        self.logs = logs
        self.metrics = metrics
        self.recent = recent
        self.usage = usage  # usage.UsageLedger: per key, model and day

    def record(self, scope: dict[str, Any], info: RequestInfo, status: int) -> None:
        total = time.perf_counter() - info.start
        route = info.route or scope.get("path", "")
        if info.route:
            m = self.metrics
            m.child(m.requests, route, info.model or "", str(status), info.key_name or "").inc()
            m.child(m.duration, route).observe(total)
            if status == 429:
                m.rate_limited.labels(info.key_name or "").inc()
            self.recent.add(info.model or "-", status, total)
            if self.usage is not None and info.key_name and info.model:
                self.usage.add(info.key_name, info.model, status, info.items, info.tokens)
        client = scope.get("client")
        self.logs.access(
            now_text(),
            info,
            scope.get("method", ""),
            scope.get("path", ""),  # never the query string: it may hold ?api_key=
            status,
            total * 1000,
            f"{client[0]}:{client[1]}" if client else None,
        )
