"""The access log cannot be forged by a client, and a client that leaves early is a 499, not a 500.

Text lines are `name=value` fields separated by one space; a value is bare when it is plain, else
double-quoted with backslash escapes (er_gateway.observability.log_field). The parser here is an
independent reference: it accepts only that grammar, so a forged field or line fails it.
"""

from __future__ import annotations

import json
import re
import socket
import time
import types
from pathlib import Path
from typing import Any

import httpx
from conftest import ACCESS_FIELDS, EMB, GatewayProc, backend_args, start_backend, start_gateway, wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from er_gateway.observability import Logs, RequestInfo, log_field

FIELDS = list(ACCESS_FIELDS)
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\Z")
BARE = re.compile(r"[!#-<>-\[\]-~]+")  # printable ASCII but space " \ =
NAME = re.compile(r"[a-z_]+=")
SIMPLE_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}


# ---- a reference parser ---------------------------------------------------------------------
def parse_quoted(s: str, i: int) -> tuple[str, int]:
    """The value of the quoted field starting at s[i] == '"', and the index after its closing quote."""
    assert s[i] == '"'
    out: list[str] = []
    i += 1
    while True:
        c = s[i]  # IndexError: unterminated
        if c == '"':
            return "".join(out), i + 1
        if c == "\\":
            e = s[i + 1]
            if e in SIMPLE_ESCAPES:
                out.append(SIMPLE_ESCAPES[e])
                i += 2
            else:
                n = HEX_ESCAPES[e]  # KeyError: an escape the format does not have
                digits = s[i + 2 : i + 2 + n]
                assert re.fullmatch(r"[0-9a-f]+", digits) and len(digits) == n, digits
                out.append(chr(int(digits, 16)))
                i += 2 + n
        else:
            assert c.isprintable(), f"raw non-printable {c!r} in a quoted value"
            out.append(c)
            i += 1


def parse_value(s: str) -> str | None:
    """One field value as written (the whole of `s`): None for `-`."""
    if s.startswith('"'):
        value, end = parse_quoted(s, 0)
        assert end == len(s), "junk after a quoted value"
        return value
    assert BARE.fullmatch(s), f"bad bare value {s!r}"
    return None if s == "-" else s


def parse_line(line: str) -> dict[str, str | None]:
    """The fields of one text access-log line; fails on anything outside the grammar."""
    assert "\n" not in line and "\r" not in line
    fields: dict[str, str | None] = {}
    i = 0
    while True:
        m = NAME.match(line, i)
        assert m, f"no field name at {i} in {line!r}"
        name, i = m.group()[:-1], m.end()
        if line.startswith('"', i):
            _, end = parse_quoted(line, i)
        else:
            end = line.find(" ", i)
            end = len(line) if end < 0 else end
        assert name not in fields, f"field {name} twice in {line!r}"
        fields[name] = parse_value(line[i:end])
        if end == len(line):
            return fields
        assert line[end] == " " and end + 1 < len(line), f"bad separator at {end} in {line!r}"
        i = end + 1


# ---- the escaping itself ------------------------------------------------------------------
@settings(max_examples=2000, deadline=None)
@given(st.text())
@example("")
@example("-")
@example('a" status=200 x="')
@example("/v1/models\ntime=forged")
@example("\u2028\u2029\x85\xa0\xad\x7f\x00\t\r\\")
@example("中文 é 😀 \U000e0001 \udc80")
def test_escaped_value_has_no_line_break_and_unescapes_to_the_original(s: str) -> None:
    out = log_field(s)
    assert "\n" not in out and "\r" not in out
    assert out.isprintable() and len(out.splitlines()) == 1  # no U+2028, NEL, ... either
    if not out.startswith('"'):
        assert " " not in out and "=" not in out
    assert parse_value(out) == s


def test_plain_values_stay_bare_and_others_are_quoted() -> None:
    for plain in (
        "3f9a1c2b4d5e000000012a",
        "POST",
        "/v1/embeddings",
        "Qwen3-Embedding-0.6B",
        "http://127.0.0.1:8001",
        "[::1]:5000",
        "trace-me-1",
    ):
        assert log_field(plain) == plain
    assert log_field(None) == "-" and log_field("-") == '"-"' and log_field("") == '""'
    assert log_field(7) == "7" and log_field(1.005) == "1.00"
    assert log_field("a b") == '"a b"' and log_field("a=b") == '"a=b"'
    assert log_field('a"b\\c') == '"a\\"b\\\\c"'
    assert log_field("l1\nl2\r\t\x00\x1b\x7f") == '"l1\\nl2\\r\\t\\x00\\x1b\\x7f"'
    assert log_field("\x85\xa0\u2028\u2029\ufeff") == '"\\x85\\xa0\\u2028\\u2029\\ufeff"'
    assert log_field("検索 é") == '"検索 é"'  # printable non-ASCII stays readable


