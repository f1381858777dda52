"""The ASGI application: GatewayASGI (request id, timing, bookkeeping, dispatch) around FastAPI.

FastAPI declares the routes (and serves /docs, 404 and 405); GatewayASGI calls the API
endpoints directly from a table built from the same router.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .errors import GatewayError
from .gateway import Gateway
from .observability import Logs, Recorder, RequestInfo, log_field, new_request_id
from .routes import router
from .settings import Settings, load_settings

log = logging.getLogger("er_gateway")

SETTINGS_ENV = "ER__SETTINGS_JSON"  # how the CLI hands settings to uvicorn worker processes
CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before it had its answer


def create_app(settings: Settings, cli_overrides: dict[str, Any] | None = None) -> Any:
    logs = Logs(settings)
    gateway = Gateway(settings, cli_overrides)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        log.info(
            "gateway pid %d serving %s; rate limit %s (%s), max concurrency %d",
            os.getpid(),
            ", ".join(f"{m.name} ({m.kind}) -> {','.join(m.urls)}" for m in settings.models),
            settings.rate_limit,
            "redis" if settings.redis_url else "memory",
            gateway.gate.limit,
        )
        try:
            yield
        finally:
            await gateway.stop()
            log.info("gateway pid %d stopped", os.getpid())
            logs.close()

    app = FastAPI(
        title="Qwen3 embedding & reranker gateway",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = gateway
    app.include_router(router)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc, request.scope)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return GatewayError(exc.status_code, f"{message}: {request.method} {request.url.path}").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return GatewayError(400, str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(exc, request.scope)

    return GatewayASGI(app, Recorder(logs, gateway.metrics, gateway.recent))


def error_response(exc: Exception, scope: dict[str, Any]) -> Response:
    """The envelope for any exception: a GatewayError as it says, anything else a logged 500."""
    if isinstance(exc, GatewayError):
        return exc.response()
    if isinstance(exc, ClientDisconnect):  # nobody to answer; GatewayASGI logs and records a 499
        return Response(status_code=CLIENT_CLOSED)
    log.error("unexpected error on %s %s", log_field(scope.get("method")), log_field(scope.get("path")), exc_info=exc)
    return GatewayError(500, "internal gateway error; see the gateway log").response()


class GatewayASGI:
    """The outermost ASGI app: request id, X-Gateway-Overhead-Ms, bookkeeping, dispatch.

    API routes are called straight from a (method, path) table built from the FastAPI router,
    skipping FastAPI's routing and middleware stack, which cost about a third of the CPU per
    request in profiles (bench/RESULTS.md). Everything else (docs, 404/405) goes through FastAPI.
    """

    def __init__(self, app: FastAPI, recorder: Recorder) -> None:
        self.app = app
        self.state = app.state
        self.recorder = recorder
        self.routes: dict[tuple[str, str], Any] = {}
        for route in router.routes:  # the API router itself: FastAPI may wrap included routes
            if isinstance(route, APIRoute) and "{" not in route.path:
                for method in route.methods:
                    self.routes[(method, route.path)] = route.endpoint

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                incoming = v
                break
        info = RequestInfo(new_request_id(incoming), time.perf_counter())
        scope.setdefault("state", {})["er"] = info
        status = 500
        gone = ""  # set when the client left: what the gateway was doing then

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                headers.append((b"x-request-id", info.request_id.encode("latin-1")))
                if info.route:
                    overhead = (time.perf_counter() - info.start) * 1000 - info.upstream_ms - info.queue_ms
                    headers.append((b"x-gateway-overhead-ms", f"{overhead:.3f}".encode()))
                message["headers"] = headers
            await send(message)

        try:
            endpoint = self.routes.get((scope["method"], scope["path"]))
            if endpoint is None:
                try:
                    await self.app(scope, receive, send_wrapper)
                except ClientDisconnect:  # Starlette re-raises it after its 500 handler ran
                    gone = "before the request was complete"
                return
            scope["app"] = self.app
            try:
                response = await endpoint(Request(scope, receive))
            except ClientDisconnect:  # mid-body: no one to answer
                gone = "before the request was complete"
                return
            except Exception as e:  # noqa: BLE001 - every failure leaves as the SPEC envelope
                response = error_response(e, scope)
            try:
                await response(scope, receive, send_wrapper)
            except OSError:  # ASGI servers may raise this from send() once the client is gone
                gone = "before the answer was sent"
        finally:
            # uvicorn's send() is a method of the request's cycle, whose `disconnected` is set when the
            # connection drops before the answer is complete: send() then drops the answer silently.
            # One attribute read per request; no polling while vLLM works.
            if not gone and getattr(getattr(send, "__self__", None), "disconnected", False):
                gone = "before the answer was sent"
            if gone:
                status = CLIENT_CLOSED
                log.info(
                    "client closed the connection %s: status=499 method=%s path=%s request_id=%s key=%s",
                    gone, log_field(scope.get("method")), log_field(scope.get("path")),
                    log_field(info.request_id), log_field(info.key_name),
                )
            self.recorder.record(scope, info, status)


def create_app_from_env() -> Any:
    """uvicorn factory for `--workers N`: each worker rebuilds the settings the CLI resolved."""
    data = orjson.loads(os.environ[SETTINGS_ENV])
    return create_app(load_settings(data["cli"], environ=data["env"]), data["cli"])
