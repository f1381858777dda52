"""Every route, every input form and every error row, through a real gateway process."""

from __future__ import annotations

import base64
import struct

import httpx
import orjson
import pytest
from conftest import EMB, RER, Stack
from fake_vllm import embed_vector, pair_score

from er_gateway.qwen3 import rerank_document_part, rerank_query_part
from er_gateway.settings import DEFAULT_INSTRUCTION


def test_models_list(stack: Stack) -> None:
    r = stack.gw.get("/v1/models")
    assert r.status_code == 200
    ids = {m["id"]: m["kind"] for m in r.json()["data"]}
    assert ids == {EMB: "embedding", RER: "rerank"}
    assert r.json()["object"] == "list"
    for h in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-Request-ID"):
        assert h in r.headers


@pytest.mark.parametrize(
    "inp",
    ["hello world", ["a b", "c"], [1, 2, 3], [[1, 2], [3, 4, 5]]],
    ids=["string", "strings", "token-ids", "lists-of-token-ids"],
)
def test_embedding_input_forms(stack: Stack, inp: object) -> None:
    r = stack.gw.post("/v1/embeddings", {"model": EMB, "input": inp})
    assert r.status_code == 200, r.text
    items = [inp] if isinstance(inp, str) or isinstance(inp[0], int) else inp  # type: ignore[index]
    data = r.json()["data"]
    assert [d["index"] for d in data] == list(range(len(items)))
    for d, item in zip(data, items, strict=True):
        assert d["embedding"] == embed_vector(item, 64)
    assert r.json()["usage"]["total_tokens"] > 0


def test_embedding_body_is_passed_through_byte_for_byte(stack: Stack) -> None:
    body = b'{"input": ["x y", "z"],   "encoding_format": "float", "truncate_prompt_tokens": 5, "user": "u1"}'
    r = httpx.post(stack.gw.url + "/v1/embeddings", content=body, headers=stack.gw.auth)
    assert r.status_code == 200
    sent = stack.emb.stats()["last_body"]
    assert sent == orjson.loads(body)  # extras forwarded untouched, model not added
    assert r.json()["data"][1]["embedding"] == embed_vector("z", 64)


def test_embedding_base64_and_dimensions(stack: Stack) -> None:
    r = stack.gw.post("/v1/embeddings", {"input": "q", "encoding_format": "base64", "dimensions": 16})
    assert r.status_code == 200
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    assert list(struct.unpack("<16f", raw)) == embed_vector("q", 16)


