"""Keys, rate limits and the concurrency cap on real gateway processes (plus a real Redis)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
from conftest import EMB, RER, backend_args, start_backend, start_gateway, start_redis, wait_until


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("limits")
    emb = start_backend(tmp, "embedding")
    rer = start_backend(tmp, "rerank")
    yield emb, rer
    emb.stop()
    rer.stop()


def new_key(gw, *args: str, hup: bool = False) -> str:  # type: ignore[no-untyped-def]
    """Create a key with the CLI; with hup=True make the gateway load it now (spending no request)."""
    r = gw.cli("keys", "create", *args)
    assert r.returncode == 0, r.stderr
    if hup:
        os.kill(gw.proc.pid, signal.SIGHUP)
        time.sleep(0.3)
    return r.stdout.strip()


def test_101st_request_gets_429_with_honest_retry_after(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(tmp_path, *backend_args(*backends))
    try:
        key = new_key(gw, "--name", "user", hup=True)  # default limit: 100/minute
        # The sliding-window counters roll over on the minute (epoch multiples of 60 s); 100 requests
        # that straddle a rollover are partly weighted down and leave 1-2 requests over. Start well
        # inside a window (a slow, loaded machine needs seconds for the 100).
        into = time.time() % 60
        if into > 40:
            time.sleep(60 - into + 0.2)
        for i in range(100):
            r = gw.get("/v1/models", key=key)
            assert r.status_code == 200, (i, r.text)
            assert r.headers["X-RateLimit-Limit"] == "100"
        assert r.headers["X-RateLimit-Remaining"] == "0"
        r = gw.get("/v1/models", key=key)
        assert r.status_code == 429
        assert r.json()["error"]["code"] == 429 and "user" in r.json()["error"]["message"]
        retry = int(r.headers["Retry-After"])
        assert 1 <= retry <= 60
        assert r.headers["X-RateLimit-Remaining"] == "0"
        limited_at = time.monotonic()
        # One second before the promised moment it must still refuse; right after it must accept.
        if retry > 1:
            time.sleep(max(0.0, retry - 1 - (time.monotonic() - limited_at) - 0.2))
            assert gw.get("/v1/models", key=key).status_code == 429
        time.sleep(max(0.0, retry - (time.monotonic() - limited_at)) + 0.3)
        assert gw.get("/v1/models", key=key).status_code == 200
        # the admin key (own budget) was never affected
        assert gw.get("/v1/models").status_code == 200
    finally:
        gw.stop()


def test_two_gateways_share_one_budget_in_redis(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    redis = start_redis(tmp_path)
    a = start_gateway(tmp_path / "a", *backend_args(*backends), "--redis-url", redis.url)
    b = start_gateway(tmp_path / "b", *backend_args(*backends), "--redis-url", redis.url, keys_file=a.keys_file)
    try:
        key = new_key(a, "--name", "shared", "--rpm", "20")
        time.sleep(2.2)  # both gateways see the new key within 2 s (no request spent on waiting)
        codes = [(a if i % 2 else b).get("/v1/models", key=key).status_code for i in range(30)]
        assert codes.count(200) == 20 and codes.count(429) == 10, codes
        # Redis killed mid-test: the documented default is fail-open (serve, warn, count).
        redis.stop(signal.SIGKILL)
        r = a.get("/v1/models", key=key)
        assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "20"
        assert "X-RateLimit-Remaining" not in r.headers  # nothing was counted, so nothing is claimed
        metrics = httpx.get(a.url + "/metrics").text
        assert "er_ratelimit_storage_errors_total 1" in metrics or "er_ratelimit_storage_errors_total 2" in metrics
        wait_until(
            lambda: "rate-limit storage failed" in (a.logs / "embedding_reranker_proxy.log").read_text(),
            5,
            "warning logged",
        )
    finally:
        for p in (a, b, redis):
            p.stop()


def test_redis_down_fail_closed_is_503(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    redis = start_redis(tmp_path)
    gw = start_gateway(tmp_path, *backend_args(*backends), "--redis-url", redis.url, "--redis-failure-mode", "closed")
    try:
        assert gw.get("/v1/models").status_code == 200
        redis.stop(signal.SIGKILL)
        start = time.monotonic()
        r = gw.get("/v1/models")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert time.monotonic() - start < 2
    finally:
        gw.stop()
        redis.stop()


def test_workers_share_limits_through_redis(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    redis = start_redis(tmp_path)
    gw = start_gateway(tmp_path, *backend_args(*backends), "--redis-url", redis.url, "--workers", "2")
    try:
        key = new_key(gw, "--name", "w", "--rpm", "30")
        time.sleep(2.2)
        codes = [
            httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code for _ in range(40)
        ]
        assert codes.count(200) == 30 and codes.count(429) == 10, codes
    finally:
        gw.stop()
        redis.stop()


def test_600_concurrent_requests_never_more_than_500_upstream(tmp_path: Path) -> None:
    slow = start_backend(tmp_path, "embedding", extra=["--delay", "1.5"])
    gw = start_gateway(
        tmp_path,
        "--embedding-url",
        slow.url,
        "--reranker-url",
        slow.url,
        "--max-concurrency",
        "500",
        "--max-concurrency-per-key",
        "500",
        "--queue-timeout",
        "0.5",
    )
    try:

        async def run() -> list[tuple[int, str | None]]:
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:

                async def one() -> tuple[int, str | None]:
                    async with s.post(gw.url + "/v1/embeddings", json={"input": "x"}, headers=gw.auth) as r:
                        await r.read()
                        return r.status, r.headers.get("Retry-After")

                return await asyncio.gather(*(one() for _ in range(600)))

        results = asyncio.run(run())
        stats = slow.stats()
        assert stats["max_concurrent"] <= 500
        assert stats["max_concurrent"] >= 450  # the cap was actually reached
        statuses = [s for s, _ in results]
        assert set(statuses) <= {200, 503}, set(statuses)
        assert statuses.count(200) >= 500 and statuses.count(503) >= 1
        assert all(ra == "1" for s, ra in results if s == 503)
        assert len(results) == 600
    finally:
        gw.stop()
        slow.stop()


def test_key_changes_take_effect_on_a_running_gateway(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(tmp_path, *backend_args(*backends))
    try:
        t0 = time.monotonic()
        k = new_key(gw, "--name", "live")
        wait_until(lambda: gw.get("/v1/models", key=k).status_code == 200, 2.5, "new key accepted")
        assert time.monotonic() - t0 < 3

        new = gw.cli("keys", "rotate", "live").stdout.strip()
        wait_until(lambda: gw.get("/v1/models", key=k).status_code == 401, 2.5, "old key refused")
        assert gw.get("/v1/models", key=new).status_code == 200

        assert gw.cli("keys", "revoke", "live").returncode == 0
        wait_until(lambda: gw.get("/v1/models", key=new).status_code == 401, 2.5, "revoked key refused")
        assert "revoked" in gw.get("/v1/models", key=new).json()["error"]["message"]

        expired = new_key(gw, "--name", "old", "--expires", "2020-01-01")
        time.sleep(1.5)
        r = gw.get("/v1/models", key=expired)
        assert r.status_code == 401 and "expired" in r.json()["error"]["message"]

        only = new_key(gw, "--name", "emb-only", "--models", EMB)
        wait_until(lambda: gw.post("/v1/embeddings", {"input": "x"}, key=only).status_code == 200, 2.5, "allowed")
        r = gw.post("/v1/rerank", {"model": RER, "query": "q", "documents": ["d"]}, key=only)
        assert r.status_code == 403 and r.json()["error"]["code"] == 403
        assert [m["id"] for m in gw.get("/v1/models", key=only).json()["data"]] == [EMB]

        # SIGHUP and POST /reload_model reload at once; non-admin keys may not reload
        later = new_key(gw, "--name", "hup")
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_until(lambda: gw.get("/v1/models", key=later).status_code == 200, 1, "SIGHUP reload")
        assert gw.post("/reload_model", key=later).status_code == 403
        r = gw.post("/reload_model")
        assert r.status_code == 200 and {m["name"] for m in r.json()["models"]} == {EMB, RER}

        # a corrupt file at runtime keeps the old keys (and says so), and is never overwritten
        gw.keys_file.write_text("{broken")
        time.sleep(1.5)
        assert gw.get("/v1/models", key=later).status_code == 200
        assert gw.keys_file.read_text() == "{broken"
        assert "keeping the previous keys" in (gw.logs / "embedding_reranker_proxy.log").read_text()
    finally:
        gw.stop()

    # the key is never in any log file, whichever way it was sent
    for f in gw.logs.glob("*"):
        text = f.read_text()
        for secret in (k, new, expired, only, later, gw.key):
            assert secret not in text, f


def test_query_string_key_is_not_logged(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    gw = start_gateway(tmp_path, *backend_args(*backends), "--log-level", "debug")
    try:
        assert httpx.get(f"{gw.url}/v1/models?api_key={gw.key}").status_code == 200
        assert httpx.get(f"{gw.url}/v1/models?api_key=er-wrong-key-123").status_code == 401
    finally:
        gw.stop()
    for f in list(gw.logs.glob("*")) + [gw.log]:
        text = f.read_text()
        assert gw.key not in text and "er-wrong-key-123" not in text, f
    assert "key=admin" in (gw.logs / "access.log").read_text()


def test_token_budget_per_key(tmp_path: Path, backends) -> None:  # type: ignore[no-untyped-def]
    """Tokens are reserved before forwarding (here an upper bound: the stand-in model has no
    tokenizer.json, so 7 bytes + 2 special tokens = 9) and settled to what vLLM reports (5)."""
    gw = start_gateway(tmp_path, *backend_args(*backends))
    try:
        key = new_key(gw, "--name", "tok", "--tpm", "20", hup=True)
        r = gw.post("/v1/embeddings", {"input": "a b c d"}, key=key)  # the stand-in counts 5 tokens
        assert r.status_code == 200
        assert r.headers["X-RateLimit-Limit-Tokens"] == "20" and r.headers["X-RateLimit-Remaining-Tokens"] == "11"
        r = gw.post("/v1/embeddings", {"input": "a b c d"}, key=key)
        assert r.headers["X-RateLimit-Remaining-Tokens"] == "6"  # 20 - 5 settled - 9 reserved
        r = gw.post("/v1/embeddings", {"input": "a b c d"}, key=key)
        assert r.headers["X-RateLimit-Remaining-Tokens"] == "1"  # 20 - 10 - 9
        r = gw.post("/v1/embeddings", {"input": "a b c d"}, key=key)  # 5 left, 9 needed: refused up front
        assert r.status_code == 429 and "has 5 tokens left; this request needs about 9" in r.json()["error"]["message"]
        assert r.headers["X-RateLimit-Remaining-Tokens"] == "5" and int(r.headers["Retry-After"]) >= 1
        assert r.headers["X-RateLimit-Limit"] == "100"  # the request-limit family is there too
    finally:
        gw.stop()
