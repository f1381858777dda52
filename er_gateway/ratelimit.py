"""Per-key request and token limits (the `limits` library, async) and the concurrency cap.

Requests are counted with a sliding-window counter by default: O(1) per hit in
memory and in Redis, and, unlike a fixed window, it never lets twice the limit
through at a window boundary. `moving-window` (an exact log of hits) is
available; it costs O(limit) per hit, which matters only for very high limits.
Retry-After is computed from the counters: the seconds until the algorithm in
use will accept a request again, not the window length.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from limits import RateLimitItem, parse as parse_limit
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from .errors import GatewayError
from .keys import ApiKey

log = logging.getLogger("er_gateway.limits")

Strategy = Literal["sliding-window", "moving-window"]
REDIS_CALL_TIMEOUT = 0.5


@dataclass(frozen=True)
class Budget:
    """What the X-RateLimit-* headers report for one limit."""

    limit: int
    remaining: int
    reset_after: float  # seconds until at least one more unit is allowed (or the window rolls)

    def headers(self, suffix: str = "") -> dict[str, str]:
        return {
            f"X-RateLimit-Limit{suffix}": str(self.limit),
            f"X-RateLimit-Remaining{suffix}": str(self.remaining),
            f"X-RateLimit-Reset{suffix}": str(max(0, math.ceil(self.reset_after))),
        }


def make_storage(redis_url: str | None) -> Storage:
    if not redis_url:
        return MemoryStorage()
    uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
    return RedisStorage(
        uri,
        wrap_exceptions=True,
        implementation="redispy",
        socket_timeout=REDIS_CALL_TIMEOUT,
        socket_connect_timeout=REDIS_CALL_TIMEOUT,
    )


class RateLimiter:
    def __init__(
        self,
        default_rate: str,
        default_tokens: str | None,
        redis_url: str | None = None,
        failure_mode: Literal["open", "closed"] = "open",
        strategy: Strategy = "sliding-window",
    ) -> None:
        self.storage = make_storage(redis_url)
        self.shared = redis_url is not None
        self.failure_mode = failure_mode
        self.strategy = strategy
        self._requests = (
            MovingWindowRateLimiter(self.storage)
            if strategy == "moving-window"
            else SlidingWindowCounterRateLimiter(self.storage)
        )
        # Token costs can be large: only the O(1) counter is suitable.
        self._tokens = SlidingWindowCounterRateLimiter(self.storage)
        self._items: dict[str, RateLimitItem] = {}
        self.default_rate = default_rate
        self.default_tokens = default_tokens
        self.on_storage_error: Callable[[], None] | None = None
        self._last_warning = 0.0
        self.item(default_rate)  # fail at start-up on a bad spec
        if default_tokens:
            self.item(default_tokens)

    def item(self, spec: str) -> RateLimitItem:
        item = self._items.get(spec)
        if item is None:
            item = self._items[spec] = parse_limit(spec)
        return item

    async def hit_request(self, key: ApiKey, cost: int = 1) -> dict[str, str]:
        """Count `cost` requests for `key`; raise 429 (with Retry-After) when over the limit."""
        item = self.item(key.rate_limit or self.default_rate)
        try:
            allowed = await self._call(self._requests.hit(item, "req", key.name, cost=cost))
            budget = await self._budget(self._requests, item, "req", key.name)
        except _StorageDown:
            return {"X-RateLimit-Limit": str(item.amount)}
        headers = budget.headers()
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(budget.reset_after)))
            raise GatewayError(
                429,
                f"rate limit {item.amount}/{_window_name(item)} exceeded for key {key.name!r}; "
                f"retry after {headers['Retry-After']} s",
                headers=headers,
            )
        return headers

    async def check_tokens(self, key: ApiKey) -> dict[str, str]:
        """Refuse a request (429) once the key's token budget is used up."""
        spec = key.token_limit or self.default_tokens
        if not spec:
            return {}
        item = self.item(spec)
        try:
            budget = await self._budget(self._tokens, item, "tok", key.name)
        except _StorageDown:
            return {}
        headers = budget.headers("-Tokens")
        if budget.remaining <= 0:
            headers["Retry-After"] = str(max(1, math.ceil(budget.reset_after)))
            raise GatewayError(
                429,
                f"token budget {item.amount}/{_window_name(item)} used up for key {key.name!r}; "
                f"retry after {headers['Retry-After']} s",
                headers=headers,
            )
        return headers

    async def add_tokens(self, key: ApiKey, tokens: int) -> None:
        """Charge tokens the backend reported; an overrun drains the budget to zero."""
        spec = key.token_limit or self.default_tokens
        if not spec or tokens <= 0:
            return
        item = self.item(spec)
        try:
            if not await self._call(self._tokens.hit(item, "tok", key.name, cost=min(tokens, item.amount))):
                budget = await self._budget(self._tokens, item, "tok", key.name)
                if budget.remaining > 0:
                    await self._call(self._tokens.hit(item, "tok", key.name, cost=budget.remaining))
        except _StorageDown:
            pass

    async def _budget(self, limiter: object, item: RateLimitItem, *ids: str) -> Budget:
        now = time.time()
        if isinstance(limiter, MovingWindowRateLimiter):
            stats = await self._call(limiter.get_window_stats(item, *ids))
            return Budget(item.amount, max(0, stats.remaining), stats.reset_time - now)
        prev, prev_ttl, cur, cur_ttl = await self._call(
            self.storage.get_sliding_window(item.key_for(*ids), item.get_expiry())  # type: ignore[attr-defined]
        )
        return sliding_budget(item.amount, item.get_expiry(), prev, prev_ttl, cur, cur_ttl)

    async def _call(self, coro):  # type: ignore[no-untyped-def]
        if not self.shared:
            return await coro
        try:
            async with asyncio.timeout(REDIS_CALL_TIMEOUT * 2):
                return await coro
        except (Exception, asyncio.TimeoutError) as e:  # noqa: BLE001 - any storage failure
            if self.on_storage_error is not None:
                self.on_storage_error()
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning("rate-limit storage failed (%s: %s); failing %s",
                            type(e).__name__, e, self.failure_mode)
            if self.failure_mode == "closed":
                raise GatewayError(
                    503, "rate-limit storage is unavailable", headers={"Retry-After": "1"}
                ) from None
            raise _StorageDown from None

    async def check_storage(self) -> bool:
        try:
            return bool(await self.storage.check())
        except Exception:  # noqa: BLE001
            return False


