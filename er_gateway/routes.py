"""HTTP routes. Each one: admit (auth + limits), read and validate, hand to a service."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from fastapi import APIRouter
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .embeddings import create_embeddings
from .errors import GatewayError
from .gateway import Admission, Gateway, api_key_of, usage_tokens, use_backend_name
from .protocol import EmbeddingRequest, ReloadModelRequest, RerankRequest
from .requestbody import check_batch, check_documents, check_inputs, read_json, validate
from .rerank import estimate_score_tokens, rerank
from .status_page import STATUS_HTML

router = APIRouter()
log = logging.getLogger("er_gateway")
BATCH_PARALLEL = 4  # items of one /batch_rerank in flight at once
_STARTED = int(time.time())


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


def require_key_if(required: bool, gw: Gateway, request: Request) -> bool:
    """Operational pages are public unless configured otherwise (--metrics-auth, --status-auth).

    Returns whether the caller holds an admin key: only then do pages show replica URLs.
    """
    if required:
        return gw.keys.authenticate(api_key_of(request)).admin
    return gw.is_admin(request)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


# ---- OpenAI ---------------------------------------------------------------------------------
@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    gw = gateway_of(request)
    adm = await gw.admit(request, "/v1/models")
    data = []
    for m in gw.settings.models:
        if not gw.may_use(adm.key, m):
            continue
        pool = gw.upstreams.pools[m.name]
        card = {"object": "model", "created": _STARTED, "owned_by": "er-gateway", "kind": m.kind,
                "root": pool.upstream_name or m.name, "max_model_len": pool.max_model_len}
        data.extend({"id": name, **card} for name in gw.names_of(m))
    return json_response({"object": "list", "data": data}, headers=adm.headers)


@router.post("/v1/embeddings")
@router.post("/embeddings", include_in_schema=False)
async def embeddings(request: Request) -> Response:
    gw = gateway_of(request)
    adm = await gw.admit(request, "/v1/embeddings")
    data, raw = await read_json(request, gw.settings)
    if isinstance(data, dict):
        check_inputs(data, gw.settings)
    req = validate(EmbeddingRequest, data)
    return await create_embeddings(gw, adm, req, data, raw)


# ---- rerank ---------------------------------------------------------------------------------
async def _rerank_route(request: Request, route: str, seed_shape: bool) -> Response:
    gw = gateway_of(request)
    adm = await gw.admit(request, route)
    data, _ = await read_json(request, gw.settings)
    if isinstance(data, dict):
        check_documents(data, gw.settings)
    req = validate(RerankRequest, data)
    return json_response(await rerank(gw, adm, req, seed_shape=seed_shape), headers=adm.headers)


@router.post("/v1/rerank")
async def rerank_v1(request: Request) -> Response:
    return await _rerank_route(request, "/v1/rerank", False)


@router.post("/v2/rerank")
async def rerank_v2(request: Request) -> Response:
    return await _rerank_route(request, "/v2/rerank", False)


@router.post("/rerank")
async def rerank_seed(request: Request) -> Response:
    return await _rerank_route(request, "/rerank", True)


@router.post("/batch_rerank")
async def batch_rerank(request: Request) -> Response:
    """A list of rerank requests → a list of answers or error objects, in the same order.

    The batch is charged its item count against the key's rate limit before any work (429 if
    they do not fit) and its items run a few at a time; a bad item gets its own error object
    while the others are served.
    """
    gw = gateway_of(request)
    adm = await gw.admit(request, "/batch_rerank", cost=0)
    adm.headers.update(await gw.limiter.check_request(adm.key))  # an exhausted key sends no body
    data, _ = await read_json(request, gw.settings)
    items = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise GatewayError(400, "body must be a non-empty JSON list of rerank requests (or {\"requests\": [...]})",
                           param="requests")
    check_batch(items, gw.settings)
    adm.info.items = len(items)
    adm.headers.update(await gw.limiter.hit_request(adm.key, cost=len(items)))
    parallel = asyncio.Semaphore(min(BATCH_PARALLEL, gw.settings.per_key_concurrency))

    async def one(item: Any) -> dict[str, Any]:
        try:
            if isinstance(item, dict):
                check_documents(item, gw.settings)
            req = validate(RerankRequest, item)
            async with parallel:
                return await rerank(gw, Admission(adm.key, adm.headers, adm.info), req, seed_shape=True)
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
@router.post("/v1/score")
@router.post("/score")
async def score_passthrough(request: Request) -> Response:
    gw = gateway_of(request)
    adm = await gw.admit(request, "/score")
    data, raw = await read_json(request, gw.settings)
    if not isinstance(data, dict):
        raise GatewayError(400, "request body must be a JSON object")
    check_documents(data, gw.settings, ("text_2", "documents", "items", "data_2"))
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise GatewayError(400, "'model' must be a string", param="model")
    pairs = [("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2")]
    if not any(a in data and b in data for a, b in pairs):
        raise GatewayError(400, "'text_1' and 'text_2' are required", param="text_1")
    for a, b in pairs:
        for f in (a, b):
            if f in data and (data[f] == [] or data[f] == ""):
                raise GatewayError(400, f"'{f}' must not be empty", param=f)
    for f in ("text_1", "text_2"):  # the form every vLLM version takes; others pass to vLLM as sent
        v = data.get(f)
        if f in data and not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))):
            raise GatewayError(400, f"'{f}' must be a string or a list of strings", param=f)
    pool = gw.resolve(model, "rerank", adm.key)
    adm.info.model = pool.model.name
    body = orjson.dumps(data) if use_backend_name(data, pool) else raw
    if gw.budgets_tokens(adm.key):
        await gw.reserve_tokens(adm, await estimate_score_tokens(gw, pool, data))
    try:
        result = await gw.call(pool, "/score", body, adm.info)
    except BaseException:
        await gw.refund_tokens(adm)
        raise
    await gw.charge_tokens(adm, pool.model.name, usage_tokens(result.body))
    return Response(result.body, media_type="application/json", headers=adm.headers)


# ---- operations -----------------------------------------------------------------------------
@router.post("/reload_model")
async def reload_model(request: Request) -> Response:
    """No body: re-read the config and keys files. Seed 000's body (`kind`, `model_path`,
    `model_size`, `gpu_memory_utilization`, `max_model_len`): restart that kind's vLLM servers
    with those settings when the gateway manages them (--manage-models), else 409 with the
    command to run."""
    gw = gateway_of(request)
    adm = await gw.admit(request, "/reload_model")
    gw.require_admin(adm.key)
    data, _ = await read_json(request, gw.settings, empty={})
    if data == {}:
        return json_response({"status": "reloaded", **gw.reload()}, headers=adm.headers)
    req = validate(ReloadModelRequest, data)
    if not gw.settings.manage_models:
        raise gw.manager.refuse_unmanaged(req)
    return json_response(await gw.manager.reload(req), headers=adm.headers)


@router.get("/health")
async def health(request: Request) -> Response:
    gw = gateway_of(request)
    status, body = gw.health(admin=gw.is_admin(request), model=request.query_params.get("model"))
    return json_response(body, status=status)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    gw = gateway_of(request)
    require_key_if(gw.settings.metrics_auth, gw, request)
    gw.refresh_gauges()
    return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/status")
async def status_page(request: Request) -> Response:
    gw = gateway_of(request)
    require_key_if(gw.settings.status_auth, gw, request)
    return HTMLResponse(STATUS_HTML)


@router.get("/status.json")
async def status_json(request: Request) -> Response:
    gw = gateway_of(request)
    admin = require_key_if(gw.settings.status_auth, gw, request)
    return json_response(gw.status_snapshot(admin=admin))
