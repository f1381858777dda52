"""A keep-alive HTTP/1.1 client for talking to vLLM: one pool per backend URL.

Why not aiohttp, httpx, aiosonic or pyreqwest: measured in the same benchmark run, none comes
within 10 % of this client's throughput in the gateway (README, "Upstream HTTP client").
Forwarding a JSON body and reading a JSON answer needs little: this client writes the request
in one call and parses the answer with httptools (llhttp, the parser uvicorn uses).

Because it is home-made it carries a library's obligations. Each connection is an explicit
state machine, so an answer can only ever belong to the exchange that is waiting for it:

    IDLE --exchange()--> ACTIVE --final answer--> DONE --reusable--> IDLE
      any byte or EOF while IDLE or DONE, any error, timeout or cancel --> CLOSED

- Interim 1xx answers (100 Continue, 103 Early Hints) are skipped; 101 is a protocol error.
- A byte that arrives on an idle connection, or after the final answer, closes the connection:
  it can only be a stray or late answer, and must never be read as the next request's answer.
  Before an idle connection is reused, a zero-timeout poll checks that nothing has arrived
  unnoticed (httpcore and urllib3 do the same).
- Truncation is an error: a Content-Length or chunked answer cut short, or a close-delimited
  answer ended by a reset rather than a clean close.
- Answer headers are capped at MAX_HEADER_BYTES and bodies at `max_body` (declared or streamed),
  so a hostile upstream cannot make the gateway buffer without bound.

Errors are four kinds the upstream layer maps to statuses: ConnectError (nothing was sent),
DisconnectError (the connection broke mid-exchange), ProtocolError (not valid HTTP/1.1 for us),
TooLargeError (over a cap); timeouts raise TimeoutError.
"""

from __future__ import annotations

import asyncio
import enum
import select
import ssl
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

# Far above any real answer's headers (vLLM sends about 150 bytes), far below what could hurt.
MAX_HEADER_BYTES = 64 * 1024


class UpstreamError(Exception):
    pass


class ConnectError(UpstreamError):
    """The connection could not be made (refused, DNS, connect timeout): nothing was sent."""


class DisconnectError(UpstreamError):
    """The connection broke before a whole answer arrived."""


class ProtocolError(UpstreamError):
    """The peer answered something that is not an HTTP/1.1 answer we can use."""


class TooLargeError(ProtocolError):
    """The answer's headers or body exceed the configured cap."""


@dataclass
class HTTPResponse:
    status: int
    body: bytes


