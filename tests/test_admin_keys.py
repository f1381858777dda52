"""Key admin over HTTP (routes.py, /admin/keys): the `keys` CLI's operations and storage for admin
keys, effective at once in the answering process and within 2 s in the others, audited."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from conftest import GatewayProc, backend_args, run_cli, start_backend, start_gateway, start_redis, wait_until


def _models(g: GatewayProc, key: str) -> int:
    return httpx.get(g.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_create_list_revoke_rotate_on_the_keys_file(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *backend_args(emb, None), "--reranker-url", "none")
    try:
        r = gw.post("/admin/keys", {"name": "team a", "rpm": 5, "models": ["Qwen3-Embedding-0.6B"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"  # no spaces, slashes
        r = gw.post("/admin/keys", {"name": "team-a", "rpm": 5, "models": ["Qwen3-Embedding-0.6B"]})
        assert r.status_code == 201, r.text
        created = r.json()
        key = created["key"]
        assert key.startswith("er-") and created["state"] == "active" and created["rate_limit"] == "5/minute"
        assert "hash" not in created
        assert _models(gw, key) == 200  # at once, in the process that answered
        listed = gw.get("/admin/keys").json()["data"]
        assert {k["name"] for k in listed} == {"admin", "team-a"} and all("hash" not in k for k in listed)
        assert key not in gw.keys_file.read_text()  # hashed, as the CLI writes it
        assert "team-a" in gw.cli("keys", "list").stdout  # the same storage as the CLI
        # what the CLI refuses, refused with the right status
        assert gw.post("/admin/keys", {"name": "team-a"}).status_code == 409
        assert gw.post("/admin/keys", {"name": "x", "rate_limit": "lots"}).status_code == 400
        assert gw.post("/admin/keys", {"name": "x", "expires": "soon"}).status_code == 400
        assert gw.post("/admin/keys", {"name": "x", "colour": "red"}).status_code == 400
        assert httpx.delete(gw.url + "/admin/keys/nobody", headers=gw.auth).status_code == 404
        # only admin keys
        assert httpx.get(gw.url + "/admin/keys", headers={"Authorization": f"Bearer {key}"}).status_code == 403
        assert httpx.get(gw.url + "/admin/keys").status_code == 401
        r = httpx.put(gw.url + "/admin/keys/team-a", headers=gw.auth)
        assert r.status_code == 405 and r.headers["allow"] == "DELETE"
        # revoke, then rotate brings it back with a new secret
        r = httpx.delete(gw.url + "/admin/keys/team-a", headers=gw.auth)
        assert r.status_code == 200 and r.json()["state"] == "revoked"
        assert _models(gw, key) == 401
        r = gw.post("/admin/keys/team-a/rotate")
        assert r.status_code == 200 and r.json()["state"] == "active"
        new = r.json()["key"]
        assert new != key and _models(gw, new) == 200 and _models(gw, key) == 401
        # audited: who did what, in the access log
        wait_until(lambda: "rotate team-a" in (gw.logs / "access.log").read_text(), 5, "access log")
        log = (gw.logs / "access.log").read_text()
        for what in ("create team-a", "revoke team-a", "rotate team-a", "list"):
            assert f'audit="{what}"' in log or f"audit={what}" in log, what
        assert "key=admin method=POST path=/admin/keys/team-a/rotate" in log
    finally:
        gw.stop()
        emb.stop()


def test_a_key_created_on_one_gateway_works_on_another_within_2_s(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    emb = start_backend(tmp_path, "embedding")
    args = (*backend_args(emb, None), "--reranker-url", "none", "--keys-store", "redis", "--redis-url", redis.url)
    a = start_gateway(tmp_path / "a", *args, admin_key=False)
    b = start_gateway(tmp_path / "b", *args, admin_key=False)
    try:
        admin = run_cli("keys", "--keys-store", "redis", "--redis-url", redis.url, "create", "--name", "ops", "--admin")
        assert admin.returncode == 0, admin.stderr
        headers = {"Authorization": f"Bearer {admin.stdout.strip()}"}
        wait_until(lambda: _models(a, admin.stdout.strip()) == 200, 2, "admin key on a")
        r = httpx.post(a.url + "/admin/keys", json={"name": "team-b"}, headers=headers)
        assert r.status_code == 201, r.text
        start = time.monotonic()
        wait_until(lambda: _models(b, r.json()["key"]) == 200, 2, "key on b")
        assert time.monotonic() - start < 2
        assert httpx.delete(b.url + "/admin/keys/team-b", headers=headers).status_code == 200
        wait_until(lambda: _models(a, r.json()["key"]) == 401, 2, "revoke on a")
    finally:
        for g in (a, b):
            g.stop()
        emb.stop()
        redis.stop()
