"""Front-door limits for the client-facing HTTP/1.1 server (uvicorn's httptools protocol, subclassed).

uvicorn's httptools protocol has no header read timeout, no request-head size limit and no
connection cap, and it closes a connection with unread request bytes (RST: the client never reads
the 413 it was sent). ``FrontDoorProtocol`` adds, per worker process:

* ``--header-timeout`` (S): a request head (request line + headers) must be complete within S
  seconds of the connection opening, or of the first byte after an idle keep-alive period (idle
  keep-alive connections are uvicorn's ``timeout_keep_alive``, ``--keepalive-timeout``). A
  periodic sweep closes late ones (408 with the JSON envelope if part of a head arrived) — no timer
  per request; the hot path only stores a float and clears it.
* ``--max-header-bytes`` (N): the parser is never fed more than N bytes of one head; above it the
  answer is 431 with the JSON envelope, then a lingering close. (A head that begins inside the
  same read as the previous request's last body bytes is counted from the next read on, so it can
  exceed N by the rest of that one read, at most 256 KiB.)
* ``--max-connections`` (N): a connection beyond N open ones is closed at once; a WARNING (at most
  one per 10 s) says how many were refused. Start-up raises RLIMIT_NOFILE's soft limit to the hard
  one and lowers the cap if it does not fit (``FD_RESERVE`` kept for upstream sockets and logs).
* Lingering close: when the app has answered (e.g. 413 from Content-Length) before the request
  body was in, the write side is shut down after the response and incoming bytes are read and
  dropped (at most ``LINGER_BYTES``, ``LINGER_IDLE`` s without data, ``LINGER_TIME`` s in all)
  before closing, so a client that writes its whole body before reading still reads the answer.
  This also applies on keep-alive connections (uvicorn would read and drop the rest of the body,
  without bound, to reuse the connection).

Per request the additions are a few attribute operations and one call frame (on_headers_complete):
~2-3 us on this repository's 2-vCPU benchmark machine (bench/RESULTS.md). uvicorn 0.54's
on_message_complete and on_response_complete are inlined below; re-check them on a uvicorn upgrade.

Configuration is class state: ``configure()`` in the serving process, or, for ``--workers N``
(spawned processes), the ``ENV`` variable the CLI sets, read when this module is imported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import time
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .http2 import PREFACE, H2Protocol

log = logging.getLogger("er_gateway.frontdoor")

ENV = "ER__FRONTDOOR_JSON"  # how the CLI hands the effective limits to uvicorn worker processes
FD_RESERVE = 64  # file descriptors kept free of client connections: upstream sockets, log files
LINGER_BYTES = 64 * 1024 * 1024  # most request bytes read and dropped after an early answer
LINGER_IDLE = 5.0  # seconds without a byte that end a lingering close
LINGER_TIME = 30.0  # seconds a lingering close may last in all
REFUSAL_LOG_INTERVAL = 10.0
SHUTDOWN_GRACE = 0.5  # seconds an idle keep-alive connection stays open once shutdown begins
_OPEN_ROOM = 1 << 62  # "no head in progress": body bytes are never counted against the head limit


def _envelope(status: int, type_: str, message: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": status}})
    out = [STATUS_LINE[status]]
    for name, value in default_headers:
        out += [name, b": ", value, b"\r\n"]
    out += [
        b"content-type: application/json\r\ncontent-length: ",
        str(len(body)).encode(),
        b"\r\nconnection: close\r\n\r\n",
        body,
    ]
    return b"".join(out)


class _Transport:
    """The transport as the protocol and its request/response cycles see it: ``close()`` becomes a
    lingering close when the response is complete but the request body is not. Everything else is
    the transport's own bound methods (no extra call on the hot path)."""

    __slots__ = ("_proto", "_transport", "write", "is_closing", "pause_reading", "resume_reading", "get_extra_info")

    def __init__(self, proto: FrontDoorProtocol, transport: asyncio.Transport) -> None:
        self._proto = proto
        self._transport = transport
        self.write = transport.write
        self.is_closing = transport.is_closing
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.get_extra_info = transport.get_extra_info

    def close(self) -> None:
        p = self._proto
        c = p.cycle
        if c is not None and c.response_complete and c.more_body and not p._lingering:
            p._linger()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _Lingerer(asyncio.Protocol):
    """Takes over a connection whose answer is written: drops what the client still sends, then
    closes. The HTTP protocol object stays the one uvicorn tracks; it hears connection_lost."""

    def __init__(self, owner: FrontDoorProtocol, transport: asyncio.Transport) -> None:
        self.owner = owner
        self.transport = transport
        self.left = LINGER_BYTES
        self.loop = owner.loop
        self.start = self.last = self.loop.time()
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(LINGER_IDLE, self._check)

    def data_received(self, data: bytes) -> None:
        self.left -= len(data)
        self.last = self.loop.time()
        if self.left <= 0:
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the client is done sending: close

    def _check(self) -> None:
        now = self.loop.time()
        idle_end = self.last + LINGER_IDLE
        if now >= idle_end or now >= self.start + LINGER_TIME:
            self.timer = None
            self.transport.close()
        else:
            self.timer = self.loop.call_later(min(idle_end, self.start + LINGER_TIME) - now, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.owner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.owner.pause_writing()

    def resume_writing(self) -> None:
        self.owner.resume_writing()


class FrontDoorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the front-door limits (module docstring)."""

    # Configuration (class state, per process; see configure()).
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 4096  # effective cap of this process
    # Process-wide state.
    open_connections: int = 0
    refused: int = 0  # since the last refusal log line
    refused_total: int = 0
    header_timeouts: int = 0
    heads_too_large: int = 0
    lingering_closes: int = 0
    _last_refusal_log: float = -1e9
    _refusal_log_timer: asyncio.TimerHandle | None = None
    _sweep_handle: asyncio.TimerHandle | None = None
    _registry: Any = ()

    # Per-connection state (class defaults until connection_made).
    _counted = False
    _lingering = False
    _head_since: float | None = None  # loop time the current head began (None: no head pending)
    _head_room = _OPEN_ROOM  # head bytes the parser may still be fed
    _real: asyncio.Transport | None = None  # the transport itself (self.transport is a _Transport)

    # --- connection accounting -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        fd = FrontDoorProtocol
        if fd.open_connections >= fd.max_connections:
            transport.close()
            fd._note_refusal(self.loop)
            return
        fd.open_connections += 1
        self._counted = True
        self._real = transport
        super().connection_made(_Transport(self, transport))  # type: ignore[arg-type]
        self._head_room = self.max_header_bytes
        self._head_since = self.loop.time()
        if fd._sweep_handle is None:
            fd._start_sweep(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            self.parser = None  # type: ignore[assignment]
            return
        self._counted = False
        FrontDoorProtocol.open_connections -= 1
        self._head_since = None
        super().connection_lost(exc)

    @staticmethod
    def _note_refusal(loop: asyncio.AbstractEventLoop) -> None:
        fd = FrontDoorProtocol
        fd.refused += 1
        fd.refused_total += 1
        if fd._refusal_log_timer is not None:
            return
        wait = fd._last_refusal_log + REFUSAL_LOG_INTERVAL - time.monotonic()
        if wait <= 0:
            fd._log_refusals()
        else:
            fd._refusal_log_timer = loop.call_later(wait, fd._log_refusals)

    @staticmethod
    def _log_refusals() -> None:
        fd = FrontDoorProtocol
        fd._refusal_log_timer = None
        if not fd.refused:
            return
        log.warning(
            "refused %d client connection(s) since the last such line: %d open, the limit of this process "
            "(--max-connections) is %d",
            fd.refused,
            fd.open_connections,
            fd.max_connections,
        )
        fd.refused = 0
        fd._last_refusal_log = time.monotonic()

    # --- request head: size and time -------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        ka = self.timeout_keep_alive_task
        if ka is not None:  # first bytes after an idle keep-alive period: a head starts its clock
            ka.cancel()
            self.timeout_keep_alive_task = None
            if self._head_since is None:
                self._head_since = self.loop.time()
        room = self._head_room
        if len(data) > room:
            self._feed_capped(data)
            return
        self._head_room = room - len(data)
        self._feed(data)

    def _feed(self, data: Any) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()

    def _feed_capped(self, data: bytes) -> None:
        """`data` is more than the head in progress may still take: feed what fits; if the head is
        then still incomplete it is too large, else go on with the rest (body, next request)."""
        mv = memoryview(data)
        while True:
            room = self._head_room
            if len(mv) <= room:
                self._head_room = room - len(mv)
                self._feed(mv)
                return
            self._head_room = 0  # on_headers_complete / on_message_complete reset it
            if room:
                self._feed(mv[:room])
                if self.transport.is_closing() or self._lingering or self.parser is None:
                    return
            if self._head_room == 0:
                self._head_too_large()
                return
            mv = mv[room:]

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown, per connection. An idle keep-alive connection may already
        carry a request its client sent before it could know (HTTP's keep-alive race): closing it
        at once would reset that request. So it is closed `SHUTDOWN_GRACE` seconds later, or after
        the answer to a request that arrives meanwhile."""
        c = self.cycle
        if c is None or c.response_complete:
            self.loop.call_later(SHUTDOWN_GRACE, self._close_when_done)
        else:
            c.keep_alive = False

    def _close_when_done(self) -> None:
        c = self.cycle
        if c is None or c.response_complete:
            self.transport.close()
        else:
            c.keep_alive = False

    def on_headers_complete(self) -> None:
        self._head_since = None
        self._head_room = _OPEN_ROOM
        _on_headers_complete(self)

    def on_chunk_header(self) -> None:
        # A chunk's size line. After the last (zero-size) one come trailers, which httptools
        # gathers by concatenation (quadratic) and uvicorn would add to the headers: they get the
        # head's budget. A chunk's data resets it in on_body.
        self._head_room = self.max_header_bytes

    def on_body(self, body: bytes) -> None:
        self._head_room = _OPEN_ROOM
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._head_room = self.max_header_bytes  # what follows is the next request's head
        # uvicorn 0.54's HttpToolsProtocol.on_message_complete, inlined (a call less per request):
        if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
            return
        self.cycle.more_body = False
        self.cycle.message_event.set()

    def _head_too_large(self) -> None:
        FrontDoorProtocol.heads_too_large += 1
        self._head_since = None
        c = self.cycle
        if c is not None and c.more_body and not c.response_complete:
            # Trailers over the limit while the app still reads the body: hang up (it sees a
            # disconnect, logged as 499).
            self.transport.close()
            return
        if c is not None and not c.response_complete:
            # Pipelined behind a response in progress: finish that one, then close; read no more.
            c.keep_alive = False
            self.flow.pause_reading()
            return
        limit = self.max_header_bytes
        self.transport.write(
            _envelope(
                431,
                "request_header_fields_too_large",
                f"request line and headers exceed the limit of {limit} bytes (--max-header-bytes)",
                self.server_state.default_headers,
            )
        )
        self._linger()

    @staticmethod
    def _start_sweep(proto: FrontDoorProtocol) -> None:
        fd = FrontDoorProtocol
        fd._registry = proto.connections
        tick = max(0.05, min(1.0, fd.header_timeout / 4))
        loop = proto.loop

        def sweep() -> None:
            now = loop.time()
            deadline = now - fd.header_timeout
            for p in tuple(fd._registry):
                since = getattr(p, "_head_since", None)
                if since is not None and since <= deadline:
                    p._head_timed_out(now)
            fd._sweep_handle = loop.call_later(tick, sweep)

        fd._sweep_handle = loop.call_later(tick, sweep)

    def _head_timed_out(self, now: float) -> None:
        c = self.cycle
        if c is not None and not c.response_complete:
            self._head_since = now  # a response is in progress; the next head's clock starts over
            return
        self._head_since = None
        t = self._real
        if t is None or t.is_closing() or self._lingering:
            return
        FrontDoorProtocol.header_timeouts += 1
        if self._head_room < self.max_header_bytes:  # part of a head arrived: say why
            t.write(
                _envelope(
                    408,
                    "request_timeout",
                    f"request line and headers not received within {self.header_timeout:g} s (--header-timeout)",
                    self.server_state.default_headers,
                )
            )
        t.close()

    # --- answers before the body is in: lingering close ------------------------------------

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        c = self.cycle
        if c.more_body and c.response_complete or self._lingering:  # answered before the body was in
            self._linger()
            return
        # uvicorn 0.54's HttpToolsProtocol.on_response_complete, inlined (a call less per request):
        if self.transport.is_closing():
            return
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _linger(self) -> None:
        if self._lingering:
            return
        self._lingering = True
        self._head_since = None
        self._unset_keepalive_if_required()
        t = self._real
        if t is None or t.is_closing():
            return
        FrontDoorProtocol.lingering_closes += 1
        t.set_protocol(_Lingerer(self, t))
        if t.can_write_eof():
            t.write_eof()  # FIN once the answer is flushed
        self.flow.resume_reading()
        c = self.cycle
        if c is not None:
            c.body = bytearray()

    def handle_websocket_upgrade(self) -> None:
        # Only with uvicorn's `ws` set (the CLI passes "none"): the WebSocket protocol takes the
        # connection over and hears its connection_lost, so it leaves this process's count here.
        if self._counted:
            self._counted = False
            FrontDoorProtocol.open_connections -= 1
        self._head_since = None
        super().handle_websocket_upgrade()

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn logs two WARNING lines per such request (e.g. `Upgrade: h2c`); the request is
        # served as plain HTTP/1.1, so a debug line is enough and no client can flood the log.
        self.logger.debug("request with an unsupported Upgrade header served as HTTP/1.1")

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_envelope(400, "invalid_request_error", msg, self.server_state.default_headers))
        self.transport.close()


