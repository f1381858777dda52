"""Rerank (Jina/Cohere shapes, and the `/rerank` route's extra fields) on top of vLLM's /score.

Every vLLM from 0.9.2 scores `text_1` against a list `text_2`, so all rerank
routes use /score and build the answer here; that is also what lets the
gateway restore the original document texts, honour `return_documents`, split
large document lists across replicas and apply `top_n` after the merge.

Prompt modes (per model, `prompt:` in the config):
- gateway: the gateway renders the official Qwen3-Reranker prompt; the vLLM
  server must NOT have a --chat-template (it would be applied twice);
- server:  vLLM was started with the project's Qwen3 score template; raw texts
  and the instruction go upstream;
- none:    plain cross-encoders, raw texts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

from .admission import Admission
from .cache import ResultCache, entry
from .catalog import use_backend_name
from .coalesce import Group, Member, apportion, exact_extra, in_order
from .dispatch import gather_all
from .errors import GatewayError
from .protocol import RerankRequest, ScoreRequest
from .qwen3 import rerank_document_part, rerank_query_part
from .tokens import WINDOW_CHARS_PER_TOKEN, ModelTokenizer
from .upstream import Pool

if TYPE_CHECKING:
    from .gateway import Runtime


async def rerank(rt: Runtime, adm: Admission, req: RerankRequest, *, ranked: bool) -> dict[str, Any]:
    """Score `req.documents` against `req.query`; Jina/Cohere answer (+ the `/rerank` route's
    `scores` and `ranked_documents`)."""
    pool = rt.catalog.resolve(req.model, "rerank", adm.key)
    model = pool.model
    adm.info.model = adm.info.model or model.name  # a /batch_rerank is logged under its first model
    texts = req.texts()
    if req.truncate_prompt_tokens is not None and model.prompt != "none":
        raise GatewayError(
            400,
            "truncate_prompt_tokens would cut the end of the Qwen3 prompt template and make "
            "scores meaningless; use max_length to truncate documents instead",
            param="truncate_prompt_tokens",
        )
    instruction = req.instruction or model.instruction or rt.settings.default_instruction
    max_length = req.max_length and await _fit(rt, pool, adm, req.query, instruction, req.max_length)
    sent, counts = await truncate_texts(rt, pool, adm, texts, max_length) if max_length else (texts, None)
    if rt.admission.budgets_tokens(adm.key):
        await rt.admission.reserve_tokens(adm, await _estimate(rt, pool, req.query, sent, instruction, counts))
    try:
        scores, tokens = await score(rt, pool, adm, req.query, sent, instruction, req.truncate_prompt_tokens)
    finally:
        await rt.admission.settle(adm, model.name)

    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if req.top_n:
        order = order[: req.top_n]
    results = []
    for i in order:
        r: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if req.return_documents:
            r["document"] = {"text": texts[i]}
        results.append(r)
    answer: dict[str, Any] = {
        "id": f"rerank-{adm.info.request_id}",
        "model": pool.upstream_name or model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "meta": rerank_meta(len(texts), tokens),
        "results": results,
    }
    if ranked:
        answer["scores"] = scores
        answer["ranked_documents"] = [
            {"document": texts[i], "score": scores[i], "rank": rank} for rank, i in enumerate(order, start=1)
        ]
    return answer


DOCS_PER_SEARCH_UNIT = 100  # Cohere bills one search unit per query with up to 100 documents


def rerank_meta(documents: int, tokens: int) -> dict[str, Any]:
    """Cohere's `meta` beside Jina's `usage`: LiteLLM and Dify read it to bill a rerank."""
    units = max(1, -(-documents // DOCS_PER_SEARCH_UNIT))
    return {
        "api_version": {"version": "2"},
        "billed_units": {"search_units": units},
        "tokens": {"input_tokens": tokens},
    }


SPECIAL_TOKENS = 2  # per pair, beyond the texts (a separator or end token some templates add)
FALLBACK_PARALLEL = 4  # /tokenize calls in flight per request when the gateway has no tokenizer
NAME_MAX_CHARS = 1 << 20  # text tokenized at most to name an over-long document


async def _fit(rt: Runtime, pool: Pool, adm: Admission, query: str, instruction: str, max_length: int) -> int:
    """`max_length`, lowered where a document that long would not fit the backend's context
    beside the query and the prompt template (vLLM refuses such a pair outright).

    A client asking for `max_length` wants scores, not a 400 (clients of the `/rerank` route
    send 8192 to an 8192-token model). The context length is what the replicas report in /v1/models; the query
    and template are counted with the gateway's tokenizer, else by one /tokenize call, and only
    when a byte bound says they might not fit. The lowered value is said in
    `X-Max-Length-Applied`.
    """
    limit = pool.max_model_len
    if not limit:
        return max_length
    frame = (
        [query] if pool.model.prompt == "none" else [rerank_query_part(query, instruction), rerank_document_part("")]
    )
    bound = sum(map(_utf8_len, frame)) + SPECIAL_TOKENS  # tokens, from above, without tokenizing
    if max_length + bound <= limit:
        return max_length
    if rt.catalog.tokenizer(pool.model) is not None:
        used: int | None = await rt.catalog.count_tokens(pool.model, frame)
    else:
        used = await backend_count(rt, pool, adm, "".join(frame))  # one call, not one per document
    if used is None:
        return max_length  # not even vLLM could count: let it judge the pairs itself
    fit = limit - (used + SPECIAL_TOKENS)
    if fit < 1:
        raise GatewayError(
            400,
            f"the query is too long: with the prompt it takes {limit - fit} of the "
            f"model's {limit} tokens, leaving none for a document",
            param="query",
        )
    if fit < max_length:
        adm.headers["X-Max-Length-Applied"] = str(fit)
        return fit
    return max_length


async def backend_count(rt: Runtime, pool: Pool, adm: Admission, text: str) -> int | None:
    """Tokens in `text` by vLLM's /tokenize (the gateway has no tokenizer for this model)."""
    body = {**pool.model_field(), "prompt": text, "add_special_tokens": False}
    try:
        return len(_value(await rt.dispatch.json(pool, "/tokenize", orjson.dumps(body), adm), "tokens", list))
    except GatewayError:
        return None


