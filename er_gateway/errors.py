"""The one error envelope (README, "Errors") and the exception that carries it.

Every failure a client can see leaves the gateway as
``{"error": {"message", "type", "param", "code"}}`` with ``code`` equal to the
HTTP status, so OpenAI/Cohere SDKs and curl users read the same thing.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "request_timeout",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "request_header_fields_too_large",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}


class GatewayError(Exception):
    """An error answered to the client with ``status`` in the error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ERROR_TYPES.get(status, "error")
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.payload()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def parse_backend_error(body: bytes) -> tuple[str, str | None]:
    """Extract (message, param) from any error body vLLM has ever sent.

    vLLM < 0.10.1 answers ``{"object": "error", "message": ...}``, later versions
    ``{"error": {...}}``, and its FastAPI layer ``{"detail": ...}``. Anything
    else is returned as (truncated) text so the client still sees something.
    """
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:500] or "empty response"), None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"]), _str_or_none(inner.get("param"))
        if isinstance(inner, str):
            return inner, None
        if "message" in data:
            return str(data["message"]), _str_or_none(data.get("param"))
        detail = data.get("detail")
        if isinstance(detail, str):
            return detail, None
        if isinstance(detail, list) and detail:
            first = detail[0]
            if isinstance(first, dict):
                loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
                return f"{loc}: {first.get('msg', 'invalid')}".strip(": "), loc or None
    return body.decode("utf-8", "replace")[:500], None


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
