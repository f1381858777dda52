"""Cohere /v2/embed and Voyage's fields on /v1/embeddings, with the real cohere SDK: every
embedding type against numpy from the float vectors, instructions per input_type, output_dimension,
truncate, and quantized vectors independent of what they were batched or merged with."""

from __future__ import annotations

import base64
import struct

import cohere
import httpx
import numpy as np
import pytest
from conftest import EMB, Stack
from fake_vllm import embed_vector
from test_quantize import reference

from er_gateway.qwen3 import TASK_INSTRUCTIONS, embedding_query
from er_gateway.settings import DEFAULT_INSTRUCTION

TYPES = ["float", "int8", "uint8", "binary", "ubinary", "base64"]


def test_cohere_sdk_v2_embed_every_type(stack: Stack) -> None:
    co = cohere.ClientV2(api_key=stack.gw.key, base_url=stack.gw.url)
    texts = ["what is a panda?", "capital of France"]
    res = co.embed(model=EMB, texts=texts, input_type="search_query", embedding_types=TYPES)
    e = res.embeddings
    # search_query: the Qwen3 query instruction, as /v1/embeddings' input_type "query" does
    want = [embed_vector(embedding_query(t, DEFAULT_INSTRUCTION), 64) for t in texts]
    assert e.float_ == want
    for dtype, got in (("int8", e.int8), ("uint8", e.uint8), ("binary", e.binary), ("ubinary", e.ubinary)):
        assert got == [reference(v, dtype) for v in want], dtype
    assert [list(struct.unpack("<64f", base64.b64decode(b))) for b in e.base64] == want
    assert res.texts == texts
    openai_style = stack.gw.post("/v1/embeddings", {"model": EMB, "input": texts, "input_type": "query"}).json()
    assert res.meta.billed_units.input_tokens == openai_style["usage"]["total_tokens"]


@pytest.mark.parametrize("input_type", ["search_document", "classification", "clustering"])
def test_input_types_pick_the_instruction(stack: Stack, input_type: str) -> None:
    r = stack.gw.post("/v2/embed", {"model": EMB, "texts": ["a text"], "input_type": input_type})
    assert r.status_code == 200, r.text
    task = TASK_INSTRUCTIONS.get(input_type)
    sent = embedding_query("a text", task) if task else "a text"
    assert r.json()["embeddings"]["float"] == [embed_vector(sent, 64)]
    assert r.json()["response_type"] == "embeddings_by_type"


def test_inputs_form_output_dimension_and_errors(stack: Stack) -> None:
    gw = stack.gw
    body = {"model": EMB, "input_type": "search_document"}
    inputs = [{"content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]}]
    r = gw.post("/v2/embed", {**body, "inputs": inputs, "output_dimension": 16})
    assert r.status_code == 200, r.text
    (vec,) = r.json()["embeddings"]["float"]
    assert len(vec) == 16 and r.json()["texts"] == ["hello\nworld"]
    for bad, param in (
        ({"texts": ["a"], "inputs": inputs}, None),
        ({}, None),
        ({"texts": []}, "texts"),
        ({"texts": [""]}, None),
        ({"texts": ["a"], "embedding_types": ["float16"]}, "embedding_types"),
        ({"texts": ["a"], "input_type": "image"}, "input_type"),
        ({"texts": ["a"], "truncate": "MIDDLE"}, "truncate"),
        ({"texts": ["a"] * 5000}, "texts"),
    ):
        r = gw.post("/v2/embed", {**body, **bad})
        assert r.status_code == 400, (bad, r.text)
        if param:
            assert r.json()["error"]["param"] == param, (bad, r.json())
    r = gw.post("/v2/embed", {"texts": ["q"], "input_type": "search_query", "truncate": "START"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncate"


def test_truncate_end_fits_a_long_text_and_none_does_not(stack: Stack) -> None:
    long = "word " * 2000  # the stand-in's context is 512 tokens
    none = stack.gw.post("/v2/embed", {"texts": [long], "input_type": "search_document", "truncate": "NONE"})
    assert none.status_code == 400, none.text
    end = stack.gw.post("/v2/embed", {"texts": [long], "input_type": "search_document"})
    assert end.status_code == 200, end.text
    assert end.json()["meta"]["billed_units"]["input_tokens"] <= 512
    start = stack.gw.post("/v2/embed", {"texts": [long], "input_type": "search_document", "truncate": "START"})
    assert start.status_code == 200, start.text


def test_voyage_output_dtype_on_v1_embeddings(stack: Stack) -> None:
    gw = stack.gw
    texts = ["one", "two", "three"]
    floats = [embed_vector(t, 64) for t in texts]
    for dtype in ("int8", "uint8", "binary", "ubinary"):
        r = gw.post("/v1/embeddings", {"model": EMB, "input": texts, "output_dtype": dtype})
        assert r.status_code == 200, r.text
        assert [d["embedding"] for d in r.json()["data"]] == [reference(v, dtype) for v in floats], dtype
        b = gw.post(
            "/v1/embeddings", {"model": EMB, "input": texts, "output_dtype": dtype, "encoding_format": "base64"}
        )
        np_type = np.int8 if dtype in ("int8", "binary") else np.uint8
        got = [np.frombuffer(base64.b64decode(d["embedding"]), dtype=np_type).tolist() for d in b.json()["data"]]
        assert got == [reference(v, dtype) for v in floats], dtype
    r = gw.post("/v1/embeddings", {"model": EMB, "input": "one", "output_dtype": "float", "output_dimension": 8})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 8
    assert "output_dtype" not in (stack.emb.stats()["last_body"] or {})  # never sent to vLLM
    r = gw.post("/v1/embeddings", {"model": EMB, "input": "one", "output_dtype": "int4"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "output_dtype"


def test_quantized_vectors_do_not_depend_on_the_batch(stack: Stack) -> None:
    """The same text gives the same int8 bytes alone, in a batch, and split over calls."""
    gw = stack.gw
    alone = gw.post("/v1/embeddings", {"input": "panda", "output_dtype": "int8"}).json()["data"][0]["embedding"]
    batch = [f"other {i}" for i in range(100)] + ["panda"]
    r = gw.post("/v1/embeddings", {"input": batch, "output_dtype": "int8"})  # split: 64 per upstream call
    assert r.json()["data"][-1]["embedding"] == alone
    co = httpx.post(gw.url + "/v2/embed", headers=gw.auth, json={"texts": batch, "embedding_types": ["int8"]})
    assert co.json()["embeddings"]["int8"][-1] == alone
