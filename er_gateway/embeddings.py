"""POST /v1/embeddings: forward as bytes, wrap Qwen3 queries, split big batches.

The common case (no gateway extras, batch within `max_batch_inputs`) sends
the client's body unchanged and returns vLLM's body unchanged: vectors are
never decoded. Only a split batch is re-assembled (orjson keeps floats exact
and base64 strings are copied as they are).
"""

from __future__ import annotations

import base64
import binascii
import math
import sys
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from .admission import Admission
from .cache import ResultCache, entry
from .catalog import use_backend_name
from .coalesce import Group, Member, apportion, in_order
from .errors import GatewayError
from .protocol import EmbeddingRequest
from .quantize import quantize_answer
from .qwen3 import TASK_INSTRUCTIONS, embedding_query
from .tokens import ModelTokenizer
from .upstream import Pool

if TYPE_CHECKING:
    from .gateway import Runtime

PATH = "/v1/embeddings"
QUERY_TYPES = ("query", "search_query")
SPECIAL_TOKENS = 2  # per input, added by the tokenizer (Qwen3-Embedding appends <|endoftext|>)


def input_count(inputs: Any) -> int:
    """How many inputs `input` holds: a string or one list of token ids is one."""
    return len(inputs) if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else 1


async def create_embeddings(
    rt: Runtime, adm: Admission, req: EmbeddingRequest, data: dict[str, Any], raw: bytes
) -> Response:
    """POST /v1/embeddings: vLLM's answer as it wrote it, or with Voyage's `output_dtype` its
    vectors quantized (quantize.py)."""
    dtype = req.output_dtype or "float"
    b64 = False
    if "output_dtype" in data:  # the gateway's to apply, never vLLM's
        data.pop("output_dtype")
        raw = b""  # changed: the body is built again
    if dtype != "float":
        b64 = data.pop("encoding_format", None) == "base64"  # the quantized bytes, in base64
    body = await embed(rt, adm, req, data, raw)
    if dtype != "float":
        body = quantize_answer(body, dtype, base64_bytes=b64)
    return Response(body, media_type="application/json", headers=adm.headers)


async def embed(rt: Runtime, adm: Admission, req: EmbeddingRequest, data: dict[str, Any], raw: bytes) -> bytes:
    """The one forwarding path of embeddings (/v1/embeddings and Cohere's /v2/embed): `data` is
    the request body (`raw` its bytes, or b"" when `data` was changed); returns the answer's bytes."""
    pool = rt.catalog.resolve(req.model, "embedding", adm.key)
    adm.info.model = pool.model.name
    changed = _apply_gateway_fields(rt, pool, req, data) or not raw
    if data.pop("output_dimension", None) is not None:
        data.setdefault("dimensions", req.dimensions)
        changed = True
    changed = use_backend_name(data, pool) or changed
    inputs = data["input"]
    if rt.admission.budgets_tokens(adm.key):
        estimate = await _estimate(rt, pool, inputs, data.get("truncate_prompt_tokens"))
        await rt.admission.reserve_tokens(adm, estimate)
    limit = rt.settings.max_batch_inputs
    cached = await _lookup(rt, pool, adm, data)
    if cached is not None and cached.hits:
        if not cached.missing:  # every input known: vLLM is not asked
            await rt.admission.settle(adm, pool.model.name)
            return cached.answer(pool, adm)
        inputs = data["input"] = [cached.texts[i] for i in cached.missing]
        changed = True
    cut = None
    if req.dimensions is not None and pool.refuses_dimensions and _cuttable(data):
        cut, changed = data.pop("dimensions"), True

    async def forward(changed: bool) -> bytes:
        if input_count(inputs) > limit:
            parts = await rt.dispatch.split(
                pool, PATH, inputs, limit, lambda c: orjson.dumps({**data, "input": c}), adm
            )
            return _merge(parts, limit)
        body = orjson.dumps(data) if changed else raw
        merged = await _coalesced(rt, pool, adm, data, body)
        if merged is not None:
            return merged
        return (await rt.dispatch.send(pool, PATH, body, adm)).body

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
        if cached is not None:
            body = await cached.fill(rt, pool, adm, body)
    finally:
        await rt.admission.settle(adm, pool.model.name)
    return body