class _StorageDown(Exception):
    """Redis failed and the failure mode is `open`: serve without counting."""


def sliding_budget(
    limit: int, window: float, prev: int, prev_ttl: float, cur: int, cur_ttl: float
) -> Budget:
    """Remaining and time-to-next-allowed for limits' sliding-window counter.

    The counter allows a hit while floor(prev * w + cur) < limit, where w is the
    share of the previous window still inside the sliding window; w falls
    linearly to 0 over the `prev_ttl` seconds left in the current window, after
    which the current count becomes the previous one.
    """
    weighted = prev * prev_ttl / window + cur
    remaining = max(0, limit - math.floor(weighted))
    rollover = cur_ttl - window  # seconds until the current window ends
    if remaining > 0:
        return Budget(limit, remaining, max(0.0, rollover))
    wait = math.inf
    if prev and cur < limit:
        # Phase 1: the previous window's weight decays until prev*w + cur < limit.
        t = prev_ttl - (limit - cur) * window / prev
        if t < rollover:
            wait = max(0.0, t)
    if wait == math.inf:
        # Phase 2: after the rollover the current count decays the same way.
        wait = rollover + (window * (1 - limit / cur) if cur >= limit else 0.0)
    return Budget(limit, 0, wait + 0.001)


def _window_name(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    return unit if item.multiples == 1 else f"{item.multiples} {unit}s"


class ConcurrencyGate:
    """At most `limit` requests upstream at once; the rest queue up to `queue_timeout`."""

    def __init__(self, limit: int, queue_timeout: float) -> None:
        self.limit = limit
        self.queue_timeout = queue_timeout
        self._sem = asyncio.Semaphore(limit)
        self.in_flight = 0
        self.waiting = 0

    async def acquire(self) -> float:
        """Take a slot; return seconds waited. 503 with Retry-After if none in time."""
        if not self._sem.locked():
            await self._sem.acquire()  # free slot: returns without suspending
            self.in_flight += 1
            return 0.0
        start = time.perf_counter()
        self.waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout):
                await self._sem.acquire()
        except TimeoutError:
            raise GatewayError(
                503,
                f"gateway busy: {self.limit} requests in flight and no slot freed within "
                f"{self.queue_timeout:g} s",
                headers={"Retry-After": "1"},
            ) from None
        finally:
            self.waiting -= 1
        self.in_flight += 1
        return time.perf_counter() - start

    def release(self) -> None:
        self.in_flight -= 1
        self._sem.release()
