"""The route table: every HTTP route, declared once.

`ROUTES` feeds both the dispatch in app.py (a dict lookup per request) and the OpenAPI
document (openapi.py): method, path, handler, request model, answer model, the errors it
can give, and whether it needs a key. A handler admits the request (auth + limits), reads
and validates the body, sets what the access log says of it (`items`), and hands it to a
service (embeddings.py, rerank.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from . import keys as ks
from . import protocol as p
from .admission import Admission
from .cohere_embed import cohere_embed
from .embeddings import create_embeddings, input_count
from .errors import GatewayError
from .gateway import Gateway, Runtime
from .keys_redis import open_store
from .observability import RequestInfo
from .openapi import DOCS_ASSETS, docs_asset, docs_html, document
from .requestbody import (
    check_batch,
    check_documents,
    check_inputs,
    check_texts,
    read_json,
    validate,
)
from .rerank import rerank, score_passthrough
from .status import health
from .status_page import STATUS_HTML
from .usage import DAYS

log = logging.getLogger("er_gateway")
BATCH_PARALLEL = 4  # items of one /batch_rerank in flight at once
_STARTED = int(time.time())


@dataclass
class Call:
    """What a handler gets: the request, the process's gateway and the configuration it runs on."""

    request: Request
    gw: Gateway
    rt: Runtime
    info: RequestInfo

    @property
    def api_key(self) -> str | None:
        return api_key_of(self.request)

    async def admit(self, route: str, cost: int = 1) -> Admission:
        trace = self.info.trace
        if trace is None or trace.span is None:
            return await self.rt.admission.admit(self.api_key, self.info, route, cost)
        start = time.time_ns()
        try:
            return await self.rt.admission.admit(self.api_key, self.info, route, cost)
        finally:
            trace.children.append(("admission", start, time.time_ns(), {"er.key": self.info.key_name or ""}))