def check_backend_url(url: str) -> None:
    """Refuse a URL this client cannot use safely (ValueError, saying what to do instead).

    Credentials in a URL would show wherever the URL does (logs, admin pages) and would not
    be sent, so they are refused rather than silently dropped: vLLM takes a Bearer key.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"backend URL must be http(s)://host[:port][/prefix], got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "backend URLs must not carry user:password; give vLLM's key with --backend-api-key "
            "(ER_BACKEND_API_KEY) instead"
        )


class State(enum.Enum):
    IDLE = "idle"  # no exchange; nothing may arrive
    ACTIVE = "active"  # a request is out, its answer (after any 1xx) is being read
    DONE = "done"  # the final answer is complete; nothing more may arrive
    CLOSED = "closed"


# Module globals: the hot path reads these several times per request, and an Enum member lookup
# on the class costs twice a global's on Python 3.11.
IDLE, ACTIVE, DONE, CLOSED = State.IDLE, State.ACTIVE, State.DONE, State.CLOSED


class _Connection(asyncio.Protocol):
    def __init__(self, max_body: int) -> None:
        self.transport: asyncio.Transport | None = None
        self.state = IDLE
        self.max_body = max_body
        # One parser per connection: llhttp is back at a message boundary after each complete
        # answer, and a connection that is not is never reused.
        self.parser = httptools.HttpResponseParser(self)
        # For the idle check; None on TLS, where raw bytes need not be answer bytes.
        self._poller: select.poll | None = None
        self._reset()

    def _reset(self) -> None:
        self.waiter: asyncio.Future[HTTPResponse] | None = None
        self.got_data = False  # any byte of an answer (even a 1xx) arrived in this exchange
        self.keep_alive = False
        self._new_answer()
        # Header size, two ways: raw bytes read while headers are unfinished (bounds what llhttp
        # buffers for a header still arriving) and parsed header bytes (a whole oversized block
        # can arrive in one read). Neither resets after a 1xx.
        self._head_bytes = 0
        self._header_bytes = 0

    def _new_answer(self) -> None:
        # Per answer (a 1xx is followed by another answer on the same exchange).
        self.chunks: list[bytes] = []
        self.size = 0  # body bytes so far
        self.headers_done = False
        self.framed = False  # Content-Length or chunked: the end is known without a close

    # ---- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if transport.get_extra_info("sslcontext") is None and sock is not None:
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)

    def data_received(self, data: bytes) -> None:
        if self.state is not ACTIVE:
            # Nobody asked: a stray or late answer, or junk after a complete one.
            self.close()
            return
        self.got_data = True
        if not self.headers_done:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("unexpected protocol switch (101)"))
        except httptools.HttpParserCallbackError as e:
            self._fail(e.__context__ if isinstance(e.__context__, UpstreamError) else ProtocolError(str(e)))
        except httptools.HttpParserError as e:
            self._fail(ProtocolError(f"invalid HTTP answer: {e}"))
        if self.state is ACTIVE and not self.headers_done and self._head_bytes > MAX_HEADER_BYTES:
            self._fail(TooLargeError(f"answer headers exceed {MAX_HEADER_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = CLOSED
        w = self.waiter
        if was is not ACTIVE or w is None or w.done():
            return
        if exc is None and self.headers_done and not self.framed:
            # An answer delimited by the end of the connection, ended cleanly.
            w.set_result(HTTPResponse(self.parser.get_status_code(), b"".join(self.chunks)))
        elif self.headers_done:
            w.set_exception(DisconnectError("connection lost before the answer was complete"))
        else:
            w.set_exception(DisconnectError("connection closed before an answer arrived"))

    # ---- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.state is not ACTIVE:
            raise ProtocolError("bytes after the answer")  # stops the parser; _fail closes

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise TooLargeError(f"answer headers exceed {MAX_HEADER_BYTES} bytes")
        lname = name.lower()
        if lname == b"content-length":
            self.framed = True
            # llhttp has already refused a malformed or repeated Content-Length.
            if value.strip().isdigit() and int(value) > self.max_body:
                raise TooLargeError(f"answer body of {int(value)} bytes exceeds the cap of {self.max_body}")
        elif lname == b"transfer-encoding" and b"chunked" in value.lower():
            self.framed = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.max_body:
            raise TooLargeError(f"answer body exceeds the cap of {self.max_body} bytes")
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if status < 200:
            # Interim answer (100 Continue, 103 Early Hints): the real one follows. Header bytes
            # keep counting across interim answers, so an endless stream of them hits the cap.
            self._new_answer()
            return
        self.state = DONE
        self.keep_alive = self.parser.should_keep_alive()
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(HTTPResponse(status, b"".join(self.chunks)))

    # ---- use ---------------------------------------------------------------------------------
    def _fail(self, exc: BaseException) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(exc)
        self.close()

    def readable_while_idle(self) -> bool:
        """True when bytes or an EOF wait unread on an idle connection (it must not be reused)."""
        return self._poller is not None and bool(self._poller.poll(0))

    async def exchange(self, data: bytes) -> HTTPResponse:
        if self.state is not IDLE or self.transport is None:
            raise DisconnectError(f"connection is {self.state.value}, not idle")
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.state = ACTIVE
        self.transport.write(data)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        self.state = CLOSED
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
        max_body: int = 256 * 1024 * 1024,
    ) -> None:
        check_backend_url(url)
        parts = urlsplit(url)
        self.url = url
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_body = max_body
        fixed = {"Host": parts.netloc, "User-Agent": "er-gateway", **(headers or {})}
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items()).encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self._max_idle = max_idle

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_body), self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            raise ConnectError(f"connect timeout after {self.connect_timeout:g} s") from None
        except OSError as e:
            # strerror only: asyncio's combined message for several addresses names them all.
            raise ConnectError(e.strerror or "connection failed") from None
        return conn

    def _head(self, method: str, path: str, body: bytes, headers: dict[str, str] | None) -> bytes:
        extra = b""
        if headers:
            # A CR or LF would let a caller-supplied value (a request id) write its own headers.
            values = "".join(headers.values())
            if "\r" in values or "\n" in values:
                raise ValueError("header values must not contain CR or LF")
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
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
                if conn.state is not IDLE or conn.readable_while_idle():
                    conn.close()
                    continue
                try:
                    return await self._use(conn, data)
                except DisconnectError:
                    if conn.got_data:
                        raise
                    # The server closed an idle keep-alive connection just as we reused it:
                    # nothing was answered, so a fresh connection is safe.
            return await self._use(await self._connect(), data)

    async def _use(self, conn: _Connection, data: bytes) -> HTTPResponse:
        try:
            response = await conn.exchange(data)
        except BaseException:
            conn.close()  # mid-exchange (error, timeout, cancel): never reuse
            raise
        # DONE means nothing arrived after the answer; anything that did has closed it.
        if conn.state is DONE and conn.keep_alive and len(self._idle) < self._max_idle:
            conn.state = IDLE
            self._idle.append(conn)
        else:
            conn.close()
        return response

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
