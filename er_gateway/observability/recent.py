"""The last minute of traffic, for the status page."""

from __future__ import annotations

import time
from collections import deque


class Recent:
    """The last minute of requests (or the last 20,000, whichever is shorter) for the status page.

    Bounded so a refresh of /status costs a few milliseconds of event-loop time, not a stall.
    """

    def __init__(self, horizon: float = 60.0, maxlen: int = 20_000) -> None:
        self.horizon = horizon
        self.events: deque[tuple[float, str, int, float]] = deque(maxlen=maxlen)

    def add(self, model: str, status: int, seconds: float) -> None:
        self.events.append((time.monotonic(), model, status, seconds))

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        now = time.monotonic()
        events = list(self.events)
        cutoff = now - self.horizon
        # When the deque is full it covers less than the horizon: divide by what it covers.
        span = self.horizon
        if len(events) == self.events.maxlen and events and events[0][0] > cutoff:
            span = max(now - events[0][0], 1e-3)
        by_model: dict[str, list[tuple[int, float]]] = {}
        for t, model, status, seconds in events:
            if t >= cutoff:
                by_model.setdefault(model, []).append((status, seconds))
        out: dict[str, dict[str, float | int | None]] = {}
        for model, rows in by_model.items():
            lat = sorted(s for _, s in rows)
            n = len(rows)
            out[model] = {
                "requests": n,
                "rps": round(n / span, 3),
                "p50_ms": round(lat[int(0.50 * (n - 1))] * 1000, 2),
                "p95_ms": round(lat[int(0.95 * (n - 1))] * 1000, 2),
                "error_rate": round(sum(1 for st, _ in rows if st >= 500) / n, 4),
                "rate_limited": sum(1 for st, _ in rows if st == 429),
            }
        return out
