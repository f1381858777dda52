"""SIGTERM drains (er_gateway/drain.py): readiness goes at once, serving goes after --drain-delay,
in-flight requests finish within --drain-timeout, exit status 0; a rolling restart behind nginx
loses nothing."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import httpx
from conftest import EMB, Backend, backend_args, free_port, start_backend, start_gateway, start_redis, wait_until


def only(emb: Backend) -> list[str]:
    return [*backend_args(emb, None), "--reranker-url", "none"]


def _embed(url: str, key: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        url + "/v1/embeddings",
        json={"model": EMB, "input": "hello"},
        headers={"Authorization": f"Bearer {key}"},
        timeout=timeout,
    )


def test_probes_while_serving(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *only(emb))
    try:
        wait_until(lambda: httpx.get(gw.url + "/health/ready").status_code == 200, 10, "ready")
        assert httpx.get(gw.url + "/health/ready").json() == {"status": "ready", "models": {EMB: True}}
        assert httpx.get(gw.url + "/health/live").json() == {"status": "alive"}
        emb.stop()  # no model can serve: not ready, but alive (a restart would not help)
        wait_until(lambda: httpx.get(gw.url + "/health/ready").status_code == 503, 15, "unready")
        assert httpx.get(gw.url + "/health/ready").json() == {"status": "unready", "models": {EMB: False}}
        assert httpx.get(gw.url + "/health/live").status_code == 200
    finally:
        gw.stop()


def test_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *only(emb), "--drain-delay", "1.5", "--drain-timeout", "10")
    try:
        emb.admin(delay=2.5)  # every request now takes 2.5 s upstream
        slow: list[httpx.Response] = []
        t = threading.Thread(target=lambda: slow.append(_embed(gw.url, gw.key)))
        t.start()
        wait_until(lambda: emb.stats()["current"] >= 1, 5, "request in flight")
        sent = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        # At once: not ready (every probe here answers well before the 1.5 s delay is over).
        wait_until(lambda: httpx.get(gw.url + "/health/ready").status_code == 503, 1.0, "draining")
        assert httpx.get(gw.url + "/health/ready").json()["status"] == "draining"
        health = httpx.get(gw.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        live = httpx.get(gw.url + "/health/live")
        assert live.status_code == 200 and live.headers["connection"] == "close"
        assert time.monotonic() - sent < 1.5
        # Still serving during the delay, each answer telling keep-alive clients to go elsewhere.
        emb.admin(delay=0)
        r = _embed(gw.url, gw.key)
        assert r.status_code == 200 and r.headers["connection"] == "close"
        # After the delay the port is closed; the request in flight since before SIGTERM finishes.
        wait_until(lambda: _refused(gw.url), 3.0, "stopped accepting")
        assert time.monotonic() - sent >= 1.5
        t.join(10)
        assert slow and slow[0].status_code == 200, slow
        assert gw.proc.wait(10) == 0
        assert time.monotonic() - sent < 5.0
    finally:
        gw.stop()
        emb.stop()


def _refused(url: str) -> bool:
    try:
        httpx.get(url + "/health/live", timeout=0.5)
    except httpx.ConnectError:
        return True
    return False


def test_drain_timeout_bounds_the_wait(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *only(emb), "--drain-delay", "0.5", "--drain-timeout", "1")
    try:
        emb.admin(delay=30)  # a request that would never finish in time
        t = threading.Thread(target=lambda: _swallow(gw.url, gw.key), daemon=True)
        t.start()
        wait_until(lambda: emb.stats()["current"] >= 1, 5, "request in flight")
        sent = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(10) == 0
        # 0.5 s delay + 1 s timeout, plus uvicorn's shutdown steps
        assert 1.5 <= time.monotonic() - sent < 3.5
    finally:
        gw.stop()
        emb.stop()


def _swallow(url: str, key: str) -> None:
    try:
        _embed(url, key, timeout=60)
    except httpx.HTTPError:
        pass


def test_second_sigterm_skips_the_delay(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *only(emb), "--drain-delay", "30")
    try:
        sent = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(gw.url + "/health/ready").status_code == 503, 1.0, "draining")
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(10) == 0
        assert time.monotonic() - sent < 3
    finally:
        gw.stop()
        emb.stop()


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream gateways {{
        server 127.0.0.1:{a} max_fails=1 fail_timeout=1s;
        server 127.0.0.1:{b} max_fails=1 fail_timeout=1s;
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://gateways;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
}}
"""


