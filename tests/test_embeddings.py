"""Embeddings specifics: Matryoshka `dimensions` cut in the gateway when the backend refuses it."""

from __future__ import annotations

import base64
import math
import struct
from pathlib import Path

import orjson
import pytest
from conftest import backend_args, start_backend, start_gateway

from er_gateway.embeddings import _merge, cut_vectors
from er_gateway.errors import GatewayError


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_cut_vectors_float_and_base64_agree() -> None:
    vec = [3.0, 4.0, 12.0, 84.0]
    packed = base64.b64encode(struct.pack("<4f", *vec)).decode()
    body = orjson.dumps(
        {"data": [{"index": 0, "embedding": vec}, {"index": 1, "embedding": packed}], "usage": {"total_tokens": 3}}
    )
    out = orjson.loads(cut_vectors(body, 2))
    assert out["data"][0]["embedding"] == [0.6, 0.8] and out["usage"] == {"total_tokens": 3}
    raw = base64.b64decode(out["data"][1]["embedding"])
    assert [round(x, 6) for x in struct.unpack("<2f", raw)] == [0.6, 0.8]


def test_dimensions_in_front_of_a_vllm_that_refuses_them(tmp_path: Path) -> None:
    """The stand-in, like vLLM without is_matryoshka, answers `dimensions` with 400: the gateway
    asks for whole vectors and cuts them, and from then on does not send `dimensions` at all."""
    emb, rer = start_backend(tmp_path, "embedding"), start_backend(tmp_path, "rerank")
    gw = start_gateway(tmp_path, *backend_args(emb, rer))
    try:
        texts = ["hello world", "Paris"]
        full = [d["embedding"] for d in gw.post("/v1/embeddings", {"input": texts}).json()["data"]]
        r = gw.post("/v1/embeddings", {"input": texts, "dimensions": 16})
        assert r.status_code == 200, r.text
        for d, f in zip(r.json()["data"], full, strict=True):
            assert len(d["embedding"]) == 16
            assert max(abs(a - b) for a, b in zip(d["embedding"], unit(f[:16]), strict=True)) < 1e-6
        emb.admin(reset_stats=True)
        r = gw.post("/v1/embeddings", {"input": texts, "dimensions": 16, "encoding_format": "base64"})
        assert r.status_code == 200
        assert emb.stats()["requests"] == 1 and "dimensions" not in emb.stats()["last_body"]
        for d, f in zip(r.json()["data"], full, strict=True):
            vec = struct.unpack("<16f", base64.b64decode(d["embedding"]))
            assert max(abs(a - b) for a, b in zip(vec, unit(f[:16]), strict=True)) < 1e-6
        r = gw.post("/v1/embeddings", {"input": texts, "dimensions": 100000})
        assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions"
    finally:
        for p in (gw, emb, rer):
            p.stop()


@pytest.mark.parametrize(
    "answer",
    [
        b'{"data": [{"embedding": "!!!!"}]}',  # not base64
        b'{"data": [{"embedding": "AAA"}]}',  # base64 of no whole float32
        b'{"data": ["x"]}',
        b'{"data": {"embedding": [1.0]}}',
        b'{"data": [{"embedding": ["a", "b", "c"]}]}',
        b'{"data": [{"embedding": {"x": 1}}]}',
    ],
)
def test_cutting_a_broken_answer_is_the_backends_fault(answer: bytes) -> None:
    """The gateway's own `dimensions` cut on a hostile answer: a 502, never a 500 or the client's 400."""
    with pytest.raises(GatewayError) as e:
        cut_vectors(answer, 2)
    assert e.value.status == 502


def test_merged_parts_must_answer_every_input() -> None:
    with pytest.raises(GatewayError) as e:
        _merge([(["a", "b"], {"data": [{"index": 0}, {"index": 1}]}), (["c", "d"], {"data": [{"index": 0}]})], 2)
    assert e.value.status == 502 and "1 embeddings for 2 inputs" in e.value.message
    with pytest.raises(GatewayError):
        _merge([(["a", "b"], {"data": [{"index": 0}, {"index": 0}]})], 2)
    merged = orjson.loads(
        _merge([(["a", "b"], {"data": [{"index": 1}, {"index": 0}]}), (["c"], {"data": [{"index": 0}]})], 2)
    )
    assert [d["index"] for d in merged["data"]] == [1, 0, 2]
