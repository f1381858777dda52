"""Rate-limit arithmetic, token reservations and the Redis breaker (unit level; integration tests use real gateways)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import pytest

from er_gateway.errors import GatewayError
from er_gateway.keys import ApiKey
from er_gateway.ratelimit import RateLimiter, sliding_budget

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


# ---- token reservations ---------------------------------------------------------------------
TPM = ApiKey(name="tpm", hash="t", created="", token_limit="100/minute")


async def _remaining_tokens(limiter: RateLimiter, key: ApiKey = TPM) -> int:
    try:
        return int((await limiter.check_tokens(key))["X-RateLimit-Remaining-Tokens"])
    except GatewayError:
        return 0


async def test_a_request_larger_than_the_whole_budget_is_refused_up_front() -> None:
    limiter = RateLimiter("100/minute", None)
    with pytest.raises(GatewayError) as e:
        await limiter.reserve_tokens(TPM, 100_000)
    assert e.value.status == 429 and "more than the whole token budget" in e.value.message
    assert await _remaining_tokens(limiter) == 100  # nothing was taken


async def test_concurrent_reservations_never_overshoot_the_budget() -> None:
    limiter = RateLimiter("100/minute", None)
    results = await asyncio.gather(*(limiter.reserve_tokens(TPM, 10) for _ in range(20)), return_exceptions=True)
    granted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, GatewayError) and r.status == 429]
    assert sum(r[0] for r in granted) == 100 and len(refused) == 10
    assert await _remaining_tokens(limiter) == 0


@pytest.mark.parametrize("used, left", [(20, 80), (50, 50), (70, 30), (None, 100)])
async def test_settling_refunds_or_charges_the_difference(used: int | None, left: int) -> None:
    limiter = RateLimiter("100/minute", None)
    reserved, _ = await limiter.reserve_tokens(TPM, 50)
    await limiter.settle_tokens(TPM, reserved, used)
    assert await _remaining_tokens(limiter) == left


async def test_settling_in_redis(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import start_redis

    redis = start_redis(tmp_path)
    try:
        limiter = RateLimiter("100/minute", None, redis.url)
        reserved, _ = await limiter.reserve_tokens(TPM, 50)
        assert await _remaining_tokens(limiter) == 50
        await limiter.settle_tokens(TPM, reserved, 20)
        assert await _remaining_tokens(limiter) == 80
        await limiter.settle_tokens(TPM, 0, 30)
        assert await _remaining_tokens(limiter) == 50
    finally:
        redis.stop()


# ---- Redis breaker ----------------------------------------------------------------------------
async def _hung_redis() -> tuple[asyncio.base_events.Server, int, list[asyncio.StreamWriter]]:
    """A server that accepts connections and never answers: the worst Redis there is."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        while await reader.read(65536):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], held


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_a_hung_redis_costs_one_timeout_per_breaker_interval(mode: str) -> None:
    server, port, held = await _hung_redis()
    limiter = RateLimiter(
        "100/minute",
        "1000/minute",
        f"redis://127.0.0.1:{port}/0",
        mode,  # type: ignore[arg-type]
        redis_timeout=0.3,
        breaker_interval=1.0,
    )
    costs = []
    try:
        for _ in range(20):
            start = time.monotonic()
            try:
                await limiter.hit_request(KEY)
                await limiter.reserve_tokens(TPM, 5)
                outcome = "served"
            except GatewayError as e:
                outcome = str(e.status)
            costs.append(time.monotonic() - start)
            assert outcome == ("served" if mode == "open" else "503")
        # the first request pays one timeout; the other 19 skip Redis while the breaker is open
        assert 0.25 < costs[0] < 0.6, costs
        assert sum(costs[1:]) < 0.05, costs
        await asyncio.sleep(1.05)  # interval over: one request tries Redis again and pays once more
        start = time.monotonic()
        with pytest.raises(GatewayError) if mode == "closed" else contextlib.nullcontext():
            await limiter.hit_request(KEY)
        assert 0.25 < time.monotonic() - start < 0.6
    finally:
        server.close()
        for w in held:
            w.close()


