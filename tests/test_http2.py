"""HTTP/2 to clients (er_gateway/http2.py, `--http2`): h2c with prior knowledge and h2 over TLS
(ALPN) on every route, with a real HTTP/2 client (httpx's http2 extra) and the SDKs over it; and the
front door's limits held against a hostile HTTP/2 client speaking raw frames (the h2 library's
client side), each asserting its figure."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
from conftest import (
    EMB,
    RER,
    Backend,
    GatewayProc,
    backend_args,
    self_signed_cert,
    start_backend,
    start_gateway,
    start_redis,
    wait_until,
)
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame

from er_gateway.http2 import MAX_STREAMS
from er_gateway.routes import ROUTES


@dataclass
class H2Stack:
    emb: Backend
    rer: Backend
    plain: GatewayProc  # --http2, h2c
    tls: GatewayProc  # --http2 with a certificate: h2 by ALPN
    https: str
    trust: ssl.SSLContext


@pytest.fixture(scope="module")
def h2stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[H2Stack]:
    tmp = tmp_path_factory.mktemp("h2")
    emb = start_backend(tmp, "embedding", extra=["--matryoshka"])
    rer = start_backend(tmp, "rerank")
    common = [*backend_args(emb, rer), "--http2", "--health-interval", "0.5"]
    plain = start_gateway(tmp / "plain", *common)
    cert, key = self_signed_cert(tmp)
    tls = start_gateway(tmp / "tls", *common, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), wait=False)
    trust = ssl.create_default_context(cafile=str(cert))
    https = tls.url.replace("http://", "https://")
    wait_until(lambda: httpx.get(https + "/health", verify=trust).status_code == 200, 30, "TLS gateway", tls.proc)
    wait_until(lambda: httpx.get(plain.url + "/health").status_code == 200, 10, "gateway healthy")
    yield H2Stack(emb, rer, plain, tls, https, trust)
    for p in (plain, tls, emb, rer):
        p.stop()


# One request per route (method, path as in ROUTES): the test fails when a route is added without one.
def route_requests(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        ("GET", "/v1/models"): {},
        ("POST", "/v1/embeddings"): {"json": {"model": EMB, "input": ["alpha", "beta"], "dimensions": 32}},
        ("POST", "/embeddings"): {"json": {"model": EMB, "input": "alpha"}},
        ("POST", "/v2/embed"): {
            "json": {"model": EMB, "texts": ["alpha"], "input_type": "search_query", "embedding_types": ["int8"]}
        },
        ("POST", "/v1/rerank"): {"json": {"model": RER, "query": "q", "documents": ["a b", "q c"]}},
        ("POST", "/v2/rerank"): {"json": {"model": RER, "query": "q", "documents": ["a b", "q c"], "top_n": 1}},
        ("POST", "/rerank"): {"json": {"model": RER, "query": "q", "documents": ["a b"]}},
        ("POST", "/batch_rerank"): {"json": [{"model": RER, "query": "q", "documents": ["a b", "q"]}] * 2},
        ("POST", "/score"): {"json": {"model": RER, "text_1": "a b", "text_2": ["a", "c"]}},
        ("POST", "/v1/score"): {"json": {"model": RER, "text_1": "a b", "text_2": "a"}},
        ("POST", "/reload_model"): {},
        ("GET", "/v1/usage"): {},
        ("GET", "/admin/keys"): {},
        ("POST", "/admin/keys"): {"json": {"name": name}},
        ("POST", "/admin/keys/{name}/rotate"): {"path": f"/admin/keys/{name}/rotate"},
        ("DELETE", "/admin/keys/{name}"): {"path": f"/admin/keys/{name}"},
        ("GET", "/health"): {},
        ("GET", "/health/live"): {},
        ("GET", "/health/ready"): {},
        ("GET", "/metrics"): {},
        ("GET", "/status"): {},
        ("GET", "/status.json"): {},
        ("GET", "/openapi.json"): {},
        ("GET", "/docs"): {},
        ("GET", "/docs/swagger-ui-bundle.js"): {},
        ("GET", "/docs/swagger-ui.css"): {},
    }


# Answers that are the same for the same request (no ids, clocks or counters in them).
DETERMINISTIC = {"/v1/models", "/v1/embeddings", "/embeddings", "/v2/embed", "/rerank", "/v1/rerank", "/v2/rerank"}
DETERMINISTIC |= {"/batch_rerank", "/score", "/v1/score", "/health/live", "/openapi.json", "/docs/swagger-ui.css"}


def comparable(r: httpx.Response) -> Any:
    if r.headers.get("content-type", "").startswith("application/json"):
        body = r.json()
        for answer in body if isinstance(body, list) else [body]:
            if isinstance(answer, dict):
                answer.pop("id", None)
                answer.pop("created", None)
        return body
    return r.content


def exercise(client: httpx.Client, name: str) -> dict[tuple[str, str], httpx.Response]:
    out = {}
    for (method, path), spec in route_requests(name).items():
        out[(method, path)] = client.request(method, spec.get("path", path), json=spec.get("json"))
    return out


@pytest.mark.parametrize("how", ["h2c", "tls"])
def test_every_route_over_http2_answers_as_over_http1(h2stack: H2Stack, how: str) -> None:
    gw = h2stack.plain if how == "h2c" else h2stack.tls
    url = gw.url if how == "h2c" else h2stack.https
    verify: Any = h2stack.trust if how == "tls" else True
    assert set(route_requests("x")) == {(r.method, r.path) for r in ROUTES}
    # h2c: prior knowledge (no HTTP/1.1 first); TLS: the client offers h2 and http/1.1 by ALPN.
    h2 = httpx.Client(base_url=url, headers=gw.auth, verify=verify, http1=how == "tls", http2=True, timeout=30)
    h1 = httpx.Client(base_url=url, headers=gw.auth, verify=verify, timeout=30)
    with h2, h1:
        over2 = exercise(h2, f"h2-{how}")
        over1 = exercise(h1, f"h1-{how}")
    for route, r2 in over2.items():
        r1 = over1[route]
        assert r2.http_version == "HTTP/2" and r1.http_version == "HTTP/1.1", route
        assert r2.status_code == r1.status_code and r2.status_code < 300, (route, r2.text[:300])
        assert r2.headers["content-type"] == r1.headers["content-type"], route
        assert r2.headers["x-request-id"] and "connection" not in r2.headers
        if route[1] in DETERMINISTIC:
            assert comparable(r2) == comparable(r1), route
    assert over2[("POST", "/admin/keys")].json()["key"].startswith("er-")


def test_readme_curl_over_http2(h2stack: H2Stack, tmp_path: Path) -> None:
    from test_clients import needs_http2, readme_curls, run_readme_curl

    cmds = [c for c in readme_curls() if needs_http2(c)]
    assert cmds
    for cmd in cmds:
        status, body = run_readme_curl(cmd + " -w ' %{http_version}'", h2stack.plain, tmp_path)
        assert status == "200", (cmd, status, body)
    log = (h2stack.plain.logs / "access.log").read_text()
    assert "path=/v1/embeddings" in log


def test_http2_is_off_unless_asked(tmp_path: Path, h2stack: H2Stack) -> None:
    gw = start_gateway(tmp_path, *backend_args(h2stack.emb, h2stack.rer))
    try:
        # Without --http2 the preface is a malformed HTTP/1.1 request: 400 in the error envelope.
        with socket.create_connection(("127.0.0.1", port_of(gw)), timeout=5) as s:
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            answer = s.recv(4096)
        assert answer.startswith(b"HTTP/1.1 400 ") and b'"code":400' in answer, answer
        with pytest.raises(httpx.TransportError), httpx.Client(http1=False, http2=True) as c:
            c.get(gw.url + "/health")
        assert httpx.get(gw.url + "/health").http_version == "HTTP/1.1"
    finally:
        gw.stop()
    # With --http2, an HTTP/1.1 client (TLS without h2 in its ALPN list, or plain) still gets HTTP/1.1.
    r = httpx.get(h2stack.https + "/v1/models", headers=h2stack.tls.auth, verify=h2stack.trust)
    assert r.status_code == 200 and r.http_version == "HTTP/1.1"


def test_workers_serve_http2_over_tls(tmp_path: Path, h2stack: H2Stack) -> None:
    """--workers N: each worker process gets the HTTP/2 protocol and the ALPN context."""
    redis = start_redis(tmp_path)
    cert, key = self_signed_cert(tmp_path)
    tls = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    gw = start_gateway(
        tmp_path, *backend_args(h2stack.emb, h2stack.rer), "--http2", "--workers", "2", "--redis-url", redis.url,
        *tls, wait=False,
    )  # fmt: skip
    try:
        https = gw.url.replace("http://", "https://")
        trust = ssl.create_default_context(cafile=str(cert))
        wait_until(lambda: httpx.get(https + "/health", verify=trust).status_code == 200, 30, "gw", gw.proc)
        for _ in range(12):  # new connections, spread over the workers by the kernel
            with httpx.Client(http2=True, verify=trust) as c:
                r = c.get(https + "/v1/models", headers=gw.auth)
            assert r.status_code == 200 and r.http_version == "HTTP/2"
        started = re.findall(r"gateway pid (\d+) serving .*; HTTP/2 on", gw.output())
        assert len(set(started)) == 2, started
    finally:
        gw.stop()
        redis.stop()


def test_large_bodies_both_ways_pass_flow_control(h2stack: H2Stack) -> None:
    """2 MiB up and ~1 MiB down: thirty-odd times HTTP/2's 64 KiB window each way."""
    gw = h2stack.plain
    texts = [f"text {i} " + "word " * 400 for i in range(1000)]  # ~2 MiB of JSON
    body = {"model": EMB, "input": texts}
    with httpx.Client(base_url=gw.url, headers=gw.auth, http1=False, http2=True, timeout=60) as c:
        r2 = c.post("/v1/embeddings", json=body)
    r1 = gw.post("/v1/embeddings", body)
    assert r2.status_code == 200 and r2.http_version == "HTTP/2"
    assert len(r2.content) > 1_000_000
    assert r2.json()["data"] == r1.json()["data"]


