"""The concurrency cap on upstream requests, shared fairly between keys.

At most `limit` upstream requests run at once and at most `per_key` of them belong to one
key, so one key can never hold every slot. When slots are short, waiting requests queue per
key and a freed slot goes to the waiting key that holds the fewest slots (ties: the key that
has waited longest for its turn). A key's backlog therefore never delays another key's first
request by more than one freed slot, however many requests the backlog holds.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections import deque

import redis.asyncio as aioredis
from redis.exceptions import RedisError

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


# A lease is a member of one sorted set scored by its expiry (Redis's clock, ms). Taking one
# first drops the expired (leases of a gateway that died), then adds ours if fewer than the cap.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  return 1
end
return 0
"""
_RENEW = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i]) end
return #ARGV - 1
"""


class GlobalSlots:
    """`--global-max-concurrency`: at most `limit` upstream requests at once across every gateway
    sharing a Redis, on top of each process's FairGate. A slot is a lease that this process
    renews every `ttl`/3 seconds, so the slots of a gateway that dies free themselves within
    `ttl` seconds. When none is free a request retries with backoff until --queue-timeout.
    If Redis fails, `fail_open` lets requests through (the process's own cap still holds)."""

    KEY = "er:global-slots"

    def __init__(self, url: str, limit: int, ttl: float, timeout: float, queue_timeout: float, fail_open: bool) -> None:
        self.limit = limit
        self.ttl_ms = int(ttl * 1000)
        self.renew_every = ttl / 3
        self.queue_timeout = queue_timeout
        self.fail_open = fail_open
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._take = self.redis.register_script(_TAKE)
        self._renew = self.redis.register_script(_RENEW)
        self.prefix = f"{os.getpid()}-{os.urandom(4).hex()}-"
        self._ids = itertools.count()
        self.held: set[str] = set()
        self._pending: set[asyncio.Future[None]] = set()

    async def acquire(self, waited: float = 0.0) -> str | None:
        """A lease id (None: Redis failed and the failure mode is open). 503 when none is free
        within what is left of --queue-timeout after `waited` (the time the process's gate took)."""
        lease = self.prefix + str(next(self._ids))
        deadline = time.monotonic() + self.queue_timeout - waited
        pause = 0.002
        while True:
            try:
                if await self._take(keys=[self.KEY], args=[self.limit, self.ttl_ms, lease]):
                    self.held.add(lease)
                    return lease
            except (RedisError, OSError) as e:
                # The script may have run and only its answer been lost: take the lease back (in the
                # background, bounded by the socket timeout) rather than hold a slot for `ttl`.
                task = asyncio.ensure_future(self._forget(lease))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)
                if self.fail_open:
                    return None
                raise GatewayError(
                    503, f"gateway busy: the global concurrency cap's Redis failed ({type(e).__name__})"
                ) from None
            if time.monotonic() + pause > deadline:
                raise GatewayError(
                    503,
                    f"gateway busy: no upstream slot freed within {self.queue_timeout:g} s across gateways "
                    f"(--global-max-concurrency {self.limit}, --queue-timeout)",
                    headers={"Retry-After": "1"},
                )
            await asyncio.sleep(pause * (0.5 + random.random()))  # jitter: gateways do not retry in step
            pause = min(pause * 2, 0.05)

    async def _forget(self, lease: str) -> None:
        try:
            await self.redis.zrem(self.KEY, lease)
        except (RedisError, OSError):
            pass

    async def release(self, lease: str) -> None:
        self.held.discard(lease)
        try:
            await self.redis.zrem(self.KEY, lease)
        except (RedisError, OSError):
            pass  # the lease expires by itself within ttl

    async def renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.renew_every)
            if self.held:
                try:
                    await self._renew(keys=[self.KEY], args=[self.ttl_ms, *self.held])
                except (RedisError, OSError):
                    pass  # the next renewal tries again; meanwhile leases may expire early

    async def close(self) -> None:
        await self.redis.aclose()
