"""What one request did: its id, key, model, items and where its time went."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any


@dataclass
class RequestInfo:
    """What a request did: routes fill in who and what, the dispatch layer where time went.

    `upstream_ms` and `queue_ms` are wall-clock spans, not sums: while any of the request's
    upstream calls is in flight the time counts once as upstream, else while any waits for a
    concurrency slot as queue. A request split into parts that run at once therefore never
    reports more time away than it took, and `X-Gateway-Overhead-Ms` (total minus both) is
    never negative.
    """

    request_id: str
    start: float
    route: str = ""
    key_name: str | None = None
    model: str | None = None
    upstream_ms: float = 0.0
    queue_ms: float = 0.0
    replica: str | None = None
    retries: int = 0
    items: int | None = None
    tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    trace: Any = None  # tracing.Trace when the client sent a traceparent or tracing exports spans
    _sending: int = 0
    _queued: int = 0
    _mark: float = 0.0

    def _account(self) -> None:
        now = perf_counter()
        if self._sending:
            self.upstream_ms += (now - self._mark) * 1000
        elif self._queued:
            self.queue_ms += (now - self._mark) * 1000
        self._mark = now

    def queued(self, delta: int) -> None:
        """One of the request's calls starts (+1) or stops (-1) waiting for a slot."""
        self._account()
        self._queued += delta

    def sending(self, delta: int) -> None:
        """One of the request's calls goes upstream (+1) or comes back (-1)."""
        self._account()
        self._sending += delta

    @property
    def overhead_ms(self) -> float:
        """Time spent in the gateway itself so far: neither upstream nor waiting for a slot."""
        return (perf_counter() - self.start) * 1000 - self.upstream_ms - self.queue_ms


_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_request_id(incoming: bytes | None) -> str:
    """The client's X-Request-ID if sane, else a process-unique id (random prefix + counter:
    no syscall per request, unlike secrets.token_hex)."""
    if incoming:
        rid = incoming.decode("latin-1")
        if 0 < len(rid) <= 128 and rid.isprintable():
            return rid
    return f"{_ID_PREFIX}{next(_ID_COUNTER):010x}"