def test_many_streams_on_one_connection(h2stack: H2Stack) -> None:
    gw = h2stack.plain

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, headers=gw.auth, http1=False, http2=True, timeout=30) as c:
            calls = [c.post("/v1/embeddings", json={"model": EMB, "input": f"t{i}"}) for i in range(MAX_STREAMS)]
            return await asyncio.gather(*calls)

    rs = asyncio.run(run())
    assert [r.status_code for r in rs] == [200] * MAX_STREAMS
    assert len({r.headers["x-request-id"] for r in rs}) == MAX_STREAMS


def test_openai_and_cohere_sdks_over_http2(h2stack: H2Stack) -> None:
    import cohere
    import openai

    gw = h2stack.tls
    with httpx.Client(http2=True, verify=h2stack.trust) as http:
        client = openai.OpenAI(base_url=h2stack.https + "/v1", api_key=gw.key, http_client=http)
        got = client.embeddings.create(model=EMB, input=["alpha", "beta"])
        assert len(got.data) == 2
        co = cohere.ClientV2(api_key=gw.key, base_url=h2stack.https, httpx_client=http)
        emb = co.embed(model=EMB, texts=["alpha"], input_type="search_document", embedding_types=["float"])
        assert emb.embeddings.float_ is not None
        ranked = co.rerank(model=RER, query="q", documents=["a b", "q c"])
        assert len(ranked.results) == 2
    log = (gw.logs / "access.log").read_text()
    assert "path=/v1/embeddings" in log and "path=/v2/embed" in log