Handler = Callable[[Call], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    body: type[BaseModel] | None = None  # the request schema (the handler validates with it)
    answer: type[BaseModel] | None = None  # the 200 schema; None: not JSON (see `media`)
    errors: tuple[int, ...] = ()  # statuses answered with the error envelope (500 goes for all)
    # statuses answered with another body: /health's 503 is its own readiness report
    other: tuple[tuple[int, type[BaseModel]], ...] = ()
    body_required: bool = True
    key: bool = True  # needs an API key (operational pages say in `description` when)
    media: str = "application/json"
    description: str = ""
    alias_of: str | None = None  # the same handler under another path, documented as such
    documented: bool = True  # in /openapi.json (not the documentation's own pages)


def api_key_of(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.query_params.get("api_key") or None


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


def _page_admin(c: Call, required: bool) -> bool:
    """Operational pages are public unless configured otherwise (--metrics-auth, --status-auth).

    Returns whether the caller holds an admin key: only then do pages show replica URLs.
    """
    if required:
        return c.rt.admission.authenticate(c.api_key).admin
    return c.rt.admission.is_admin(c.api_key)


# ---- OpenAI ---------------------------------------------------------------------------------
async def list_models(c: Call) -> Response:
    adm = await c.admit("/v1/models")
    catalog = c.rt.catalog
    data: list[dict[str, Any]] = []
    for m in c.rt.settings.models:
        if not catalog.may_use(adm.key, m):
            continue
        pool = c.rt.upstreams.pools[m.name]
        card = {
            "object": "model",
            "created": _STARTED,
            "owned_by": "er-gateway",
            "kind": m.kind,
            "root": pool.upstream_name or m.name,
            "max_model_len": pool.max_model_len,
        }
        data.extend({"id": name, **card} for name in catalog.names_of(m))
    return json_response({"object": "list", "data": data}, headers=adm.headers)


async def embeddings(c: Call) -> Response:
    adm = await c.admit("/v1/embeddings")
    data, raw = await read_json(c.request, c.rt.settings)
    if isinstance(data, dict):
        check_inputs(data, c.rt.settings)
    req = validate(p.EmbeddingRequest, data)
    c.info.items = input_count(req.input)
    return await create_embeddings(c.rt, adm, req, data, raw)


async def cohere_embed_route(c: Call) -> Response:
    adm = await c.admit("/v2/embed")
    data, _ = await read_json(c.request, c.rt.settings)
    if isinstance(data, dict):
        check_texts(data, c.rt.settings)
    req = validate(p.CohereEmbedRequest, data)
    c.info.items = len(req.all_texts())
    return json_response(await cohere_embed(c.rt, adm, req), headers=adm.headers)


# ---- rerank ---------------------------------------------------------------------------------
async def _rerank_route(c: Call, route: str, ranked: bool) -> Response:
    adm = await c.admit(route)
    data, _ = await read_json(c.request, c.rt.settings)
    if isinstance(data, dict):
        check_documents(data, c.rt.settings)
    req = validate(p.RerankRequest, data)
    c.info.items = len(req.documents)
    return json_response(await rerank(c.rt, adm, req, ranked=ranked), headers=adm.headers)


async def rerank_v1(c: Call) -> Response:
    return await _rerank_route(c, "/v1/rerank", False)


async def rerank_v2(c: Call) -> Response:
    return await _rerank_route(c, "/v2/rerank", False)


async def rerank_ranked(c: Call) -> Response:
    return await _rerank_route(c, "/rerank", True)


async def batch_rerank(c: Call) -> Response:
    """A list of rerank requests → a list of answers or error objects, in the same order.

    The batch is charged its item count against the key's rate limit before any work (429 if
    they do not fit) and its items run a few at a time; a bad item gets its own error object
    while the others are served.
    """
    rt = c.rt
    adm = await c.admit("/batch_rerank", cost=0)
    await rt.admission.check_requests(adm)  # an exhausted key sends no body
    data, _ = await read_json(c.request, rt.settings)
    items = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise GatewayError(
            400, 'body must be a non-empty JSON list of rerank requests (or {"requests": [...]})', param="requests"
        )
    check_batch(items, rt.settings)
    c.info.items = len(items)
    await rt.admission.count_requests(adm, len(items))
    parallel = asyncio.Semaphore(min(BATCH_PARALLEL, rt.settings.per_key_concurrency))

    async def one(item: Any) -> dict[str, Any]:
        try:
            if isinstance(item, dict):
                check_documents(item, rt.settings)
            req = validate(p.RerankRequest, item)
            async with parallel:
                return await rerank(rt, Admission(adm.key, adm.headers, adm.info), req, ranked=True)
        except GatewayError as e:
            if e.status == 429:
                adm.headers.update({k: v for k, v in e.headers.items() if k.startswith("X-RateLimit")})
            return e.payload()
        except Exception:  # noqa: BLE001 - one item's bug must not fail the other items
            log.exception("unexpected error in a /batch_rerank item")
            return GatewayError(500, "internal gateway error; see the gateway log").payload()

    results = await asyncio.gather(*(one(i) for i in items))
    return json_response(results, headers=adm.headers)


# ---- vLLM score passthrough -----------------------------------------------------------------
async def score(c: Call) -> Response:
    adm = await c.admit("/score")
    data, raw = await read_json(c.request, c.rt.settings)
    if isinstance(data, dict):
        check_documents(data, c.rt.settings, tuple(b for _, b in p.SCORE_PAIRS))
    req = validate(p.ScoreRequest, data)
    second = next((data[b] for a, b in p.SCORE_PAIRS if a in data and b in data), None)
    c.info.items = len(second) if isinstance(second, list) else 1
    return await score_passthrough(c.rt, adm, req, data, raw)


# ---- operations -----------------------------------------------------------------------------
async def reload_model(c: Call) -> Response:
    adm = await c.admit("/reload_model")
    c.rt.admission.require_admin(adm.key)
    data, _ = await read_json(c.request, c.rt.settings, empty={})
    if data == {}:
        return json_response({"status": "reloaded", **await c.gw.reload_everywhere()}, headers=adm.headers)
    req = validate(p.ReloadModelRequest, data)
    return json_response(await c.gw.restart_models(req), headers=adm.headers)


# ---- usage ----------------------------------------------------------------------------------------
async def usage(c: Call) -> Response:
    adm = await c.admit("/v1/usage")
    q = c.request.query_params
    try:
        days = int(q.get("days", DAYS))
    except ValueError:
        days = 0
    if not 1 <= days <= DAYS:
        raise GatewayError(400, f"days must be a whole number from 1 to {DAYS}", param="days")
    wanted = q.get("key")
    if adm.key.admin:
        key = wanted  # None: every key
    elif wanted not in (None, adm.key.name):
        raise GatewayError(403, "only an admin key sees another key's usage", param="key")
    else:
        key = adm.key.name
    rows = await c.gw.usage.report(key, days)
    return json_response({"object": "list", "days": days, "data": rows}, headers=adm.headers)


# ---- key admin ----------------------------------------------------------------------------------
async def _key_admin(c: Call, what: str, change: Callable[[ks.Store], Any]) -> Any:
    """Run one `keys` operation on the gateway's own store (off the event loop: file locks and
    Redis calls block), then use the keys at once here; the other processes follow as always
    (the file watcher, or Redis's messages). Audited in the access log."""
    adm = await c.admit("/admin/keys")
    c.rt.admission.require_admin(adm.key)
    c.info.extra["audit"] = what
    store = open_store(c.rt.settings)
    try:
        result = await asyncio.to_thread(change, store)
    except ks.KeyExists as e:
        raise GatewayError(409, str(e), param="name") from None
    except ks.NoSuchKey as e:
        raise GatewayError(404, str(e), param="name") from None
    except ValueError as e:  # a limit spec or expiry the key format refuses
        raise GatewayError(400, str(e)) from None
    except (ks.KeysFileError, OSError, RedisError) as e:
        raise GatewayError(503, f"the key store failed: {e}", headers={"Retry-After": "1"}) from None
    await c.gw.keys_changed()
    return result, adm


def _record_of(store: ks.Store, name: str) -> dict[str, Any]:
    return next(k for k in store.read() if k.name == name).public(time.time())


async def admin_keys_list(c: Call) -> Response:
    rows, adm = await _key_admin(c, "list", lambda store: [k.public(time.time()) for k in store.read()])
    return json_response({"data": rows}, headers=adm.headers)


async def admin_keys_create(c: Call) -> Response:
    data, _ = await read_json(c.request, c.rt.settings)
    req = validate(p.KeyCreateRequest, data)

    def create(store: ks.Store) -> dict[str, Any]:
        key = ks.create_key(
            store,
            req.name,
            rate_limit=req.rate_limit or (f"{req.rpm}/minute" if req.rpm else None),
            token_limit=f"{req.tpm}/minute" if req.tpm else None,
            models=req.models,
            expires=req.expires,
            admin=req.admin,
        )
        return {**_record_of(store, req.name), "key": key}

    created, adm = await _key_admin(c, f"create {req.name}", create)
    return json_response(created, status=201, headers=adm.headers)


async def admin_key_revoke(c: Call) -> Response:
    name = c.request.path_params["name"]

    def revoke(store: ks.Store) -> dict[str, Any]:
        ks.revoke_key(store, name)
        return _record_of(store, name)

    record, adm = await _key_admin(c, f"revoke {name}", revoke)
    return json_response(record, headers=adm.headers)


async def admin_key_rotate(c: Call) -> Response:
    name = c.request.path_params["name"]

    def rotate(store: ks.Store) -> dict[str, Any]:
        key = ks.rotate_key(store, name)
        return {**_record_of(store, name), "key": key}

    rotated, adm = await _key_admin(c, f"rotate {name}", rotate)
    return json_response(rotated, headers=adm.headers)


async def health_route(c: Call) -> Response:
    status, body = health(
        c.rt.catalog, admin=c.rt.admission.is_admin(c.api_key), model=c.request.query_params.get("model")
    )
    if c.gw.drain.active:  # shutting down: a load balancer must stop sending here
        status, body["status"] = 503, "draining"
    return json_response(body, status=status)


async def health_live(c: Call) -> Response:
    return json_response({"status": "alive"})


async def health_ready(c: Call) -> Response:
    _, body = health(c.rt.catalog)
    models = {name: m["ready"] for name, m in body["models"].items()}
    ready = any(models.values()) and c.gw.keys.loaded
    state = "draining" if c.gw.drain.active else "ready" if ready else "unready"
    return json_response({"status": state, "models": models}, status=200 if state == "ready" else 503)


async def metrics(c: Call) -> Response:
    _page_admin(c, c.rt.settings.metrics_auth)
    return Response(c.gw.metrics_text(), media_type=CONTENT_TYPE_LATEST)


async def status_page(c: Call) -> Response:
    _page_admin(c, c.rt.settings.status_auth)
    return HTMLResponse(STATUS_HTML)


async def status_json(c: Call) -> Response:
    admin = _page_admin(c, c.rt.settings.status_auth)
    return json_response(c.gw.status(c.rt, admin=admin))


_DOCUMENT: list[bytes] = []


async def openapi_json(c: Call) -> Response:
    if not _DOCUMENT:  # built once, on first use: a gateway nobody reads the docs of never builds it
        _DOCUMENT.append(orjson.dumps(document(ROUTES)))
    return Response(_DOCUMENT[0], media_type="application/json")


async def docs(c: Call) -> Response:
    return HTMLResponse(docs_html("/openapi.json"))


def _asset_route(name: str) -> Route:
    async def serve(c: Call) -> Response:
        return docs_asset(name, c.request.headers.get("if-none-match"))

    return Route("GET", f"/docs/{name}", serve, name, "docs", key=False, documented=False)


_CLIENT = (400, 401, 403, 404, 408, 413, 429)
_UPSTREAM = (502, 503, 504)


def _with_alias(route: Route, path: str) -> tuple[Route, Route]:
    """`route`, and the same route at `path` as well (documented as an alias)."""
    return route, replace(route, path=path, alias_of=route.path, description="")


def _rerank(path: str, handler: Handler, summary: str, description: str = "") -> Route:
    return Route(
        "POST",
        path,
        handler,
        summary,
        "rerank",
        body=p.RerankRequest,
        answer=p.RerankResponse,
        errors=(*_CLIENT, *_UPSTREAM),
        description=description,
    )


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/models",
        list_models,
        "List the models this key may use",
        "models",
        answer=p.ModelList,
        errors=(401, 429, 503),
        description="Every name that reaches a model: the names its backends serve, then the configured "
        "name and aliases.",
    ),
    *_with_alias(
        Route(
            "POST",
            "/v1/embeddings",
            embeddings,
            "Create embeddings (OpenAI)",
            "embeddings",
            body=p.EmbeddingRequest,
            answer=p.EmbeddingResponse,
            errors=(*_CLIENT, *_UPSTREAM),
            description="`input_type: query` (or `instruction`) wraps each input in the Qwen3 query "
            "instruction; documents go as they are. Big batches are split over the replicas.",
        ),
        "/embeddings",
    ),
    Route(
        "POST",
        "/v2/embed",
        cohere_embed_route,
        "Create embeddings (Cohere v2)",
        "embeddings",
        body=p.CohereEmbedRequest,
        answer=p.CohereEmbedResponse,
        errors=(*_CLIENT, *_UPSTREAM),
        description="`input_type` picks the Qwen3 instruction; `embedding_types` any of float, int8, uint8, "
        "binary, ubinary, base64 (formulas in the README); `truncate` END (default) cuts texts to fit.",
    ),
    _rerank("/v1/rerank", rerank_v1, "Rerank documents (Jina/Cohere)"),
    _rerank("/v2/rerank", rerank_v2, "Rerank documents (Cohere v2)"),
    _rerank(
        "/rerank",
        rerank_ranked,
        "Rerank documents, with scores and ranked_documents",
        "The Jina/Cohere answer plus `scores` (input order) and `ranked_documents`.",
    ),
    Route(
        "POST",
        "/batch_rerank",
        batch_rerank,
        "Several rerank requests in one",
        "rerank",
        body=p.BatchRerankRequest,
        answer=p.BatchRerankResponse,
        errors=(*_CLIENT, 503),
        description="Answers in request order: each item a rerank answer or its own error envelope. "
        "A bare JSON list of rerank requests works too. Charged its item count against the key's "
        "rate limit before any work.",
    ),
    *_with_alias(
        Route(
            "POST",
            "/score",
            score,
            "vLLM's /score, passed through",
            "rerank",
            body=p.ScoreRequest,
            answer=p.ScoreResponse,
            errors=(*_CLIENT, *_UPSTREAM),
        ),
        "/v1/score",
    ),
    Route(
        "POST",
        "/reload_model",
        reload_model,
        "Reload the configuration, or restart a model's vLLM servers",
        "operations",
        body=p.ReloadModelRequest,
        body_required=False,
        answer=p.ReloadAnswer,
        errors=(400, 401, 403, 404, 408, 409, 413, 429, 502, 503),
        description="Admin key. No body: re-read the config and keys files. With a body: restart that kind's "
        "vLLM servers with those settings (`--manage-models`), else 409 with the command to run.",
    ),
    Route(
        "GET",
        "/v1/usage",
        usage,
        "Requests, inputs and tokens per model per day",
        "keys",
        answer=p.UsageList,
        errors=(400, 401, 403, 429),
        description="A key sees its own; an admin key every key's, or one's with `?key=NAME`. `?days=N` "
        f"(1-{DAYS}, default {DAYS}) UTC days, newest first.",
    ),
    Route(
        "GET",
        "/admin/keys",
        admin_keys_list,
        "List API keys (never a key or its hash)",
        "keys",
        answer=p.KeyList,
        errors=(401, 403, 429, 503),
        description="Admin key. What `keys list` shows.",
    ),
    Route(
        "POST",
        "/admin/keys",
        admin_keys_create,
        "Create an API key",
        "keys",
        body=p.KeyCreateRequest,
        answer=p.KeyCreated,
        errors=(400, 401, 403, 409, 413, 429, 503),
        description="Admin key. `keys create` over HTTP: 201 with the key, shown this once. Every process "
        "accepts it within 2 s (this one at once).",
    ),
    Route(
        "DELETE",
        "/admin/keys/{name}",
        admin_key_revoke,
        "Revoke an API key",
        "keys",
        answer=p.KeyRecord,
        errors=(401, 403, 404, 429, 503),
        description="Admin key. `keys revoke NAME`: refused everywhere within 2 s; `rotate` brings it back.",
    ),
    Route(
        "POST",
        "/admin/keys/{name}/rotate",
        admin_key_rotate,
        "Give an API key a new secret",
        "keys",
        answer=p.KeyCreated,
        errors=(401, 403, 404, 429, 503),
        body_required=False,
        description="Admin key. `keys rotate NAME`: the new key in the answer, once; the old one stops working.",
    ),
    Route(
        "GET",
        "/health",
        health_route,
        "Readiness per model and replica",
        "operations",
        answer=p.Health,
        errors=(404,),
        other=((503, p.Health),),
        key=False,
        description="200 while at least one model can serve, 503 when none can or the gateway is draining "
        "(SIGTERM); `?model=` for one model.",
    ),
    Route(
        "GET",
        "/health/live",
        health_live,
        "Liveness probe: the process serves",
        "operations",
        answer=p.Probe,
        key=False,
        description="Always 200 while the process answers HTTP, draining included (a restart would not help).",
    ),
    Route(
        "GET",
        "/health/ready",
        health_ready,
        "Readiness probe: send this gateway traffic",
        "operations",
        answer=p.Probe,
        other=((503, p.Probe),),
        key=False,
        description="200 while at least one model can serve; 503 when none can, and at once on SIGTERM "
        "(`--drain-delay`).",
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        "operations",
        answer=None,
        key=False,
        media=CONTENT_TYPE_LATEST,
        errors=(401,),
        description="Public unless --metrics-auth.",
    ),
    Route(
        "GET",
        "/status",
        status_page,
        "Status page (HTML)",
        "operations",
        answer=None,
        key=False,
        media="text/html",
        errors=(401,),
        description="Needs a key unless --no-status-auth.",
    ),
    Route(
        "GET",
        "/status.json",
        status_json,
        "What the status page shows, as JSON",
        "operations",
        answer=None,
        key=False,
        errors=(401,),
        description="Needs a key unless --no-status-auth.",
    ),
    Route("GET", "/openapi.json", openapi_json, "This document", "docs", key=False, documented=False),
    Route("GET", "/docs", docs, "API documentation (Swagger UI)", "docs", key=False, documented=False),
    *(_asset_route(name) for name in DOCS_ASSETS),
)
