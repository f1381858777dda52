"""Per-key request and token limits (the `limits` library, async), with a breaker around Redis.

Requests are counted with a sliding-window counter by default: O(1) per hit in
memory and in Redis, and, unlike a fixed window, it never lets twice the limit
through at a window boundary. `moving-window` (an exact log of hits) is
available; it costs O(limit) per hit, which matters only for very high limits.
Retry-After is computed from the counters: the seconds until the algorithm in
use will accept a request again, not the window length.

Token budgets are reserved before a request is forwarded (an exact count from the model's
tokenizer, or an upper bound without one) and settled against the backend's `usage` after,
so concurrent requests cannot together spend more than the budget.

Every Redis call has a timeout (`--redis-timeout`); after a failure the breaker skips Redis
for `--redis-breaker-interval` seconds (the failure mode applies at once, costing nothing),
then lets one request try it again. A hung Redis thus costs one timeout per interval, not
one per request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, TypeVar

from limits import RateLimitItem
from limits import parse as parse_limit
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

from .errors import GatewayError
from .keys import ApiKey

T = TypeVar("T")

log = logging.getLogger("er_gateway.limits")

Strategy = Literal["sliding-window", "moving-window"]


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


def make_storage(redis_url: str | None, timeout: float = 0.5) -> Storage:
    if not redis_url:
        return MemoryStorage()
    uri = redis_url if redis_url.startswith("async+") else "async+" + redis_url
    return RedisStorage(
        uri,
        wrap_exceptions=True,
        implementation="redispy",
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )


class RateLimiter:
    def __init__(
        self,
        default_rate: str,
        default_tokens: str | None,
        redis_url: str | None = None,
        failure_mode: Literal["open", "closed"] = "open",
        strategy: Strategy = "sliding-window",
        redis_timeout: float = 0.5,
        breaker_interval: float = 5.0,
        storage: Storage | None = None,
        on_storage_error: Callable[[], None] | None = None,
    ) -> None:
        self.storage = storage or make_storage(redis_url, redis_timeout)
        self.shared = redis_url is not None
        self.failure_mode = failure_mode
        self.redis_timeout = redis_timeout
        self.breaker_interval = breaker_interval
        self._open_until = 0.0  # breaker: Redis is skipped until then
        self._probing = False  # one request is trying Redis after the interval
        self.strategy = strategy
        self._requests = (
            MovingWindowRateLimiter(self.storage)
            if strategy == "moving-window"
            else SlidingWindowCounterRateLimiter(self.storage)
        )
        # Token costs can be large: only the O(1) counter is suitable.
        self._tokens = SlidingWindowCounterRateLimiter(self.storage)
        self._items: dict[str, RateLimitItem] = {}
        # Redis: the request hit and the read behind X-RateLimit-Remaining in one round trip
        # (limits makes them two), the same keys and arithmetic as limits' own scripts.
        self._hits: list[tuple[list[str], list[int], asyncio.Future[Any]]] = []  # this loop turn's
        self._tasks: set[asyncio.Task[None]] = set()
        self._hit_and_read = (
            self.storage.bridge.get_connection().register_script(HIT_AND_READ)
            if isinstance(self.storage, RedisStorage) and hasattr(self.storage.bridge, "get_connection")
            else None
        )
        self.default_rate = default_rate
        self.default_tokens = default_tokens
        self.on_storage_error = on_storage_error
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
        """Count `cost` requests for `key`; raise 429 (with Retry-After) when they do not fit."""
        item = self.item(key.rate_limit or self.default_rate)
        try:
            if self._hit_and_read is not None and self.strategy == "sliding-window":
                allowed, budget = await self._call(self._redis_hit(item, key.name, cost))
            else:
                allowed = await self._call(self._requests.hit(item, "req", key.name, cost=cost))
                budget = await self._budget(self._requests, item, "req", key.name)
        except _StorageDown:
            return {"X-RateLimit-Limit": str(item.amount)}
        headers = budget.headers()
        if not allowed:
            if cost > item.amount:  # can never fit: no Retry-After to honour forever
                raise GatewayError(
                    429,
                    f"{cost} requests (a batch) are more than the whole rate limit "
                    f"{item.amount}/{_window_name(item)} of key {key.name!r}; split it",
                    headers=headers,
                )
            headers["Retry-After"] = str(max(1, math.ceil(budget.reset_after)))
            what = f"{cost} requests (a batch) do not fit" if cost > 1 else "exceeded"
            raise GatewayError(
                429,
                f"rate limit {item.amount}/{_window_name(item)} {what} for key {key.name!r} "
                f"({budget.remaining} left); retry after {headers['Retry-After']} s",
                headers=headers,
            )
        return headers

    async def _redis_hit(self, item: RateLimitItem, name: str, cost: int) -> tuple[bool, Budget]:
        """The sliding-window hit and the window read for the headers in one Redis call."""
        assert self._hit_and_read is not None and isinstance(self.storage, RedisStorage)
        storage, bridge = self.storage, self.storage.bridge
        key = item.key_for("req", name)
        keys = [
            bridge.prefixed_key(storage._previous_window_key(key)),
            bridge.prefixed_key(storage._current_window_key(key)),
        ]
        expiry = item.get_expiry()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._hits.append((keys, [item.amount, expiry, cost], answer))
        if len(self._hits) == 1:
            loop.call_soon(self._send_hits)
        acquired, prev, prev_ttl, cur, cur_ttl = await answer
        budget = sliding_budget(
            item.amount, expiry, int(prev or 0), max(0, float(prev_ttl or 0)) / 1000, int(cur or 0),
            max(0, float(cur_ttl or 0)) / 1000,
        )  # fmt: skip
        return bool(acquired), budget

    def _send_hits(self) -> None:
        # Every hit asked for in one turn of the event loop goes to Redis in one pipeline: at
        # 64 connections that is one write and one read for many requests, not one each.
        hits, self._hits = self._hits, []
        task = asyncio.get_running_loop().create_task(self._run_hits(hits))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_hits(self, hits: list[tuple[list[str], list[int], asyncio.Future[Any]]]) -> None:
        script = self._hit_and_read
        assert script is not None
        try:
            if len(hits) == 1:
                results: list[Any] = [await script(hits[0][0], hits[0][1])]
            else:
                async with script.registered_client.pipeline(transaction=False) as pipe:
                    for keys, args, _ in hits:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                for i, r in enumerate(results):
                    if isinstance(r, Exception):  # the script not loaded yet (a new or flushed Redis)
                        results[i] = await script(hits[i][0], hits[i][1])
        except Exception as e:  # noqa: BLE001 - every waiting request gets the failure (breaker, mode)
            for _, _, answer in hits:
                if not answer.done():
                    answer.set_exception(e)
            return
        for (_, _, answer), r in zip(hits, results, strict=True):
            if not answer.done():
                answer.set_result(r)

    async def check_request(self, key: ApiKey) -> dict[str, str]:
        """429 if `key` has no request left, without counting one (for work charged later)."""
        item = self.item(key.rate_limit or self.default_rate)
        try:
            budget = await self._budget(self._requests, item, "req", key.name)
        except _StorageDown:
            return {}
        headers = budget.headers()
        if budget.remaining <= 0:
            headers["Retry-After"] = str(max(1, math.ceil(budget.reset_after)))
            raise GatewayError(
                429,
                f"rate limit {item.amount}/{_window_name(item)} exceeded for key {key.name!r}; "
                f"retry after {headers['Retry-After']} s",
                headers=headers,
            )
        return headers

    def token_item(self, key: ApiKey) -> RateLimitItem | None:
        spec = key.token_limit or self.default_tokens
        return self.item(spec) if spec else None

    async def reserve_tokens(self, key: ApiKey, tokens: int) -> tuple[int, dict[str, str]]:
        """Take `tokens` from the key's budget before forwarding; 429 if they do not fit.

        Returns what was reserved (0 when Redis is down in open mode: nothing to settle).
        """
        item = self.token_item(key)
        if item is None or tokens <= 0:
            return 0, {}
        if tokens > item.amount:
            # No Retry-After: waiting does not help, and clients that honour it would retry forever.
            raise GatewayError(
                429,
                f"this request needs about {tokens} tokens, more than the whole token budget "
                f"{item.amount}/{_window_name(item)} of key {key.name!r}; split it",
            )
        try:
            allowed = await self._call(self._tokens.hit(item, "tok", key.name, cost=tokens))
        except _StorageDown:
            return 0, {}
        try:
            budget = await self._budget(self._tokens, item, "tok", key.name)
        except _StorageDown:
            return (tokens, {}) if allowed else (0, {})  # taken: settle it later all the same
        headers = budget.headers("-Tokens")
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(budget.reset_after)))
            raise GatewayError(
                429,
                f"token budget {item.amount}/{_window_name(item)} of key {key.name!r} has "
                f"{budget.remaining} tokens left; this request needs about {tokens}; "
                f"retry after {headers['Retry-After']} s",
                headers=headers,
            )
        return tokens, headers

    async def settle_tokens(self, key: ApiKey, reserved: int, used: int | None) -> None:
        """Correct a reservation by what the backend reported (`None`: it failed, refund all).

        Never raises: the work is done, and a storage failure here must not replace its answer.
        """
        used = used or 0
        try:
            if used > reserved:
                await self.add_tokens(key, used - reserved)
            elif used < reserved:
                await self._refund(key, reserved - used)
        except GatewayError:
            pass  # fail-closed storage down: the reservation stands as the charge

    async def _refund(self, key: ApiKey, tokens: int) -> None:
        item = self.token_item(key)
        if item is None:
            return
        name = item.key_for("tok", key.name)
        expiry = item.get_expiry()
        storage = self.storage
        try:
            if isinstance(storage, RedisStorage):
                _, _, current, _ = await self._call(storage.get_sliding_window(name, expiry))
                if min(tokens, current) > 0:
                    # limits has no decrement for Redis; a negative increment of the current
                    # window's counter is one (clamped above by what it holds).
                    await self._call(storage.incr(storage._current_window_key(name), expiry * 2, -min(tokens, current)))
            elif isinstance(storage, MemoryStorage):
                _, current_key = storage.sliding_window_keys(name, expiry, time.time())
                await storage.decr(current_key, tokens)  # clamps at zero
        except _StorageDown:
            pass

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

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self.shared:
            return await coro
        probe = False
        if self._open_until:
            if self._probing or time.monotonic() < self._open_until:
                coro.close()  # never awaited: Redis is skipped while the breaker is open
                self._fail()
            self._probing = probe = True
        try:
            async with asyncio.timeout(self.redis_timeout):
                result = await coro
        except (TimeoutError, Exception) as e:  # noqa: BLE001 - any storage failure
            self._open_until = time.monotonic() + self.breaker_interval
            if self.on_storage_error is not None:
                self.on_storage_error()
            now = time.monotonic()
            if now - self._last_warning > 10:
                self._last_warning = now
                log.warning(
                    "rate-limit storage failed (%s: %s); failing %s for %gs before retrying",
                    type(e).__name__,
                    e,
                    self.failure_mode,
                    self.breaker_interval,
                )
            self._fail()
        finally:
            if probe:
                self._probing = False
        if probe:
            self._open_until = 0.0
            log.warning("rate-limit storage is back")
        return result

    def _fail(self) -> NoReturn:
        if self.failure_mode == "closed":
            raise GatewayError(503, "rate-limit storage is unavailable", headers={"Retry-After": "1"})
        raise _StorageDown

    async def check_storage(self) -> bool:
        try:
            return bool(await self.storage.check())
        except Exception:  # noqa: BLE001
            return False


# limits' acquire_sliding_window.lua, answering the window as its sliding_window.lua reads it:
# {acquired, previous count, previous TTL ms, current count, current TTL ms}.
HIT_AND_READ = """
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2]) * 1000
local amount = tonumber(ARGV[3])
local current_ttl = tonumber(redis.call('pttl', KEYS[2]))
if current_ttl > 0 and current_ttl < expiry then
    redis.call('rename', KEYS[2], KEYS[1])
    redis.call('set', KEYS[2], 0, 'PX', current_ttl + expiry)
end
local previous_count = tonumber(redis.call('get', KEYS[1])) or 0
local previous_ttl = tonumber(redis.call('pttl', KEYS[1])) or 0
local current_count = tonumber(redis.call('get', KEYS[2])) or 0
current_ttl = tonumber(redis.call('pttl', KEYS[2])) or 0
if previous_ttl <= 0 then previous_ttl = 0 end
if current_ttl <= 0 then current_ttl = 0 end
local weighted_count = math.floor(previous_count * previous_ttl / expiry) + current_count
if amount > limit or (weighted_count + amount) > limit then
    return {0, previous_count, previous_ttl, current_count, current_ttl}
end
if redis.call('exists', KEYS[2]) == 1 then
    current_count = redis.call('incrby', KEYS[2], amount)
else
    redis.call('set', KEYS[2], amount, 'PX', expiry * 2)
    current_count = amount
end
current_ttl = tonumber(redis.call('pttl', KEYS[2])) or 0
return {1, previous_count, previous_ttl, current_count, current_ttl}
"""


class _StorageDown(Exception):
    """Redis failed and the failure mode is `open`: serve without counting."""


def sliding_budget(limit: int, window: float, prev: int, prev_ttl: float, cur: int, cur_ttl: float) -> Budget:
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
