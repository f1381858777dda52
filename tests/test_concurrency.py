"""The fair concurrency gate: global cap, per-key share, fair turns, no leaked slots."""

from __future__ import annotations

import asyncio
import random

import pytest

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
