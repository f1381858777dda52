"""The OpenAPI document and the /docs page, both made from the route table (routes.py).

Request and answer schemas come from the pydantic models in protocol.py; every error a route
can give is documented with the one error envelope. /docs is Swagger UI served by the gateway
itself (the `swagger-ui-py` package's files), so it works where GPU hosts have no internet.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.responses import Response

from . import __version__
from .errors import GatewayError
from .protocol import ErrorEnvelope

if TYPE_CHECKING:
    from .routes import Route

ERROR_MEANINGS = {
    400: "Invalid request: the message names the field (`param`)",
    401: "Missing, unknown, revoked or expired API key",
    403: "The key may not use this model, or is not an admin key",
    404: "No such model (the message lists the available ones)",
    408: "The request body did not arrive within --body-timeout",
    409: "A reload cannot be done now (unmanaged servers, or one already running)",
    413: "Body over --max-body-bytes or --max-json-values",
    429: "The key's request or token limit is reached; see Retry-After and X-RateLimit-*",
    500: "A bug in the gateway (logged with its traceback); never caused by what a client sends",
    502: "The backend failed or answered something that is not a valid answer",
    503: "No healthy backend replica, no concurrency slot within --queue-timeout, or the rate-limit "
    "storage is down with --redis-failure-mode closed; see Retry-After",
    504: "The backend did not answer within --timeout",
}
DOCS_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css")


def document(routes: tuple[Route, ...]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the documented routes."""
    shown = [r for r in routes if r.documented]
    models: dict[type[BaseModel], None] = {ErrorEnvelope: None}
    for r in shown:
        for m in (r.body, r.answer, *(model for _, model in r.other)):
            if m is not None:
                models[m] = None
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for r in shown:
        paths.setdefault(r.path, {})[r.method.lower()] = _operation(r)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Qwen3 embedding & reranker gateway",
            "version": __version__,
            "description": "OpenAI-style embeddings and Jina/Cohere-style rerank in front of vLLM. "
            "Send `Authorization: Bearer <key>`. Every error has the same envelope: "
            '`{"error": {"message", "type", "param", "code"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(r: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": r.summary + (f" (same as {r.alias_of})" if r.alias_of else ""),
        "operationId": r.method.lower() + r.path.replace("/", "_").replace(".", "_").replace("{", "").replace("}", ""),
        "tags": [r.tag],
        "security": [{"bearer": []}] if r.key else [],
    }
    if r.description:
        op["description"] = r.description
    names = [seg[1:-1] for seg in r.path.split("/") if seg.startswith("{") and seg.endswith("}")]
    if names:
        op["parameters"] = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]
    if r.body is not None:
        media: dict[str, Any] = {"schema": _ref(r.body)}
        extra = r.body.model_config.get("json_schema_extra")
        examples = extra.get("examples") if isinstance(extra, dict) else None
        if isinstance(examples, list) and examples:
            media["example"] = examples[0]
        op["requestBody"] = {"required": r.body_required, "content": {"application/json": media}}
    ok: dict[str, Any] = {"description": "OK"}
    if r.answer is not None:
        ok["content"] = {r.media: {"schema": _ref(r.answer)}}
    else:
        ok["content"] = {
            r.media: {"schema": {"type": "string"} if r.media != "application/json" else {"type": "object"}}
        }
    op["responses"] = {"200": ok}
    for code in (*r.errors, 500):
        op["responses"][str(code)] = {
            "description": ERROR_MEANINGS.get(code, "Error"),
            "content": {"application/json": {"schema": _ref(ErrorEnvelope)}},
        }
    for code, model in r.other:
        op["responses"][str(code)] = {
            "description": ERROR_MEANINGS.get(code, "Error"),
            "content": {"application/json": {"schema": _ref(model)}},
        }
    return op


@functools.cache
def _static_dir() -> Path | None:
    spec = importlib.util.find_spec("swagger_ui")  # located, not imported (it pulls in jinja2)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "static"
    return path if all((path / a).is_file() for a in DOCS_ASSETS) else None


_ASSETS: dict[str, tuple[bytes, str]] = {}  # name -> (content, ETag), read on first use


def docs_asset(name: str, if_none_match: str | None) -> Response:
    """One of Swagger UI's files, cacheable (ETag, a day's max-age): a browser fetches it once."""
    if name not in _ASSETS:
        static = _static_dir()
        if static is None:
            return GatewayError(404, "Swagger UI's files are not installed (pip install swagger-ui-py)").response()
        content = (static / name).read_bytes()
        _ASSETS[name] = content, '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    content, etag = _ASSETS[name]
    headers = {"ETag": etag, "Cache-Control": "public, max-age=86400"}
    if if_none_match == etag:
        return Response(status_code=304, headers=headers)
    media = "text/css" if name.endswith(".css") else "application/javascript"
    return Response(content, media_type=media, headers=headers)


def docs_html(openapi_url: str) -> str:
    # The gateway's own copy when installed, else the CDN (as FastAPI's /docs does).
    base = "/docs/" if _static_dir() else "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Qwen3 embedding &amp; reranker gateway - API</title>
<link rel="stylesheet" href="{base}swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{base}swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({{url: "{openapi_url}", dom_id: "#swagger-ui", deepLinking: true}});</script>
</body></html>"""
