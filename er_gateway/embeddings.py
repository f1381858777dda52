"""POST /v1/embeddings: forward as bytes, wrap Qwen3 queries, split big batches.

The common case (no gateway extras, batch within `max_batch_inputs`) sends
the client's body unchanged and returns vLLM's body unchanged: vectors are
never decoded. Only a split batch is re-assembled (orjson keeps floats exact
and base64 strings are copied as they are).
"""

from __future__ import annotations

import asyncio
import base64
import math
import sys
from array import array
from typing import Any

import orjson
from starlette.responses import Response

from .errors import GatewayError
from .gateway import Admission, Gateway, usage_tokens, use_backend_name
from .protocol import EmbeddingRequest
from .qwen3 import embedding_query
from .upstream import Pool

PATH = "/v1/embeddings"
QUERY_TYPES = ("query", "search_query")
SPECIAL_TOKENS = 2  # per input, added by the tokenizer (Qwen3-Embedding appends <|endoftext|>)


async def create_embeddings(
    gw: Gateway, adm: Admission, req: EmbeddingRequest, data: dict[str, Any], raw: bytes
) -> Response:
    pool = gw.resolve(req.model, "embedding", adm.key)
    adm.info.model = pool.model.name
    changed = _apply_gateway_fields(gw, pool, req, data)
    changed = use_backend_name(data, pool) or changed
    inputs = data["input"]
    many = isinstance(inputs, list) and inputs and not isinstance(inputs[0], int)
    adm.info.items = len(inputs) if many else 1
    if gw.budgets_tokens(adm.key):
        await gw.reserve_tokens(adm, await _estimate(gw, pool, inputs, data.get("truncate_prompt_tokens")))
    limit = gw.settings.max_batch_inputs
    cut = None
    if req.dimensions is not None and pool.refuses_dimensions and _cuttable(data):
        cut, changed = data.pop("dimensions"), True

    async def forward(changed: bool) -> bytes:
        if many and len(inputs) > limit:
            return await _split(gw, pool, adm, data, inputs, limit)
        result = await gw.call(pool, PATH, orjson.dumps(data) if changed else raw, adm.info)
        if not result.body.lstrip()[:1] == b"{":
            raise GatewayError(502, "backend answered with something that is not JSON")
        return result.body

    try:
        try:
            body = await forward(changed)
        except GatewayError as e:
            if not (cut is None and req.dimensions is not None and _refused_dimensions(e) and _cuttable(data)):
                raise
            # vLLM refuses `dimensions` for a model it was not told is Matryoshka (Qwen3-Embedding's
            # config does not say so): ask for whole vectors and cut them here, from now on.
            pool.refuses_dimensions = True
            cut = data.pop("dimensions")
            body = await forward(True)
        if cut is not None:
            body = cut_vectors(body, cut)
    except BaseException:
        await gw.refund_tokens(adm)
        raise
    await gw.charge_tokens(adm, pool.model.name, usage_tokens(body))
    return Response(body, media_type="application/json", headers=adm.headers)


def _refused_dimensions(e: GatewayError) -> bool:
    return e.status == 400 and "matryoshka" in e.message.lower()


def _cuttable(data: dict[str, Any]) -> bool:
    return data.get("encoding_format") in (None, "float", "base64")


def _floats(packed: str) -> array[float]:
    values = array("f", base64.b64decode(packed))
    if sys.byteorder != "little":  # vLLM's base64 is little-endian float32
        values.byteswap()
    return values


def _packed(values: array[float]) -> str:
    if sys.byteorder != "little":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()


