"""HTTP/2 to clients (``--http2``): h2 over TLS (ALPN) and h2c with prior knowledge, on uvicorn's server.

uvicorn speaks HTTP/1.1 only. With ``--http2`` the front door (``frontdoor.H2FrontDoorProtocol``)
hands a connection to ``H2Protocol`` when TLS negotiated ``h2`` or the connection's first bytes are
the HTTP/2 preface; every other connection stays on the HTTP/1.1 path, unchanged. Framing, HPACK
and flow-control accounting are the ``h2`` library's (python-hyper's, which hypercorn also uses);
this module maps streams to ASGI request/response cycles and keeps the front door's limits. One
connection carries up to ``MAX_STREAMS`` requests at once, as that many HTTP/1.1 connections would
(each body within ``--max-body-bytes`` as usual); beyond that a client holds no more than over
HTTP/1.1:

* The connection counts against ``--max-connections`` (it is still the same connection).
* The preface and the first request's headers must arrive within ``--header-timeout`` seconds;
  a connection without open streams is closed (GOAWAY) after ``--keepalive-timeout`` seconds.
* Header lists decode to at most ``--max-header-bytes`` (SETTINGS_MAX_HEADER_LIST_SIZE, enforced
  while decoding), and an unfinished header block may not buffer more than that either.
* ``MAX_STREAMS`` concurrent streams are advertised, and requests still being served on one
  connection (those whose client reset them included, as their work goes on) are capped at the
  same figure: more are refused with REFUSED_STREAM, and ``2 * MAX_STREAMS`` refusals within
  ``REFUSAL_WINDOW`` seconds end the connection (GOAWAY ENHANCE_YOUR_CALM: the "rapid reset" flood).
* A request body is buffered per stream up to the flow-control window (64 KiB, HTTP/2's default),
  which is reopened only as the app reads it.
* A response the client does not let through (flow-control window closed) for
  ``--header-timeout`` seconds in a row is reset (CANCEL): the app sees the client gone and frees
  its slot. WINDOW_UPDATEs or SETTINGS that open no room do not restart that clock.
* While the socket's send buffer is full, reading stops: a client that sends PINGs or SETTINGS
  without reading the acknowledgements cannot grow the gateway's memory. A connection whose
  client reads nothing for ``--header-timeout`` seconds is aborted, and a closing connection whose
  client does not read its GOAWAY is aborted after ``CLOSE_GRACE`` seconds, so neither holds a
  ``--max-connections`` slot.
* ``Connection: close`` from the app (sent while draining, drain.py) becomes a GOAWAY (NO_ERROR,
  the last stream id taken) once no stream has been in flight for ``DRAIN_IDLE`` seconds, and the
  connection closes: the client opens its next streams elsewhere. uvicorn's graceful shutdown (after the drain delay)
  does the same, and after ``SHUTDOWN_SERVE`` seconds without such a moment refuses new streams
  (REFUSED_STREAM) until the streams in flight are done. The GOAWAY waits because h2-based clients
  (httpx, so the OpenAI SDK) fail every stream in flight on a GOAWAY, though RFC 9113 lets them
  finish. After the GOAWAY the gateway stops writing and reads what the client still sends
  until it closes (at most ``CLOSE_GRACE`` s): a reset connection would turn the client's next
  request into a write error instead of a clean "connection closed" that clients retry elsewhere.
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
from h2.errors import ErrorCodes

from .errors import GatewayError

if TYPE_CHECKING:
    from .frontdoor import FrontDoorProtocol

log = logging.getLogger("er_gateway.http2")
error_log = logging.getLogger("uvicorn.error")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_STREAMS = 100  # SETTINGS_MAX_CONCURRENT_STREAMS, and the cap on requests served per connection
REFUSAL_WINDOW = 10.0  # seconds over which 2 * MAX_STREAMS refused streams end a connection
SHUTDOWN_SERVE = 2.0  # seconds a busy connection keeps taking new streams once shutdown begins
DRAIN_IDLE = 0.1  # seconds without a stream in flight before a draining connection's GOAWAY
CLOSE_GRACE = 2.0  # seconds a closing connection waits for its client to close before an abort
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
        "body_done",
        "expect_100",
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
        self.body_done = False  # the app was given the body's last part
        self.expect_100 = False  # `expect: 100-continue`: a 100 goes out when the app first reads
        self.event = asyncio.Event()  # body bytes, end of body, answer complete or disconnect
        self.window: asyncio.Event | None = None  # set while a send waits for flow-control credit
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.headers: list[tuple[bytes, bytes]] = []

    async def receive(self) -> dict[str, Any]:
        if self.expect_100:
            self.expect_100 = False
            if self.more_body and not self.body and not self.response_started:
                self.conn.informational(self)
        if self.body_done:  # as uvicorn: after the body, wait until the client leaves or the answer is done
            while not self.disconnected and not self.response_complete:
                self.event.clear()
                await self.event.wait()
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
        if not self.more_body:
            self.body_done = True
        return {"type": "http.request", "body": data, "more_body": self.more_body}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.response_started:
                raise RuntimeError("ASGI: response already started")
            self.response_started = True
            headers = [(b":status", _STATUS.get(message["status"]) or str(message["status"]).encode())]
            headers += self.conn.state.default_headers  # uvicorn refreshes `date` every second
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
            self.event.set()
        conn = self.conn
        if self.disconnected or conn.closed:
            return
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
        except h2.exceptions.ProtocolError:  # the stream (or connection) ended in between
            conn.gone(self)
            return
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
        self.streams: dict[int, Stream] = {}  # served and not yet done (reset by the client included)
        self.refused = 0  # streams refused since `refused_since`
        self.refused_since = 0.0
        self.close_wanted = False  # GOAWAY at the next moment without a stream in flight (draining)
        self.going_away = False  # as close_wanted, and new streams are refused meanwhile
        self.closed = False  # GOAWAY sent or the connection failed: nothing more is sent
        self.lost = False
        self.writable: asyncio.Event | None = None  # set while the socket's send buffer is full
        self.idle_timer: asyncio.TimerHandle | None = None
        self.abort_timer: asyncio.TimerHandle | None = None
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
        if self.closed:
            return
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def data_received(self, data: bytes) -> None:
        if self.closed:  # after our GOAWAY: read and drop until the client closes (_finish)
            return
        conn = self.h2
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:  # h2 queued the GOAWAY that says why
            log.debug("HTTP/2 protocol error from %s: %s", self.front.client, e)
            self._fail()
            return
        for ev in events:
            if self.lost or self.h2.state_machine.state is h2.connection.ConnectionState.CLOSED:
                break  # a handler below closed the connection
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
                # h2 can send nothing more on any stream once it has a GOAWAY, though RFC 9113
                # would let the streams in flight finish: they end here.
                self._fail()
                return
        if conn.incoming_buffer._headers_buffer:  # a header block split over CONTINUATION frames
            if sum(len(f.data) for f in conn.incoming_buffer._headers_buffer) > self.max_header_bytes:
                self._go_away(ErrorCodes.ENHANCE_YOUR_CALM)
                return
        self.flush()

    def pause_writing(self) -> None:
        self.writable = asyncio.Event()
        if not self.closed:
            self.transport.pause_reading()  # read no more while our answers are not being read

    def resume_writing(self) -> None:
        if self.writable is not None:
            self.writable.set()
            self.writable = None
        if not self.lost:
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.lost = True
        self._head_since = None
        for timer in (self.idle_timer, self.abort_timer):
            if timer is not None:
                timer.cancel()
        self.idle_timer = self.abort_timer = None
        self.state.connections.discard(self)
        from .frontdoor import FrontDoorProtocol

        FrontDoorProtocol.open_connections -= 1
        self._gone_all()
        if self.writable is not None:
            self.writable.set()

    # --- streams -----------------------------------------------------------------------------

    def _request(self, ev: h2.events.RequestReceived) -> None:
        sid = ev.stream_id
        if self.going_away:
            self._rst(sid, ErrorCodes.REFUSED_STREAM)
            return
        if len(self.streams) >= MAX_STREAMS:
            self._rst(sid, ErrorCodes.REFUSED_STREAM)
            now = self.loop.time()
            if now - self.refused_since > REFUSAL_WINDOW:
                self.refused, self.refused_since = 0, now
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
        method = raw = authority = host = b""
        expect = False
        for name, value in ev.headers or ():
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    raw = value
                elif name == b":authority":
                    authority = value
            else:
                if name == b"host":
                    host = value
                elif name == b"expect" and value.lower() == b"100-continue":
                    expect = True
                headers.append((name, value))
        if authority and not host:  # (a Host that differs from :authority, h2 refuses: RFC 9113 8.3.1)
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
        s.expect_100 = expect
        self.streams[sid] = s
        task = self.loop.create_task(self._run(s))
        tasks = self.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _run(self, s: Stream) -> None:
        try:
            await self.app(s.scope, s.receive, s.send)
        except BaseException as e:  # noqa: BLE001 - as uvicorn: log it, answer 500 if we still can
            error_log.error("Exception in ASGI application", exc_info=e)
            if not s.response_started and not s.disconnected and not self.closed:
                try:  # the one error envelope (errors.py)
                    await GatewayError(500, "internal gateway error").response()(s.scope, s.receive, s.send)
                except Exception:  # noqa: BLE001 - nothing more can be said on this stream
                    pass
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            if not s.response_complete and not s.disconnected and not self.closed:
                # The app returned without finishing its answer: tell the client this stream failed.
                self._rst(s.id, ErrorCodes.INTERNAL_ERROR)
                self.gone(s)
            self._done(s)

    def informational(self, s: Stream) -> None:
        """`100 Continue`, for a client that waits for it before sending the body."""
        if self.closed or s.disconnected:
            return
        try:
            self.h2.send_headers(s.id, [(b":status", b"100")])
        except h2.exceptions.ProtocolError:
            return
        self.flush()

    def response_done(self, s: Stream) -> None:
        """The answer's last frame is queued. A request body still coming is not wanted any more:
        RST_STREAM(NO_ERROR) after a complete answer asks the client to stop sending it (RFC
        9113 8.1). The client did not leave: the request is logged with its status, not 499."""
        if s.more_body and not s.disconnected:
            s.more_body = False
            self._rst(s.id, ErrorCodes.NO_ERROR)

    def _done(self, s: Stream) -> None:
        self.streams.pop(s.id, None)
        if s.unacked:
            self.acknowledge(s.id, s.unacked)
            s.unacked = 0
        self.state.total_requests += 1
        if self.closed:
            return
        if not self.streams:
            if self.going_away:
                self._go_away(ErrorCodes.NO_ERROR)
                return
            # Draining: the GOAWAY goes once no stream has been in flight for DRAIN_IDLE s. A
            # client that got several answers at once is sending its next requests right now.
            wait = DRAIN_IDLE if self.close_wanted else self.front.timeout_keep_alive
            self.idle_timer = self.loop.call_later(wait, self._idle)
        self.flush()

    def gone(self, s: Stream) -> None:
        s.disconnected = True
        s.more_body = False
        s.event.set()
        if s.window is not None:
            s.window.set()

    def _gone_all(self) -> None:
        for s in list(self.streams.values()):
            self.gone(s)

    def _rst(self, stream_id: int, code: ErrorCodes) -> None:
        if self.closed:
            return
        try:
            self.h2.reset_stream(stream_id, code)
        except h2.exceptions.ProtocolError:  # closed already (e.g. the client reset it in the same read)
            return
        self.flush()

    def acknowledge(self, stream_id: int, n: int) -> None:
        """Give `n` body bytes of credit back (h2 sends WINDOW_UPDATE once enough has gathered)."""
        if self.closed or not n:
            return
        try:
            self.h2.acknowledge_received_data(n, stream_id)  # a closed stream's bytes still credit the connection
        except h2.exceptions.ProtocolError:
            return
        self.flush()

    # --- sending -----------------------------------------------------------------------------

    async def send_data(self, s: Stream, data: bytes, end_stream: bool) -> None:
        conn = self.h2
        view = memoryview(data)
        stalled_until: float | None = None  # while the window gives no room: when the stream is reset
        while view and not s.disconnected and not self.closed:
            try:
                room = min(conn.local_flow_control_window(s.id), conn.max_outbound_frame_size)
            except h2.exceptions.ProtocolError:  # reset meanwhile
                self.gone(s)
                return
            if room <= 0:
                now = self.loop.time()
                if stalled_until is None:
                    stalled_until = now + self.header_timeout
                if now >= stalled_until or not await self._wait_window(s, stalled_until - now):
                    log.info(
                        "HTTP/2 client %s did not take the answer on stream %d for %g s (flow-control window "
                        "closed; --header-timeout): stream reset",
                        self.front.client,
                        s.id,
                        self.header_timeout,
                    )
                    self._rst(s.id, ErrorCodes.CANCEL)
                    self.gone(s)
                    return
                continue
            stalled_until = None
            chunk, view = view[:room], view[room:]
            conn.send_data(s.id, chunk.tobytes(), end_stream=end_stream and not view)
            self.flush()
            if self.writable is not None:
                try:
                    await asyncio.wait_for(self.writable.wait(), self.header_timeout)
                except TimeoutError:
                    log.info(
                        "HTTP/2 client %s read nothing for %g s (--header-timeout): connection aborted",
                        self.front.client,
                        self.header_timeout,
                    )
                    self._abort()
                    return

    async def _wait_window(self, s: Stream, timeout: float) -> bool:
        """Until a WINDOW_UPDATE or SETTINGS may have opened room (True), or `timeout` s (False)."""
        self.flush()
        s.window = asyncio.Event()
        try:
            await asyncio.wait_for(s.window.wait(), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            s.window = None

    def _wake_senders(self, stream_id: int) -> None:
        for s in self.streams.values() if stream_id == 0 else (self.streams.get(stream_id),):
            if s is not None and s.window is not None:
                s.window.set()

    # --- closing -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """uvicorn's graceful shutdown: GOAWAY at the next moment without a stream in flight;
        after SHUTDOWN_SERVE seconds without one, new streams are refused until then."""
        if self.closed:
            return
        if not self.streams:
            self._go_away(ErrorCodes.NO_ERROR)
            return
        self.close_wanted = True
        self.loop.call_later(SHUTDOWN_SERVE, self._stop_taking_streams)

    def _stop_taking_streams(self) -> None:
        self.going_away = True

    def _go_away(self, code: ErrorCodes) -> None:
        """GOAWAY (the last stream id taken) and close. Called with NO_ERROR only when no stream
        is in flight: h2-based clients fail the streams in flight on a GOAWAY (module docstring)."""
        if self.closed:
            return
        self._head_since = None
        try:
            self.h2.close_connection(code, last_stream_id=self.h2.highest_inbound_stream_id)
        except h2.exceptions.ProtocolError:
            pass
        self.flush()
        self._finish()

    def _fail(self) -> None:
        """The connection is broken (a protocol error, or the client's GOAWAY): send what h2 has
        queued (its GOAWAY), end every stream and close."""
        self.flush()
        self._finish()

    def _finish(self) -> None:
        """No more frames: the write side is shut once flushed, and what the client still sends
        is read and dropped until it closes, or for CLOSE_GRACE seconds, then the socket is aborted."""
        self.closed = True
        self._head_since = None
        self._gone_all()
        t = self.transport
        if t.can_write_eof():
            t.write_eof()
            if not self.lost:
                t.resume_reading()
        else:
            t.close()
        if self.abort_timer is None and not self.lost:
            self.abort_timer = self.loop.call_later(CLOSE_GRACE, self._abort)

    def _abort(self) -> None:
        self.abort_timer = None
        self.closed = True
        self._gone_all()
        if not self.lost:
            self.transport.abort()

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
