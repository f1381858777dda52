"""Rerank (Jina/Cohere and seed-000 shapes) on top of vLLM's /score.

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

import asyncio
from typing import Any

import orjson

from .errors import GatewayError
from .gateway import Admission, Gateway
from .protocol import RerankRequest
from .qwen3 import rerank_document_part, rerank_query_part
from .upstream import Pool


async def rerank(gw: Gateway, adm: Admission, req: RerankRequest, *, seed_shape: bool) -> dict[str, Any]:
    """Score `req.documents` against `req.query`; Jina/Cohere answer (+ seed-000 fields)."""
    pool = gw.resolve(req.model, "rerank", adm.key)
    model = pool.model
    adm.info.model = model.name
    texts = req.texts()
    adm.info.items = len(texts)
    if req.truncate_prompt_tokens is not None and model.prompt != "none":
        raise GatewayError(
            400,
            "truncate_prompt_tokens would cut the end of the Qwen3 prompt template and make "
            "scores meaningless; use max_length to truncate documents instead",
            param="truncate_prompt_tokens",
        )
    sent = await _truncate(gw, pool, adm, texts, req.max_length) if req.max_length else texts
    instruction = req.instruction or model.instruction or gw.settings.default_instruction
    scores, tokens = await score(gw, pool, adm, req.query, sent, instruction, req.truncate_prompt_tokens)
    await gw.charge_tokens(adm, model.name, tokens)

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
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results,
    }
    if seed_shape:
        answer["scores"] = scores
        answer["ranked_documents"] = [
            {"document": texts[i], "score": scores[i], "rank": rank}
            for rank, i in enumerate(order, start=1)
        ]
    return answer


async def score(
    gw: Gateway,
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
    size = gw.settings.max_batch_docs
    chunks = [docs[i : i + size] for i in range(0, len(docs), size)]
    base: dict[str, Any] = {"model": model.backend_name, "text_1": text_1}
    if model.prompt == "server":
        # vLLM >= 0.32 hands these to the score template as its `instruction` variable.
        base["instruction"] = instruction
        base["chat_template_kwargs"] = {"instruction": instruction}
    if truncate is not None:
        base["truncate_prompt_tokens"] = truncate
    answers = await asyncio.gather(
        *(gw.call(pool, "/score", orjson.dumps({**base, "text_2": c}), adm.info) for c in chunks),
        return_exceptions=True,
    )
    scores: list[float] = []
    tokens = 0
    for chunk, answer in zip(chunks, answers):
        if isinstance(answer, GatewayError) and answer.status == 400 and "context length" in answer.message:
            raise await _name_too_long(gw, pool, adm, text_1, docs, answer)
        if isinstance(answer, BaseException):
            raise answer
        try:
            data = orjson.loads(answer.body)
            part = sorted(data["data"], key=lambda d: d["index"])
            if len(part) != len(chunk):
                raise ValueError("wrong number of scores")
            scores.extend(float(d["score"]) for d in part)
            tokens += int((data.get("usage") or {}).get("total_tokens") or 0)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise GatewayError(502, f"backend answered /score with an unexpected body ({e})") from None
    return scores, tokens


async def _name_too_long(
    gw: Gateway, pool: Pool, adm: Admission, text_1: str, docs: list[str], error: GatewayError
) -> GatewayError:
    """vLLM says "too long" without saying which document; find out with its tokenizer."""
    async def count(doc: str) -> tuple[int, int]:
        body = {"model": pool.model.backend_name, "prompt": text_1 + doc}
        tok = orjson.loads((await gw.call(pool, "/tokenize", orjson.dumps(body), adm.info)).body)
        return int(tok.get("count", 0)), int(tok.get("max_model_len", 0))

    try:
        counts = await asyncio.gather(*(count(d) for d in docs))
    except (GatewayError, orjson.JSONDecodeError, ValueError):
        return error
    over = [(i, n, limit) for i, (n, limit) in enumerate(counts) if limit and n > limit]
    if not over:
        return error
    i, n, limit = over[0]
    more = f" (and {len(over) - 1} more)" if len(over) > 1 else ""
    return GatewayError(
        400,
        f"document {i}{more} is too long: {n} tokens with the prompt, the model's limit is {limit}; "
        "send max_length to truncate documents",
        param=f"documents[{i}]",
    )


async def _truncate(gw: Gateway, pool: Pool, adm: Admission, texts: list[str], max_length: int) -> list[str]:
    """Cut each document (never the template) to `max_length` tokens with the backend's tokenizer."""

    async def one(text: str) -> str:
        body = {"model": pool.model.backend_name, "prompt": text, "add_special_tokens": False}
        tok = orjson.loads((await gw.call(pool, "/tokenize", orjson.dumps(body), adm.info)).body)
        ids = tok.get("tokens") or []
        if len(ids) <= max_length:
            return text
        back = {"model": pool.model.backend_name, "tokens": ids[:max_length]}
        out = orjson.loads((await gw.call(pool, "/detokenize", orjson.dumps(back), adm.info)).body)
        return str(out.get("prompt", ""))

    return list(await asyncio.gather(*(one(t) for t in texts)))