# ---- a hostile HTTP/2 client ----------------------------------------------------------------
Headers = tuple[tuple[bytes, bytes], ...]


class RawH2:
    """A client that speaks HTTP/2 frame by frame, to do what well-behaved clients never do."""

    def __init__(self, port: int, settings: dict[int, int] | None = None, handshake: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
        self.closed = False
        self.events: list[Any] = []
        if handshake:
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.closed:
            try:
                self.sock.sendall(out)
            except (BrokenPipeError, ConnectionResetError):
                self.closed = True

    def open_stream(self, method: str, path: str, key: str, extra: Headers = (), end: bool = False) -> int:
        """HEADERS for a new stream, queued (not flushed): the caller adds what it wants."""
        sid = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", method.encode()),
            (b":path", path.encode()),
            (b":scheme", b"http"),
            (b":authority", b"127.0.0.1"),
            (b"authorization", f"Bearer {key}".encode()),
            *([(b"content-type", b"application/json")] if method == "POST" else []),
            *extra,
        ]
        self.conn.send_headers(sid, headers, end_stream=end)
        return sid

    def request(self, path: str, key: str, body: bytes | None = None, extra: Headers = ()) -> int:
        sid = self.open_stream("POST" if body is not None else "GET", path, key, extra, end=body is None)
        if body is not None:
            self.conn.send_data(sid, body, end_stream=True)
        self.flush()
        return sid

    def read(self, timeout: float) -> list[Any]:
        """Events arriving within `timeout` seconds (fewer if the gateway closes the connection)."""
        got: list[Any] = []
        end = time.monotonic() + timeout
        while not self.closed and (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                break
            evs = self.conn.receive_data(data)
            got += evs
            self.flush()
        self.events += got
        return got

    def until(self, pred: Any, timeout: float) -> Any:
        end = time.monotonic() + timeout
        while time.monotonic() < end and not self.closed:
            for ev in self.read(min(0.02, end - time.monotonic())):  # returns soon after the event
                if pred(ev):
                    return ev
        for ev in self.events:
            if pred(ev):
                return ev
        return None

    def close(self) -> None:
        self.sock.close()


def goaway(ev: Any) -> bool:
    return isinstance(ev, h2.events.ConnectionTerminated)


def port_of(gw: GatewayProc) -> int:
    return int(gw.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, h2stack: H2Stack) -> Iterator[GatewayProc]:
    """A --http2 gateway with short timeouts, a small connection cap and a slow embedding model."""
    tmp = tmp_path_factory.mktemp("h2tight")
    slow = start_backend(tmp, "embedding", extra=["--delay", "1.5"])
    args = ["--embedding-url", slow.url, "--reranker-url", h2stack.rer.url, "--http2", "--max-connections", "4"]
    gw = start_gateway(tmp, *args, "--header-timeout", "1", "--keepalive-timeout", "1", "--max-header-bytes", "4096")
    yield gw
    gw.stop()
    slow.stop()


def test_preface_without_a_request_is_closed_after_the_header_timeout(tight: GatewayProc) -> None:
    c = RawH2(port_of(tight))
    t0 = time.monotonic()
    ev = c.until(goaway, 5)
    took = time.monotonic() - t0
    c.read(1)
    assert ev is not None and ev.error_code == ErrorCodes.NO_ERROR and c.closed
    assert 0.9 <= took <= 2.6, took  # --header-timeout 1, swept every 0.25 s
    c.close()


def test_idle_connection_goes_away_after_keepalive_timeout(tight: GatewayProc) -> None:
    c = RawH2(port_of(tight))
    sid = c.request("/health/live", tight.key)
    assert c.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == sid, 5)
    t0 = time.monotonic()
    ev = c.until(goaway, 5)
    took = time.monotonic() - t0
    assert ev is not None and ev.error_code == ErrorCodes.NO_ERROR and ev.last_stream_id == sid
    assert 0.8 <= took <= 2.0, took  # --keepalive-timeout 1
    c.close()


