"""Front-door limits (er_gateway/frontdoor.py) against real gateway processes: each limit is hit with
the hostile case and the figure asserted (seconds to close, status and envelope, RSS, latency)."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import PY, ROOT, Backend, GatewayProc, backend_args, start_backend, start_gateway, start_redis

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Backend, Backend]]:
    tmp = tmp_path_factory.mktemp("fd-backends")
    emb, rer = start_backend(tmp, "embedding"), start_backend(tmp, "rerank")
    yield emb, rer
    emb.stop()
    rer.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, backends: tuple[Backend, Backend]) -> Iterator[GatewayProc]:
    """Short header timeout (1 s) and keep-alive timeout (3 s), default head and connection caps."""
    g = start_gateway(
        tmp_path_factory.mktemp("fd-gw"), *backend_args(*backends), "--header-timeout", "1", "--keepalive-timeout", "3"
    )
    yield g
    g.stop()


def addr(g: GatewayProc) -> tuple[str, int]:
    host, port = g.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def connect(g: GatewayProc, timeout: float = 10) -> socket.socket:
    return socket.create_connection(addr(g), timeout=timeout)


def vm(pid: int, field: str) -> int:
    """VmRSS / VmHWM of a process in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes (EOF or reset); returns (bytes, seconds)."""
    t0 = time.monotonic()
    s.settimeout(timeout)
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout} s; got {out[:200]!r}") from None
        if not chunk:
            break
        out += chunk
    return out, time.monotonic() - t0


_leftover: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(s: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length; returns (status, body). Bytes past it (the next
    pipelined response) are kept for the next call on the same socket."""
    buf = _leftover.pop(s, b"")
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response head; got {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:] if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "closed inside a response body"
        body += chunk
    if len(body) > length:
        _leftover[s] = body[length:]
    return int(head.split(b" ", 2)[1]), body[:length]


def status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


HEALTH = b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n"


# --- header timeout ----------------------------------------------------------------------------------


def test_header_timeout_closes_idle_trickling_and_stalled_keepalive_heads(gw: GatewayProc) -> None:
    """--header-timeout 1: closed within 1 s + 1 s of the connection or of a later request's first byte;
    an idle keep-alive connection is governed by --keepalive-timeout 3 instead."""

    def idle() -> tuple[bytes, float]:
        with connect(gw) as s:
            return read_until_closed(s, 5)

    def trickle() -> tuple[bytes, float]:
        with connect(gw) as s:
            t0 = time.monotonic()
            s.sendall(b"GET /health HTTP/1.1\r\n")
            s.settimeout(0.1)
            out = b""
            while time.monotonic() - t0 < 5:
                try:
                    s.sendall(b"X")  # one byte of a header name every 0.1 s, never finished
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
                if not chunk:
                    break
                out += chunk
            return out, time.monotonic() - t0

    def stalled_second_head() -> tuple[bytes, float]:
        with connect(gw) as s:
            s.sendall(HEALTH)
            assert read_response(s)[0] == 200
            time.sleep(0.5)
            s.sendall(b"GET /hea")  # first bytes of the next request, then nothing
            return read_until_closed(s, 5)

    def idle_keepalive() -> tuple[bytes, float]:
        with connect(gw) as s:
            s.sendall(HEALTH)
            assert read_response(s)[0] == 200
            return read_until_closed(s, 8)

    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(f) for f in (idle, trickle, stalled_second_head, idle_keepalive)]
        (idle_out, idle_t), (tr_out, tr_t), (st_out, st_t), (ka_out, ka_t) = [f.result() for f in futures]

    print(
        f"\nheader timeout 1 s: idle closed after {idle_t:.2f} s, trickling {tr_t:.2f} s, stalled 2nd head "
        f"{st_t:.2f} s; idle keep-alive (3 s) {ka_t:.2f} s"
    )
    assert idle_out == b"" and 0.9 <= idle_t <= 2.0, (idle_out, idle_t)  # nothing sent: closed silently
    for out, t in ((tr_out, tr_t), (st_out, st_t)):
        assert 0.9 <= t <= 2.0, t
        status, err = status_and_error(out)
        assert status == 408 and err["type"] == "request_timeout" and err["code"] == 408
        assert "--header-timeout" in err["message"], err
    assert ka_out == b"" and 2.5 <= ka_t <= 4.5, ka_t  # keep-alive idle: 3 s, not the 1 s header timeout
    assert httpx.get(gw.url + "/health").status_code == 200


# --- request head size -------------------------------------------------------------------------------


