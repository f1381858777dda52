"""Keys in Redis (`--keys-store redis`, er_gateway/keys_redis.py): the `keys` CLI on the same
settings as the gateway, import of a keys file, and every gateway following creates and revokes
within 2 s, a missed message included."""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import orjson
import pytest
import redis
from conftest import EMB, PY, ROOT, Redis, backend_args, run_cli, start_backend, start_gateway, start_redis, wait_until

from er_gateway import keys as ks
from er_gateway.keys_redis import CHANNEL, HASH, VERSION, RedisStore


@pytest.fixture
def rds(tmp_path: Path) -> Redis:  # type: ignore[misc]
    r = start_redis(tmp_path)
    yield r
    r.stop()


def keys_cli(r: Redis, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("keys", "--keys-store", "redis", "--redis-url", r.url, *args, env=env)


def test_cli_writes_to_redis_from_flags_environment_or_config_file(rds: Redis, tmp_path: Path) -> None:
    r = keys_cli(rds, "create", "--name", "a", "--rpm", "5", "--models", EMB)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    # the same settings from ER_* variables, and from a config file
    env = {"ER_KEYS_STORE": "redis", "ER_REDIS_URL": rds.url}
    assert run_cli("keys", "create", "--name", "b", env=env).returncode == 0
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"keys_store: redis\nredis_url: {rds.url}\n")
    assert run_cli("keys", "--config", str(cfg), "create", "--name", "c", "--admin").returncode == 0
    listed = run_cli("keys", "list", env=env)
    assert listed.returncode == 0
    rows = {line.split()[0]: line for line in listed.stdout.splitlines()[1:]}
    assert set(rows) == {"a", "b", "c"} and "5/minute" in rows["a"] and rows["c"].endswith("admin")
    # hashed as in the file: the key itself is nowhere in Redis
    raw = redis.Redis.from_url(rds.url).hgetall(HASH)
    assert orjson.loads(raw[b"a"])["hash"] == ks.hash_key(key)
    assert not any(key.encode() in v for v in raw.values())
    assert keys_cli(rds, "revoke", "a").returncode == 0
    assert keys_cli(rds, "create", "--name", "a").returncode == 1  # names stay unique
    rotated = keys_cli(rds, "rotate", "a")
    assert rotated.returncode == 0 and rotated.stdout.strip() != key
    state = {k.name: k for k in RedisStore(rds.url).read()}
    assert not state["a"].revoked and state["a"].hash == ks.hash_key(rotated.stdout.strip())
    # without --redis-url the store cannot be used: a clear error, nothing written
    r = run_cli("keys", "--keys-store", "redis", "list", env={"ER_REDIS_URL": ""})
    assert r.returncode == 2 and "--keys-store redis needs --redis-url" in r.stderr


def test_concurrent_commands_lose_nothing(rds: Redis) -> None:
    store = RedisStore(rds.url)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: ks.create_key(store, f"k{i}"), range(40)))
    assert sorted(k.name for k in store.read()) == sorted(f"k{i}" for i in range(40))
    assert int(redis.Redis.from_url(rds.url).get(VERSION)) == 40


def test_import_copies_a_keys_file_and_can_run_twice(rds: Redis, tmp_path: Path) -> None:
    f = tmp_path / "er_api_keys.json"
    old = ks.create_key(f, "old", rate_limit="7/minute")
    ks.create_key(f, "admin", admin=True)
    ks.create_key(RedisStore(rds.url), "admin")  # already in Redis: kept as it is
    r = keys_cli(rds, "--keys-file", str(f), "import")
    assert r.returncode == 0, r.stderr
    assert "imported 1 key(s)" in r.stderr and "kept 1 already there: admin" in r.stderr
    again = keys_cli(rds, "import", str(f))
    assert again.returncode == 0 and "imported 0 key(s)" in again.stderr
    by_name = {k.name: k for k in RedisStore(rds.url).read()}
    assert by_name["old"].hash == ks.hash_key(old) and by_name["old"].rate_limit == "7/minute"
    assert not by_name["admin"].admin  # Redis's own record won
    # the imported key works on a gateway reading Redis
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path / "gw", *backend_args(emb, None), "--reranker-url", "none", *_redis(rds))
    try:
        assert gw.post("/v1/embeddings", {"input": "x"}, key=old).status_code == 200
    finally:
        gw.stop()
        emb.stop()
    r = run_cli("keys", "import", str(f))
    assert r.returncode == 2 and "--keys-store redis" in r.stderr


def _redis(r: Redis) -> tuple[str, ...]:
    return ("--keys-store", "redis", "--redis-url", r.url)