def test_rolling_restart_behind_nginx_loses_no_request(tmp_path: Path) -> None:
    """Two gateways behind nginx, 200 clients sending all along; each gateway is restarted in turn
    (SIGTERM, drained, exited 0, started again). Every request succeeds."""
    emb = start_backend(tmp_path, "embedding")
    ports = [free_port(), free_port()]
    args = (*only(emb), "--drain-delay", "2", "--rate-limit", "10000000/minute")
    keys = tmp_path / "er_api_keys.json"
    gws = [start_gateway(tmp_path / "a", *args, port=ports[0], keys_file=keys)]
    gws.append(start_gateway(tmp_path / "b", *args, port=ports[1], keys_file=keys))
    key = gws[0].key
    port = free_port()
    ndir = tmp_path / "nginx"
    ndir.mkdir()
    (ndir / "nginx.conf").write_text(NGINX_CONF.format(dir=ndir, a=ports[0], b=ports[1], port=port))
    nginx = subprocess.Popen(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(ndir / "nginx.conf"), "-p", str(ndir)],
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health/ready").status_code == 200, 10, "nginx")
        statuses: dict[int, int] = {}
        errors: list[str] = []
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession, i: int) -> None:
            body = {"model": EMB, "input": f"client {i}"}
            while not stop.is_set():
                try:
                    async with session.post(url + "/v1/embeddings", json=body) as r:
                        await r.read()
                        statuses[r.status] = statuses.get(r.status, 0) + 1
                except aiohttp.ClientError as e:
                    errors.append(repr(e))

        def restart(i: int) -> float:
            g = gws[i]
            sent = time.monotonic()
            g.proc.send_signal(signal.SIGTERM)
            assert g.proc.wait(30) == 0
            took = time.monotonic() - sent
            gws[i] = start_gateway(tmp_path / "abc"[i], *args, port=ports[i], keys_file=keys)
            gws[i].key = key
            return took

        async def run() -> list[float]:
            conn = aiohttp.TCPConnector(limit=200)
            headers = {"Authorization": f"Bearer {key}"}
            async with aiohttp.ClientSession(connector=conn, headers=headers) as session:
                tasks = [asyncio.create_task(client(session, i)) for i in range(200)]
                await asyncio.sleep(1.0)
                took = [await asyncio.to_thread(restart, i) for i in (0, 1)]
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*tasks)
                return took

        took = asyncio.run(run())
        total = sum(statuses.values())
        assert errors == [] and set(statuses) == {200}, (statuses, errors[:5])
        assert total > 400, statuses  # traffic flowed all along
        assert all(2.0 <= t < 10 for t in took), took  # each drained for its delay, then exited 0
    finally:
        nginx.terminate()
        nginx.wait(10)
        for g in gws:
            g.stop()
        emb.stop()


def test_workers_drain_and_the_supervisor_exits_0(tmp_path: Path) -> None:
    """With --workers 2 the supervisor passes SIGTERM to each worker, and each drains."""
    redis = start_redis(tmp_path)
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *only(emb), "--workers", "2", "--redis-url", redis.url, "--drain-delay", "1.5")
    try:
        wait_until(lambda: httpx.get(gw.url + "/health/ready").status_code == 200, 20, "ready")
        sent = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        # New connections go to either worker: every one of them answers 503 during the delay.
        wait_until(lambda: httpx.get(gw.url + "/health/ready").status_code == 503, 1.0, "draining")
        assert all(httpx.get(gw.url + "/health/ready").status_code == 503 for _ in range(6))
        assert _embed(gw.url, gw.key).status_code == 200
        assert time.monotonic() - sent < 1.5
        assert gw.proc.wait(15) == 0
        assert time.monotonic() - sent >= 1.5
    finally:
        gw.stop()
        emb.stop()
        redis.stop()