def test_head_over_max_header_bytes_is_431_and_never_buffered(gw: GatewayProc) -> None:
    """A 100 KiB header gets 431 + envelope; 60 KiB passes; four 128 MiB unfinished heads sent at
    once each get their 431, cost the gateway < 40 MB of peak RSS and do not stall /health."""
    with connect(gw) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (100 * 1024) + b"\r\n\r\n")
        out, _ = read_until_closed(s, 5)
    status, err = status_and_error(out)
    assert status == 431 and err["type"] == "request_header_fields_too_large" and err["code"] == 431
    assert err["param"] is None and "--max-header-bytes" in err["message"] and "65536" in err["message"]
    assert b"connection: close" in out.lower()

    with connect(gw) as s:  # under the limit: served, also pipelined, also with a big body in the same write
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (60 * 1024) + b"\r\n\r\n")
        assert read_response(s)[0] == 200
        s.sendall(HEALTH * 3)
        assert [read_response(s)[0] for _ in range(3)] == [200] * 3
        body = json.dumps({"model": "Qwen3-Embedding-0.6B", "input": ["word " * 50] * 1000}).encode()
        assert len(body) > 200 * 1024  # more than one read of the gateway (and than the head limit)
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
            + gw.key.encode()
            + b"\r\nContent-Type: application/json\r\nX-Big: "
            + b"a" * (60 * 1024)
            + b"\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
            + HEALTH
        )
        status, payload = read_response(s)
        assert status == 200, payload[:300]
        assert read_response(s)[0] == 200

    pid = gw.proc.pid
    rss_before = vm(pid, "VmRSS")
    try:  # reset the peak (VmHWM) to the current RSS, so the peak below is this attack's
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass
    hwm_before = vm(pid, "VmHWM")
    results: list[tuple[bytes, int]] = []
    lock = threading.Lock()

    def hostile_head() -> None:
        s = connect(gw, timeout=30)
        got: list[bytes] = []

        def reader() -> None:
            try:
                while chunk := s.recv(65536):
                    got.append(chunk)
            except OSError:
                pass

        r = threading.Thread(target=reader)
        r.start()
        sent = 0
        block = b"a" * MiB
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: ")
            while sent < 128 * MiB:
                s.sendall(block)
                sent += len(block)
        except OSError:
            pass
        r.join(10)
        s.close()
        with lock:
            results.append((b"".join(got), sent))

    threads = [threading.Thread(target=hostile_head) for _ in range(4)]
    for t in threads:
        t.start()
    health_ms = []
    rss_peak = rss_before
    while any(t.is_alive() for t in threads):
        t0 = time.monotonic()
        assert httpx.get(gw.url + "/health", timeout=5).status_code == 200
        health_ms.append((time.monotonic() - t0) * 1000)
        rss_peak = max(rss_peak, vm(pid, "VmRSS"))
        time.sleep(0.02)
    for t in threads:
        t.join()
    hwm_growth = max(vm(pid, "VmHWM") - hwm_before, rss_peak - rss_before)
    print(
        f"\n431: 4 x 128 MiB heads; peak RSS growth {hwm_growth / MiB:.1f} MiB, bytes sent per connection "
        f"{[round(n / MiB) for _, n in results]} MiB, /health during: max {max(health_ms or [0]):.1f} ms "
        f"over {len(health_ms)}"
    )
    for out, sent in results:
        assert status_and_error(out)[0] == 431
        assert sent < 100 * MiB  # the lingering close stops reading at 64 MiB (+ socket buffers)
    assert hwm_growth < 40 * MiB, hwm_growth
    assert max(health_ms or [0]) < 1000


# --- connection cap ----------------------------------------------------------------------------------


