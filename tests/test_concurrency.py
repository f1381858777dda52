"""The fair concurrency gate: global cap, per-key share, fair turns, no leaked slots."""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
from conftest import Backend, GatewayProc, Redis, start_backend, start_gateway, start_redis, wait_until

from er_gateway.concurrency import FairGate
from er_gateway.errors import GatewayError


async def test_queues_then_503_naming_the_settings() -> None:
    gate = FairGate(2, 2, queue_timeout=0.2)
    assert await gate.acquire("a") == 0 and await gate.acquire("a") == 0

    async def later() -> None:
        await asyncio.sleep(0.05)
        gate.release("a")

    asyncio.create_task(later())
    waited = await gate.acquire("a")
    assert 0.03 < waited < 0.2
    with pytest.raises(GatewayError) as e:
        await gate.acquire("a")
    assert e.value.status == 503 and e.value.headers["Retry-After"] == "1"
    assert "--max-concurrency-per-key" in e.value.message
    assert gate.in_flight == 2 and gate.waiting == 0 and not gate._queues


async def test_one_key_never_holds_more_than_its_share() -> None:
    gate = FairGate(4, 2, queue_timeout=0.1)
    await gate.acquire("a")
    await gate.acquire("a")
    with pytest.raises(GatewayError):  # global slots are free, but a's share is used
        await gate.acquire("a")
    assert await gate.acquire("b") == 0  # another key gets a slot at once
    assert gate.held("a") == 2 and gate.held("b") == 1 and gate.in_flight == 3


async def test_a_backlog_never_delays_another_keys_first_request() -> None:
    gate = FairGate(2, 2, queue_timeout=5)
    await gate.acquire("a")
    await gate.acquire("a")
    backlog = [asyncio.create_task(gate.acquire("a")) for _ in range(50)]
    await asyncio.sleep(0)
    b = asyncio.create_task(gate.acquire("b"))
    await asyncio.sleep(0)
    gate.release("a")  # the first freed slot goes to b (it holds none), not to a's backlog
    await asyncio.sleep(0)
    assert b.done() and gate.held("b") == 1
    assert sum(t.done() for t in backlog) == 0
    gate.release("b")
    gate.release("a")
    await asyncio.sleep(0)
    assert sum(t.done() for t in backlog) == 2  # a's queue proceeds in order once b is served
    for t in backlog:
        t.cancel()
    await asyncio.gather(*backlog, return_exceptions=True)
    assert gate.waiting == 0 and not gate._queues


async def test_turns_rotate_between_waiting_keys() -> None:
    gate = FairGate(1, 1, queue_timeout=5)
    await gate.acquire("x")
    order: list[str] = []

    async def take(key: str) -> None:
        await gate.acquire(key)
        order.append(key)

    tasks = [asyncio.create_task(take(k)) for k in ["a", "a", "a", "b", "b", "c"]]
    await asyncio.sleep(0)
    current = "x"
    for _ in range(6):
        gate.release(current)
        await asyncio.sleep(0)
        current = order[-1]
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "a", "b", "a"]


async def test_random_schedules_keep_the_invariants() -> None:
    """Random arrivals, holds, timeouts and cancellations: never over a cap, nothing leaked."""
    rng = random.Random(13)
    gate = FairGate(5, 3, queue_timeout=0.05)
    keys = ["a", "b", "c", "d"]
    peak = {"in_flight": 0}

    async def client(key: str) -> None:
        try:
            await gate.acquire(key)
        except GatewayError:
            return
        assert gate.in_flight <= 5 and gate.held(key) <= 3
        assert sum(gate._held.values()) == gate.in_flight
        peak["in_flight"] = max(peak["in_flight"], gate.in_flight)
        try:
            await asyncio.sleep(rng.random() * 0.01)
        finally:
            gate.release(key)

    tasks = []
    for _ in range(600):
        tasks.append(asyncio.create_task(client(rng.choice(keys))))
        if rng.random() < 0.1:
            rng.choice(tasks).cancel()
        await asyncio.sleep(rng.random() * 0.001)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.in_flight == 0 and gate.waiting == 0 and not gate._queues and not gate._held
    assert peak["in_flight"] == 5


async def test_a_waiter_cancelled_in_the_same_turn_as_a_release_leaks_nothing() -> None:
    """The waiter's timeout fires and a slot is released before the waiter runs its cleanup."""
    gate = FairGate(1, 1, queue_timeout=5)
    await gate.acquire("a")
    waiter = asyncio.create_task(gate.acquire("b"))
    await asyncio.sleep(0)
    waiter.cancel()  # cancels the future it waits on, now
    gate.release("a")  # same turn: the cancelled future is still first in b's queue
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.in_flight == 0 and not gate._held and not gate._queues
    assert await gate.acquire("c") == 0  # the slot was not lost