def test_header_list_over_the_limit_ends_the_connection(tight: GatewayProc) -> None:
    c = RawH2(port_of(tight))
    c.read(0.2)
    sid = c.request("/v1/models", tight.key, extra=((b"x-big", b"v" * 8000),))  # --max-header-bytes 4096
    ev = c.until(goaway, 3)
    assert ev is not None and ev.error_code != ErrorCodes.NO_ERROR and c.until(lambda e: False, 1) is None and c.closed
    assert not any(isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid for e in c.events)
    # An unfinished header block (HEADERS without END_HEADERS, then CONTINUATION frames) is capped too.
    c = RawH2(port_of(tight))
    c.read(0.2)
    first = HeadersFrame(1)
    first.data = b"\x00" * 1000
    c.sock.sendall(first.serialize())
    for _ in range(6):
        more = ContinuationFrame(1)
        more.data = b"\x00" * 1000
        c.sock.sendall(more.serialize())
    ev = c.until(goaway, 3)
    assert ev is not None and ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert httpx.get(tight.url + "/health/live").status_code == 200


def test_streams_opened_before_the_settings_arrive_are_refused_not_the_connection(h2stack: H2Stack) -> None:
    gw = h2stack.plain
    c = RawH2(port_of(gw))
    body = b'{"model": "%s", "input": "x"}' % EMB.encode()
    sids = [c.request("/v1/embeddings", gw.key, body) for _ in range(MAX_STREAMS + 20)]  # SETTINGS not read yet
    done: dict[int, str] = {}
    end = time.monotonic() + 10
    while len(done) < len(sids) and time.monotonic() < end and not c.closed:
        for e in c.read(0.2):
            if isinstance(e, h2.events.ResponseReceived):
                done[e.stream_id] = dict(e.headers)[b":status"].decode()
            elif isinstance(e, h2.events.StreamReset):
                done[e.stream_id] = ErrorCodes(e.error_code).name
    assert not any(goaway(e) for e in c.events) and not c.closed
    assert set(done) == set(sids) and set(done.values()) <= {"200", "REFUSED_STREAM"}, set(done.values())
    assert list(done.values()).count("200") >= MAX_STREAMS
    c.close()


