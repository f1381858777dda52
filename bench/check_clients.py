#!/usr/bin/env python3
"""Check every upstream client in bench/clients.py against a tiny local server:
bytes and headers arrive intact, and each failure raises the home client's exception.

    .venv/bin/python bench/check_clients.py [home,aiohttp,aiosonic,pyreqwest]
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clients import CLIENTS, versions  # noqa: E402
from er_gateway.httpclient import ConnectError, DisconnectError, ProtocolError  # noqa: E402

BODY = json.dumps({"input": "é" * 3000}).encode()  # non-ASCII, larger than one small read


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ")
            hdrs = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:] if ln)}
            body = await reader.readexactly(int(hdrs.get("content-length", 0)))
            if target.endswith("/echo"):
                out = json.dumps({"method": method, "target": target, "headers": hdrs}).encode() + b"\n" + body
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(out), out))
            elif target.endswith("/chunked"):
                writer.write(
                    b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nbusy \r\n3\r\nnow\r\n0\r\n\r\n"
                )
            elif target.endswith("/garbage"):
                writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
            elif target.endswith("/truncated"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
                await writer.drain()
                break
            elif target.endswith("/slow"):
                await asyncio.sleep(3)
            elif target.endswith("/close-after"):  # a keep-alive answer, then the server hangs up
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
                break
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):  # client gone, or shutdown
        pass
    finally:
        writer.close()


async def check(name: str, base: str, dead: str, full: str) -> list[str]:
    cls = CLIENTS[name]
    pool = cls(
        base + "/prefix",
        connect_timeout=1,
        timeout=10,
        headers={"Content-Type": "application/json", "Authorization": "Bearer k"},
    )
    dead_pool = cls(dead, connect_timeout=1, timeout=10)
    full_pool = cls(full, connect_timeout=0.5, timeout=10)
    failures = []

    async def expect(label: str, exc: type[BaseException] | None, coro) -> object:
        try:
            result = await coro
        except BaseException as e:  # noqa: BLE001 - we report whatever came out
            if exc is None or not isinstance(e, exc):
                failures.append(f"{label}: raised {type(e).__module__}.{type(e).__name__}: {e}")
            return None
        if exc is not None:
            failures.append(f"{label}: returned {result!r}, expected {exc.__name__}")
        return result

    for _ in range(2):  # the second time over a reused connection
        r = await expect("echo", None, pool.request("POST", "/v1/echo", BODY, {"X-Request-ID": "r1"}))
        if r is not None:
            meta, _, got = r.body.partition(b"\n")
            info = json.loads(meta)
            want = {"method": "POST", "target": "/prefix/v1/echo"}
            if r.status != 200 or got != BODY or any(info[k] != v for k, v in want.items()):
                failures.append(f"echo: status {r.status}, meta {info}, body equal: {got == BODY}")
            for k, v in {
                "x-request-id": "r1",
                "authorization": "Bearer k",
                "content-type": "application/json",
                "user-agent": "er-gateway",
            }.items():
                if info["headers"].get(k) != v:
                    failures.append(f"echo: header {k} = {info['headers'].get(k)!r}, want {v!r}")
    r = await expect("chunked 503", None, pool.request("POST", "/chunked", b"{}"))
    if r is not None and (r.status, r.body) != (503, b"busy now"):
        failures.append(f"chunked 503: got {r.status} {r.body!r}")
    await expect("health GET", None, pool.request("GET", "/echo", timeout=2))
    await expect("close-after", None, pool.request("POST", "/close-after", b"{}"))
    await asyncio.sleep(0.1)
    await expect("reuse after server close", None, pool.request("POST", "/v1/echo", b"{}"))
    await expect("refused", ConnectError, dead_pool.request("POST", "/x", b"{}"))
    await expect("connect timeout", ConnectError, full_pool.request("POST", "/x", b"{}"))
    await expect("garbage", ProtocolError, pool.request("POST", "/garbage", b"{}"))
    await expect("truncated", DisconnectError, pool.request("POST", "/truncated", b"{}"))
    await expect("slow", TimeoutError, pool.request("POST", "/slow", b"{}", timeout=0.5))
    await pool.close()
    await dead_pool.close()
    await full_pool.close()
    return failures


async def main() -> int:
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(CLIENTS)
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    # A listener whose accept queue is full: the kernel drops further SYNs, so connects time out.
    backlog = socket.socket()
    backlog.bind(("127.0.0.1", 0))
    backlog.listen(0)
    full = f"http://127.0.0.1:{backlog.getsockname()[1]}"
    fillers = [socket.socket() for _ in range(3)]
    for s in fillers:
        s.setblocking(False)
        s.connect_ex(backlog.getsockname())
    bad = 0
    v = versions()
    for name in names:
        failures = await check(name, base, dead, full)
        print(f"{name:<10} {v[name]:<14} {'ok' if not failures else 'FAILED'}")
        for f in failures:
            print(f"    {f}")
        bad += bool(failures)
    server.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
