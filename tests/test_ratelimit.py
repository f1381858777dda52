"""Rate-limit arithmetic and the concurrency gate (unit level; integration tests use real gateways)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from er_gateway.errors import GatewayError
from er_gateway.keys import ApiKey
from er_gateway.ratelimit import ConcurrencyGate, RateLimiter, sliding_budget

KEY = ApiKey(name="k", hash="h", created="")


def test_sliding_budget_remaining() -> None:
    b = sliding_budget(10, 60, prev=0, prev_ttl=0, cur=4, cur_ttl=90)
    assert (b.remaining, round(b.reset_after)) == (6, 30)


def test_sliding_budget_wait_after_burst_is_until_rollover() -> None:
    # 100 hits in the current window, 20 s left in it: next hit allowed right after the rollover.
    b = sliding_budget(100, 60, prev=0, prev_ttl=0, cur=100, cur_ttl=80)
    assert b.remaining == 0 and math.isclose(b.reset_after, 20, abs_tol=0.01)


def test_sliding_budget_wait_while_previous_window_decays() -> None:
    # prev=100 weighted by 30/60 = 50, cur=50: full. Allowed when 100*(30-t)/60 + 50 < 100 -> t > 0.
    b = sliding_budget(100, 60, prev=100, prev_ttl=30, cur=50, cur_ttl=90)
    assert b.remaining == 0 and b.reset_after < 0.1
    # prev=100 weighted by 54/60 = 90, cur=20: allowed when 100*(54-t)/60 + 20 < 100 -> t > 6
    b = sliding_budget(100, 60, prev=100, prev_ttl=54, cur=20, cur_ttl=114)
    assert b.remaining == 0 and math.isclose(b.reset_after, 6, abs_tol=0.01)


@pytest.mark.parametrize("strategy", ["sliding-window", "moving-window"])
async def test_retry_after_is_honest(strategy: str) -> None:
    limiter = RateLimiter("3/2 seconds", None, strategy=strategy)  # type: ignore[arg-type]
    for _ in range(3):
        h = await limiter.hit_request(KEY)
    assert h["X-RateLimit-Remaining"] == "0"
    with pytest.raises(GatewayError) as e:
        await limiter.hit_request(KEY)
    assert e.value.status == 429
    retry = int(e.value.headers["Retry-After"])
    assert 1 <= retry <= 2
    # the limiter itself says when: find the real moment with small probes and compare
    start = time.monotonic()
    while True:
        try:
            await limiter.hit_request(KEY)
            break
        except GatewayError:
            await asyncio.sleep(0.05)
    waited = time.monotonic() - start
    assert waited <= retry + 0.2 and waited >= retry - 1.05


async def test_token_budget() -> None:
    limiter = RateLimiter("100/minute", "50/minute")
    assert (await limiter.check_tokens(KEY))["X-RateLimit-Remaining-Tokens"] == "50"
    await limiter.add_tokens(KEY, 30)
    assert (await limiter.check_tokens(KEY))["X-RateLimit-Remaining-Tokens"] == "20"
    await limiter.add_tokens(KEY, 45)  # overrun drains to zero
    with pytest.raises(GatewayError) as e:
        await limiter.check_tokens(KEY)
    assert e.value.status == 429 and "Retry-After" in e.value.headers


async def test_per_key_override() -> None:
    limiter = RateLimiter("100/minute", None)
    k = ApiKey(name="small", hash="x", created="", rate_limit="1/minute")
    await limiter.hit_request(k)
    with pytest.raises(GatewayError):
        await limiter.hit_request(k)
    await limiter.hit_request(KEY)


async def test_concurrency_gate_queues_then_503() -> None:
    gate = ConcurrencyGate(2, queue_timeout=0.2)
    assert await gate.acquire() == 0 and await gate.acquire() == 0

    async def later() -> None:
        await asyncio.sleep(0.05)
        gate.release()

    asyncio.create_task(later())
    waited = await gate.acquire()
    assert 0.03 < waited < 0.2
    with pytest.raises(GatewayError) as e:
        await gate.acquire()
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    assert gate.in_flight == 2 and gate.waiting == 0