def test_rapid_reset_is_capped_per_connection(tight: GatewayProc) -> None:
    """Streams opened and reset by the client (CVE-2023-44487): work that goes on after the reset
    still holds one of the connection's MAX_STREAMS slots; beyond, streams are refused at once, and
    a flood of refusals ends the connection."""
    c = RawH2(port_of(tight))
    c.read(0.2)
    body = b'{"model": "%s", "input": "x"}' % EMB.encode()
    first = [c.request("/v1/embeddings", tight.key, body) for _ in range(MAX_STREAMS)]
    c.read(0.3)  # the gateway has read them: they wait for the slow model (1.5 s)
    t0 = time.monotonic()
    for sid in first:
        c.conn.reset_stream(sid, ErrorCodes.CANCEL)
    c.flush()
    for _ in range(2 * MAX_STREAMS):  # the client's own count of open streams is back to 0
        sid = c.request("/v1/embeddings", tight.key, body)
        c.conn.reset_stream(sid, ErrorCodes.CANCEL)
        c.flush()
    ev = c.until(goaway, 5)
    took = time.monotonic() - t0
    assert ev is not None and ev.error_code == ErrorCodes.ENHANCE_YOUR_CALM, c.events[-5:]
    assert took < 1.0, took  # before the slow model answered any: the refusals came at once
    wait_until(lambda: "keeps opening streams over the limit" in tight.log.read_text(), 5, "the warning")
    # What the gateway did: the first MAX_STREAMS requests (logged as 499: their client left), no more.
    log = tight.logs / "access.log"
    wait_until(lambda: log.read_text().count("path=/v1/embeddings") >= MAX_STREAMS, 10, "the first ones logged")
    time.sleep(0.5)
    assert log.read_text().count("path=/v1/embeddings") == MAX_STREAMS
    assert log.read_text().count("status=499") >= MAX_STREAMS
    c.close()


