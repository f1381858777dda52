"""Upstream error mapping (README, "Errors") against small in-process aiohttp servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import web
from conftest import free_port

from er_gateway.errors import GatewayError
from er_gateway.settings import load_settings
from er_gateway.upstream import METRICS_MAX_BYTES, MODELS_MAX_BYTES, Pool, Upstreams


class Scripted:
    """A backend answering every POST with the configured status/body (or sleeping)."""

    def __init__(self) -> None:
        self.status, self.body, self.sleep = 200, b"{}", 0.0
        self.requests: list[web.Request] = []
        self.headers: list[dict[str, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        await request.read()
        if self.sleep:
            await asyncio.sleep(self.sleep)
        return web.Response(status=self.status, body=self.body, content_type="application/json")


async def _ok(request: web.Request) -> web.Response:
    return web.Response()


@pytest.fixture
async def backends() -> AsyncIterator[list[tuple[str, Scripted]]]:
    runners, out = [], []
    for _ in range(2):
        s = Scripted()
        app = web.Application()
        app.router.add_post("/{tail:.*}", s.handle)
        app.router.add_get("/health", _ok)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        out.append((f"http://127.0.0.1:{port}", s))
    yield out
    for r in runners:
        await r.cleanup()


def make(urls: list[str], **opts: str) -> tuple[Upstreams, Pool]:
    s = load_settings({"embedding_urls": ",".join(urls), "eject_cooldown": "5", **opts}, environ={})
    ups = Upstreams(s)
    ups.pools = ups.build(s.models)
    return ups, ups.pools["Qwen3-Embedding-0.6B"]


@pytest.mark.parametrize(
    "status,body,expect,message",
    [
        (
            400,
            b'{"error":{"message":"too long","type":"BadRequestError","param":"input_tokens","code":400}}',
            400,
            "too long",
        ),
        (
            400,
            b'{"object":"error","message":"flat msg","type":"BadRequestError","param":null,"code":400}',
            400,
            "flat msg",
        ),
        (404, b'{"detail":"Not Found"}', 404, "Not Found"),
        (422, b'{"detail":[{"loc":["body","input"],"msg":"bad"}]}', 422, "input: bad"),
        (500, b'{"error":{"message":"boom","type":"x","code":500}}', 502, "boom"),
        (502, b"<html>", 502, "<html>"),
    ],
)
async def test_status_mapping(backends, status: int, body: bytes, expect: int, message: str) -> None:  # type: ignore[no-untyped-def]
    (url, s), _ = backends
    s.status, s.body = status, body
    ups, pool = make([url])
    try:
        with pytest.raises(GatewayError) as e:
            await pool.post("/v1/embeddings", b"{}")
        assert e.value.status == expect and message in e.value.message
        assert len(s.headers) == 1  # 4xx and 5xx are not retried on the same replica
    finally:
        await ups.close()


async def test_timeout_is_504_and_not_retried(backends) -> None:  # type: ignore[no-untyped-def]
    (u1, s1), (u2, s2) = backends
    s1.sleep = s2.sleep = 2
    ups, pool = make([u1, u2], timeout="0.3")
    try:
        start = time.monotonic()
        with pytest.raises(GatewayError) as e:
            await pool.post("/v1/embeddings", b"{}")
        assert e.value.status == 504 and time.monotonic() - start < 1.5
        assert len(s1.headers) + len(s2.headers) == 1
    finally:
        await ups.close()


async def test_503_is_retried_on_another_replica(backends) -> None:  # type: ignore[no-untyped-def]
    (u1, s1), (u2, s2) = backends
    s1.status, s1.body = 503, b'{"error":{"message":"busy"}}'
    ups, pool = make([u1, u2])
    try:
        pool.replicas[1].outstanding = 1  # first pick: the 503 one
        r = await pool.post("/v1/embeddings", b"{}")
        assert r.status == 200 and r.retries == 1 and len(s1.headers) == 1
        pool.replicas[1].outstanding = 0
        s2.status, s2.body = 503, b'{"error":{"message":"busy"}}'
        with pytest.raises(GatewayError) as e:
            await pool.post("/v1/embeddings", b"{}")
        assert e.value.status == 503 and "Retry-After" in e.value.headers
        # both ejected for the cooldown, but still used rather than failing ("panic mode")
        s1.status = s2.status = 200
        s1.body = s2.body = b"{}"
        assert (await pool.post("/v1/embeddings", b"{}")).status == 200
    finally:
        await ups.close()


async def test_refused_connection_is_503_fast_and_retried(backends) -> None:  # type: ignore[no-untyped-def]
    (u1, _), _ = backends
    dead = f"http://127.0.0.1:{free_port()}"
    ups, pool = make([dead, u1])
    ups2, pool2 = make([dead])
    try:
        pool.replicas[1].outstanding = 1  # make the dead one the first pick
        r = await pool.post("/v1/embeddings", b"{}")
        assert r.status == 200 and r.retries == 1
        assert pool.replicas[0].healthy is False
        start = time.monotonic()
        with pytest.raises(GatewayError) as e:
            await pool2.post("/v1/embeddings", b"{}")
        assert e.value.status == 503 and time.monotonic() - start < 1
        with pytest.raises(GatewayError) as e:  # now known down: immediate 503 without connecting
            await pool2.post("/v1/embeddings", b"{}")
        assert e.value.status == 503 and "no healthy backend" in e.value.message
        await ups2.check_all()  # still refused: stays down
        assert pool2.replicas[0].healthy is False
    finally:
        await ups.close()
        await ups2.close()


async def test_backend_key_and_request_id_sent_upstream(backends) -> None:  # type: ignore[no-untyped-def]
    (u1, s1), _ = backends
    ups, pool = make([u1], backend_api_key="sekret")
    try:
        await pool.post("/v1/embeddings", b"{}", request_id="rid-1")
        assert s1.headers[0]["Authorization"] == "Bearer sekret"
        assert s1.headers[0]["X-Request-ID"] == "rid-1"
    finally:
        await ups.close()


async def test_health_check_brings_replica_back(backends) -> None:  # type: ignore[no-untyped-def]
    (u1, _), _ = backends
    ups, pool = make([u1])
    try:
        pool.replicas[0].healthy = False
        await ups.check_all()
        assert pool.replicas[0].healthy is True and pool.replicas[0].latency_ms is not None
    finally:
        await ups.close()


async def test_least_outstanding_then_round_robin() -> None:
    ups, pool = make(["http://a:1", "http://b:1", "http://c:1"])
    picks = [pool.pick().url for _ in range(6)]  # type: ignore[union-attr]
    assert sorted(picks) == sorted(["http://a:1", "http://b:1", "http://c:1"] * 2)
    pool.replicas[0].items = 3
    pool.replicas[1].items = 1
    assert pool.pick().url == "http://c:1"  # type: ignore[union-attr]
    await ups.close()


async def test_load_of_other_gateways_steers_the_choice() -> None:
    """vLLM's queue that is not ours (`others`, from its /metrics) counts like our own requests."""
    ups, pool = make(["http://a:1", "http://b:1"])
    a, b = pool.replicas
    a.others = 10.0  # another gateway keeps 10 requests on a
    picks = [pool.pick() for _ in range(10)]
    assert picks == [b] * 10  # nothing of ours is outstanding: b is less loaded
    b.items = 10  # our inputs in flight there (vLLM counts each input as a request)
    assert {pool.pick() for _ in range(4)} == {a, b}  # 10 + 0 against 0 + 10: round-robin again
    b.items = 11
    assert pool.pick() is a
    await ups.close()


VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="Qwen3-Embedding-0.6B"} 3.0
vllm:num_requests_running{engine="1",model_name="Qwen3-Embedding-0.6B"} 2.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="Qwen3-Embedding-0.6B"} 4.0
vllm:num_requests_waiting_by_reason{engine="0",reason="capacity"} 99.0
vllm:request_success_total{engine="0",finished_reason="stop"} 123.0
"""


@pytest.mark.parametrize(
    "page,load",
    [
        (VLLM_METRICS, 9.0),  # summed over engines; other metrics sharing a prefix are not counted
        (b"vllm:num_requests_running 2\nvllm:num_requests_waiting 1.5\n", 3.5),  # no labels
        (b"# a backend without vLLM's gauges\nprocess_cpu_seconds_total 1.0\n", None),
        # values no scheduler has are ignored, so a page cannot make a replica look idle or break the sum
        (b"vllm:num_requests_running nan\nvllm:num_requests_waiting -5\nvllm:num_requests_running x\n", None),
        (b"vllm:num_requests_running inf\nvllm:num_requests_waiting 1e9\nvllm:num_requests_running 1\n", 1.0),
        (b"vllm:num_requests_running 1\n" + b"#" * (METRICS_MAX_BYTES + 1), None),  # too big: not read
    ],
)
async def test_vllm_load_is_read_from_metrics(page: bytes, load: float | None) -> None:
    url, runner = await serve_models(cards({"id": "m"}), metrics=page)
    ups, pool = make([url])
    try:
        replica = pool.replicas[0]
        replica.items = 2  # ours, which vLLM counts too
        start = time.monotonic()
        await ups.check_all()
        assert time.monotonic() - start < 1.0
        assert replica.healthy and replica.load == load
        assert replica.others == (max(0.0, load - 2) if load is not None else 0.0)
    finally:
        await ups.close()
        await runner.cleanup()


async def serve_models(answer: bytes, metrics: bytes | None = None) -> tuple[str, web.AppRunner]:
    """A backend whose /health is fine and whose /v1/models answers `answer` (and /metrics `metrics`)."""

    async def models(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=metrics, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/health", _ok)
    app.router.add_get("/v1/models", models)
    if metrics is not None:
        app.router.add_get("/metrics", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return f"http://127.0.0.1:{port}", runner


def cards(*items: dict) -> bytes:  # type: ignore[type-arg]
    return orjson.dumps({"object": "list", "data": list(items)})


@pytest.mark.parametrize(
    "answer,served,max_len",
    [
        (cards({"id": "real", "max_model_len": 4096}), ("real",), 4096),
        # a huge answer (2 MiB of cards) is not parsed at all
        (cards(*({"id": f"m{i}", "max_model_len": 512} for i in range(60_000))), (), None),
        # at most 16 names; ids that are not short strings are dropped
        (cards(*({"id": f"m{i}"} for i in range(100))), tuple(f"m{i}" for i in range(16)), None),
        (cards({"id": 7}, {"id": ""}, {"id": "x" * 300}, {"id": ["a"]}, {"id": "ok"}), ("ok",), None),
        # context lengths that no model has are ignored, not used to cut documents to nothing
        (
            cards(
                {"id": "a", "max_model_len": True},
                {"id": "b", "max_model_len": 0},
                {"id": "c", "max_model_len": -5},
                {"id": "d", "max_model_len": 10**12},
                {"id": "e", "max_model_len": "512"},
            ),
            ("a", "b", "c", "d", "e"),
            None,
        ),
        (b"[1, 2", (), None),
        (b'{"data": 3}', (), None),
    ],
)
async def test_hostile_models_answers_are_bounded(answer: bytes, served: tuple[str, ...], max_len: int | None) -> None:
    url, runner = await serve_models(answer)
    ups, pool = make([url])
    try:
        start = time.monotonic()
        await ups.check_all()
        assert time.monotonic() - start < 1.0, "reading /v1/models must stay cheap"
        replica = pool.replicas[0]
        assert replica.healthy  # a bad /v1/models never marks a replica down: that is /health's to say
        assert replica.served == served and replica.max_model_len == max_len
        assert pool.max_model_len == max_len
        if len(answer) > MODELS_MAX_BYTES:
            assert len(answer) > 2 * 1024 * 1024  # the case really is over the cap
    finally:
        await ups.close()
        await runner.cleanup()


async def test_names_dns_cannot_resolve_keep_their_replica() -> None:
    """A label DNS refuses (empty, or over 63 characters, which raise UnicodeError rather than
    OSError) or a name that does not resolve: the URL stays the one replica, nothing raises."""
    ups, pool = make(["http://a..b:1", f"http://{'x' * 70}.example:1", "http://no-such-host.invalid:1"])
    try:
        assert await ups.discover() is False
        assert [r.url for r in pool.replicas] == ["http://a..b:1", f"http://{'x' * 70}.example:1",
                                                 "http://no-such-host.invalid:1"]  # fmt: skip
    finally:
        await ups.close()
