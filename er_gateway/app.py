"""The ASGI application: one dispatcher over the route table (routes.py).

Per request: a request id, the configuration it runs on, the handler found by one dict
lookup on (method, path), the error envelope for anything that goes wrong, the
X-Gateway-Overhead-Ms header, and the bookkeeping (metrics, access log, status page).
No framework router or middleware stack sits in between: in profiles they cost about a
third of the CPU per request (bench/RESULTS.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import MutableMapping
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .errors import GatewayError
from .gateway import Gateway
from .observability import Logs, Recorder, RequestInfo, log_field, new_request_id
from .observability.tracing import Trace, Tracing, parse_traceparent
from .routes import ROUTES, Call, Handler
from .settings import Settings, load_settings

log = logging.getLogger("er_gateway")

SETTINGS_ENV = "ER__SETTINGS_JSON"  # how the CLI hands settings to uvicorn worker processes
CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before it had its answer
Scope = dict[str, Any]


def create_app(settings: Settings, cli_overrides: dict[str, Any] | None = None) -> GatewayASGI:
    logs = Logs(settings)
    return GatewayASGI(Gateway(settings, cli_overrides), logs)


def error_response(exc: BaseException, scope: Scope) -> Response:
    """The envelope for any exception: a GatewayError as it says, anything else a logged 500."""
    if isinstance(exc, GatewayError):
        return exc.response()
    if isinstance(exc, ClientDisconnect):  # nobody to answer; GatewayASGI logs and records a 499
        return Response(status_code=CLIENT_CLOSED)
    log.error("unexpected error on %s %s", log_field(scope.get("method")), log_field(scope.get("path")), exc_info=exc)
    return GatewayError(500, "internal gateway error; see the gateway log").response()


def _no_route(scope: Scope, allowed: list[str] | None) -> Response:
    method, path = scope["method"], scope["path"]
    if allowed is None:
        return GatewayError(404, f"no such route: {method} {path}").response()
    return GatewayError(
        405, f"method not allowed: {method} {path}; use {', '.join(allowed)}", headers={"Allow": ", ".join(allowed)}
    ).response()


class GatewayASGI:
    def __init__(self, gateway: Gateway, logs: Logs) -> None:
        self.gateway = gateway
        self.logs = logs
        self.recorder = Recorder(logs, gateway.metrics, gateway.recent, gateway.usage)
        self.routes: dict[tuple[str, str], Handler] = {
            (r.method, r.path): r.handler for r in ROUTES if "{" not in r.path
        }
        self.methods: dict[str, list[str]] = {}
        # Routes with a `{name}` segment (/admin/keys/{name}): matched only when no exact path does.
        self.templates = [(r.method, r.path.split("/"), r.handler) for r in ROUTES if "{" in r.path]
        for r in ROUTES:
            self.methods.setdefault(r.path, []).append(r.method)

    def _match(self, scope: Scope, allowed: list[str] | None) -> tuple[Handler | None, list[str] | None]:
        """The templated route for the path, its parameters put in scope["path_params"]."""
        parts = scope["path"].split("/")
        found: Handler | None = None
        methods: list[str] = []
        for method, template, handler in self.templates:
            params = _segments_match(template, parts)
            if params is None:
                continue
            methods.append(method)
            if method == scope["method"]:
                scope["path_params"] = params
                found = handler
        return found, methods or allowed

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        gw = self.gateway
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await gw.start()
                except Exception as e:  # noqa: BLE001 - uvicorn reports it and exits
                    log.exception("gateway did not start")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                s = gw.settings
                log.info(
                    "gateway pid %d serving %s; rate limit %s (%s), max concurrency %d%s",
                    os.getpid(),
                    ", ".join(f"{m.name} ({m.kind}) -> {','.join(m.urls)}" for m in s.models),
                    s.rate_limit,
                    "redis" if s.redis_url else "memory",
                    gw.gate.limit,
                    "; HTTP/2 on (--http2)" if s.http2 else "",
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await gw.stop()
                    log.info("gateway pid %d stopped", os.getpid())
                finally:
                    self.logs.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Any, send: Any) -> None:
        incoming = parent = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                incoming = v
            elif k == b"traceparent":
                parent = v
        info = RequestInfo(new_request_id(incoming), time.perf_counter())
        tracing = self.gateway.tracing
        if tracing is not None or parent is not None:
            info.trace = _trace(tracing, scope, parent)
        status = 500
        gone = ""  # set when the client left: what the gateway was doing then

        async def send_wrapper(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", info.request_id.encode("latin-1")))
                if info.route:
                    headers.append((b"x-gateway-overhead-ms", f"{info.overhead_ms:.3f}".encode()))
                if self.gateway.drain.since is not None:  # clients reconnect elsewhere (drain.py)
                    headers.append((b"connection", b"close"))
                message["headers"] = headers
            await send(message)

        gw = self.gateway
        rt = gw.enter()
        try:
            handler = self.routes.get((scope["method"], scope["path"]))
            if handler is None:  # not the hot path: templated routes, then 404/405
                handler, allowed = self._match(scope, self.methods.get(scope["path"]))
            if handler is None:
                response = _no_route(scope, allowed)
            else:
                try:
                    response = await handler(Call(Request(scope, receive), gw, rt, info))
                except ClientDisconnect:  # mid-body: no one to answer
                    gone = "before the request was complete"
                    return
                except Exception as e:  # noqa: BLE001 - every failure leaves in the error envelope
                    response = error_response(e, scope)
            try:
                await response(scope, receive, send_wrapper)
            except OSError:  # ASGI servers may raise this from send() once the client is gone
                gone = "before the answer was sent"
        finally:
            gw.leave(rt)
            # uvicorn's send() is a method of the request's cycle, whose `disconnected` is set when the
            # connection drops before the answer is complete: send() then drops the answer silently.
            # One attribute read per request; no polling while vLLM works.
            if not gone and getattr(getattr(send, "__self__", None), "disconnected", False):
                gone = "before the answer was sent"
            if gone:
                status = CLIENT_CLOSED
                log.info(
                    "client closed the connection %s: status=499 method=%s path=%s request_id=%s key=%s",
                    gone,
                    log_field(scope.get("method")),
                    log_field(scope.get("path")),
                    log_field(info.request_id),
                    log_field(info.key_name),
                )
            self.recorder.record(scope, info, status)
            if info.trace is not None and info.trace.span is not None and tracing is not None:
                tracing.finish(
                    info.trace,
                    {
                        "http.request.method": scope["method"],
                        "url.path": scope["path"],
                        "http.response.status_code": status,
                        "er.request_id": info.request_id,
                        "er.route": info.route or None,
                        "er.model": info.model,
                        "er.key": info.key_name,
                        "er.replica": info.replica,
                        "er.items": info.items,
                        "er.tokens": info.tokens,
                    },
                )


def _trace(tracing: Tracing | None, scope: Scope, parent: bytes | None) -> Trace | None:
    header = parent.decode("latin-1") if parent is not None else ""
    if tracing is not None:
        return tracing.begin(f"{scope['method']} {scope['path']}", header)
    return Trace(header) if parse_traceparent(header) is not None else None  # passed to vLLM as it is


def _segments_match(template: list[str], parts: list[str]) -> dict[str, str] | None:
    if len(template) != len(parts):
        return None
    params = {}
    for t, p in zip(template, parts, strict=True):
        if t.startswith("{"):
            if not p:
                return None
            params[t[1:-1]] = p
        elif t != p:
            return None
    return params


def create_app_from_env() -> GatewayASGI:
    """uvicorn factory for `--workers N`: each worker rebuilds the settings the CLI resolved."""
    data = orjson.loads(os.environ[SETTINGS_ENV])
    return create_app(load_settings(data["cli"], environ=data["env"]), data["cli"])