def test_a_client_that_never_opens_its_window_loses_the_stream(tight: GatewayProc) -> None:
    c = RawH2(port_of(tight), settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    c.read(0.2)
    t0 = time.monotonic()
    sid = c.request("/v1/models", tight.key)
    ev = None
    while ev is None and time.monotonic() - t0 < 6:  # SETTINGS frames that open no room do not help
        c.conn.update_settings({})
        c.flush()
        ev = c.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == sid, 0.3)
    took = time.monotonic() - t0
    assert ev is not None and ev.error_code == ErrorCodes.CANCEL
    assert 0.9 <= took <= 2.5, took  # --header-timeout 1
    assert any(isinstance(e, h2.events.ResponseReceived) for e in c.events)  # HEADERS are not flow-controlled
    log = tight.logs / "access.log"
    wait_until(lambda: any("/v1/models" in x and "status=499" in x for x in log.read_text().splitlines()), 5, "499")
    c.close()


def test_connections_over_http2_count_against_max_connections(tight: GatewayProc) -> None:
    time.sleep(0.5)  # the other tests' connections are closed
    held = [RawH2(port_of(tight)) for _ in range(4)]  # --max-connections 4
    for c in held:
        c.request("/health/live", tight.key)
        assert c.until(lambda e: isinstance(e, h2.events.ResponseReceived), 3)
    extra = RawH2(port_of(tight), handshake=False)
    extra.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    extra.read(1)
    assert extra.closed
    held[0].close()
    time.sleep(0.3)
    again = RawH2(port_of(tight))
    again.request("/health/live", tight.key)
    assert again.until(lambda e: isinstance(e, h2.events.ResponseReceived), 3)
    for c in (*held[1:], again):
        c.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_pings_without_reading_do_not_grow_memory(h2stack: H2Stack) -> None:
    """A client that floods PINGs and reads none of the 17-byte acknowledgements: the gateway stops
    reading once its send buffer is full, so what it holds stays small."""
    gw = h2stack.plain
    c = RawH2(port_of(gw))
    c.read(0.2)
    before = rss_kib(gw.proc.pid)
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    chunk = ping * 4096  # 68 KiB
    c.sock.setblocking(False)
    sent = 0
    t0 = time.monotonic()
    end, late, sent_late = t0 + 5, t0 + 3.5, -1
    view = memoryview(chunk)
    while time.monotonic() < end:
        if sent_late < 0 and time.monotonic() >= late:
            sent_late = sent
        try:
            n = c.sock.send(view)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        sent += n
        view = view[n:] or memoryview(chunk)  # whole frames only
    grew = rss_kib(gw.proc.pid) - before
    print(f"sent {sent} ({sent - sent_late} in the last 1.5 s), grew {grew} KiB")
    assert sent - sent_late < 256 * 1024, (sent, sent_late)  # the gateway stopped reading: buffers are full
    assert grew < 8 * 1024, f"{grew} KiB after {sent} bytes of PINGs"
    c.close()
    assert httpx.get(gw.url + "/health/live").status_code == 200


def test_drain_sends_goaway_once_the_streams_in_flight_are_done(tmp_path: Path, h2stack: H2Stack) -> None:
    slow = start_backend(tmp_path, "embedding", extra=["--delay", "1"])
    gw = start_gateway(
        tmp_path, "--embedding-url", slow.url, "--reranker-url", h2stack.rer.url, "--http2", "--drain-delay", "3"
    )
    try:
        c = RawH2(port_of(gw))
        c.read(0.2)
        body = b'{"model": "%s", "input": "x"}' % EMB.encode()

        async def httpx_pair() -> list[int]:  # an h2 client as users run it, two requests in flight
            async with httpx.AsyncClient(base_url=gw.url, headers=gw.auth, http1=False, http2=True) as h:
                calls = [h.post("/v1/embeddings", json={"model": EMB, "input": f"y{i}"}) for i in range(2)]
                first = asyncio.gather(*calls)
                await asyncio.sleep(0.3)
                os.kill(gw.proc.pid, signal.SIGTERM)
                return [r.status_code for r in await first]

        assert asyncio.run(httpx_pair()) == [200, 200]  # not failed by a GOAWAY while in flight
        busy = c.request("/v1/embeddings", gw.key, body)  # draining: still served on this connection
        ready = c.request("/health/ready", gw.key)
        assert c.until(lambda e: isinstance(e, h2.events.StreamEnded) and e.stream_id == ready, 3)
        assert not any(goaway(e) for e in c.events)  # `busy` is still in flight: no GOAWAY yet
        live = c.request("/health/live", gw.key)  # nor refused: the connection still serves
        ev = c.until(goaway, 5)
        assert ev is not None and ev.error_code == ErrorCodes.NO_ERROR and ev.last_stream_id == live
        statuses = {
            e.stream_id: dict(e.headers)[b":status"] for e in c.events if isinstance(e, h2.events.ResponseReceived)
        }
        assert statuses == {busy: b"200", ready: b"503", live: b"200"}
        kinds = [(type(e).__name__, getattr(e, "stream_id", 0)) for e in c.events]
        assert kinds.index(("StreamEnded", busy)) < kinds.index(("ConnectionTerminated", 0))
        c.read(1)
        assert c.closed
        assert gw.proc.wait(10) == 0
    finally:
        gw.stop()
        slow.stop()