def _status(url: str, key: str) -> int:
    return httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_two_gateways_see_creates_and_revokes_within_2_s(rds: Redis, tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    args = (*backend_args(emb, None), "--reranker-url", "none", *_redis(rds))
    gws = [start_gateway(tmp_path / f"g{i}", *args, admin_key=False) for i in range(2)]
    store = RedisStore(rds.url)
    try:
        for g in gws:
            wait_until(lambda g=g: httpx.get(g.url + "/health/ready").status_code == 200, 10, "ready")

        def everywhere(key: str, status: int, what: str) -> float:
            start = time.monotonic()
            for g in gws:
                wait_until(lambda g=g: _status(g.url, key) == status, 2.0, what)
            return time.monotonic() - start

        key = ks.create_key(store, "new")
        assert everywhere(key, 200, "create seen") < 2.0
        ks.revoke_key(store, "new")
        assert everywhere(key, 401, "revoke seen") < 2.0
        # a change whose message is lost (written without PUBLISH): the periodic check heals it
        client = redis.Redis.from_url(rds.url)
        fresh = ks.generate_key()
        record = ks.new_record("quiet", fresh)
        client.hset(HASH, "quiet", orjson.dumps(record.to_json()))
        client.incr(VERSION)
        assert everywhere(fresh, 200, "missed message healed") < 2.0
        # a corrupt record is refused whole: the keys already in use stay
        client.hset(HASH, "bad", b"{not json")
        client.incr(VERSION)
        client.publish(CHANNEL, b"changed")
        time.sleep(1.5)
        assert all(_status(g.url, fresh) == 200 for g in gws)
        assert "is corrupt" in gws[0].log.read_text()
    finally:
        for g in gws:
            g.stop()
        emb.stop()


def test_first_start_creates_one_admin_key_in_redis(rds: Redis, tmp_path: Path) -> None:
    """Two gateways starting at once on an empty Redis: one "default" admin key, printed once."""
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                PY,
                str(ROOT / "embedding_reranker_proxy.py"),
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                "--log-dir",
                str(tmp_path / f"logs{i}"),
                "--embedding-url",
                "http://127.0.0.1:9",
                "--reranker-url",
                "none",
                *_redis(rds),
            ],
            stdout=out.open("w"),
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )  # fmt: skip
        for i, out in enumerate(outs)
    ]
    try:
        wait_until(lambda: all("Uvicorn running" in o.read_text() for o in outs), 20, "both started")
        banners = [o.read_text().count("First start") for o in outs]
        assert sorted(banners) == [0, 1]
        keys = RedisStore(rds.url).read()
        assert [(k.name, k.admin) for k in keys] == [("default", True)]
        assert not (tmp_path / "er_api_keys.json").exists()
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_redis_down_at_start_then_up(tmp_path: Path) -> None:
    """Keys not read yet: a request with a key gets 503 (not a false 401) and the gateway is not
    ready; once Redis answers, the keys are read within 2 s. Redis going away later keeps them."""
    from conftest import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(
        tmp_path, *backend_args(emb, None), "--reranker-url", "none", "--keys-store", "redis", "--redis-url", url,
        admin_key=False,
    )  # fmt: skip
    r2 = None
    try:
        assert _status(gw.url, "er-anything") == 503
        assert httpx.get(gw.url + "/health/ready").json()["status"] == "unready"
        r2 = start_redis(tmp_path, port=port)
        key = ks.create_key(RedisStore(url), "late")
        wait_until(lambda: _status(gw.url, key) == 200, 2.5, "keys read once Redis is up")
        assert httpx.get(gw.url + "/health/ready").status_code == 200
        r2.stop()
        assert _status(gw.url, key) == 200  # kept; the rate limit's failure mode is open
        assert _status(gw.url, "er-unknown") == 401
    finally:
        gw.stop()
        emb.stop()
        if r2 is not None:
            r2.stop()


def test_a_flushed_redis_does_not_lock_everyone_out(rds: Redis, tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *backend_args(emb, None), "--reranker-url", "none", *_redis(rds), admin_key=False)
    try:
        key = ks.create_key(RedisStore(rds.url), "kept")
        wait_until(lambda: _status(gw.url, key) == 200, 2.0, "key seen")
        redis.Redis.from_url(rds.url).flushall()  # keys and version gone
        time.sleep(1.5)
        assert _status(gw.url, key) == 200
        assert "no API keys" in (gw.logs / "embedding_reranker_proxy.log").read_text()
        # the next change through the commands is taken as it is
        fresh = ks.create_key(RedisStore(rds.url), "after")
        wait_until(lambda: _status(gw.url, fresh) == 200 and _status(gw.url, key) == 401, 2.0, "new set used")
    finally:
        gw.stop()
        emb.stop()