async def _estimate(
    rt: Runtime, pool: Pool, query: str, documents: list[str], instruction: str, counts: list[int] | None
) -> int:
    """Tokens the pairs will cost: every pair is the query part plus one document part.

    The Qwen3 template is counted in every prompt mode but `none`: with `server` vLLM adds
    it, so the texts the gateway sends would understate the cost. `counts` are the documents'
    token counts when a `max_length` cut already has them.
    """
    if pool.model.prompt == "none":
        query_part, doc_frame = query, ""
    else:
        query_part, doc_frame = rerank_query_part(query, instruction), rerank_document_part("")
    per_pair = await rt.catalog.count_tokens(pool.model, [query_part, doc_frame]) + SPECIAL_TOKENS
    docs = sum(counts) if counts is not None else await rt.catalog.count_tokens(pool.model, documents)
    return per_pair * len(documents) + docs


async def estimate_score_tokens(rt: Runtime, pool: Pool, data: dict[str, Any]) -> int:
    """Tokens a /score passthrough will cost: each pair is one first text plus one second text."""

    def texts(*fields: str) -> list[str]:
        for f in fields:
            v = data.get(f)
            if isinstance(v, str):
                return [v]
            if isinstance(v, list):
                return [x for x in v if isinstance(x, str)]
        return []

    first, second = texts("text_1", "queries", "data_1"), texts("text_2", "documents", "items", "data_2")
    pairs = max(len(first), len(second), 1)
    first_tokens = await rt.catalog.count_tokens(pool.model, first) * (pairs if len(first) == 1 else 1)
    return first_tokens + await rt.catalog.count_tokens(pool.model, second) + SPECIAL_TOKENS * pairs