_on_headers_complete = HttpToolsProtocol.on_headers_complete


class H2FrontDoorProtocol(FrontDoorProtocol):
    """The front door with ``--http2``: a connection that negotiated ``h2`` over TLS, or whose
    first bytes are the HTTP/2 preface (h2c with prior knowledge), is handed to http2.H2Protocol
    (same limits, same connection count); any other stays HTTP/1.1. The only cost to an HTTP/1.1
    connection is the check of its first bytes."""

    _first = True  # no byte read yet on this connection
    _early = b""  # a read shorter than the preface that may be its start

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self._counted:
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._to_h2(b"")

    def data_received(self, data: bytes) -> None:
        if self._first:
            if self._early:
                data = self._early + data
            if data[:24] == PREFACE:
                self._first = False
                self._to_h2(data)
                return
            if len(data) < 24 and PREFACE.startswith(data):
                self._early = data  # wait for the rest of the preface
                return
            self._first = False
            self._early = b""
        super().data_received(data)

    def _to_h2(self, data: bytes) -> None:
        self._head_since = None
        self.connections.discard(self)
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        h2proto = H2Protocol(self, self._real)  # type: ignore[arg-type]
        self.connections.add(h2proto)  # type: ignore[arg-type]
        self._counted = False  # the count is H2Protocol's now: it decrements it in connection_lost
        h2proto.start(data)


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, e)
        return soft, hard
    return target, hard


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16