def test_connection_cap_closes_extra_connections_and_logs_rate_limited(
    tmp_path: Path, backends: tuple[Backend, Backend]
) -> None:
    g = start_gateway(tmp_path, *backend_args(*backends), "--max-connections", "50")
    try:
        held = [connect(g) for _ in range(50)]
        time.sleep(0.3)  # let the gateway accept them all
        extra = [connect(g) for _ in range(20)]
        closed_in = [read_until_closed(s, 2) for s in extra]
        for out, t in closed_in:
            assert out == b"" and t < 0.5, (out, t)
        for s in held + extra:
            s.close()
        time.sleep(0.3)
        assert httpx.get(g.url + "/health").status_code == 200  # room again once the idle ones left
        for _ in range(60):  # more than the cap, one after another: every connection is given back,
            with connect(g) as s:  # also those asking for an upgrade (served as plain HTTP/1.1)
                s.sendall(
                    b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                )
                assert read_response(s)[0] == 200
        assert httpx.get(g.url + "/health").status_code == 200
        log = g.logs / "embedding_reranker_proxy.log"
        deadline = time.monotonic() + 3
        while "refused" not in (text := log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        lines = [ln for ln in text.splitlines() if "refused" in ln]
        print(
            f"\ncap 50: 20 extra connections closed in max {max(t for _, t in closed_in) * 1000:.1f} ms; log: {lines}"
        )
        # 20 refusals, one line so far (the next may come only 10 s after it, with the count since)
        assert len(lines) == 1 and "WARNING" in lines[0] and "--max-connections" in lines[0]
        assert "refused 1 client connection(s)" in lines[0] and "is 50" in lines[0]
    finally:
        g.stop()


def test_fd_limit_raised_and_cap_fitted_to_it() -> None:
    code = (
        "import resource, logging\n"
        "logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 300))\n"
        "from er_gateway import frontdoor\n"
        "conf = frontdoor.configure(10, 65536, 4096)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], conf['max_connections'],"
        " frontdoor.FrontDoorProtocol.max_connections)\n"
    )
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert r.returncode == 0, r.stderr
    soft, cap, cls_cap = map(int, r.stdout.split())
    assert soft == 300  # soft limit raised to the hard one
    assert cap == cls_cap and 200 <= cap <= 300 - 64, cap  # the rest of the fds, minus the reserve
    assert r.stderr.count("--max-connections 4096 does not fit") == 1, r.stderr


# --- lingering close after an early answer -----------------------------------------------------------


def test_oversized_body_413_is_readable_by_clients_that_send_first(gw: GatewayProc) -> None:
    """40 MiB body (limit 32 MiB): the gateway answers 413 from Content-Length before reading; a client
    that writes everything before reading must still read the 413 and its envelope."""
    body = b'{"model":"x","input":"' + b"a" * (40 * MiB) + b'"}'
    path = "/v1/embeddings"

    def check(status: int, payload: bytes | str) -> None:
        err = json.loads(payload)["error"]
        assert status == 413 and err["code"] == 413 and err["type"] == "request_too_large", (status, payload)
        assert "--max-body-bytes" in err["message"]

    for conn_header in (b"", b"Connection: close\r\n"):  # keep-alive, then close
        with connect(gw, timeout=20) as s:
            s.sendall(
                b"POST "
                + path.encode()
                + b" HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                + gw.key.encode()
                + b"\r\nContent-Type: application/json\r\n"
                + conn_header
                + b"Content-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
            )
            s.sendall(body)  # all of it, before reading anything
            status, payload = read_response(s)
            check(status, payload)
            assert read_until_closed(s, 7)[0] == b""  # then the gateway closes

    r = httpx.post(gw.url + path, content=body, headers={**gw.auth, "Content-Type": "application/json"}, timeout=30)
    check(r.status_code, r.content)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the 413 comes once 32 MiB were read
        for i in range(0, len(body), MiB):
            yield body[i : i + MiB]

    r = httpx.post(gw.url + path, content=chunks(), headers={**gw.auth, "Content-Type": "application/json"}, timeout=30)
    check(r.status_code, r.content)
    req = urllib.request.Request(gw.url + path, data=body, headers={**gw.auth, "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    check(e.value.code, e.value.read())

    # The lingering close is bounded: a client that never stops sending is cut off after ~64 MiB.
    s = connect(gw, timeout=20)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: _recv(s), b"")))
    s.sendall(
        b"POST "
        + path.encode()
        + b" HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + gw.key.encode()
        + b"\r\nContent-Length: "
        + str(1 << 40).encode()
        + b"\r\n\r\n"
    )
    reader.start()
    sent, t0, block = 0, time.monotonic(), b"a" * MiB
    try:
        while sent < 512 * MiB:
            s.sendall(block)
            sent += len(block)
    except OSError:
        pass
    reader.join(10)
    s.close()
    print(f"\nlingering close: cut off after {sent / MiB:.0f} MiB, {time.monotonic() - t0:.2f} s")
    assert sent < 100 * MiB
    status, err = status_and_error(b"".join(got))
    assert status == 413
    assert (
        httpx.post(gw.url + path, json={"model": "Qwen3-Embedding-0.6B", "input": "hi"}, headers=gw.auth).status_code
        == 200
    )


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


# --- cost of many idle and trickling connections ----------------------------------------------------