def test_a_client_that_reads_nothing_loses_its_connection_slot(tight: GatewayProc) -> None:
    """PING floods that never read: the gateway closes them (no request within --header-timeout),
    and aborts them CLOSE_GRACE s later when the client still reads nothing, freeing the slots."""
    from er_gateway.http2 import CLOSE_GRACE

    time.sleep(0.5)
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
    hogs = []
    for _ in range(4):  # --max-connections 4
        h = RawH2(port_of(tight))
        h.sock.setblocking(False)
        try:
            for _ in range(200):
                h.sock.send(ping * 4096)
        except BlockingIOError:
            pass
        hogs.append(h)
    t0 = time.monotonic()

    def fresh() -> bool:
        c = RawH2(port_of(tight))
        c.request("/health/live", tight.key)
        ok = c.until(lambda e: isinstance(e, h2.events.ResponseReceived), 0.5) is not None
        c.close()
        return ok

    # --header-timeout 1, then CLOSE_GRACE, plus the seconds the gateway spends answering the
    # PINGs it read before its send buffers filled (pure-Python h2, four floods on one core).
    wait_until(fresh, 1 + CLOSE_GRACE + 6, "a connection slot")
    assert time.monotonic() - t0 <= 1 + CLOSE_GRACE + 6
    for h in hogs:
        h.close()


def test_client_goaway_with_a_request_in_the_same_read_leaves_no_traceback(h2stack: H2Stack) -> None:
    gw = h2stack.plain
    c = RawH2(port_of(gw))
    c.read(0.2)
    c.open_stream("GET", "/health/live", gw.key, end=True)
    c.conn.close_connection()  # in the same write
    c.flush()
    c.read(1)
    time.sleep(0.3)
    assert "Traceback" not in gw.output() and "Exception in ASGI" not in gw.output()
    assert httpx.get(gw.url + "/health/live").status_code == 200


def test_an_answer_before_the_body_is_logged_with_its_status(h2stack: H2Stack) -> None:
    """401 before the body arrived: the rest of the body is declined (RST_STREAM NO_ERROR), and
    the request is logged as 401, not as a client that left (499)."""
    gw = h2stack.plain
    c = RawH2(port_of(gw))
    c.read(0.2)
    sid = c.open_stream("POST", "/v1/embeddings", "wrong", ((b"x-request-id", b"early-401"),))
    c.flush()
    ev = c.until(lambda e: isinstance(e, h2.events.StreamReset) and e.stream_id == sid, 3)
    assert ev is not None and ev.error_code == ErrorCodes.NO_ERROR
    statuses = [dict(e.headers)[b":status"] for e in c.events if isinstance(e, h2.events.ResponseReceived)]
    assert statuses == [b"401"]
    log = gw.logs / "access.log"
    wait_until(lambda: "request_id=early-401" in log.read_text(), 5, "logged")
    line = next(x for x in log.read_text().splitlines() if "request_id=early-401" in x)
    assert "status=401" in line, line
    c.close()


