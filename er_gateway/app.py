"""The ASGI application: FastAPI routes inside the request middleware, plus lifespan."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from .errors import GatewayError
from .gateway import Gateway
from .observability import Logs, RequestMiddleware
from .routes import router
from .settings import Settings, load_settings

log = logging.getLogger("er_gateway")

SETTINGS_ENV = "ER__SETTINGS_JSON"  # how the CLI hands settings to uvicorn worker processes


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
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return GatewayError(exc.status_code, f"{message}: {request.method} {request.url.path}").response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        return GatewayError(400, str(exc.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return GatewayError(500, "internal gateway error; see the gateway log").response()

    wrapped = RequestMiddleware(app, logs, gateway.metrics, gateway.recent)
    wrapped.state = app.state  # type: ignore[attr-defined]  # tests reach the gateway through it
    return wrapped


def create_app_from_env() -> Any:
    """uvicorn factory for `--workers N`: each worker rebuilds the settings the CLI resolved."""
    data = orjson.loads(os.environ[SETTINGS_ENV])
    return create_app(load_settings(data["cli"], environ=data["env"]), data["cli"])
