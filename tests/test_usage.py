"""GET /v1/usage (er_gateway/usage.py): per key, model and UTC day; a key sees its own, an admin
every key's; kept beside the keys file (at most --usage-snapshot-interval lost, even to SIGKILL)
or in Redis, where several gateways add to the same totals."""

from __future__ import annotations

import datetime as dt
import signal
import time
from pathlib import Path

import httpx
from conftest import EMB, RER, GatewayProc, backend_args, run_cli, start_backend, start_gateway, start_redis

TODAY = dt.datetime.now(dt.UTC).date().isoformat()


def _usage(g: GatewayProc, api_key: str, **params: str) -> httpx.Response:
    return httpx.get(g.url + "/v1/usage", params=params, headers={"Authorization": f"Bearer {api_key}"})


def _work(g: GatewayProc, key: str) -> int:
    """3 embeddings requests (5 inputs), 1 rerank (3 documents), 1 failing; tokens vLLM counted."""
    tokens = 0
    for inp in ("a", ["b c", "d"], ["e", "f"]):
        tokens += g.post("/v1/embeddings", {"model": EMB, "input": inp}, key=key).json()["usage"]["total_tokens"]
    r = g.post("/v1/rerank", {"model": RER, "query": "q", "documents": ["x", "y", "z"]}, key=key)
    tokens += r.json()["usage"]["total_tokens"]
    assert g.post("/v1/embeddings", {"model": EMB, "input": "w " * 600}, key=key).status_code == 400
    return tokens


def test_each_key_sees_its_own_and_an_admin_sees_all(tmp_path: Path) -> None:
    emb, rer = start_backend(tmp_path, "embedding"), start_backend(tmp_path, "rerank")
    gw = start_gateway(tmp_path, *backend_args(emb, rer), "--usage-snapshot-interval", "0.5")
    try:
        user = gw.cli("keys", "create", "--name", "user").stdout.strip()
        other = gw.cli("keys", "create", "--name", "other").stdout.strip()
        time.sleep(1.2)  # the keys file is re-read within a second
        tokens = _work(gw, user)
        gw.post("/v1/embeddings", {"model": EMB, "input": "x"}, key=other)
        time.sleep(0.3)
        mine = _usage(gw, user).json()
        assert mine["days"] == 31
        rows = {(r["key"], r["model"]): r for r in mine["data"]}
        assert set(rows) == {("user", EMB), ("user", RER)}  # not the other key's
        e, r = rows[("user", EMB)], rows[("user", RER)]
        assert (e["date"], e["requests"], e["inputs"], e["errors"]) == (TODAY, 3, 5, 1)
        assert (r["requests"], r["inputs"], r["errors"]) == (1, 3, 0)
        assert e["tokens"] + r["tokens"] == tokens
        everyone = _usage(gw, gw.key).json()["data"]
        assert {row["key"] for row in everyone} == {"user", "other"}  # the admin key embedded nothing
        assert [row["key"] for row in _usage(gw, gw.key, key="other").json()["data"]] == ["other"]
        assert _usage(gw, user, key="other").status_code == 403
        assert _usage(gw, user, key="user").status_code == 200
        for bad in ("0", "32", "x"):
            assert _usage(gw, user, days=bad).status_code == 400
        assert httpx.get(gw.url + "/v1/usage").status_code == 401
        # kept beside the keys file: a SIGKILL loses at most one snapshot interval
        time.sleep(1.0)
        assert gw.keys_file.with_suffix(".usage.json").exists()
        gw.stop(signal.SIGKILL)
        gw = start_gateway(tmp_path, *backend_args(emb, rer), port=int(gw.url.rsplit(":", 1)[1]), admin_key=False)
        again = {(r["key"], r["model"]): r for r in _usage(gw, user).json()["data"]}
        assert again[("user", EMB)]["requests"] == 3 and again[("user", RER)]["inputs"] == 3
    finally:
        gw.stop()
        emb.stop()
        rer.stop()


def test_gateways_sharing_redis_add_to_the_same_totals(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    emb, rer = start_backend(tmp_path, "embedding"), start_backend(tmp_path, "rerank")
    keys = tmp_path / "er_api_keys.json"
    args = (*backend_args(emb, rer), "--redis-url", redis.url)
    a = start_gateway(tmp_path / "a", *args, keys_file=keys)
    b = start_gateway(tmp_path / "b", *args, keys_file=keys)
    try:
        user = run_cli("--keys-file", str(keys), "keys", "create", "--name", "user").stdout.strip()
        time.sleep(1.2)
        tokens = _work(a, user) + _work(b, user)
        time.sleep(1.5)  # counters reach Redis once a second
        for g in (a, b):
            rows = {r["model"]: r for r in _usage(g, user).json()["data"]}
            assert rows[EMB]["requests"] == 6 and rows[EMB]["inputs"] == 10 and rows[EMB]["errors"] == 2
            assert rows[RER]["requests"] == 2 and rows[EMB]["tokens"] + rows[RER]["tokens"] == tokens
    finally:
        for g in (a, b):
            g.stop()
        emb.stop()
        rer.stop()
        redis.stop()
