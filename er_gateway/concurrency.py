"""The concurrency cap on upstream requests, shared fairly between keys.

At most `limit` upstream requests run at once and at most `per_key` of them belong to one
key, so one key can never hold every slot. When slots are short, waiting requests queue per
key and a freed slot goes to the waiting key that holds the fewest slots (ties: the key that
has waited longest for its turn). A key's backlog therefore never delays another key's first
request by more than one freed slot, however many requests the backlog holds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from .errors import GatewayError


class FairGate:
    def __init__(self, limit: int, per_key: int, queue_timeout: float) -> None:
        self.limit = limit
        self.per_key = min(per_key, limit)
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self.waiting = 0
        self._held: dict[str, int] = {}
        # Keys with waiters, in turn order (a dict keeps insertion order; a served key moves last).
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}

    async def acquire(self, key: str) -> float:
        """Take a slot for `key`; return seconds waited. 503 with Retry-After if none in time."""
        held = self._held.get(key, 0)
        if self.in_flight < self.limit and held < self.per_key and key not in self._queues:
            self.in_flight += 1
            self._held[key] = held + 1
            return 0.0
        start = time.perf_counter()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(key, deque()).append(fut)
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await fut
        except BaseException as e:
            if fut.done() and not fut.cancelled():
                self.release(key)  # the slot was granted just as we gave up: hand it on
            else:
                self._forget(key, fut)
            if isinstance(e, TimeoutError):
                raise GatewayError(
                    503,
                    f"gateway busy: no upstream slot freed within {self.queue_timeout:g} s "
                    f"({self.in_flight} of {self.limit} in flight, at most {self.per_key} per key; "
                    "--max-concurrency, --max-concurrency-per-key, --queue-timeout)",
                    headers={"Retry-After": "1"},
                ) from None
            raise
        finally:
            self.waiting -= 1
        return time.perf_counter() - start

    def release(self, key: str) -> None:
        self.in_flight -= 1
        held = self._held[key] - 1
        if held:
            self._held[key] = held
        else:
            del self._held[key]
        if self._queues:
            self._grant()

    def held(self, key: str) -> int:
        return self._held.get(key, 0)

    def _grant(self) -> None:
        while self.in_flight < self.limit and self._queues:
            best: str | None = None
            fewest = self.per_key
            for key in self._queues:  # only keys that are waiting: few, even under load
                n = self._held.get(key, 0)
                if n < fewest:
                    best, fewest = key, n
                    if n == 0:
                        break
            if best is None:
                return  # every waiting key is at its share; the free slots stay free
            queue = self._queues.pop(best)
            fut = queue.popleft()
            if queue:
                self._queues[best] = queue  # back of the line for its next turn
            if fut.done():
                # Its waiter timed out or was cancelled in this same loop turn and has not yet run
                # its cleanup: the slot goes to the next waiter instead.
                continue
            self.in_flight += 1
            self._held[best] = fewest + 1
            fut.set_result(None)

    def _forget(self, key: str, fut: asyncio.Future[None]) -> None:
        fut.cancel()
        queue = self._queues.get(key)
        if queue is None:
            return
        try:
            queue.remove(fut)
        except ValueError:
            pass
        if not queue:
            del self._queues[key]