def test_expect_100_continue_is_answered_and_date_is_fresh(h2stack: H2Stack) -> None:
    gw = h2stack.plain
    c = RawH2(port_of(gw))
    c.read(0.2)
    body = b'{"model": "%s", "input": "x"}' % EMB.encode()
    sid = c.open_stream("POST", "/v1/embeddings", gw.key, ((b"expect", b"100-continue"),))
    c.flush()
    ev = c.until(lambda e: isinstance(e, h2.events.InformationalResponseReceived), 3)
    assert ev is not None and dict(ev.headers)[b":status"] == b"100"
    c.conn.send_data(sid, body, end_stream=True)
    c.flush()
    first = c.until(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid, 3)
    assert first is not None and dict(first.headers)[b":status"] == b"200"
    time.sleep(2.1)  # the same connection, later: uvicorn's date header moves on
    later = c.request("/health/live", gw.key)
    second = c.until(lambda e: isinstance(e, h2.events.ResponseReceived) and e.stream_id == later, 3)
    assert dict(second.headers)[b"date"] != dict(first.headers)[b"date"]
    c.close()


def test_receive_waits_after_the_body_until_the_answer_is_done() -> None:
    """ASGI: after the last body part, receive() blocks until the client leaves or the answer is
    complete (then http.disconnect), as uvicorn's does; it never returns at once in a loop."""
    from er_gateway.http2 import Stream

    class Conn:
        def acknowledge(self, *a: Any) -> None:
            pass

        def informational(self, *a: Any) -> None:
            pass

    async def run() -> None:
        s = Stream(Conn(), 1, {"method": "POST"})  # type: ignore[arg-type]
        s.body += b"abc"
        s.more_body = False
        assert await s.receive() == {"type": "http.request", "body": b"abc", "more_body": False}
        pending = asyncio.ensure_future(s.receive())
        await asyncio.sleep(0.2)
        assert not pending.done()
        s.response_complete = True
        s.event.set()
        assert await asyncio.wait_for(pending, 1) == {"type": "http.disconnect"}

    asyncio.run(run())


def test_drain_with_a_busy_httpx_client_loses_no_request(tmp_path: Path, h2stack: H2Stack) -> None:
    """httpx (h2) with four requests always in flight while the gateway drains: no GOAWAY while
    they are in flight (it would fail them all), not even when all four answers go out at once;
    the first pause gets the GOAWAY,
    and the client's next requests go out on a new connection (httpcore retries a stream above
    the GOAWAY's last id), all within --drain-delay."""
    slow = start_backend(tmp_path, "embedding", extra=["--delay", "0.3"])
    gw = start_gateway(
        tmp_path, "--embedding-url", slow.url, "--reranker-url", h2stack.rer.url, "--http2", "--drain-delay", "4"
    )
    try:

        async def run() -> list[Any]:
            results: list[Any] = []
            async with httpx.AsyncClient(base_url=gw.url, headers=gw.auth, http1=False, http2=True) as c:

                async def worker(until: float) -> None:
                    while time.monotonic() < until:
                        try:
                            r = await c.post("/v1/embeddings", json={"model": EMB, "input": "x"})
                            results.append(r.status_code)
                        except httpx.HTTPError as e:
                            results.append(repr(e))

                t0 = time.monotonic()
                busy = asyncio.gather(*(worker(t0 + 1.5) for _ in range(4)))
                await asyncio.sleep(0.2)
                os.kill(gw.proc.pid, signal.SIGTERM)
                await busy
                await asyncio.sleep(0.5)  # no stream in flight: the GOAWAY comes now
                # One request at a time: httpcore fails a second request that races the first
                # one's reading of the GOAWAY (README, "HTTP/2").
                await worker(time.monotonic() + 0.6)
            return results

        results = asyncio.run(run())
        assert results and all(r == 200 for r in results), [r for r in results if r != 200][:3]
        lines = [x for x in (gw.logs / "access.log").read_text().splitlines() if "path=/v1/embeddings" in x]
        clients = {re.findall(r"client=(\S+)", x)[0] for x in lines}
        assert len(clients) == 2, clients  # one connection while busy, a new one after its GOAWAY
        assert gw.proc.wait(10) == 0
    finally:
        gw.stop()
        slow.stop()
