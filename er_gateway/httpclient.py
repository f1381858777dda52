"""A small keep-alive HTTP/1.1 client for talking to vLLM: one pool per backend URL.

Why not aiohttp or httpx: measured on the benchmark machine (bench/RESULTS.md), httpx's pool
managed 470 rps and aiohttp's client spent ~60 % of the gateway's CPU per request on request
objects, payload lookup and timers. Forwarding a JSON body and reading a JSON answer needs
none of that: this client writes the request in one call and parses the answer with
httptools (the parser uvicorn itself uses), which handles Content-Length and chunked bodies.

Errors are reported as three kinds the upstream layer maps to SPEC.md statuses:
ConnectError (nothing was sent), DisconnectError (the connection broke mid-exchange),
ProtocolError (the answer was not HTTP); timeouts raise asyncio.TimeoutError.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools


class UpstreamError(Exception):
    pass


class ConnectError(UpstreamError):
    """The connection could not be made (refused, DNS, connect timeout): nothing was sent."""


class DisconnectError(UpstreamError):
    """The connection broke before a whole answer arrived."""


class ProtocolError(UpstreamError):
    """The peer answered something that is not HTTP/1.1."""


@dataclass
class HTTPResponse:
    status: int
    body: bytes


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[HTTPResponse] | None = None
        self.chunks: list[bytes] = []
        self.closed = False
        self.got_data = False
        self.headers_done = False
        self.reusable = False
        self._framed = False  # Content-Length or chunked: the end is known without a close

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_data = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("unexpected protocol upgrade"))
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"invalid HTTP answer: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        w = self.waiter
        if w is not None and not w.done():
            if self.headers_done and self.parser.get_http_version() and not self._framed:
                # An answer delimited by the end of the connection.
                w.set_result(HTTPResponse(self.parser.get_status_code(), b"".join(self.chunks)))
            else:
                w.set_exception(DisconnectError("connection closed before the answer was complete"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"content-length" or (lname == b"transfer-encoding" and b"chunked" in value.lower()):
            self._framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.reusable = self.parser.should_keep_alive()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(HTTPResponse(self.parser.get_status_code(), b"".join(self.chunks)))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, data: bytes) -> HTTPResponse:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.chunks = []
        self.got_data = self.headers_done = self.reusable = False
        self._framed = False
        self.transport.write(data)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class HTTPPool:
    """Keep-alive connections to one backend URL (http or https)."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        timeout: float,
        headers: dict[str, str] | None = None,
        max_idle: int = 1024,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend URL must be http(s)://host[:port], got {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        host_header = parts.netloc.rsplit("@", 1)[-1]
        fixed = {"Host": host_header, "User-Agent": "er-gateway", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
        except TimeoutError:
            raise ConnectError(f"connect timeout after {self.connect_timeout:g} s") from None
        except OSError as e:
            raise ConnectError(e.strerror or str(e)) from None
        return conn

    def _head(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1") if headers else b""
        return (
            f"{method} {self.prefix}{path} HTTP/1.1\r\nContent-Length: {len(body)}\r\n".encode("latin-1")
            + self._fixed
            + extra
            + b"\r\n"
        )

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> HTTPResponse:
        data = self._head(method, path, body, headers) + body
        async with asyncio.timeout(timeout or self.timeout):
            while self._idle:
                conn = self._idle.pop()
                if conn.closed:
                    continue
                try:
                    return await self._use(conn, data)
                except DisconnectError:
                    if conn.got_data:
                        raise
                    # The server closed an idle keep-alive connection just as we reused it:
                    # nothing was processed, so a fresh connection is safe.
            return await self._use(await self._connect(), data)

    async def _use(self, conn: _Connection, data: bytes) -> HTTPResponse:
        try:
            response = await conn.exchange(data)
        except BaseException:
            conn.close()  # mid-exchange (error, timeout, cancel): never reuse
            raise
        if conn.reusable and not conn.closed and len(self._idle) < self._max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