def test_500_idle_and_trickling_connections_cost_little(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    """250 idle + 250 trickling connections (16 KiB of an unfinished head each, then a byte a second):
    RSS grows < 100 MB and /health's p99 stays within the unloaded p99 + 10 ms (+ 5 ms slack)."""
    g = start_gateway(tmp_path, *backend_args(*backends))  # defaults: header timeout 10 s, cap 4096
    try:
        pid = g.proc.pid

        def health_ms(n: int = 200) -> tuple[float, float]:
            """p50 and p99 of /health on one keep-alive connection (a raw socket: little client noise)."""
            lat = []
            with connect(g) as c:
                for _ in range(n):
                    t0 = time.perf_counter()
                    c.sendall(HEALTH)
                    assert read_response(c)[0] == 200
                    lat.append((time.perf_counter() - t0) * 1000)
            q = statistics.quantiles(lat, n=100)
            return q[49], q[98]

        unloaded50, unloaded = health_ms()
        rss0 = vm(pid, "VmRSS")
        # The connections live in another process, so its trickling does not hold this one's GIL
        # while a latency sample waits for its answer.
        holder = subprocess.Popen(
            [PY, "-c", HOLDER, str(addr(g)[1])], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert holder.stdout.readline().strip() == "ready"
            time.sleep(1.2)  # a round of trickled bytes has arrived
            loaded50, loaded = health_ms()
            rss1 = vm(pid, "VmRSS")
            holder.stdin.close()
            alive = int(holder.stdout.readline())
        finally:
            holder.kill()
            holder.wait()
        growth = rss1 - rss0
        print(
            f"\n500 connections: RSS +{growth / MiB:.1f} MiB; /health p50/p99 unloaded {unloaded50:.2f}/"
            f"{unloaded:.2f} ms, loaded {loaded50:.2f}/{loaded:.2f} ms; {alive} still open"
        )
        assert alive == 500  # they were all held open during the measurement
        assert growth < 100 * 1000 * 1000
        # +10 ms is the target; +5 ms slack because two cores carry the gateway, this test, the trickling
        # process and the stand-in backends at once, and p99 of 200 samples is the third-worst one.
        assert loaded <= unloaded + 15, (unloaded, loaded)
        assert loaded50 <= unloaded50 + 2, (unloaded50, loaded50)  # the typical request: no visible cost
    finally:
        g.stop()


HOLDER = r"""
import socket, sys, threading, time
port = int(sys.argv[1])
idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(250)]
trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(250)]
for s in trickling:
    s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * (16 * 1024))
print("ready", flush=True)
stop = threading.Event()
def trickle():
    while not stop.is_set():
        for s in trickling:  # a byte a second on each, spread over the second
            try:
                s.send(b"p")
            except OSError:
                pass
            time.sleep(1 / len(trickling))
threading.Thread(target=trickle, daemon=True).start()
sys.stdin.read()
stop.set()
def open_(s):
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
print(sum(open_(s) for s in idle + trickling), flush=True)
"""


# --- worker processes ---------------------------------------------------------------------------------


def test_workers_run_the_front_door_with_the_cli_limits(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    redis = start_redis(tmp_path)
    g = start_gateway(
        tmp_path, *backend_args(*backends), "--redis-url", redis.url, "--workers", "2", "--max-header-bytes", "2048"
    )
    try:
        for _ in range(4):  # new connections, so both workers answer some
            with connect(g) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n")
                status, err = status_and_error(read_until_closed(s, 5)[0])
                assert status == 431 and "2048" in err["message"], err
        assert httpx.get(g.url + "/health").status_code == 200
    finally:
        g.stop()
        redis.stop()


def test_trailers_get_the_head_budget_and_bodies_a_deadline(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    """A chunked body followed by 1 MiB of trailer trickled in 1 KiB pieces (httptools gathers a
    trailer by concatenation: quadratic CPU) is cut off at --max-header-bytes; a body that stops
    arriving gets 408 after --body-timeout."""
    g = start_gateway(tmp_path, *backend_args(*backends), "--max-header-bytes", "8192", "--body-timeout", "1")
    try:
        s = connect(g)
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + g.key.encode()
            + b'\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"inp\r\n0\r\nX-Trailer: '
        )
        t = time.monotonic()
        sent = 0
        try:
            while sent < 1024 * 1024:
                s.sendall(b"a" * 1024)
                sent += 1024
                time.sleep(0.0005)
        except OSError:
            pass
        _, closed_after = read_until_closed(s, 5)
        print(f"trailer refused after {sent} bytes sent, {time.monotonic() - t:.2f} s")
        assert sent <= 64 * 1024, sent  # refused at ~8 KiB (plus what was in flight)
        assert time.monotonic() - t < 3
        # the body deadline
        s = connect(g)
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + g.key.encode()
            + b'\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"input": '
        )
        t = time.monotonic()
        status, err = status_and_error(read_until_closed(s, 5)[0])
        waited = time.monotonic() - t
        assert status == 408 and "--body-timeout" in err["message"], err
        assert 0.9 < waited < 2.5, waited
        assert g.get("/health").status_code == 200
    finally:
        g.stop()
