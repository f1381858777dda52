"""Tracing (er_gateway/observability/tracing.py): a client's W3C traceparent is continued and
reaches vLLM; with --otlp-endpoint every request is exported over OTLP/HTTP, to a receiver run
here, as a span with children for admission, the queue wait, each upstream call and batches."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from conftest import EMB, backend_args, free_port, start_backend, start_gateway, wait_until
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


class Receiver:
    """An OTLP/HTTP collector: POST /v1/traces, protobuf bodies, spans kept in order."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.paths: list[str] = []
        spans, paths = self.spans, self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                paths.append(self.path)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def by_name(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for s in self.spans:
            out.setdefault(s.name, []).append(s)
        return out


def attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.string_value or v.int_value or v.double_value or v.bool_value
    return out


def test_traceparent_reaches_vllm_without_tracing(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, *backend_args(emb, None), "--reranker-url", "none")
    try:
        assert gw.post("/v1/embeddings", {"input": "x"}, headers={"traceparent": TRACEPARENT}).status_code == 200
        assert emb.stats()["last_headers"]["traceparent"] == TRACEPARENT  # vLLM's spans hang under the client's
        gw.post("/v1/embeddings", {"input": "y"}, headers={"traceparent": "00-zz-nonsense-01"})
        assert "traceparent" not in emb.stats()["last_headers"]  # nothing invalid is passed on
    finally:
        gw.stop()
        emb.stop()


def test_spans_are_exported_over_otlp(tmp_path: Path) -> None:
    receiver = Receiver()
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(
        tmp_path, *backend_args(emb, None), "--reranker-url", "none", "--otlp-endpoint", receiver.url,
        "--max-batch-inputs", "2",
    )  # fmt: skip
    try:
        r = gw.post("/v1/embeddings", {"model": EMB, "input": ["a", "b", "c"]}, headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
        wait_until(lambda: "POST /v1/embeddings" in receiver.by_name(), 10, "spans exported")
        wait_until(lambda: len(receiver.by_name().get("upstream /v1/embeddings", [])) == 2, 5, "both calls")
        assert set(receiver.paths) == {"/v1/traces"}
        spans = receiver.by_name()
        (request,) = spans["POST /v1/embeddings"]
        assert request.trace_id.hex() == TRACE and request.parent_span_id.hex() == PARENT  # the client's trace
        a = attrs(request)
        assert a["er.model"] == EMB and a["er.key"] == "admin" and a["http.response.status_code"] == 200
        assert a["er.items"] == 3 and a["er.tokens"] == r.json()["usage"]["total_tokens"]
        assert a["er.request_id"] == r.headers["x-request-id"]
        (admission,) = spans["admission"]
        calls = spans["upstream /v1/embeddings"]  # split in two calls of at most 2 inputs
        for child in (admission, *calls):
            assert child.trace_id == request.trace_id and child.parent_span_id == request.span_id
            assert request.start_time_unix_nano <= child.start_time_unix_nano <= child.end_time_unix_nano
            assert child.end_time_unix_nano <= request.end_time_unix_nano
        assert sorted(attrs(c)["er.items"] for c in calls) == [1, 2]
        assert all(attrs(c)["er.replica"] == emb.url for c in calls)
        # vLLM gets the upstream call's span as its parent, in the same trace
        sent = emb.stats()["last_headers"]["traceparent"]
        assert sent.split("-")[1] == TRACE and sent.split("-")[2] in {c.span_id.hex() for c in calls}
        # without a traceparent the request starts its own trace
        gw.post("/v1/embeddings", {"input": "solo"})
        wait_until(lambda: len(receiver.by_name()["POST /v1/embeddings"]) == 2, 10, "second request")
        second = receiver.by_name()["POST /v1/embeddings"][1]
        assert second.trace_id.hex() != TRACE and not second.parent_span_id
    finally:
        gw.stop()
        emb.stop()
        receiver.server.shutdown()


def test_queue_wait_and_a_coalesced_batch_are_spans(tmp_path: Path) -> None:
    receiver = Receiver()
    emb = start_backend(tmp_path, "embedding", extra=["--delay", "0.2"])
    tok = tmp_path / "tokenizer.json"  # coalescing needs a tokenizer: the stand-in's word counts
    from test_coalesce import word_tokenizer

    word_tokenizer(tok)
    gw = start_gateway(
        tmp_path, *backend_args(emb, None), "--reranker-url", "none", "--otlp-endpoint", receiver.url,
        "--embedding-tokenizer", str(tok), "--max-concurrency", "4", "--max-concurrency-per-key", "4",
        "--coalesce-wait-ms", "50",
    )  # fmt: skip
    try:
        threads = [threading.Thread(target=gw.post, args=("/v1/embeddings", {"input": f"t{i}"})) for i in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.01)
        for t in threads:
            t.join(10)
        wait_until(lambda: len(receiver.by_name().get("POST /v1/embeddings", [])) == 8, 10, "8 requests")
        spans = receiver.by_name()
        assert spans.get("queue wait"), list(spans)  # 8 requests, 4 slots: some waited
        batches = spans.get("coalesced batch", [])
        assert batches and all(attrs(b)["er.batch_members"] >= 2 for b in batches), list(spans)
        requests = {s.span_id for s in spans["POST /v1/embeddings"]}
        assert all(b.parent_span_id in requests for b in batches)
    finally:
        gw.stop()
        emb.stop()
        receiver.server.shutdown()


def test_otlp_endpoint_is_checked(tmp_path: Path) -> None:
    from conftest import run_cli

    r = run_cli("--otlp-endpoint", "collector:4318", "--keys-file", str(tmp_path / "k.json"))
    assert r.returncode == 2 and "--otlp-endpoint must be an http(s) URL" in r.stderr