def stub_logs(json_format: bool) -> tuple[Logs, list[str]]:
    """A Logs whose access lines go to a list instead of the writer thread."""
    lines: list[str] = []
    logs = Logs.__new__(Logs)
    logs.json = json_format
    logs._access = types.SimpleNamespace(queue=types.SimpleNamespace(put=lines.append))  # type: ignore[assignment]
    return logs, lines


no_surrogates = st.text(st.characters(blacklist_categories=("Cs",)))  # orjson refuses lone surrogates
maybe = st.none() | no_surrogates


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rid=no_surrogates,
    key=maybe,
    method=no_surrogates,
    path=no_surrogates,
    model=maybe,
    replica=maybe,
    client=maybe,
    items=st.none() | st.integers(0, 10**6),
    extra=st.dictionaries(st.sampled_from(["a", "b"]), maybe, max_size=2),
)
@example(rid="-", key="", method="GET", path="/", model="-", replica=None, client="", items=None, extra={})
@example(
    rid="x",
    key="admin",
    method="GET",
    path="/v1/models\ntime=forged",
    model=None,
    replica=None,
    client="1.2.3.4:0 status=200",
    items=3,
    extra={"a": "b c"},
)
def test_whole_lines_give_every_value_back(
    rid: str,
    key: str | None,
    method: str,
    path: str,
    model: str | None,
    replica: str | None,
    client: str | None,
    items: int | None,
    extra: dict[str, Any],
) -> None:
    """Through Logs.access itself, so the one-test-per-line fast path is covered too."""
    info = RequestInfo(rid, 0.0, key_name=key, model=model, replica=replica, items=items, tokens=5, extra=dict(extra))
    sent = {
        "request_id": rid,
        "key": key,
        "method": method,
        "path": path,
        "model": model,
        "replica": replica,
        "client": client,
        "items": None if items is None else str(items),
        "tokens": "5",
        **extra,
    }
    logs, lines = stub_logs(False)
    logs.access("2026-01-02T03:04:05", info, method, path, 200, 1.5, client)
    fields = parse_line(lines[0])
    assert list(fields)[: len(FIELDS)] == FIELDS
    assert {k: fields[k] for k in sent} == sent
    assert fields["status"] == "200" and fields["time"] == "2026-01-02T03:04:05"

    logs, lines = stub_logs(True)
    logs.access("2026-01-02T03:04:05", info, method, path, 200, 1.5, client)
    assert len(lines[0].splitlines()) == 1  # also no U+2028/U+2029/NEL, which str.splitlines() splits on
    row = json.loads(lines[0])
    assert {k: row[k] for k in sent} == {**sent, "items": items, "tokens": 5}


# ---- through a real gateway ---------------------------------------------------------------
FORGED_ID = 'a" status=200 x="'
FORGED_PATH = "/v1/models\ntime=forged"
ODD_PATH = '/v1/\u2028x\x85y"z'


def raw_request(gw: GatewayProc, head: str, body: bytes = b"", close_after: float | None = None) -> bytes:
    """Send a hand-written request; read the answer to EOF, or close after `close_after` s."""
    port = int(gw.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head.encode("latin-1") + body)
        if close_after is not None:
            time.sleep(close_after)
            return b""
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def access_lines(gw: GatewayProc) -> list[str]:
    f = gw.logs / "access.log"
    return f.read_text(encoding="utf-8").split("\n")[:-1] if f.exists() else []