def test_default_model_when_none_given(stack: Stack) -> None:
    r = stack.gw.post("/v1/embeddings", {"input": "hi"})
    assert r.status_code == 200 and r.json()["model"] == EMB
    r = stack.gw.post("/v1/rerank", {"query": "hi", "documents": ["hi there"]})
    assert r.status_code == 200 and r.json()["model"] == RER


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_rerank_routes(stack: Stack, path: str) -> None:
    docs = ["Paris is the capital of France", {"text": "London is in England"}, "capital of France: Paris"]
    r = stack.gw.post(path, {"model": RER, "query": "capital of France", "documents": docs, "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    texts = ["Paris is the capital of France", "London is in England", "capital of France: Paris"]
    q = rerank_query_part("capital of France", DEFAULT_INSTRUCTION)
    expected = [pair_score(q, rerank_document_part(t)) for t in texts]
    order = sorted(range(3), key=lambda i: expected[i], reverse=True)[:2]
    assert [x["index"] for x in body["results"]] == order
    assert [x["relevance_score"] for x in body["results"]] == [expected[i] for i in order]
    assert [x["document"]["text"] for x in body["results"]] == [texts[i] for i in order]
    assert body["usage"]["total_tokens"] > 0
    if path == "/rerank":
        assert body["scores"] == expected
        assert [d["rank"] for d in body["ranked_documents"]] == [1, 2]
        assert body["ranked_documents"][0]["document"] == texts[order[0]]
    else:
        assert "scores" not in body


def test_rerank_return_documents_false(stack: Stack) -> None:
    r = stack.gw.post("/v1/rerank", {"query": "q", "documents": ["a", "b"], "return_documents": False})
    assert r.status_code == 200
    assert all("document" not in x for x in r.json()["results"])


def test_rerank_sends_qwen3_prompt_to_score(stack: Stack) -> None:
    r = stack.gw.post("/v1/rerank", {"query": "what", "documents": ["doc one"], "instruction": "Find it"})
    assert r.status_code == 200
    sent = stack.rer.stats()["last_body"]
    assert sent["text_1"] == rerank_query_part("what", "Find it")
    assert sent["text_2"] == [rerank_document_part("doc one")]


@pytest.mark.parametrize("path", ["/v1/score", "/score"])
def test_score_passthrough(stack: Stack, path: str) -> None:
    r = stack.gw.post(path, {"model": RER, "text_1": "a b", "text_2": ["a", "c"]})
    assert r.status_code == 200, r.text
    assert [d["score"] for d in r.json()["data"]] == [pair_score("a b", "a"), pair_score("a b", "c")]
    assert stack.rer.stats()["last_body"]["text_1"] == "a b"  # raw: no template on /score


def test_health_is_public(stack: Stack) -> None:
    r = httpx.get(stack.gw.url + "/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "healthy" and body["model_loaded"] is True
    # Public: replicas by index, never an internal address; an admin key sees the URLs.
    assert body["models"][EMB]["replicas"][0]["replica"] == 0 and "url" not in body["models"][EMB]["replicas"][0]
    assert stack.emb.url.split("//")[1] not in r.text
    assert body["models"][RER]["kind"] == "rerank"
    admin = httpx.get(stack.gw.url + "/health", headers=stack.gw.auth).json()
    assert admin["models"][EMB]["replicas"][0]["url"] == stack.emb.url


# ---- errors ---------------------------------------------------------------------------------
def _err(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert e["code"] == status and isinstance(e["message"], str) and "type" in e and "param" in e
    return e  # type: ignore[no-any-return]


def test_401_missing_and_wrong_key(stack: Stack) -> None:
    _err(httpx.post(stack.gw.url + "/v1/embeddings", json={"input": "x"}), 401)
    _err(stack.gw.post("/v1/embeddings", {"input": "x"}, key="er-wrong"), 401)
    ok = httpx.post(stack.gw.url + f"/v1/embeddings?api_key={stack.gw.key}", json={"input": "x"})
    assert ok.status_code == 200


def test_client_key_never_sent_upstream(stack: Stack) -> None:
    stack.gw.post("/v1/embeddings", {"input": "x"}, headers={"X-Request-ID": "trace-123"})
    headers = {k.lower(): v for k, v in stack.emb.stats()["last_headers"].items()}
    assert "authorization" not in headers
    assert stack.gw.key not in str(headers)
    assert headers["x-request-id"] == "trace-123"


def test_404_unknown_model_lists_names(stack: Stack) -> None:
    e = _err(stack.gw.post("/v1/embeddings", {"model": "nope", "input": "x"}), 404)
    assert EMB in str(e["message"]) and RER in str(e["message"])
    _err(stack.gw.post("/v1/rerank", {"model": "nope", "query": "q", "documents": ["d"]}), 404)


def test_400_wrong_kind_never_silent_cosine(stack: Stack) -> None:
    e = _err(stack.gw.post("/v1/rerank", {"model": EMB, "query": "q", "documents": ["d"]}), 400)
    assert "embedding" in str(e["message"])
    _err(stack.gw.post("/v1/embeddings", {"model": RER, "input": "x"}), 400)
    _err(stack.gw.post("/score", {"model": EMB, "text_1": "a", "text_2": "b"}), 400)


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": ""}, "input"),
        ("/v1/embeddings", {"input": [[]]}, "input"),
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/embeddings", {"input": ["a", 1]}, "input"),
        ("/v1/embeddings", {}, "input"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/v1/embeddings", {"input": "x", "dimensions": "8"}, "dimensions"),
        ("/v1/rerank", {"query": "q", "documents": []}, "documents"),
        ("/v1/rerank", {"query": "", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": "q", "documents": [1]}, "documents"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": "2"}, "top_n"),
        ("/v1/rerank", {"documents": ["a"]}, "query"),
        ("/rerank", {"query": "q", "documents": ["a"], "max_length": 0}, "max_length"),
        ("/score", {"text_1": "a"}, "text_1"),
        ("/score", {"text_1": "a", "text_2": []}, "text_2"),
    ],
)
def test_400_validation_names_the_field(stack: Stack, path: str, body: dict[str, object], param: str) -> None:
    e = _err(stack.gw.post(path, body), 400)
    assert e["param"] == param
    assert param in str(e["message"])


@pytest.mark.parametrize("raw", [b"{bad", b"", b"[1, 2]", b'"text"'])
def test_400_malformed_json(stack: Stack, raw: bytes) -> None:
    r = httpx.post(stack.gw.url + "/v1/embeddings", content=raw, headers=stack.gw.auth)
    _err(r, 400)


def test_backend_400_message_kept(stack: Stack) -> None:
    long = " ".join(["word"] * 600)
    e = _err(stack.gw.post("/v1/embeddings", {"input": long}), 400)
    assert "maximum context length is 512 tokens" in str(e["message"])
    assert e["param"] == "input_tokens"


def test_backend_flat_error_shape(stack: Stack) -> None:
    stack.emb.admin(flat_errors=True)
    try:
        e = _err(stack.gw.post("/v1/embeddings", {"input": " ".join(["w"] * 600)}), 400)
        assert "maximum context length" in str(e["message"])
    finally:
        stack.emb.admin(flat_errors=False)


@pytest.mark.parametrize("fault,status", [("500", 502), ("garbage", 502), ("drop", 502)])
def test_backend_faults_map(stack: Stack, fault: str, status: int) -> None:
    stack.emb.admin(fault=fault)
    try:
        _err(stack.gw.post("/v1/embeddings", {"input": "x"}), status)
    finally:
        stack.emb.admin(fault=None)
    # the replica recovers after the cooldown; a healthy request succeeds again
    assert stack.gw.post("/v1/embeddings", {"input": "x"}).status_code == 200


def test_413_body_too_large(tmp_path, stack: Stack) -> None:  # type: ignore[no-untyped-def]
    big = b'{"input": "' + b"a" * (33 * 1024 * 1024) + b'"}'
    r = httpx.post(stack.gw.url + "/v1/embeddings", content=big, headers=stack.gw.auth, timeout=60)
    _err(r, 413)

    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"input": "'
        for _ in range(40):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    r = httpx.post(stack.gw.url + "/v1/embeddings", content=chunks(), headers=stack.gw.auth, timeout=60)
    _err(r, 413)


def test_unknown_route_and_method(stack: Stack) -> None:
    _err(httpx.get(stack.gw.url + "/v1/nothing"), 404)
    _err(httpx.get(stack.gw.url + "/v1/embeddings", headers=stack.gw.auth), 405)


def test_request_id_echoed_and_overhead_header(stack: Stack) -> None:
    r = stack.gw.post("/v1/embeddings", {"input": "x"}, headers={"X-Request-ID": "abc-1"})
    assert r.headers["X-Request-ID"] == "abc-1"
    assert float(r.headers["X-Gateway-Overhead-Ms"]) >= 0
    r = httpx.get(stack.gw.url + "/health")
    assert len(r.headers["X-Request-ID"]) >= 16


def test_openapi_docs_list_the_api(stack: Stack) -> None:
    spec = httpx.get(stack.gw.url + "/openapi.json").json()
    for path in ("/v1/embeddings", "/v1/rerank", "/v2/rerank", "/rerank", "/batch_rerank", "/v1/models", "/health"):
        assert path in spec["paths"], path
    assert httpx.get(stack.gw.url + "/docs").status_code == 200


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank", "/rerank"])
def test_rerank_answers_carry_cohere_meta(stack: Stack, path: str) -> None:
    """Jina's `usage` and Cohere's `meta` on every rerank route: billing tools read either."""
    r = stack.gw.post(path, {"model": RER, "query": "capital of France", "documents": ["Paris", "Berlin", "Rome"]})
    assert r.status_code == 200, r.text
    body = r.json()
    tokens = body["usage"]["total_tokens"]
    assert tokens > 0
    assert body["meta"] == {
        "api_version": {"version": "2"},
        "billed_units": {"search_units": 1},
        "tokens": {"input_tokens": tokens},
    }
    many = stack.gw.post(path, {"model": RER, "query": "q", "documents": [f"d{i}" for i in range(201)]})
    assert many.json()["meta"]["billed_units"]["search_units"] == 3  # ceil(201 / 100), as Cohere bills


def test_voyage_top_k_and_cohere_max_tokens_per_doc(stack: Stack) -> None:
    docs = ["Paris is the capital of France " * 20, "Berlin is in Germany", "France capital Paris"]
    base = {"model": RER, "query": "capital of France", "documents": docs}
    assert (
        stack.gw.post("/v1/rerank", {**base, "top_k": 1}).json()["results"]
        == (stack.gw.post("/v1/rerank", {**base, "top_n": 1}).json()["results"])
    )
    cut = stack.gw.post("/v2/rerank", {**base, "max_tokens_per_doc": 3}).json()
    same = stack.gw.post("/v2/rerank", {**base, "max_length": 3}).json()
    whole = stack.gw.post("/v2/rerank", base).json()
    assert cut["results"] == same["results"] and cut["usage"] == same["usage"]
    assert cut["usage"]["total_tokens"] < whole["usage"]["total_tokens"]
    for bad in ({"top_k": -1}, {"max_tokens_per_doc": 0}, {"top_k": "1"}):
        r = stack.gw.post("/v1/rerank", {**base, **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] in ("top_k", "max_tokens_per_doc"), r.text
