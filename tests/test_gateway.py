"""Reload by swap (er_gateway/gateway.py): `POST /reload_model` without a body builds new pools
from the config file, so a changed `timeout` or `backend_api_key` applies to the next request,
while requests already upstream finish on the objects they started with."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
from conftest import start_backend, start_gateway, wait_until


def test_reload_applies_timeout_and_backend_key_to_the_next_request(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding", extra=["--api-key", "key-b"])
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("timeout: 5\nbackend_api_key: key-a\n")
    gw = start_gateway(tmp_path / "gw", "--config", str(cfg), "--embedding-url", emb.url, "--reranker-url", "none")
    try:
        r = gw.post("/v1/embeddings", {"input": "x"})
        assert r.status_code == 502 and "backend key" in r.json()["error"]["message"], r.text

        cfg.write_text("timeout: 5\nbackend_api_key: key-b\n")
        assert gw.post("/reload_model").status_code == 200
        assert gw.post("/v1/embeddings", {"input": "x"}).status_code == 200
        assert emb.stats()["last_headers"]["Authorization"] == "Bearer key-b"

        # A request 1 s upstream, started under timeout 5, while the timeout becomes 0.3 s.
        emb.admin(delay=1.0)
        slow: list[httpx.Response] = []
        t = threading.Thread(target=lambda: slow.append(gw.post("/v1/embeddings", {"input": "slow"})))
        t.start()
        cfg.write_text("timeout: 0.3\nbackend_api_key: key-b\n")
        wait_until(lambda: emb.stats()["current"] >= 1, 5, "the slow request upstream")
        assert gw.post("/reload_model").status_code == 200
        # the new configuration sees the request the old one is serving (one state per URL):
        # a managed restart waits for it
        replica = gw.get("/health").json()["models"]["Qwen3-Embedding-0.6B"]["replicas"][0]
        assert replica["outstanding"] == 1
        t.join(10)
        assert slow and slow[0].status_code == 200, "the in-flight request finishes on its old pool"

        r = gw.post("/v1/embeddings", {"input": "next"})
        assert r.status_code == 504, r.text
        assert "0.3 s" in r.json()["error"]["message"]
    finally:
        gw.stop()
        emb.stop()


def test_reload_keeps_rate_limit_counts_and_refuses_a_bad_config(tmp_path: Path) -> None:
    """A reload must not hand every key a fresh budget (memory counters are kept, whatever else
    changed), and a config it cannot apply changes nothing: 400, old configuration kept."""
    emb = start_backend(tmp_path, "embedding")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("rate_limit: 10/minute\n")
    gw = start_gateway(
        tmp_path / "gw", "--config", str(cfg), "--embedding-url", emb.url, "--reranker-url", "none", admin_key=False
    )
    try:
        user = gw.cli("keys", "create", "--name", "user").stdout.strip()
        admin = gw.cli("keys", "create", "--name", "ops", "--admin", "--rate-limit", "1000/minute").stdout.strip()
        wait_until(lambda: gw.get("/v1/models", key=user).status_code == 200, 5, "keys reloaded")
        for _ in range(2):
            r = gw.post("/v1/embeddings", {"input": "x"}, key=user)
        assert r.headers["X-RateLimit-Remaining"] == "7", r.headers

        cfg.write_text("rate_limit: 10/minute\nredis_timeout: 0.7\nmax_retries: 1\nqueue_timeout: 3\n")
        r = gw.post("/reload_model", key=admin)
        assert r.status_code == 200
        assert r.json()["restart_needed"] == ["queue_timeout"]  # said, not silently ignored
        r = gw.post("/v1/embeddings", {"input": "x"}, key=user)
        assert r.headers["X-RateLimit-Remaining"] == "6", r.headers

        cfg.write_text("rate_limit: lots\n")
        r = gw.post("/reload_model", key=admin)
        assert r.status_code == 400, r.text
        assert "old configuration kept" in r.json()["error"]["message"] and "lots" in r.json()["error"]["message"]
        r = gw.post("/v1/embeddings", {"input": "x"}, key=user)
        assert r.status_code == 200 and r.headers["X-RateLimit-Remaining"] == "5"
    finally:
        gw.stop()
        emb.stop()


async def test_overlapping_reloads_leave_one_runtime_and_retire_the_rest(tmp_path: Path) -> None:
    """Two reloads at once (an HTTP reload and a broadcast, two SIGHUPs) run one after the other:
    every configuration built is either the one in use or retired, none is retired twice."""
    import asyncio

    from er_gateway import keys as ks
    from er_gateway.gateway import Gateway
    from er_gateway.settings import load_settings

    keys = tmp_path / "er_api_keys.json"
    ks.create_key(keys, "a")
    cli = {"keys_file": str(keys), "embedding_urls": "http://127.0.0.1:9", "reranker_urls": "none",
           "log_dir": str(tmp_path / "logs"), "cache_size": "0"}  # fmt: skip
    gw = Gateway(load_settings(cli, environ={}), cli)
    built = [gw.runtime]
    build = gw._build
    gw._build = lambda *a: built.append(build(*a)) or built[-1]  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(gw.reload() for _ in range(4)))
        assert len(built) == 5
        assert [rt.retired for rt in built] == [True, True, True, True, False] and gw.runtime is built[-1]
        assert len(gw._retired) == len(set(map(id, gw._retired)))
    finally:
        await gw.stop()
