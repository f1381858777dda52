"""The keep-alive HTTP/1.1 client against raw asyncio servers that answer exactly as scripted."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import free_port, self_signed_cert
from hostile_upstream import read_request

from er_gateway.httpclient import (
    MAX_HEADER_BYTES,
    ConnectError,
    DisconnectError,
    HTTPPool,
    ProtocolError,
    TooLargeError,
)

Answer = Callable[[bytes, int], bytes | None]  # (request head+body, connection's request number) -> bytes


class RawServer:
    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = 0
        try:
            while True:
                head, body = await read_request(reader)
                self.requests.append(head + body)
                n += 1
                out = self.answer(head + body, n)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[tuple[str, RawServer]]]]:
    servers: list[asyncio.AbstractServer] = []

    async def start(answer: Answer, **kw: bool) -> tuple[str, RawServer]:
        raw = RawServer(answer, **kw)
        port = free_port()
        servers.append(await asyncio.start_server(raw.handle, "127.0.0.1", port))
        return f"http://127.0.0.1:{port}", raw

    yield start  # type: ignore[misc]
    for s in servers:
        s.close()


def ok(body: bytes = b'{"ok":1}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuses_one_connection(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda req, n: ok())
    pool = HTTPPool(url, connect_timeout=1, timeout=5, headers={"Authorization": "Bearer k"})
    for _ in range(5):
        r = await pool.request("POST", "/v1/embeddings", b'{"input":"x"}', {"X-Request-ID": "r1"})
        assert (r.status, r.body) == (200, b'{"ok":1}')
    assert raw.connections == 1
    first = raw.requests[0]
    assert first.startswith(b"POST /v1/embeddings HTTP/1.1\r\n") and first.endswith(b'{"input":"x"}')
    assert b"Authorization: Bearer k\r\n" in first and b"X-Request-ID: r1\r\n" in first
    assert b"Host: 127.0.0.1:" in first
    await pool.close()


async def test_chunked_and_close_delimited_bodies(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    url, raw = await serve(lambda req, n: chunked)
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    assert (await pool.request("GET", "/x")).body == b"hello world"
    assert (await pool.request("GET", "/x")).body == b"hello world"
    assert raw.connections == 1
    url2, _ = await serve(lambda req, n: b"HTTP/1.0 200 OK\r\n\r\nuntil close", close_after=True)
    pool2 = HTTPPool(url2, connect_timeout=1, timeout=5)
    assert (await pool2.request("GET", "/x")).body == b"until close"


async def test_connection_close_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda req, n: ok(extra=b"Connection: close\r\n"), close_after=True)
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    for _ in range(3):
        assert (await pool.request("POST", "/a", b"{}")).status == 200
    assert raw.connections == 3


async def test_idle_connection_closed_by_server_is_replaced(serve) -> None:  # type: ignore[no-untyped-def]
    # The server answers once per connection, then closes without saying so (keep-alive timeout).
    url, raw = await serve(lambda req, n: ok() if n == 1 else None)
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    assert (await pool.request("POST", "/a", b"{}")).status == 200
    await asyncio.sleep(0.05)
    assert (await pool.request("POST", "/a", b"{}")).status == 200  # no error for the client
    assert raw.connections == 2


async def test_disconnect_mid_answer(serve) -> None:  # type: ignore[no-untyped-def]
    url, _ = await serve(lambda req, n: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial", close_after=True)
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    with pytest.raises(DisconnectError):
        await pool.request("POST", "/a", b"{}")


async def test_garbage_is_a_protocol_error(serve) -> None:  # type: ignore[no-untyped-def]
    url, _ = await serve(lambda req, n: b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    with pytest.raises(ProtocolError):
        await pool.request("GET", "/health")


async def test_refused_and_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    pool = HTTPPool(f"http://127.0.0.1:{free_port()}", connect_timeout=1, timeout=5)
    with pytest.raises(ConnectError):
        await pool.request("GET", "/health")

    url, _ = await serve(lambda req, n: b"")  # accepts, reads, never answers
    slow = HTTPPool(url, connect_timeout=1, timeout=0.3)
    with pytest.raises(TimeoutError):
        await slow.request("POST", "/a", b"{}")
    assert not slow._idle  # a timed-out connection is never reused


def test_url_validation() -> None:
    with pytest.raises(ValueError):
        HTTPPool("ftp://x", connect_timeout=1, timeout=1)
    p = HTTPPool("https://example.invalid:8443/prefix/", connect_timeout=1, timeout=1)
    assert (p.host, p.port, p.prefix, p.ssl is not None) == ("example.invalid", 8443, "/prefix", True)


async def test_https_backend(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import ssl

    cert, key = self_signed_cert(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    raw = RawServer(lambda req, n: ok(b'{"tls":true}'))
    port = free_port()
    server = await asyncio.start_server(raw.handle, "127.0.0.1", port, ssl=server_ctx)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # how a user trusts a private CA
        pool = HTTPPool(f"https://127.0.0.1:{port}", connect_timeout=2, timeout=5)
        assert (await pool.request("POST", "/v1/embeddings", b"{}")).body == b'{"tls":true}'
        assert (await pool.request("POST", "/v1/embeddings", b"{}")).status == 200
        assert raw.connections == 1
        await pool.close()
        monkeypatch.delenv("SSL_CERT_FILE")
        untrusted = HTTPPool(f"https://127.0.0.1:{port}", connect_timeout=2, timeout=5)
        with pytest.raises(ConnectError):  # an unknown certificate is refused, not silently accepted
            await untrusted.request("GET", "/health")
    finally:
        server.close()


async def test_header_values_cannot_inject_lines(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(lambda req, n: ok())
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    with pytest.raises(ValueError):
        await pool.request("POST", "/a", b"{}", {"X-Request-ID": "a\r\nAuthorization: Bearer stolen"})
    assert raw.requests == []  # nothing was sent


async def test_caps_bound_headers_and_body(serve) -> None:  # type: ignore[no-untyped-def]
    url, _ = await serve(lambda req, n: ok(b"x" * 5000))
    pool = HTTPPool(url, connect_timeout=1, timeout=5, max_body=4096)
    with pytest.raises(TooLargeError, match="5000 bytes exceeds the cap of 4096"):
        await pool.request("POST", "/a", b"{}")
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"y" * 1024 + b"\r\n"
    url, _ = await serve(lambda req, n: chunked * 1 + (b"400\r\n" + b"y" * 1024 + b"\r\n") * 10)
    pool = HTTPPool(url, connect_timeout=1, timeout=5, max_body=4096)
    with pytest.raises(TooLargeError, match="exceeds the cap of 4096"):
        await pool.request("POST", "/a", b"{}")
    trickle = b"HTTP/1.1 200 OK\r\nX-Long: " + b"z" * (MAX_HEADER_BYTES + 10)  # never finished
    url, _ = await serve(lambda req, n: trickle)
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    with pytest.raises(TooLargeError, match="headers exceed"):
        await pool.request("POST", "/a", b"{}")


async def test_interim_answers_then_reuse(serve) -> None:  # type: ignore[no-untyped-def]
    url, raw = await serve(
        lambda req, n: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: <x>\r\n\r\n" + ok(b"%d" % n)
    )
    pool = HTTPPool(url, connect_timeout=1, timeout=5)
    assert [(await pool.request("POST", "/a", b"{}")).body for _ in range(3)] == [b"1", b"2", b"3"]
    assert raw.connections == 1


def test_credentials_in_backend_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="user:password"):
        HTTPPool("http://user:secret@127.0.0.1:8000", connect_timeout=1, timeout=1)
