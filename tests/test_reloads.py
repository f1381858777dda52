"""A reload reaches every process sharing a Redis (er_gateway/reloads.py): /reload_model or
SIGHUP on one gateway (or on a `--workers 2` supervisor) reloads every worker of every gateway,
and the answer says how many acknowledged."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
from conftest import EMB, GatewayProc, start_backend, start_gateway, start_redis, wait_until


def _config(path: Path, url: str, alias: str) -> None:
    path.write_text(f"models:\n  - name: {EMB}\n    kind: embedding\n    urls: [{url}]\n    aliases: [{alias}]\n")


def _names(gw: GatewayProc, key: str) -> set[str]:
    # a fresh connection each time: with --workers 2 either worker may answer
    r = httpx.get(gw.url + "/v1/models", headers={"Authorization": f"Bearer {key}", "Connection": "close"})
    return {m["id"] for m in r.json()["data"]}


def test_reload_reaches_every_worker_and_gateway(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    emb = start_backend(tmp_path, "embedding")
    shared, own = tmp_path / "shared.yaml", tmp_path / "own.yaml"
    _config(shared, emb.url, "v1")
    _config(own, emb.url, "v1")
    keys = tmp_path / "er_api_keys.json"
    common = ("--redis-url", redis.url, "--health-interval", "0.5")
    a = start_gateway(tmp_path / "a", "--config", str(shared), *common, keys_file=keys)
    key = a.key
    b = start_gateway(tmp_path / "b", "--config", str(shared), "--workers", "2", *common, keys_file=keys)
    c = start_gateway(tmp_path / "c", "--config", str(own), *common, keys_file=keys)
    gws = (a, b, c)
    try:
        for g in gws:
            wait_until(lambda g=g: "v1" in _names(g, key), 10, "started")
        time.sleep(0.5)  # every process subscribed to the reload channel
        # 1. /reload_model on one gateway: 4 processes (a, b's two workers, c) reload
        _config(shared, emb.url, "v2")
        _config(own, emb.url, "v2")
        r = a.post("/reload_model", key=key)
        assert r.status_code == 200, r.text
        assert r.json()["processes"] == {"processes": 4, "acknowledged": 4, "failed": []}
        for g in gws:
            assert all("v2" in _names(g, key) for _ in range(12)), g.url
        # 2. one process cannot load its configuration: the others reload, the answer names it
        own.write_text("models: [oops")
        _config(shared, emb.url, "v3")
        r = a.post("/reload_model", key=key)
        assert r.status_code == 200
        reach = r.json()["processes"]
        assert reach["processes"] == 4 and reach["acknowledged"] == 3, reach
        assert len(reach["failed"]) == 1 and "cannot parse config file" in reach["failed"][0]["error"], reach
        assert "v3" in _names(b, key) and "v2" in _names(c, key)  # c kept what it had
        # 3. the process asked cannot load its configuration: a 400, and nothing is broadcast
        _config(shared, emb.url, "v4")
        r = c.post("/reload_model", key=key)
        assert r.status_code == 400 and "cannot parse config file" in r.json()["error"]["message"]
        time.sleep(1.0)
        assert "v3" in _names(a, key) and "v3" in _names(b, key)
        # 4. SIGHUP to b's supervisor: one worker reloads and broadcasts; all four follow
        _config(own, emb.url, "v4")
        b.proc.send_signal(signal.SIGHUP)
        for g in gws:
            wait_until(lambda g=g: all("v4" in _names(g, key) for _ in range(6)), 5, f"SIGHUP reached {g.url}")
        wait_until(lambda: "4 of 4 process(es) acknowledged" in (b.logs / "embedding_reranker_proxy.log").read_text(),
                   5, "SIGHUP acknowledged")  # fmt: skip
    finally:
        for g in gws:
            g.stop()
        emb.stop()
        redis.stop()