async def test_breaker_closes_when_redis_answers_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from conftest import start_redis

    redis = start_redis(tmp_path)
    limiter = RateLimiter("3/minute", None, redis.url, redis_timeout=0.3, breaker_interval=0.2)
    try:
        limiter._open_until = time.monotonic() + 0.2  # as after a failure
        for _ in range(5):
            await limiter.hit_request(KEY)  # skipped: fail open, nothing counted
        await asyncio.sleep(0.25)
        for _ in range(3):
            await limiter.hit_request(KEY)  # the probe succeeds and counting resumes
        with pytest.raises(GatewayError) as e:
            await limiter.hit_request(KEY)
        assert e.value.status == 429 and limiter._open_until == 0.0
    finally:
        redis.stop()


# ---- Redis: one round trip per request ----------------------------------------------------------
async def test_a_request_hit_in_redis_is_one_call_and_agrees_with_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The hit and the window read behind X-RateLimit-Remaining are one Redis command, and give
    what limits' own hit followed by its own read give (the oracle, on a twin key)."""
    from conftest import start_redis
    from limits import parse
    from limits.aio.strategies import SlidingWindowCounterRateLimiter

    redis = start_redis(tmp_path)
    try:
        limiter = RateLimiter("10/minute", None, redis.url)
        oracle = SlidingWindowCounterRateLimiter(limiter.storage)
        item = parse("10/minute")
        twin = ApiKey(name="twin", hash="h2", created="")
        await limiter.hit_request(KEY)
        await oracle.hit(item, "req", twin.name)  # the twin starts where KEY is
        for cost in (1, 3, 2, 5, 1, 4):
            try:
                headers = await limiter.hit_request(KEY, cost)
                allowed = True
            except GatewayError as e:
                headers, allowed = e.headers, False
            want = await oracle.hit(item, "req", twin.name, cost=cost)
            prev, prev_ttl, cur, cur_ttl = await limiter.storage.get_sliding_window(  # type: ignore[attr-defined]
                item.key_for("req", twin.name), item.get_expiry()
            )
            budget = sliding_budget(item.amount, item.get_expiry(), prev, prev_ttl, cur, cur_ttl)
            assert allowed == want, cost
            assert int(headers["X-RateLimit-Remaining"]) == budget.remaining, cost
        # every command the limiter sends, counted where redis-py sends it
        client = limiter.storage.bridge.get_connection()  # type: ignore[attr-defined]
        sent: list[object] = []
        real = client.execute_command

        async def counted(*args: object, **kw: object) -> object:
            sent.append(args[0])
            return await real(*args, **kw)

        client.execute_command = counted
        other = ApiKey(name="fresh", hash="h3", created="")
        for _ in range(5):
            await limiter.hit_request(other)
        assert sent == ["EVALSHA"] * 5  # one round trip per request
    finally:
        redis.stop()


async def test_concurrent_hits_share_a_pipeline_and_stay_exact(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Hits of one event-loop turn go to Redis together; each still gets its own verdict and
    its own remaining count, and the limit holds exactly."""
    from conftest import start_redis

    redis = start_redis(tmp_path)
    try:
        limiter = RateLimiter("10/minute", None, redis.url)
        await limiter.hit_request(ApiKey(name="warm", hash="w", created=""))  # the script is loaded

        async def one() -> int | None:
            try:
                return int((await limiter.hit_request(KEY))["X-RateLimit-Remaining"])
            except GatewayError as e:
                assert e.status == 429 and int(e.headers["Retry-After"]) >= 1
                return None

        remaining = await asyncio.gather(*(one() for _ in range(25)))
        assert sorted(r for r in remaining if r is not None) == list(range(10))  # 10 allowed: 9 .. 0 left
        assert remaining.count(None) == 15
        # a Redis that lost the script (restarted, flushed) is answered all the same
        client = limiter._hit_and_read.registered_client  # type: ignore[union-attr]
        await client.script_flush()
        other = ApiKey(name="other", hash="o", created="")
        results = await asyncio.gather(*(limiter.hit_request(other) for _ in range(3)))
        assert sorted(int(h["X-RateLimit-Remaining"]) for h in results) == [7, 8, 9]
    finally:
        redis.stop()