async def score(
    rt: Runtime,
    pool: Pool,
    adm: Admission,
    query: str,
    documents: list[str],
    instruction: str,
    truncate: int | None = None,
) -> tuple[list[float], int]:
    """Scores in input order and the token count, splitting across replicas if large."""
    model = pool.model
    if model.prompt == "gateway":
        text_1 = rerank_query_part(query, instruction)
        docs = [rerank_document_part(d) for d in documents]
    else:
        text_1, docs = query, documents
    base: dict[str, Any] = {**pool.model_field(), "text_1": text_1}
    if model.prompt == "server":
        # vLLM >= 0.32 hands these to the score template as its `instruction` variable.
        base["instruction"] = instruction
        base["chat_template_kwargs"] = {"instruction": instruction}
    if truncate is not None:
        base["truncate_prompt_tokens"] = truncate
    cached = await _lookup(rt, pool, adm, base, docs)
    todo = docs if cached is None else [docs[i] for i in cached.missing]
    if not todo:  # every pair known: vLLM is not asked
        assert cached is not None
        return cached.merge([], [], 0)
    try:
        merged = await _coalesced(rt, pool, adm, base, todo)
        if merged is not None:
            parts = [(todo, merged)]
        else:
            parts = await rt.dispatch.split(
                pool, "/score", todo, rt.settings.max_batch_docs, lambda c: orjson.dumps({**base, "text_2": c}), adm
            )
    except GatewayError as e:
        if e.status == 400 and "context length" in e.message:
            raise await _name_too_long(rt, pool, adm, text_1, docs, e) from None
        raise
    scores: list[float] = []
    tokens = 0
    for chunk, data in parts:
        try:
            part = sorted(data["data"], key=lambda d: d["index"])
            if len(part) != len(chunk):
                raise ValueError("wrong number of scores")
            scores.extend(float(d["score"]) for d in part)
            tokens += int((data.get("usage") or {}).get("total_tokens") or 0)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise GatewayError(502, f"backend answered /score with an unexpected body ({e})") from None
    if cached is None:
        return scores, tokens
    # A shared call already counted each pair (ScoreCodec.split); otherwise count them now.
    known = merged.get("pair_tokens") if merged is not None else None
    shares = known if isinstance(known, list) else await _pair_tokens(rt, pool, text_1, todo, tokens)
    return cached.merge(scores, shares, tokens)


@dataclass
class _Cached:
    """One request's pairs in the result cache (cache.py): which are known, which are not."""

    cache: ResultCache
    keys: list[bytes]
    hits: dict[int, tuple[int, float]]  # document index -> (tokens, score)
    missing: list[int]

    def merge(self, scores: list[float], shares: list[int] | None, tokens: int) -> tuple[list[float], int]:
        """Every document's score in order and the tokens of all pairs (cached ones too), storing
        the fresh ones (`shares`: each fresh pair's tokens, None when not known exactly)."""
        if shares is not None and scores:
            self.cache.put_many(
                [
                    (self.keys[i], entry(n, repr(sc).encode()))
                    for i, n, sc in zip(self.missing, shares, scores, strict=True)
                ]
            )
        out = [0.0] * (len(self.hits) + len(self.missing))
        for i, (_, sc) in self.hits.items():
            out[i] = sc
        for i, sc in zip(self.missing, scores, strict=True):
            out[i] = sc
        return out, tokens + sum(t for t, _ in self.hits.values())


async def _lookup(rt: Runtime, pool: Pool, adm: Admission, base: dict[str, Any], docs: list[str]) -> _Cached | None:
    """The pairs (the query and instruction in `base`, each document) in the result cache, or
    None without a cache. Adds to `X-Cache-Hits` (a /batch_rerank's items add up) and counts."""
    cache = rt.cache
    if cache is None or not docs:
        return None
    params = orjson.dumps(base, option=orjson.OPT_SORT_KEYS)
    keys = cache.keys(cache.namespace(pool.fingerprint, params, adm.key.hash), docs)
    hits: dict[int, tuple[int, float]] = {}
    for i, (tokens, value) in (await cache.known(keys, pool.model.name)).items():
        try:
            hits[i] = (tokens, float(value))
        except ValueError:
            pass  # not a score: a miss
    missing = [i for i in range(len(docs)) if i not in hits]
    adm.headers["X-Cache-Hits"] = str(int(adm.headers.get("X-Cache-Hits", 0)) + len(hits))
    return _Cached(cache, keys, hits, missing)


async def _pair_tokens(rt: Runtime, pool: Pool, text_1: str, docs: list[str], total: int) -> list[int] | None:
    """Each pair's share of `total` (exact for one pair, or counted with the tokenizer), or
    None when it cannot be known exactly."""
    if len(docs) == 1:
        return [total]
    tokenizer = rt.catalog.tokenizer(pool.model)
    if tokenizer is None:
        return None
    counts = await tokenizer.count_many_async([text_1, *docs])
    return apportion(total, [counts[0] + c for c in counts[1:]], [1] * len(docs))


