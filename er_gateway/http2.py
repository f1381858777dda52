"""HTTP/2 to clients (``--http2``): h2 over TLS (ALPN) and h2c with prior knowledge, on uvicorn's server.

uvicorn speaks HTTP/1.1 only. With ``--http2`` the front door (``frontdoor.H2FrontDoorProtocol``)
hands a connection to ``H2Protocol`` when TLS negotiated ``h2`` or the connection's first bytes are
the HTTP/2 preface; every other connection stays on the HTTP/1.1 path, unchanged. Framing, HPACK
and flow-control accounting are the ``h2`` library's (python-hyper's, which hypercorn also uses);
this module maps streams to ASGI request/response cycles and keeps the front door's limits, so one
client holds no more here than over HTTP/1.1:

* The connection counts against ``--max-connections`` (it is still the same connection).
* The preface and the first request's headers must arrive within ``--header-timeout`` seconds;
  a connection without open streams is closed (GOAWAY) after ``--keepalive-timeout`` seconds.
* Header lists decode to at most ``--max-header-bytes`` (SETTINGS_MAX_HEADER_LIST_SIZE, enforced
  while decoding), and an unfinished header block may not buffer more than that either.
* ``MAX_STREAMS`` concurrent streams are advertised, and requests still being served on one
  connection (those whose client reset them included, as their work goes on) are capped at the
  same figure: more are refused with REFUSED_STREAM, and ``2 * MAX_STREAMS`` refusals without a
  completed answer in between end the connection (GOAWAY ENHANCE_YOUR_CALM: the "rapid reset" flood).
* A request body is buffered per stream up to the flow-control window (64 KiB, HTTP/2's default),
  which is reopened only as the app reads it.
* A response the client does not let through (flow-control window closed) for
  ``--header-timeout`` seconds is reset (CANCEL): the app sees the client gone and frees its slot.
* While the socket's send buffer is full, reading stops: a client that sends PINGs or SETTINGS
  without reading the acknowledgements cannot grow the gateway's memory.
* ``Connection: close`` from the app (sent while draining, drain.py) becomes a GOAWAY (NO_ERROR,
  the last stream id taken) the next time no stream is in flight, and the connection closes: the
  client opens its next streams elsewhere. uvicorn's graceful shutdown (after the drain delay)
  refuses new streams (REFUSED_STREAM) and sends the GOAWAY when the streams in flight are done.
  The GOAWAY waits because h2-based clients (httpx, so the OpenAI SDK) fail every stream in flight
  on a GOAWAY, though RFC 9113 lets them finish.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import urllib.parse
from collections.abc import Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import orjson
from h2.errors import ErrorCodes

if TYPE_CHECKING:
    from .frontdoor import FrontDoorProtocol

log = logging.getLogger("er_gateway.http2")
error_log = logging.getLogger("uvicorn.error")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS, and the cap on requests served per connection
# Response headers HTTP/2 forbids (RFC 9113 8.2.2); `connection: close` becomes a GOAWAY instead.
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"))
_CONFIG = h2.config.H2Configuration(client_side=False, header_encoding=None)
_STATUS = {code: str(code).encode() for code in range(100, 600)}


class Stream:
    """One request/response cycle. ``receive`` and ``send`` are the ASGI callables; app.py reads
    ``send.__self__.disconnected`` to tell a client that left (logged as 499)."""

    __slots__ = (
        "conn",
        "id",
        "scope",
        "head",
        "body",
        "unacked",
        "more_body",
        "event",
        "disconnected",
        "response_started",
        "response_complete",
        "headers",
        "window",
    )

    def __init__(self, conn: H2Protocol, stream_id: int, scope: dict[str, Any]) -> None:
        self.conn = conn
        self.id = stream_id
        self.scope = scope
        self.head = scope["method"] == "HEAD"
        self.body = bytearray()
        self.unacked = 0  # flow-controlled bytes received and not yet read by the app
        self.more_body = True
        self.event = asyncio.Event()  # body bytes, end of body or disconnect
        self.window: asyncio.Event | None = None  # set while a send waits for flow-control credit
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.headers: list[tuple[bytes, bytes]] = []

    async def receive(self) -> dict[str, Any]:
        while not self.body and self.more_body and not self.disconnected and not self.response_complete:
            self.event.clear()
            await self.event.wait()
        if self.disconnected or self.response_complete:
            return {"type": "http.disconnect"}
        data = bytes(self.body)
        self.body.clear()
        if self.unacked:
            self.conn.acknowledge(self.id, self.unacked)
            self.unacked = 0
        return {"type": "http.request", "body": data, "more_body": self.more_body}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("ASGI: response already started")
            self.response_started = True
            headers = [(b":status", _STATUS.get(message["status"]) or str(message["status"]).encode())]
            headers += self.conn.default_headers
            for name, value in message.get("headers", ()):
                name = name.lower()
                if name in _HOP_BY_HOP:
                    if name == b"connection" and b"close" in value.lower():
                        self.conn.close_wanted = True
                    continue
                headers.append((name, value))
            self.headers = headers
            return
        if kind != "http.response.body":
            raise RuntimeError(f"ASGI: unexpected message {kind!r}")
        if not self.response_started or self.response_complete:
            raise RuntimeError("ASGI: response body outside a response")
        body = b"" if self.head else message.get("body", b"")
        more = message.get("more_body", False)
        if not more:
            self.response_complete = True
        if self.disconnected:
            return
        conn = self.conn
        end = not more
        try:
            if self.headers:  # sent with the first body part: one write for a small answer
                headers, self.headers = self.headers, []
                conn.h2.send_headers(self.id, headers, end_stream=end and not body)
                if body:
                    await conn.send_data(self, body, end)
            elif body:
                await conn.send_data(self, body, end)
            elif end:
                conn.h2.end_stream(self.id)
        except h2.exceptions.StreamClosedError:  # reset by the client in between
            conn.gone(self)
        conn.flush()
        if end:
            conn.response_done(self)


class H2Protocol(asyncio.Protocol):
    """One client connection speaking HTTP/2 (module docstring)."""

    def __init__(self, front: FrontDoorProtocol, transport: asyncio.Transport) -> None:
        self.front = front  # the HTTP/1.1 protocol object the connection began on: config and state
        self.transport = transport
        self.loop = front.loop
        self.app = front.app
        self.state = front.server_state
        self.default_headers = [(n.lower(), v) for n, v in front.server_state.default_headers]
        self.streams: dict[int, Stream] = {}  # served and not yet done (reset by the client included)
        self.refused = 0  # streams refused since the last completed answer
        self.going_away = False  # no new streams; GOAWAY and close when the last one is done
        self.close_wanted = False  # an answer said `Connection: close` (draining)
        self.closed = False
        self.write_paused = False
        self.writable: asyncio.Event | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.header_timeout = front.header_timeout
        self.max_header_bytes = front.max_header_bytes
        self._head_since: float | None = self.loop.time()  # until the first request's headers are in
        conn = h2.connection.H2Connection(config=_CONFIG)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: front.max_header_bytes,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        conn.decoder.max_header_list_size = front.max_header_bytes  # before the client acknowledges
        conn.initiate_connection()
        # h2 treats a stream over its own limit as a connection error, which would fail every
        # stream in flight; a client may open more before it has read our SETTINGS. So h2's limit
        # is set higher, without telling the client, and ours refuses the streams (_request).
        conn.local_settings.max_concurrent_streams = 4 * MAX_STREAMS
        conn.local_settings.acknowledge()
        self.h2 = conn
        base: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": front.config.asgi_version, "spec_version": "2.3"},
            "http_version": "2",
            "server": front.server,
            "client": front.client,
            "scheme": front.scheme,
            "root_path": front.root_path,
        }
        self.base_scope = base
        self.app_state = front.app_state

    # --- the transport ---------------------------------------------------------------------

    def start(self, data: bytes) -> None:
        """Take the connection over (from the HTTP/1.1 protocol) with the bytes read so far."""
        self.transport.set_protocol(self)
        self.flush()
        if data:
            self.data_received(data)

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and not self.closed:
            self.transport.write(out)

    def data_received(self, data: bytes) -> None:
        conn = self.h2
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 queued the GOAWAY that says why
            log.debug("HTTP/2 protocol error from %s: %s", self.front.client, e)
            self.flush()
            self.transport.close()
            return
        for ev in events:
            if self.closed:
                return
            if isinstance(ev, h2.events.DataReceived):
                s = self.streams.get(ev.stream_id)
                if s is None or s.response_complete or s.disconnected:  # nobody reads it: credit it back
                    self.acknowledge(ev.stream_id, ev.flow_controlled_length)
                else:
                    s.body += ev.data
                    s.unacked += ev.flow_controlled_length
                    s.event.set()
            elif isinstance(ev, h2.events.RequestReceived):
                self._request(ev)
            elif isinstance(ev, h2.events.StreamEnded):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s.more_body = False
                    s.event.set()
            elif isinstance(ev, h2.events.StreamReset):
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    self.gone(s)
            elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                self._wake_senders(getattr(ev, "stream_id", 0))
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.flush()
                self.transport.close()
                return
        if conn.incoming_buffer._headers_buffer:  # a header block split over CONTINUATION frames
            if sum(len(f.data) for f in conn.incoming_buffer._headers_buffer) > self.max_header_bytes:
                self._go_away(ErrorCodes.ENHANCE_YOUR_CALM)
                return
        self.flush()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.writable = asyncio.Event()
        if not self.closed:
            self.transport.pause_reading()  # read no more while our answers are not being read

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.writable is not None:
            self.writable.set()
            self.writable = None
        if not self.closed:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._head_since = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.state.connections.discard(self)
        from .frontdoor import FrontDoorProtocol

        FrontDoorProtocol.open_connections -= 1
        for s in list(self.streams.values()):
            s.disconnected = True
            s.event.set()
            if s.window is not None:
                s.window.set()
        if self.writable is not None:
            self.writable.set()

    # --- streams -----------------------------------------------------------------------------

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        if self.going_away:
            self._refuse(sid)
            return
        if len(self.streams) >= MAX_STREAMS:
            self._refuse(sid)
            self.refused += 1
            if self.refused >= 2 * MAX_STREAMS:
                log.warning("HTTP/2 client %s keeps opening streams over the limit: closing", self.front.client)
                self._go_away(ErrorCodes.ENHANCE_YOUR_CALM)
            return
        self._head_since = None
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        scope = dict(self.base_scope)
        headers: list[tuple[bytes, bytes]] = []
        method = raw = authority = b""
        for name, value in ev.headers or ():
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    raw = value
                elif name == b":authority":
                    authority = value
            else:
                headers.append((name, value))
        if authority and not any(n == b"host" for n, _ in headers):
            headers.insert(0, (b"host", authority))  # what HTTP/1.1 apps read the authority from
        path_b, _, query = raw.partition(b"?")
        path = path_b.decode("ascii", "replace")
        if "%" in path:
            path = urllib.parse.unquote(path)
        root = scope["root_path"]
        scope["method"] = method.decode("ascii", "replace")
        scope["path"] = root + path
        scope["raw_path"] = root.encode("ascii") + path_b
        scope["query_string"] = query
        scope["headers"] = headers
        scope["state"] = self.app_state.copy()
        s = Stream(self, sid, scope)
        if ev.stream_ended is not None:
            s.more_body = False
        self.streams[sid] = s
        task = self.loop.create_task(self._run(s))
        tasks = self.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _refuse(self, sid: int) -> None:
        try:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        except h2.exceptions.StreamClosedError:  # the client reset it already (same read)
            pass

    async def _run(self, s: Stream) -> None:
        try:
            await self.app(s.scope, s.receive, s.send)
        except BaseException as e:  # noqa: BLE001 - as uvicorn: log it, answer 500 if we still can
            error_log.error("Exception in ASGI application", exc_info=e)
            if not s.response_started and not s.disconnected:
                body = orjson.dumps(
                    {"error": {"message": "internal gateway error", "type": "server_error", "param": None, "code": 500}}
                )
                await s.send(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
                )
                await s.send({"type": "http.response.body", "body": body})
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            if not s.response_complete and not s.disconnected and not self.closed:
                # The app returned without finishing its answer: tell the client this stream failed.
                self._reset(s, ErrorCodes.INTERNAL_ERROR)
            self._done(s)

    def response_done(self, s: Stream) -> None:
        """The answer's last frame is queued. A request body still coming is not wanted any more:
        RST_STREAM(NO_ERROR) after a complete answer asks the client to stop sending it (RFC 9113 8.1)."""
        self.refused = 0
        if s.more_body and not s.disconnected:
            self._reset(s, ErrorCodes.NO_ERROR)

    def _done(self, s: Stream) -> None:
        self.streams.pop(s.id, None)
        if s.unacked:
            self.acknowledge(s.id, s.unacked)
            s.unacked = 0
        self.state.total_requests += 1
        if self.closed:
            return
        if self.going_away or (self.close_wanted and not self.streams):
            self._go_away(ErrorCodes.NO_ERROR)
        elif not self.streams:
            self.idle_timer = self.loop.call_later(self.front.timeout_keep_alive, self._idle)
        self.flush()

    def gone(self, s: Stream) -> None:
        s.disconnected = True
        s.more_body = False
        s.event.set()
        if s.window is not None:
            s.window.set()

    def _reset(self, s: Stream, code: ErrorCodes) -> None:
        self.gone(s)
        try:
            self.h2.reset_stream(s.id, code)
        except h2.exceptions.StreamClosedError:
            pass
        self.flush()

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Give `n` body bytes of credit back (h2 sends WINDOW_UPDATE once enough has gathered)."""
        if self.closed or not n:
            return
        self.h2.acknowledge_received_data(n, stream_id)  # a closed stream's bytes still credit the connection
        self.flush()

    # --- sending -----------------------------------------------------------------------------

    async def send_data(self, s: Stream, data: bytes, end_stream: bool) -> None:
        conn = self.h2
        view = memoryview(data)
        while view and not s.disconnected:
            try:
                room = min(conn.local_flow_control_window(s.id), conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                self.gone(s)
                return
            if room <= 0:
                await self._wait_window(s)
                continue
            chunk, view = view[:room], view[room:]
            conn.send_data(s.id, chunk.tobytes(), end_stream=end_stream and not view)
            self.flush()
            if self.write_paused and self.writable is not None:
                await self.writable.wait()

    async def _wait_window(self, s: Stream) -> None:
        self.flush()
        s.window = asyncio.Event()
        try:
            await asyncio.wait_for(s.window.wait(), self.header_timeout)
        except TimeoutError:
            log.info(
                "HTTP/2 client %s did not take the answer on stream %d for %g s (flow-control window closed; "
                "--header-timeout): stream reset",
                self.front.client,
                s.id,
                self.header_timeout,
            )
            self._reset(s, ErrorCodes.CANCEL)
        finally:
            s.window = None

    def _wake_senders(self, stream_id: int) -> None:
        for s in self.streams.values() if stream_id == 0 else (self.streams.get(stream_id),):
            if s is not None and s.window is not None:
                s.window.set()

    # --- closing -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: GOAWAY now, close when the streams in flight are done."""
        self._go_away(ErrorCodes.NO_ERROR)

    def _go_away(self, code: ErrorCodes) -> None:
        """No new streams. With NO_ERROR, the GOAWAY waits until no stream is in flight: h2-based
        clients (httpx, so the OpenAI SDK) fail their streams in flight on any GOAWAY, though RFC
        9113 lets them finish; until then new streams are refused (REFUSED_STREAM: safe to retry)."""
        if self.closed:
            return
        self.going_away = True
        if self.streams and code == ErrorCodes.NO_ERROR:
            return  # _done() calls again when the last stream is done
        self._head_since = None
        try:
            self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        self.closed = True
        for s in list(self.streams.values()):
            self.gone(s)
        self.transport.close()

    def _idle(self) -> None:
        self.idle_timer = None
        if not self.streams:
            self._go_away(ErrorCodes.NO_ERROR)

    def _head_timed_out(self, now: float) -> None:
        """The front door's sweep: no request within --header-timeout of the connection opening."""
        self._head_since = None
        if not self.streams:
            from .frontdoor import FrontDoorProtocol

            FrontDoorProtocol.header_timeouts += 1
            self._go_away(ErrorCodes.NO_ERROR)


def alpn_context(config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's ``ssl_context_factory``: its TLS context, offering h2 before http/1.1 (ALPN)."""
    ctx = default()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx
