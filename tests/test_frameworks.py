"""RAG frameworks as they are, real packages: LangChain's OpenAIEmbeddings with the README's
setting, LlamaIndex's OpenAI-like embedding class, and the request shapes Dify's and RAGFlow's
"OpenAI-API-compatible" providers send (their payloads, URL joins and the answer fields they read)."""

from __future__ import annotations

from urllib.parse import urljoin

import httpx
from conftest import EMB, RER, Stack
from fake_vllm import embed_vector
from langchain_openai import OpenAIEmbeddings
from llama_index.embeddings.openai_like import OpenAILikeEmbedding

TEXTS = ["Beijing is the capital of China.", "Gravity pulls."]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6


def test_langchain_openai_embeddings_with_the_readme_setting(stack: Stack) -> None:
    # check_embedding_ctx_length=False: without it LangChain sends tiktoken's token ids, not text
    emb = OpenAIEmbeddings(
        model=EMB, base_url=stack.gw.url + "/v1", api_key=stack.gw.key, check_embedding_ctx_length=False
    )
    vectors = emb.embed_documents(TEXTS)
    assert all(close(v, embed_vector(t, 64)) for v, t in zip(vectors, TEXTS, strict=True))
    assert close(emb.embed_query("capital of China"), embed_vector("capital of China", 64))
    assert isinstance(stack.emb.stats()["last_body"]["input"][0], str)  # text reached vLLM, not ids


def test_llamaindex_openai_like_embedding(stack: Stack) -> None:
    emb = OpenAILikeEmbedding(model_name=EMB, api_base=stack.gw.url + "/v1", api_key=stack.gw.key)
    vectors = emb.get_text_embedding_batch(TEXTS)
    assert all(close(v, embed_vector(t, 64)) for v, t in zip(vectors, TEXTS, strict=True))
    assert close(emb.get_query_embedding("capital of China"), embed_vector("capital of China", 64))


def test_dify_openai_api_compatible_shapes(stack: Stack) -> None:
    """Dify's plugin posts {endpoint_url}/embeddings {"model", "input": batch} and reads
    data[].embedding and usage.prompt_tokens; {endpoint_url}/rerank {"model", "query",
    "documents", "top_n"} and reads results[].index and relevance_score."""
    endpoint = stack.gw.url + "/v1"  # the README's "API endpoint URL"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.gw.key}"}
    r = httpx.post(endpoint + "/embeddings", headers=headers, json={"model": EMB, "input": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [close(d["embedding"], embed_vector(t, 64)) for d, t in zip(body["data"], TEXTS, strict=True)] == [True] * 2
    assert body["usage"]["prompt_tokens"] > 0
    docs = ["Paris is in France", "Beijing is the capital of China", "Gravity"]
    payload = {"model": RER, "query": "capital of China", "documents": docs, "top_n": len(docs)}
    r = httpx.post(endpoint + "/rerank", headers=headers, json=payload)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert sorted(x["index"] for x in results) == [0, 1, 2]
    assert all(isinstance(x["relevance_score"], float) for x in results)
    assert results[0]["index"] == 1


def test_ragflow_rerank_url_joins_and_shape(stack: Stack) -> None:
    """RAGFlow's "OpenAI-API-Compatible" rerank joins "/rerank" to the base URL the README gives:
    older releases with urljoin(base, "/rerank") (which drops /v1), newer with base + "/rerank".
    It posts {"model", "query", "documents", "top_n"} and reads results[].index/relevance_score."""
    base = stack.gw.url + "/v1"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.gw.key}"}
    docs = ["Paris is in France", "Beijing is the capital of China"]
    for url in (urljoin(base, "/rerank"), urljoin(base.rstrip("/") + "/", "rerank")):
        r = httpx.post(url, headers=headers, json={"model": RER, "query": "capital of China", "documents": docs,
                                                   "top_n": 2})  # fmt: skip
        assert r.status_code == 200, (url, r.text)
        scores = {x["index"]: x["relevance_score"] for x in r.json()["results"]}
        assert set(scores) == {0, 1} and scores[1] > scores[0], url