async def _coalesced(
    rt: Runtime, pool: Pool, adm: Admission, base: dict[str, Any], docs: list[str]
) -> dict[str, Any] | None:
    """The /score answer for `docs` through a call shared with other requests (coalesce.py), or
    None when this one cannot share: not gateway prompt mode (the pairs are then not plain text
    pairs), `truncate_prompt_tokens`, more documents than one upstream call takes, too large, or
    no tokenizer to count each request's own usage with."""
    coalescer = rt.dispatch.coalescer
    tokenizer = rt.catalog.tokenizer(pool.model)
    if (
        coalescer is None
        or tokenizer is None
        or pool.model.prompt != "gateway"
        or "truncate_prompt_tokens" in base
        or len(docs) > rt.settings.max_batch_docs
    ):
        return None
    head: str = base["text_1"]
    size = (_utf8_len(head) + SPECIAL_TOKENS) * len(docs) + sum(map(_utf8_len, docs))
    if not coalescer.fits(len(docs), size):
        return None
    shared = {k: v for k, v in base.items() if k != "text_1"}
    key = orjson.dumps(shared, option=orjson.OPT_SORT_KEYS)
    group = Group(pool, SCORE_CODEC, shared, key, rt.settings.max_batch_docs, tokenizer)
    member = Member(adm, orjson.dumps({**base, "text_2": docs}), docs, head, size)
    answer: dict[str, Any] = await rt.dispatch.coalesced(group, member)
    return answer


class ScoreCodec:
    """Merged /score calls: every member's (query, document) pairs as paired `text_1`/`text_2`
    lists; each member gets its own slice of `data` (indexed from 0) and its own `usage`."""

    path = "/score"

    def merged_body(self, base: dict[str, Any], members: Sequence[Member]) -> bytes:
        heads = [m.head for m in members for _ in m.items]
        return orjson.dumps({**base, "text_1": heads, "text_2": [d for m in members for d in m.items]})

    async def count(self, members: Sequence[Member], tokenizer: ModelTokenizer) -> None:
        counted = await tokenizer.count_many_async([t for m in members for t in (m.head or "", *m.items)])
        at = 0
        for m in members:
            head, docs = counted[at], counted[at + 1 : at + 1 + len(m.items)]
            m.counts = [head + n for n in docs]
            at += 1 + len(m.items)

    def too_long(self, member: Member, max_model_len: int) -> bool:
        return max(member.counts) + SPECIAL_TOKENS > max_model_len

    def split(self, answer: bytes, members: Sequence[Member]) -> list[tuple[dict[str, Any], int]]:
        sizes = [len(m.items) for m in members]
        data = self.alone(answer)
        items = in_order(data.get("data"), sum(sizes), "scores")
        usage = data.get("usage")
        total = usage.get("total_tokens") if isinstance(usage, dict) else None
        total = total if type(total) is int else 0
        shares = apportion(total, [sum(m.counts) for m in members], sizes)
        extra = exact_extra(total, [c for m in members for c in m.counts])
        out, at = [], 0
        for m, k, share in zip(members, sizes, shares, strict=True):
            mine = [{**x, "index": i} for i, x in enumerate(items[at : at + k])]
            at += k
            own: dict[str, Any] = {"data": mine, "usage": {"prompt_tokens": share, "total_tokens": share}}
            if extra is not None:  # each pair's own tokens, for the result cache
                own["pair_tokens"] = [c + extra for c in m.counts]
            out.append((own, share))
        return out

    def alone(self, answer: bytes) -> dict[str, Any]:
        try:
            data = orjson.loads(answer)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise GatewayError(502, "backend answered /score with something that is not a JSON object")
        data.pop("pair_tokens", None)  # ours (split), never the backend's to say
        return data


SCORE_CODEC = ScoreCodec()


async def score_passthrough(
    rt: Runtime, adm: Admission, req: ScoreRequest, data: dict[str, Any], raw: bytes
) -> Response:
    """vLLM's /score as the client wrote it (under the backend's model name), answered as vLLM did."""
    pool = rt.catalog.resolve(req.model, "rerank", adm.key)
    adm.info.model = pool.model.name
    body = orjson.dumps(data) if use_backend_name(data, pool) else raw
    if rt.admission.budgets_tokens(adm.key):
        await rt.admission.reserve_tokens(adm, await estimate_score_tokens(rt, pool, data))
    try:
        result = await rt.dispatch.send(pool, "/score", body, adm)
    finally:
        await rt.admission.settle(adm, pool.model.name)
    return Response(result.body, media_type="application/json", headers=adm.headers)


