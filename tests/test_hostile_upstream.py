"""Through a real gateway, an upstream that misbehaves: every request gets its own answer or a
clean 502/504 — never another request's bytes — and the pool recovers afterwards."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import EMB, GatewayProc, start_gateway
from hostile_upstream import HostileUpstream, answer_body, http_answer, normal, reset

CAP = 8 * 1024 * 1024  # --max-upstream-bytes for this module's gateway


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostileUpstream, GatewayProc]]:
    server = HostileUpstream()
    server.start()
    gw = start_gateway(
        tmp_path_factory.mktemp("hostile"),
        "--embedding-url",
        server.url,
        "--reranker-url",
        server.url,
        "--timeout",
        "1",
        "--max-upstream-bytes",
        str(CAP),
        "--eject-cooldown",
        "0",
    )
    yield server, gw
    gw.stop()


@pytest.fixture
def hostile(up: tuple[HostileUpstream, GatewayProc]) -> Iterator[tuple[HostileUpstream, GatewayProc]]:
    server, gw = up
    server.drop_connections()
    time.sleep(0.05)
    yield server, gw
    # The pool recovers: after the fault, normal traffic gets its own answers.
    server.behaviour = normal
    results = asyncio.run(send(gw, [f"after-{i}" for i in range(20)]))
    assert all(status == 200 for status, _, _ in results), results
    check_own_answers(results)


async def send(gw: GatewayProc, texts: list[str], gap: float = 0.0) -> list[tuple[int, str, bytes]]:
    """POST each text (concurrently, or one by one `gap` seconds apart); (status, text, body)."""
    async with httpx.AsyncClient(timeout=30, headers=gw.auth) as client:

        async def one(text: str) -> tuple[int, str, bytes]:
            r = await client.post(gw.url + "/v1/embeddings", json={"input": text, "model": EMB})
            return r.status_code, text, r.content

        if not gap:
            return list(await asyncio.gather(*(one(t) for t in texts)))
        out = []
        for t in texts:
            out.append(await one(t))
            await asyncio.sleep(gap)
        return out


def check_own_answers(results: list[tuple[int, str, bytes]]) -> None:
    """Each 200 carries exactly its own answer; each error is a clean envelope naming no address."""
    for status, text, body in results:
        if status == 200:
            assert body == answer_body(text), f"{text!r} got {body[:200]!r}"
        else:
            assert status in (502, 504), (status, body)
            err = orjson.loads(body)["error"]
            assert "replica 0 of model" in err["message"] and "127.0.0.1" not in err["message"], err
            assert b"tenant" not in body and b"after-" not in body  # nobody's text in an error


def tenants(n: int, tag: str = "tenant") -> list[str]:
    return [f"{tag}-{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]


def test_interim_answers_are_skipped(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def interim(w, body, n, answer):  # type: ignore[no-untyped-def]
        w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.002)
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
        await w.drain()
        await asyncio.sleep(0.002)
        w.write(http_answer(answer))
        return True

    server.behaviour = interim
    before = server.connections
    results = asyncio.run(send(gw, tenants(40)))
    assert [s for s, _, _ in results] == [200] * 40
    check_own_answers(results)
    results = asyncio.run(send(gw, tenants(5, "seq"), gap=0.01))
    assert [s for s, _, _ in results] == [200] * 5
    check_own_answers(results)
    assert server.connections - before <= 40  # connections were kept and reused


def test_stray_bytes_on_an_idle_connection_close_it(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def stray(w, body, n, answer):  # type: ignore[no-untyped-def]
        w.write(http_answer(answer))
        await w.drain()
        await asyncio.sleep(0.01)  # the client is idle by now: a late duplicate, then half a head
        w.write(http_answer(answer) + b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n")
        return True

    server.behaviour = stray
    results = asyncio.run(send(gw, tenants(8), gap=0.1))
    assert [s for s, _, _ in results] == [200] * 8
    check_own_answers(results)


def test_bytes_after_a_complete_answer_close_the_connection(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def pipelined(w, body, n, answer):  # type: ignore[no-untyped-def]
        # The answer, then in the same segment another full answer and a head whose body would
        # be the next request's answer, if the connection were kept.
        w.write(
            http_answer(answer)
            + http_answer(answer_body("someone-else"))
            + b"HTTP/1.1 200 OK\r\nContent-Length: 60\r\n\r\n"
        )
        return True

    server.behaviour = pipelined
    results = asyncio.run(send(gw, tenants(30)))
    assert [s for s, _, _ in results] == [200] * 30
    check_own_answers(results)
    assert not any(b"someone-else" in b for _, _, b in results)


def test_late_answer_after_a_timeout_reaches_nobody(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def late(w, body, n, answer):  # type: ignore[no-untyped-def]
        if b"slow" in body:
            await asyncio.sleep(1.3)  # past the gateway's --timeout 1
        w.write(http_answer(answer))
        return True

    server.behaviour = late

    async def scenario() -> list[tuple[int, str, bytes]]:
        slow = asyncio.ensure_future(send(gw, tenants(4, "slow")))
        await asyncio.sleep(0.2)
        fast = await send(gw, tenants(20), gap=0.07)  # spans the moment the late answers arrive
        return (await slow) + fast

    start = time.monotonic()
    results = asyncio.run(scenario())
    assert [s for s, t, _ in results if t.startswith("slow")] == [504] * 4
    assert all(s == 200 for s, t, _ in results if not t.startswith("slow"))
    check_own_answers(results)
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("case", ["framed", "eof_delimited"])
def test_reset_mid_body_is_a_502_not_a_short_200(hostile, case) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def cut(w, body, n, answer):  # type: ignore[no-untyped-def]
        if case == "framed":
            w.write(b"HTTP/1.1 200 X\r\nContent-Length: %d\r\n\r\n" % (len(answer) + 50) + answer)
        else:
            w.write(b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\n\r\n" + answer)
        await w.drain()
        await asyncio.sleep(0.01)
        reset(w)
        return False

    server.behaviour = cut
    results = asyncio.run(send(gw, tenants(10)))
    assert [s for s, _, _ in results] == [502] * 10
    check_own_answers(results)
    assert all(b"closed the connection" in b for _, _, b in results)


def test_eof_delimited_answer_with_a_clean_close(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def until_close(w, body, n, answer):  # type: ignore[no-untyped-def]
        w.write(b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\n\r\n")
        await w.drain()
        w.write(answer)
        return False  # FIN ends the body

    server.behaviour = until_close
    results = asyncio.run(send(gw, tenants(10)))
    assert [s for s, _, _ in results] == [200] * 10
    check_own_answers(results)


def test_chunked_with_extensions_and_trailers(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def chunked(w, body, n, answer):  # type: ignore[no-untyped-def]
        parts = [answer[i : i + 7] for i in range(0, len(answer), 7)]
        out = b"HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\nTrailer: X-Check\r\n\r\n"
        for i, p in enumerate(parts):
            out += b'%x;ext=%d;name="v"\r\n%s\r\n' % (len(p), i, p)
        w.write(out)
        await w.drain()
        w.write(b"0;last=1\r\nX-Check: done\r\n\r\n")
        return True

    server.behaviour = chunked
    before, served = server.connections, server.requests
    results = asyncio.run(send(gw, tenants(20, "seq"), gap=0.005))
    assert [s for s, _, _ in results] == [200] * 20
    check_own_answers(results)
    assert server.requests - served == 20
    # Framing understood, so one connection carried all 20. It may be the one a health check
    # opened just before `before` was read (then no new connection at all), hence <= 1.
    assert server.connections - before <= 1


def test_huge_headers_are_refused(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def big_head(w, body, n, answer):  # type: ignore[no-untyped-def]
        if b"endless" in body:
            for _ in range(20_000):  # interim answers forever: their headers count too
                w.write(b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"p" * 64 + b"\r\n\r\n")
                if w.is_closing():
                    return False
                await w.drain()
        w.write(http_answer(answer, extra=b"X-Big: " + b"b" * (100 * 1024) + b"\r\n"))
        return True

    server.behaviour = big_head
    start = time.monotonic()
    results = asyncio.run(send(gw, tenants(5) + tenants(3, "endless")))
    assert time.monotonic() - start < 3
    assert [s for s, _, _ in results] == [502] * 8
    check_own_answers(results)
    assert all(b"headers exceed 65536 bytes" in b for _, _, b in results)


def test_huge_body_is_refused_with_bounded_memory(hostile) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def flood(w, body, n, answer):  # type: ignore[no-untyped-def]
        if b"declared" in body:
            w.write(b"HTTP/1.1 200 X\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
            return True
        w.write(b"HTTP/1.1 200 X\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b"1" * (1 << 20))
        for _ in range(200):  # 200 MiB unless the gateway hangs up first
            if w.is_closing():
                return False
            w.write(chunk)
            await w.drain()
        return False

    server.behaviour = flood
    rss_before = rss_mib(gw.proc.pid)
    start = time.monotonic()
    results = asyncio.run(send(gw, tenants(2, "declared") + tenants(4, "streamed")))
    elapsed = time.monotonic() - start
    growth = rss_mib(gw.proc.pid) - rss_before
    assert [s for s, _, _ in results] == [502] * 6
    check_own_answers(results)
    assert all(b"--max-upstream-bytes" in b for _, _, b in results)
    assert elapsed < 5, elapsed
    assert growth < 4 * CAP / 2**20 + 30, f"gateway RSS grew {growth:.0f} MiB"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"SSH-2.0-OpenSSH_9.2\r\n",
    ],
)
def test_non_2xx_or_broken_final_answers_are_502(hostile, head) -> None:  # type: ignore[no-untyped-def]
    server, gw = hostile

    async def odd(w, body, n, answer):  # type: ignore[no-untyped-def]
        w.write(head)
        return True

    server.behaviour = odd
    results = asyncio.run(send(gw, tenants(4)))
    assert [s for s, _, _ in results] == [502] * 4
    check_own_answers(results)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")
