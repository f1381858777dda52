"""Property test of the upstream HTTP client's framing, with h11 as the independent oracle.

Hypothesis scripts a sequence of answers — interim 1xx answers, Content-Length, chunked (with
extensions and trailers) or close-delimited bodies, random bodies — and a real loopback server
sends each one cut into random TCP segments, sometimes followed by junk (in the same segment,
or later on the idle connection). For every request the client must return exactly what h11
reads from the same bytes, or raise an UpstreamError; never another request's answer. A
connection that saw bytes after its answer is never used again.

ER_PROPERTY_EXAMPLES sets the number of examples (CI's default is kept small for time).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
from dataclasses import dataclass

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from er_gateway.httpclient import HTTPPool, UpstreamError

EXAMPLES = int(os.environ.get("ER_PROPERTY_EXAMPLES", "120"))


@dataclass
class Script:
    wire: bytes  # the answer as sent, 1xx included
    cuts: list[int]  # segment boundaries within `wire`
    framing: str  # length | chunked | close
    junk: bytes  # sent after the answer ("" for none)
    junk_later: bool  # junk comes as its own segment, on the idle connection


def chunked(body: bytes, sizes: list[int], ext: bool, trailers: bool) -> bytes:
    out, i = b"", 0
    for n in sizes:
        part = body[i : i + n]
        if not part:
            break
        out += b"%x%s\r\n%s\r\n" % (len(part), b';e=1;q="v"' if ext else b"", part)
        i += len(part)
    if i < len(body):
        out += b"%x\r\n%s\r\n" % (len(body) - i, body[i:])
    return out + b"0\r\n" + (b"X-Trailer: t\r\n" if trailers else b"") + b"\r\n"


@st.composite
def scripts(draw: st.DrawFn, index: int) -> Script:
    interim = draw(st.lists(st.sampled_from([100, 102, 103]), max_size=2))
    status = draw(st.sampled_from([200, 201, 400, 404, 422, 500, 503]))
    filler = draw(st.binary(max_size=2000))
    body = b'{"request":%d,"filler":"%s"}' % (index, filler.hex().encode())
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    wire = b"".join(b"HTTP/1.1 %d Interim\r\nX-Hint: %d\r\n\r\n" % (s, s) for s in interim)
    head = b"HTTP/1.1 %d Final\r\nContent-Type: application/json\r\n" % status
    if framing == "length":
        wire += head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    elif framing == "chunked":
        sizes = draw(st.lists(st.integers(1, 700), max_size=6))
        wire += (
            head
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + chunked(body, sizes, draw(st.booleans()), draw(st.booleans()))
        )
    else:
        wire += head + b"\r\n" + body
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=8))))
    junk = b""
    if framing != "close" and draw(st.integers(0, 3)) == 0:
        # Junk starts with a visible byte: bare CRLFs between answers are legal and ignored.
        junk = draw(
            st.sampled_from(
                [
                    b"H",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\n",
                    b"x\x00y",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
                ]
            )
        )
    return Script(wire, cuts, framing, junk, draw(st.booleans()))


def oracle(wire: bytes, eof: bool) -> tuple[int, bytes] | None:
    """What h11 reads from `wire` as the answer to one request; None if it is not a valid answer."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="POST", target="/", headers=[("Host", "x"), ("Content-Length", "0")]))
    conn.send(h11.EndOfMessage())
    status, body = 0, b""
    try:
        conn.receive_data(wire)
        if eof:
            conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, body
            elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return None
    except h11.RemoteProtocolError:
        return None


async def run(plan: list[Script]) -> None:
    served: dict[int, int] = {}  # request -> the connection that served it
    opened = itertools.count()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn_id = next(opened)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                i = int(await reader.readexactly(length))
                served[i] = conn_id
                s = plan[i]
                bounds = [0, *s.cuts, len(s.wire)]
                for a, b in zip(bounds, bounds[1:], strict=False):
                    writer.write(s.wire[a:b])
                    await writer.drain()
                    await asyncio.sleep(0)
                if s.junk and not s.junk_later:
                    writer.write(s.junk)  # right behind the answer
                elif s.junk:
                    await asyncio.sleep(0.002)
                    writer.write(s.junk)  # while the client's connection sits idle
                if s.framing == "close":
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = HTTPPool(f"http://127.0.0.1:{port}", connect_timeout=2, timeout=5)
    try:
        for i, s in enumerate(plan):
            expected = oracle(s.wire, eof=s.framing == "close")
            try:
                got = await pool.request("POST", "/", b"%d" % i)
            except UpstreamError:
                got = None
            if expected is None:
                assert got is None, f"request {i}: client accepted what h11 refuses: {got}"
            else:
                assert got is not None, f"request {i}: client refused what h11 reads as {expected[0]}"
                assert (got.status, got.body) == expected, f"request {i} got another answer"
            if s.junk:
                await asyncio.sleep(0.02)  # the junk has arrived before the next request
        for i, s in enumerate(plan[:-1]):
            if s.junk:
                assert served[i + 1] != served[i], f"connection reused after junk behind answer {i}"
    finally:
        await pool.close()
        server.close()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(*(scripts(i) for i in range(n)))))
def test_framing_matches_h11_under_random_segmentation_and_junk(plan: tuple[Script, ...]) -> None:
    asyncio.run(run(list(plan)))