def cut_vectors(body: bytes, dimensions: int) -> bytes:
    """Matryoshka in the gateway: each vector's first `dimensions` values, scaled back to unit
    length (what vLLM does for a Matryoshka model), as floats or base64 float32 as they came."""
    try:
        answer = orjson.loads(body)
        items = answer["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise GatewayError(502, "backend answered with something that is not an embeddings list") from None
    for item in items:
        vector = item.get("embedding")
        packed = isinstance(vector, str)
        values = _floats(vector) if packed else vector
        if not isinstance(values, (list, array)) or dimensions > len(values):
            raise GatewayError(
                400, f"dimensions {dimensions} is more than the model's {len(values or [])}", param="dimensions"
            )
        head = values[:dimensions]
        norm = math.sqrt(sum(x * x for x in head)) or 1.0
        if packed:
            item["embedding"] = _packed(array("f", (x / norm for x in head)))
        else:
            item["embedding"] = [x / norm for x in head]
    return orjson.dumps(answer)


async def _estimate(gw: Gateway, pool: Pool, inputs: Any, truncate: Any = None) -> int:
    """Tokens this request will cost (exact with the tokenizer, else an upper bound)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs and isinstance(inputs[0], int):
        inputs = [inputs]
    if isinstance(truncate, int) and not isinstance(truncate, bool) and truncate > 0:
        # vLLM keeps at most `truncate` tokens of each input; bytes bound tokens from above.
        return sum(min(len(x) if isinstance(x, list) else len(x.encode()), truncate) + SPECIAL_TOKENS
                   for x in inputs)
    texts = [x for x in inputs if isinstance(x, str)]
    ids = sum(len(x) for x in inputs if isinstance(x, list))
    return await gw.count_tokens(pool.model, texts) + ids + SPECIAL_TOKENS * len(inputs)


def _apply_gateway_fields(gw: Gateway, pool: Pool, req: EmbeddingRequest, data: dict[str, Any]) -> bool:
    """Wrap query texts in the Qwen3 instruction; documents pass as they are."""
    if req.instruction is None and req.input_type is None:
        return False
    data.pop("instruction", None)
    data.pop("input_type", None)
    is_query = req.input_type in QUERY_TYPES or (req.input_type is None and req.instruction is not None)
    if not is_query:
        return True
    instruction = req.instruction or pool.model.instruction or gw.settings.default_instruction
    inputs = data["input"]
    if isinstance(inputs, str):
        data["input"] = embedding_query(inputs, instruction)
    elif all(isinstance(x, str) for x in inputs):
        data["input"] = [embedding_query(x, instruction) for x in inputs]
    else:
        raise GatewayError(
            400, "instruction/input_type need text input, not token ids", param="input"
        )
    return True


async def _split(
    gw: Gateway, pool: Pool, adm: Admission, data: dict[str, Any], inputs: list[Any], size: int
) -> bytes:
    chunks = [inputs[i : i + size] for i in range(0, len(inputs), size)]
    bodies = [orjson.dumps({**data, "input": c}) for c in chunks]
    answers = await asyncio.gather(*(gw.call(pool, PATH, b, adm.info) for b in bodies), return_exceptions=True)
    # What the backend did for the chunks it answered is charged even if another chunk failed.
    adm.done_tokens = sum(usage_tokens(a.body) or 0 for a in answers if not isinstance(a, BaseException))
    for a in answers:
        if isinstance(a, BaseException):
            raise a
    merged: dict[str, Any] | None = None
    items: list[dict[str, Any]] = []
    usage: dict[str, int] = {}
    offset = 0
    for chunk, answer in zip(chunks, answers):
        try:
            part = orjson.loads(answer.body)  # type: ignore[union-attr]
            part_items = part["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise GatewayError(502, "backend answered with something that is not an embeddings list") from None
        for item in part_items:
            item["index"] = item.get("index", 0) + offset
        items.extend(part_items)
        for k, v in (part.get("usage") or {}).items():
            if isinstance(v, int):
                usage[k] = usage.get(k, 0) + v
        if merged is None:
            merged = part
        offset += len(chunk)
    assert merged is not None
    merged["data"] = items
    merged["usage"] = {**(merged.get("usage") or {}), **usage}
    return orjson.dumps(merged)
