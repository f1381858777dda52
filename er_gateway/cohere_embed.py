"""POST /v2/embed: Cohere's v2 embed, served by the one embeddings path (embeddings.embed).

`input_type` picks the Qwen3 instruction (search_query: the query instruction; search_document:
none; classification and clustering: their task's), `output_dimension` is `dimensions`, and each
of `embedding_types` is made from vLLM's float vectors (quantize.py). `truncate`: END (Cohere's
default) cuts each text's end to fit the model, in the gateway; START keeps the end (vLLM's
`truncate_prompt_tokens`), for documents only, since it would cut a query's instruction first;
NONE passes texts as they are, so a too-long one gets vLLM's 400. `max_tokens` bounds each text's
tokens too (END: its first ones, START: its last ones).
"""

from __future__ import annotations

import base64
import struct
from typing import TYPE_CHECKING, Any

from .admission import Admission
from .embeddings import SPECIAL_TOKENS, embed
from .errors import GatewayError
from .protocol import CohereEmbedRequest, EmbeddingRequest
from .quantize import QUANTIZERS, embedding_items
from .qwen3 import TASK_INSTRUCTIONS, embedding_query
from .rerank import backend_count, truncate_texts

if TYPE_CHECKING:
    from .gateway import Runtime

INPUT_TYPES = {"search_query": "query", "search_document": "document", **{t: t for t in TASK_INSTRUCTIONS}}


async def cohere_embed(rt: Runtime, adm: Admission, req: CohereEmbedRequest) -> dict[str, Any]:
    texts = req.all_texts()
    data: dict[str, Any] = {"input": texts, "input_type": INPUT_TYPES[req.input_type]}
    if req.model is not None:
        data["model"] = req.model
    if req.output_dimension is not None:
        data["dimensions"] = req.output_dimension
    query = req.input_type != "search_document"
    if req.truncate == "START":
        if query:
            raise GatewayError(
                400,
                f"truncate START would cut the {req.input_type} instruction before the text; use END",
                param="truncate",
            )
        data["truncate_prompt_tokens"] = req.max_tokens or -1  # vLLM keeps the last N (or max_model_len)
    elif req.truncate == "END":
        data["input"] = await _cut_ends(rt, adm, req, texts, query)
    body = await embed(rt, adm, EmbeddingRequest.model_validate(data), data, b"")
    answer, items = embedding_items(body)
    floats = [item["embedding"] for item in items]
    embeddings: dict[str, list[Any]] = {}
    for kind in dict.fromkeys(req.embedding_types):
        if kind == "float":
            embeddings[kind] = floats
        elif kind == "base64":  # Cohere's: the float32 little-endian bytes of each vector
            embeddings[kind] = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() for v in floats]
        else:
            embeddings[kind] = [QUANTIZERS[kind](v) for v in floats]
    usage = answer.get("usage")
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    return {
        "id": f"embed-{adm.info.request_id}",
        "embeddings": embeddings,
        "texts": texts,
        "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}},
        "response_type": "embeddings_by_type",
    }


async def _cut_ends(rt: Runtime, adm: Admission, req: CohereEmbedRequest, texts: list[str], query: bool) -> list[str]:
    """Each text cut at the end to what fits the model's context with its instruction, if any."""
    pool = rt.catalog.resolve(req.model, "embedding", adm.key)
    limit = pool.max_model_len
    if limit is None:  # not known yet: vLLM judges the context; max_tokens is cut here
        return (await truncate_texts(rt, pool, adm, texts, req.max_tokens))[0] if req.max_tokens else texts
    room = limit - SPECIAL_TOKENS
    if query:
        instruction = TASK_INSTRUCTIONS.get(req.input_type) or pool.model.instruction or rt.settings.default_instruction
        frame = embedding_query("", instruction)
        tok = rt.catalog.tokenizer(pool.model)
        used = tok.count(frame) if tok is not None else await backend_count(rt, pool, adm, frame)
        room -= used if used is not None else len(frame.encode())  # bytes bound tokens from above
    if room < 1:
        raise GatewayError(400, "the instruction alone fills the model's context", param="input_type")
    cut, _ = await truncate_texts(rt, pool, adm, texts, min(room, req.max_tokens or room))
    return cut