def configure(header_timeout: float, max_header_bytes: int, max_connections: int) -> dict[str, Any]:
    """Set this process's limits (raising the fd limit first); returns them for worker processes.

    The connection cap is per process: with --workers N the gateway holds up to N times it."""
    soft, _hard = raise_fd_limit()
    cap = max_connections
    if soft != resource.RLIM_INFINITY:
        fit = max(1, soft - _open_fds() - FD_RESERVE)
        if fit < cap:
            log.warning(
                "--max-connections %d does not fit the open-files limit (%d, %d kept for upstream connections "
                "and logs): this process accepts at most %d client connections; raise `ulimit -n` (hard limit) "
                "or lower --max-connections",
                max_connections,
                soft,
                FD_RESERVE,
                fit,
            )
            cap = fit
    conf = {
        "header_timeout": float(header_timeout),
        "max_header_bytes": int(max_header_bytes),
        "max_connections": int(cap),
    }
    apply(conf)
    return conf


def apply(conf: dict[str, Any]) -> None:
    FrontDoorProtocol.header_timeout = float(conf["header_timeout"])
    FrontDoorProtocol.max_header_bytes = int(conf["max_header_bytes"])
    FrontDoorProtocol.max_connections = int(conf["max_connections"])


if ENV in os.environ:  # a worker process spawned by `--workers N`: the CLI resolved the limits
    raise_fd_limit()
    apply(orjson.loads(os.environ[ENV]))