@dataclass
class _Cached:
    """One request's inputs in the result cache (cache.py): which are known, which are not."""

    cache: ResultCache
    texts: list[str]
    keys: list[bytes]
    hits: dict[int, tuple[int, bytes]]  # input index -> (tokens, embedding JSON)
    missing: list[int]

    def answer(self, pool: Pool, adm: Admission, fresh: dict[int, bytes] | None = None, tokens: int = 0) -> bytes:
        """An embeddings answer from cached (and `fresh`) embedding JSON, in input order, built
        as bytes: no vector is decoded. `usage` counts every input, cached ones too."""
        fresh = fresh or {}
        parts = []
        for i in range(len(self.texts)):
            hit = self.hits.get(i)
            value = hit[1] if hit is not None else fresh[i]
            parts.append(b'{"index":%d,"object":"embedding","embedding":%b}' % (i, value))
        total = tokens + sum(t for t, _ in self.hits.values())
        head = orjson.dumps(
            {"id": f"embd-{adm.info.request_id}", "object": "list", "created": int(time.time()),
             "model": pool.upstream_name or pool.model.name}
        )  # fmt: skip
        usage = orjson.dumps({"prompt_tokens": total, "total_tokens": total, **pool.usage_extra})
        return head[:-1] + b',"data":[' + b",".join(parts) + b'],"usage":' + usage + b"}"

    async def fill(self, rt: Runtime, pool: Pool, adm: Admission, body: bytes) -> bytes:
        """Store what vLLM answered for the missing inputs; the whole answer if some were cached."""
        if len(self.missing) == 1 and not self.hits:
            # The common miss (one input): its vector's bytes and the usage found without
            # decoding the vector, which for 1,024 floats is most of what storing would cost.
            found = _only_embedding(body)
            if found is not None:
                value, usage_at = found
                try:
                    usage = orjson.loads(body[usage_at:-1])
                    total = int(usage["total_tokens"])
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    usage = None
                if isinstance(usage, dict):
                    _learn_usage(pool, usage)
                    self.cache.put_many([(self.keys[0], entry(total, value))])
                    return body
        try:
            answer = orjson.loads(body)
            items = in_order(answer["data"], len(self.missing), "embeddings")
            values = [orjson.dumps(x["embedding"]) for x in items]
            usage = answer["usage"]
            total = max(0, int(usage["total_tokens"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise GatewayError(502, "backend answered with something that is not an embeddings list") from None
        _learn_usage(pool, usage)
        sent = [self.texts[i] for i in self.missing]
        tokenizer = rt.catalog.tokenizer(pool.model)
        if len(sent) == 1:
            shares: list[int] | None = [total]
        elif tokenizer is not None:
            shares = apportion(total, await tokenizer.count_many_async(sent), [1] * len(sent))
        else:
            shares = None  # no exact count of each input: nothing stored
        if shares is not None:
            self.cache.put_many(
                [(self.keys[i], entry(n, v)) for i, n, v in zip(self.missing, shares, values, strict=True)]
            )
        if not self.hits:
            return body  # nothing was cached: vLLM's answer as it came
        return self.answer(pool, adm, dict(zip(self.missing, values, strict=True)), total)


def _learn_usage(pool: Pool, usage: dict[str, Any]) -> None:
    """Keep the fields vLLM writes beside the counts, for answers made from the cache."""
    pool.usage_extra = {k: v for k, v in usage.items() if k not in ("prompt_tokens", "total_tokens")}


def _only_embedding(body: bytes) -> tuple[bytes, int] | None:
    """(the one embedding's JSON, where `usage`'s object starts) in a one-input answer as vLLM
    writes it (`usage` last), or None if the body is not plainly that (then it is decoded)."""
    at = body.find(b'"embedding":')
    if at < 0 or body.find(b'"embedding":', at + 12) >= 0:
        return None
    start = at + 12
    first = body[start : start + 1]
    end = body.find(b"]" if first == b"[" else b'"', start + 1) if first in (b"[", b'"') else -1
    usage = body.rfind(b'"usage":')
    if end < 0 or usage < end or body[-1:] != b"}":
        return None
    value = body[start : end + 1]
    if first == b"[" and b"[" in value[1:]:
        return None  # nested: not a vector of numbers
    return value, usage + 8


async def _lookup(rt: Runtime, pool: Pool, adm: Admission, data: dict[str, Any]) -> _Cached | None:
    """This request's inputs in the result cache, or None if it is not cached (no cache, token
    ids). Says `X-Cache-Hits` and counts hits and misses."""
    cache = rt.cache
    texts = _texts(data)
    if cache is None or texts is None:
        return None
    params = orjson.dumps({k: v for k, v in data.items() if k not in ("input", "user")}, option=orjson.OPT_SORT_KEYS)
    keys = cache.keys(cache.namespace(pool.fingerprint, params, adm.key.hash), texts)
    hits = await cache.known(keys, pool.model.name)
    adm.headers["X-Cache-Hits"] = str(len(hits))
    return _Cached(cache, texts, keys, hits, [i for i in range(len(texts)) if i not in hits])


def _texts(data: dict[str, Any]) -> list[str] | None:
    """The inputs as a list of texts, or None when they are token ids (neither cached nor merged)."""
    inputs = data["input"]
    texts = [inputs] if isinstance(inputs, str) else inputs
    return texts if texts and all(isinstance(t, str) for t in texts) else None


async def _coalesced(rt: Runtime, pool: Pool, adm: Admission, data: dict[str, Any], body: bytes) -> bytes | None:
    """The answer through a call shared with other requests (coalesce.py), or None when this
    request cannot share one: token ids, `truncate_prompt_tokens` (its usage could not be
    split exactly), too large, or no tokenizer to count each request's own usage with."""
    coalescer = rt.dispatch.coalescer
    if coalescer is None or "truncate_prompt_tokens" in data:
        return None
    tokenizer = rt.catalog.tokenizer(pool.model)
    texts = _texts(data)
    if tokenizer is None or texts is None:
        return None
    size = sum(len(t) if t.isascii() else len(t.encode()) for t in texts)
    if not coalescer.fits(len(texts), size):
        return None
    base = {k: v for k, v in data.items() if k != "input"}
    key = orjson.dumps(base, option=orjson.OPT_SORT_KEYS)
    group = Group(pool, CODEC, base, key, rt.settings.max_batch_inputs, tokenizer)
    answer: bytes = await rt.dispatch.coalesced(group, Member(adm, body, texts, None, size))
    return answer


class EmbeddingsCodec:
    """Merged /v1/embeddings calls: every member's inputs in one `input` list; each gets its
    own slice of `data` (indexed from 0) and its own `usage`."""

    path = PATH

    def merged_body(self, base: dict[str, Any], members: Sequence[Member]) -> bytes:
        return orjson.dumps({**base, "input": [t for m in members for t in m.items]})

    async def count(self, members: Sequence[Member], tokenizer: ModelTokenizer) -> None:
        counted = await tokenizer.count_many_async([t for m in members for t in m.items])
        at = 0
        for m in members:
            m.counts = counted[at : at + len(m.items)]
            at += len(m.items)

    def too_long(self, member: Member, max_model_len: int) -> bool:
        return max(member.counts) >= max_model_len  # vLLM adds at least one special token

    def split(self, answer: bytes, members: Sequence[Member]) -> list[tuple[bytes, int]]:
        sizes = [len(m.items) for m in members]
        try:
            merged = orjson.loads(answer)
            items = merged["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            merged, items = {}, None
        items = in_order(items, sum(sizes), "embeddings")
        usage = merged.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        total = usage.get("total_tokens")
        shares = apportion(total if type(total) is int else 0, [sum(m.counts) for m in members], sizes)
        rest = {k: v for k, v in merged.items() if k not in ("id", "data", "usage")}
        out, at = [], 0
        for m, k, share in zip(members, sizes, shares, strict=True):
            mine = items[at : at + k]
            at += k
            for i, item in enumerate(mine):
                item["index"] = i
            own_usage = {**usage, "prompt_tokens": share, "total_tokens": share}
            own = {"id": f"embd-{m.adm.info.request_id}", **rest, "data": mine, "usage": own_usage}
            out.append((orjson.dumps(own), share))
        return out

    def alone(self, answer: bytes) -> bytes:
        return answer


CODEC = EmbeddingsCodec()


def _refused_dimensions(e: GatewayError) -> bool:
    return e.status == 400 and "matryoshka" in e.message.lower()


def _cuttable(data: dict[str, Any]) -> bool:
    return data.get("encoding_format") in (None, "float", "base64")


def _floats(packed: str) -> array[float]:
    values = array("f", base64.b64decode(packed, validate=True))
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
    bad = GatewayError(502, "backend answered with something that is not an embeddings list")
    try:
        answer = orjson.loads(body)
        items = answer["data"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise bad from None
    if not isinstance(items, list):
        raise bad
    for item in items:
        vector = item.get("embedding") if isinstance(item, dict) else None
        packed = isinstance(vector, str)
        try:
            values = _floats(vector) if packed else vector  # type: ignore[arg-type]
        except (binascii.Error, ValueError):
            raise bad from None
        if not isinstance(values, (list, array)) or not values or not all(isinstance(x, (int, float)) for x in values):
            raise bad
        if dimensions > len(values):
            raise GatewayError(
                400, f"dimensions {dimensions} is more than the model's {len(values)}", param="dimensions"
            )
        head = values[:dimensions]
        norm = math.sqrt(sum(x * x for x in head)) or 1.0
        if packed:
            item["embedding"] = _packed(array("f", (x / norm for x in head)))
        else:
            item["embedding"] = [x / norm for x in head]
    return orjson.dumps(answer)


async def _estimate(rt: Runtime, pool: Pool, inputs: Any, truncate: Any = None) -> int:
    """Tokens this request will cost (exact with the tokenizer, else an upper bound)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs and isinstance(inputs[0], int):
        inputs = [inputs]
    if isinstance(truncate, int) and not isinstance(truncate, bool) and truncate > 0:
        # vLLM keeps at most `truncate` tokens of each input; bytes bound tokens from above.
        return sum(min(len(x) if isinstance(x, list) else len(x.encode()), truncate) + SPECIAL_TOKENS for x in inputs)
    texts = [x for x in inputs if isinstance(x, str)]
    ids = sum(len(x) for x in inputs if isinstance(x, list))
    return await rt.catalog.count_tokens(pool.model, texts) + ids + SPECIAL_TOKENS * len(inputs)


def _apply_gateway_fields(rt: Runtime, pool: Pool, req: EmbeddingRequest, data: dict[str, Any]) -> bool:
    """Wrap query texts in the Qwen3 instruction (classification and clustering inputs in their
    task's); documents pass as they are."""
    if req.instruction is None and req.input_type is None:
        return False
    data.pop("instruction", None)
    data.pop("input_type", None)
    task = TASK_INSTRUCTIONS.get(req.input_type or "")
    is_query = req.input_type in QUERY_TYPES or task is not None
    if not is_query and not (req.input_type is None and req.instruction is not None):
        return True
    instruction = req.instruction or task or pool.model.instruction or rt.settings.default_instruction
    inputs = data["input"]
    if isinstance(inputs, str):
        data["input"] = embedding_query(inputs, instruction)
    elif all(isinstance(x, str) for x in inputs):
        data["input"] = [embedding_query(x, instruction) for x in inputs]
    else:
        raise GatewayError(400, "instruction/input_type need text input, not token ids", param="input")
    return True


def _merge(parts: list[tuple[list[Any], dict[str, Any]]], size: int) -> bytes:
    """One embeddings answer from (chunk of inputs, its answer) for consecutive chunks of `size`:
    every answer must have one embedding per input of its chunk, indexed from 0."""
    merged = parts[0][1]
    items: list[dict[str, Any]] = []
    usage: dict[str, int] = {}
    for n, (chunk, part) in enumerate(parts):
        sent = len(chunk)
        part_items = part.get("data")
        if not isinstance(part_items, list) or not all(isinstance(x, dict) for x in part_items):
            raise GatewayError(502, "backend answered with something that is not an embeddings list")
        indexes = sorted(x.get("index") for x in part_items if isinstance(x.get("index"), int))
        if indexes != list(range(sent)):
            raise GatewayError(502, f"backend answered {len(part_items)} embeddings for {sent} inputs")
        for item in part_items:
            item["index"] += n * size
        items.extend(part_items)
        part_usage = part.get("usage")
        for k, v in part_usage.items() if isinstance(part_usage, dict) else ():
            if isinstance(v, int):
                usage[k] = usage.get(k, 0) + v
    first_usage = merged.get("usage")
    merged["data"] = items
    merged["usage"] = {**(first_usage if isinstance(first_usage, dict) else {}), **usage}
    return orjson.dumps(merged)