def send_forgeries(gw: GatewayProc) -> None:
    auth = f"Authorization: Bearer {gw.key}\r\n"
    answer = raw_request(
        gw,
        "GET /v1/models%0Atime=forged HTTP/1.1\r\nHost: t\r\n"
        + auth
        + f"X-Request-ID: {FORGED_ID}\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    answer = raw_request(
        gw,
        "GET /v1/%E2%80%A8x%C2%85y%22z HTTP/1.1\r\nHost: t\r\n"
        + auth
        + "X-Request-ID: odd-path\r\nConnection: close\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert gw.get("/v1/models").status_code == 200  # and one ordinary request


def test_text_access_log_cannot_be_forged(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path)
    try:
        send_forgeries(gw)
        wait_until(
            lambda: (
                any("odd-path" in l for l in access_lines(gw))
                and any("path=/v1/models " in l for l in access_lines(gw))
            ),
            5,
            "access log lines",
        )
    finally:
        gw.stop()
    lines = access_lines(gw)
    rows = [parse_line(l) for l in lines]  # every line is well formed
    for row in rows:
        assert list(row) == FIELDS and TIME.match(row["time"] or ""), row
    forged = [r for r in rows if r["request_id"] == FORGED_ID]
    assert len(forged) == 1 and forged[0]["path"] == FORGED_PATH and forged[0]["status"] == "404"
    assert sum("forged" in l for l in lines) == 1
    odd = [r for r in rows if r["request_id"] == "odd-path"]
    assert len(odd) == 1 and odd[0]["path"] == ODD_PATH
    assert len(lines) == len(gw.logs.joinpath("access.log").read_text(encoding="utf-8").splitlines())
    assert sum(r["path"] == "/v1/models" and r["status"] == "200" for r in rows) == 1


def test_json_access_log_cannot_be_forged(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, "--log-format", "json")
    try:
        send_forgeries(gw)
        wait_until(
            lambda: (
                any("odd-path" in l for l in access_lines(gw))
                and any('"path":"/v1/models"' in l for l in access_lines(gw))
            ),
            5,
            "access log lines",
        )
    finally:
        gw.stop()
    lines = access_lines(gw)
    # one object a line, also for readers that split on U+2028 & co. (str.splitlines)
    assert lines == gw.logs.joinpath("access.log").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(l) for l in lines]
    forged = [r for r in rows if r["request_id"] == FORGED_ID]
    assert len(forged) == 1 and forged[0]["path"] == FORGED_PATH and forged[0]["status"] == 404
    odd = [r for r in rows if r["request_id"] == "odd-path"]
    assert len(odd) == 1 and odd[0]["path"] == ODD_PATH
    assert all(set(FIELDS) <= set(r) for r in rows)


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (labels in any order), or 0."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        sample_name, _, rest = head.partition("{")
        if sample_name == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
            return float(value)
    return 0.0


def test_client_gone_is_a_499_not_a_500(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *backend_args(emb, None))
    head = (
        "POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {gw.key}\r\n"
    )
    try:
        # 1. mid-body: 10 of 1,000,000 announced bytes, then the connection closes
        raw_request(
            gw, head + "Content-Length: 1000000\r\nX-Request-ID: gone-mid-body\r\n\r\n", b'{"input": ', close_after=0.2
        )
        # 2. while vLLM works: a whole request, then the client leaves before the answer
        emb.admin(delay=1.0)
        body = b'{"input": "x"}'
        raw_request(
            gw, head + f"Content-Length: {len(body)}\r\nX-Request-ID: gone-waiting\r\n\r\n", body, close_after=0.3
        )

        def logged() -> list[dict[str, str | None]]:
            return [r for r in map(parse_line, access_lines(gw)) if str(r["request_id"]).startswith("gone-")]

        wait_until(lambda: len(logged()) == 2, 10, "both requests in the access log")
        emb.admin(delay=0)
        assert gw.post("/v1/embeddings", {"input": "x"}).status_code == 200  # the gateway is fine
        rows = {r["request_id"]: r for r in logged()}
        assert rows["gone-mid-body"]["status"] == "499" and rows["gone-mid-body"]["path"] == "/v1/embeddings"
        assert rows["gone-waiting"]["status"] == "499" and rows["gone-waiting"]["model"] == EMB

        text = httpx.get(gw.url + "/metrics").text
        assert sample(text, "er_requests_total", route="/v1/embeddings", model="", status="499", key="admin") == 1
        assert sample(text, "er_requests_total", route="/v1/embeddings", model=EMB, status="499", key="admin") == 1
        assert sample(text, "er_requests_total", route="/v1/embeddings", model=EMB, status="200", key="admin") == 1
        assert not any('status="500"' in l for l in text.splitlines() if l.startswith("er_requests_total"))
    finally:
        gw.stop()
        emb.stop()
    main_log = (gw.logs / "embedding_reranker_proxy.log").read_text()
    gone = [l for l in main_log.splitlines() if "client closed the connection" in l]
    assert len(gone) == 2 and all(" INFO " in l and "status=499" in l for l in gone), gone
    assert any("request_id=gone-mid-body" in l and "before the request was complete" in l for l in gone)
    assert any("request_id=gone-waiting" in l and "before the answer was sent" in l for l in gone)
    for text in (main_log, gw.output()):
        assert "ERROR" not in text and "Traceback" not in text and "Exception in ASGI" not in text