async def test_timeouts_racing_releases_keep_every_slot() -> None:
    gate = FairGate(1, 1, queue_timeout=0.05)
    loop = asyncio.get_running_loop()
    for _ in range(30):
        await gate.acquire("a")
        waiter = asyncio.create_task(gate.acquire("b"))
        loop.call_later(0.05, gate.release, "a")  # lands on the timeout's turn, give or take
        try:
            await waiter
            gate.release("b")
        except GatewayError:
            pass
        await asyncio.sleep(0.01)
        assert gate.in_flight == 0 and not gate._held, (gate.in_flight, gate._held)


# ---- --global-max-concurrency: leases in a real Redis, shared by real gateway processes ----------


def _gateways(tmp_path: Path, redis_url: str, n: int, *extra: str) -> tuple[Backend, list[GatewayProc]]:
    emb = start_backend(tmp_path, "embedding")
    keys = tmp_path / "er_api_keys.json"
    args = ("--embedding-url", emb.url, "--reranker-url", "none", "--redis-url", redis_url, *extra)
    gws = [start_gateway(tmp_path / f"g{i}", *args, keys_file=keys) for i in range(n)]
    for g in gws[1:]:
        g.key = gws[0].key
    return emb, gws


def _post_all(jobs: list[tuple[GatewayProc, str]]) -> list[tuple[int, float]]:
    """POST every (gateway, text) at once; (status, seconds) of each."""

    async def one(s: aiohttp.ClientSession, g: GatewayProc, text: str) -> tuple[int, float]:
        start = time.monotonic()
        async with s.post(g.url + "/v1/embeddings", json={"input": text}, headers=g.auth) as r:
            await r.read()
            return r.status, time.monotonic() - start

    async def run() -> list[tuple[int, float]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            return await asyncio.gather(*(one(s, g, t) for g, t in jobs))

    return asyncio.run(run())


def test_global_cap_holds_across_gateways(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    emb, gws = _gateways(tmp_path, redis.url, 2, "--global-max-concurrency", "3")
    try:
        emb.admin(delay=0.4)
        start = time.monotonic()
        results = _post_all([(gws[i % 2], f"t{i}") for i in range(12)])
        took = time.monotonic() - start
        assert [s for s, _ in results] == [200] * 12
        assert emb.stats()["max_concurrent"] == 3  # never more upstream, whichever gateway they came to
        assert took >= 4 * 0.4  # 12 requests, 3 at a time
        assert redis_client(redis).zcard("er:global-slots") == 0  # every lease given back
    finally:
        for g in gws:
            g.stop()
        emb.stop()
        redis.stop()


def test_a_dead_gateways_slots_free_themselves(tmp_path: Path) -> None:
    """A gateway holding every slot is killed (SIGKILL: no chance to give them back). The other
    gateway's request waits for the leases to expire (--global-lease-ttl 2), not forever; with a
    shorter --queue-timeout it gets a 503 that names the setting."""
    redis = start_redis(tmp_path)
    cap = ("--global-max-concurrency", "2", "--global-lease-ttl", "2", "--queue-timeout", "5")
    emb, (a, b) = _gateways(tmp_path, redis.url, 2, *cap)
    try:
        emb.admin(delay=30)
        threads = [threading.Thread(target=_swallow, args=(a, f"hold{i}"), daemon=True) for i in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: emb.stats()["current"] == 2, 5, "two requests holding both slots")
        a.stop(signal.SIGKILL)
        emb.admin(delay=0)
        start = time.monotonic()
        r = b.post("/v1/embeddings", {"input": "after"})
        waited = time.monotonic() - start
        assert r.status_code == 200, r.text
        assert 0.5 <= waited <= 3.5, waited  # the leases' 2 s, renewed at most 2/3 s before the kill
    finally:
        for g in (a, b):
            g.stop()
        emb.stop()
        redis.stop()


def test_no_global_slot_in_time_is_503(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    emb, (a, b) = _gateways(tmp_path, redis.url, 2, "--global-max-concurrency", "1", "--queue-timeout", "0.5")
    try:
        emb.admin(delay=2)
        t = threading.Thread(target=_swallow, args=(a, "hold"), daemon=True)
        t.start()
        wait_until(lambda: emb.stats()["current"] == 1, 5, "slot held")
        start = time.monotonic()
        r = b.post("/v1/embeddings", {"input": "late"})
        assert r.status_code == 503 and "--global-max-concurrency 1" in r.json()["error"]["message"]
        assert r.headers["retry-after"] == "1"
        assert 0.4 <= time.monotonic() - start <= 1.5
    finally:
        for g in (a, b):
            g.stop()
        emb.stop()
        redis.stop()


def _swallow(g: GatewayProc, text: str) -> None:
    try:
        g.post("/v1/embeddings", {"input": text})
    except httpx.HTTPError:
        pass


def redis_client(r: Redis) -> Any:
    import redis as redis_py

    return redis_py.Redis.from_url(r.url)