async def _name_too_long(
    rt: Runtime, pool: Pool, adm: Admission, text_1: str, docs: list[str], error: GatewayError
) -> GatewayError:
    """vLLM says "too long" without saying which document; find out with its tokenizer."""
    tok = rt.catalog.tokenizer(pool.model)
    limit = 0
    if tok is not None:
        limit = _limit_from(error.message)
        # Only a document longer than the limit in bytes can be too long in tokens, and only
        # the first limit+1 tokens' worth of it needs counting; past NAME_MAX_CHARS in all, the
        # backend's own message has to do.
        window = (limit + 1) * WINDOW_CHARS_PER_TOKEN
        suspects = [i for i, d in enumerate(docs) if _utf8_len(text_1) + _utf8_len(d) > limit]
        if (
            not limit
            or len(text_1) > NAME_MAX_CHARS
            or sum(min(len(docs[i]), window) for i in suspects) > NAME_MAX_CHARS
        ):
            return error
        query = (await tok.count_many_async([text_1]))[0]
        found = await tok.count_many_async([docs[i][:window] for i in suspects])
        counts = [0] * len(docs)
        for i, n in zip(suspects, found, strict=True):
            counts[i] = query + n
    else:

        async def count(doc: str) -> int:
            nonlocal limit
            body = {**pool.model_field(), "prompt": text_1 + doc}
            tok_answer = await rt.dispatch.json(pool, "/tokenize", orjson.dumps(body), adm)
            limit = int(tok_answer.get("max_model_len", 0)) or limit
            return int(tok_answer.get("count", 0))

        try:
            counts = await gather_all((count(d) for d in docs), limit=FALLBACK_PARALLEL)
        except (GatewayError, ValueError, TypeError):
            return error
    if not limit:
        return error
    over = [(i, n) for i, n in enumerate(counts) if n > limit]
    if not over:
        return error
    i, n = over[0]
    more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
    return GatewayError(
        400,
        f"document {i}{more} is too long: {n} tokens with the prompt, the model's limit is {limit}; "
        "send max_length to truncate documents",
        param=f"documents[{i}]",
    )


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _value(answer: dict[str, Any], name: str, kind: type) -> Any:
    """`name` of a /tokenize or /detokenize answer, or a 502 saying the backend sent something else."""
    value = answer.get(name)
    if not isinstance(value, kind):
        raise GatewayError(502, f"backend answered {name!r} of /tokenize or /detokenize with an unexpected body")
    return value


def _limit_from(message: str) -> int:
    """The model's context length from vLLM's "maximum context length is N tokens" message."""
    m = re.search(r"maximum (?:context|model) length is (\d+)", message) or re.search(
        r"max_model_len[^\d]*(\d+)", message
    )
    return int(m.group(1)) if m else 0


async def truncate_texts(
    rt: Runtime, pool: Pool, adm: Admission, texts: list[str], max_length: int
) -> tuple[list[str], list[int] | None]:
    """Cut each document (never the template) to `max_length` tokens with the model's tokenizer.

    In the gateway when it has the tokenizer (no upstream call; also gives the kept documents'
    token counts); otherwise with vLLM's /tokenize and /detokenize, only for documents that
    can be longer than `max_length` (a token covers at least one byte) and a few at a time.
    """
    tok = rt.catalog.tokenizer(pool.model)
    if tok is not None:
        # A document of at most max_length bytes has at most max_length tokens: not tokenized.
        long = [i for i, t in enumerate(texts) if _utf8_len(t) > max_length]
        if len(long) == len(texts):
            return await tok.truncate_count_many_async(texts, max_length)
        cut, _ = await tok.truncate_count_many_async([texts[i] for i in long], max_length)
        out = list(texts)
        for i, kept in zip(long, cut, strict=True):
            out[i] = kept
        return out, None

    async def one(text: str) -> str:
        if _utf8_len(text) <= max_length:
            return text
        body = {**pool.model_field(), "prompt": text, "add_special_tokens": False}
        ids = _value(await rt.dispatch.json(pool, "/tokenize", orjson.dumps(body), adm), "tokens", list)
        if len(ids) <= max_length:
            return text
        back = {**pool.model_field(), "tokens": ids[:max_length]}
        kept: str = _value(await rt.dispatch.json(pool, "/detokenize", orjson.dumps(back), adm), "prompt", str)
        return kept

    return await gather_all((one(t) for t in texts), limit=FALLBACK_PARALLEL), None
