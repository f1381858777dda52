"""W3C trace context, and OTLP spans with `--otlp-endpoint` (README, "Tracing").

Without an endpoint the gateway only carries a client's `traceparent` to vLLM unchanged, so
vLLM's own spans (if it exports any) hang under the client's. With one, each request is a span
(continuing the client's trace, or starting one) with children for admission, the wait for a
concurrency slot, each upstream call and each coalesced batch, exported over OTLP/HTTP by the
OpenTelemetry SDK in the background; vLLM then gets the upstream call's span as its parent.
Everything here costs nothing when tracing is off and no `traceparent` was sent.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass
class Trace:
    """One request's place in a trace."""

    header: str  # the client's traceparent ("" when it sent none)
    span: Any = None  # the request's SDK span (None: not exporting)
    children: list[tuple[str, int, int, dict[str, Any]]] = field(default_factory=list)

    def upstream_header(self, span: Any) -> str:
        """The traceparent for vLLM: the upstream call's span, else the client's own."""
        if span is None:
            return self.header
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def traces_url(endpoint: str) -> str:
    """An OTLP/HTTP base URL (http://collector:4318) gets the traces path; a full URL is kept."""
    from urllib.parse import urlsplit

    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a valid version-00 traceparent, else None."""
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None:
        return None
    trace_id, span_id, flags = int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, flags


class Tracing:
    """The SDK's tracer, exporting in batches to `endpoint` (an OTLP/HTTP traces URL)."""

    def __init__(self, endpoint: str, service: str = "er-gateway") -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service}))
        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
        self.tracer = self.provider.get_tracer("er_gateway")

    def begin(self, name: str, header: str) -> Trace:
        from opentelemetry import trace
        from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

        parent = None
        found = parse_traceparent(header) if header else None
        if found is not None:
            trace_id, span_id, flags = found
            remote = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
            parent = trace.set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
        return Trace(header if found is not None else "", span)

    def child(self, t: Trace, name: str, start_ns: int | None = None) -> Any:
        """A child span of the request's, started now (or at `start_ns`); the caller ends it."""
        from opentelemetry import trace

        return self.tracer.start_span(name, context=trace.set_span_in_context(t.span), start_time=start_ns)

    def finish(self, t: Trace, attributes: dict[str, Any]) -> None:
        end = time.time_ns()
        for name, start_ns, end_ns, attrs in t.children:
            span = self.child(t, name, start_ns)
            span.set_attributes(attrs)
            span.end(end_time=end_ns)
        t.span.set_attributes({k: v for k, v in attributes.items() if v is not None})
        t.span.end(end_time=end)

    def close(self) -> None:
        self.provider.shutdown()  # what is still queued is exported first


def available() -> bool:
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True
