"""Qwen3 semantics and the first release's API (/rerank superset, /batch_rerank, /reload_model, /health)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import EMB, RER, Stack, run_cli, start_backend, start_gateway, wait_until

from er_gateway.qwen3 import embedding_query, rerank_document_part, rerank_query_part
from er_gateway.settings import DEFAULT_INSTRUCTION


def test_embedding_instruction_wraps_queries_only(stack: Stack) -> None:
    stack.gw.post("/v1/embeddings", {"input": ["q1", "q2"], "instruction": "Find it"})
    assert stack.emb.stats()["last_body"] == {
        "input": [embedding_query("q1", "Find it"), embedding_query("q2", "Find it")]
    }
    stack.gw.post("/v1/embeddings", {"input": "q", "input_type": "query"})
    assert stack.emb.stats()["last_body"]["input"] == embedding_query("q", DEFAULT_INSTRUCTION)
    stack.gw.post("/v1/embeddings", {"input": "doc", "input_type": "document", "instruction": "ignored"})
    assert stack.emb.stats()["last_body"] == {"input": "doc"}
    r = stack.gw.post("/v1/embeddings", {"input": [1, 2, 3], "input_type": "query"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_rerank_instruction_on_every_route(stack: Stack) -> None:
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        stack.gw.post(path, {"query": "q", "documents": ["d"], "instruction": f"I{path}"})
        assert stack.rer.stats()["last_body"]["text_1"] == rerank_query_part("q", f"I{path}")
    stack.gw.post("/batch_rerank", [{"query": "q", "documents": ["d"], "instruction": "Ib"}])
    assert stack.rer.stats()["last_body"]["text_1"] == rerank_query_part("q", "Ib")


def test_truncate_prompt_tokens_is_refused_for_qwen3(stack: Stack) -> None:
    r = stack.gw.post("/v1/rerank", {"query": "q", "documents": ["d"], "truncate_prompt_tokens": -1})
    assert r.status_code == 400 and "max_length" in r.json()["error"]["message"]


def test_max_length_cuts_documents_only(stack: Stack) -> None:
    doc = "one two three four five six seven"
    r = stack.gw.post("/rerank", {"query": "q", "documents": [doc, "short"], "max_length": 3})
    assert r.status_code == 200, r.text
    sent = stack.rer.stats()["last_body"]["text_2"]
    assert sent == [rerank_document_part("one two three"), rerank_document_part("short")]
    assert r.json()["ranked_documents"][0]["document"] in (doc, "short")  # originals returned


def test_over_long_document_error_names_its_index(stack: Stack) -> None:
    long = " ".join(["word"] * 600)
    r = stack.gw.post("/rerank", {"query": "q", "documents": ["fine", long, "also fine"]})
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert "document 1 " in e["message"] and e["param"] == "documents[1]"


def test_batch_rerank_order_and_partial_failure(stack: Stack) -> None:
    items = [
        {"query": "capital of France", "documents": ["Paris capital France", "Berlin"]},
        {"query": "q", "documents": []},
        {"model": "nope", "query": "q", "documents": ["d"]},
        {"query": "Berlin", "documents": ["Paris", "Berlin Germany"], "top_n": 1, "return_documents": False},
    ]
    r = stack.gw.post("/batch_rerank", items)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out) == 4
    assert out[0]["results"][0]["document"]["text"] == items[0]["documents"][out[0]["results"][0]["index"]]
    assert out[1]["error"]["code"] == 400 and out[1]["error"]["param"] == "documents"
    assert out[2]["error"]["code"] == 404
    assert len(out[3]["results"]) == 1 and "document" not in out[3]["results"][0]
    assert out[3]["ranked_documents"][0]["document"] == items[3]["documents"][out[3]["results"][0]["index"]]
    r = stack.gw.post("/batch_rerank", {"requests": items[:1]})
    assert r.status_code == 200 and "results" in r.json()[0]
    for bad in ([], {}, "x"):
        assert stack.gw.post("/batch_rerank", bad).status_code == 400


def test_batch_rerank_items_count_against_the_rate_limit(stack: Stack) -> None:
    key = stack.gw.cli("keys", "create", "--name", "batch3", "--rpm", "3").stdout.strip()
    os.kill(stack.gw.proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    items = [{"query": "q", "documents": ["d"]} for _ in range(5)]
    r = stack.gw.post("/batch_rerank", items, key=key)  # 5 items do not fit 3/minute: refused whole
    assert r.status_code == 429 and r.json()["error"]["code"] == 429
    out = stack.gw.post("/batch_rerank", items[:3], key=key).json()
    assert all("results" in o for o in out)
    assert stack.gw.post("/v1/rerank", items[0], key=key).status_code == 429


def test_server_prompt_mode_sends_raw_text_and_instruction(tmp_path: Path) -> None:
    rer = start_backend(tmp_path, "rerank")
    gw = start_gateway(tmp_path, "--reranker-url", rer.url, "--reranker-prompt", "server")
    try:
        r = gw.post("/v1/rerank", {"query": "q", "documents": ["d1", {"text": "d2"}], "instruction": "Do"})
        assert r.status_code == 200
        body = rer.stats()["last_body"]
        assert body["text_1"] == "q" and body["text_2"] == ["d1", "d2"]
        assert body["instruction"] == "Do" and body["chat_template_kwargs"] == {"instruction": "Do"}
    finally:
        gw.stop()
        rer.stop()


def test_reload_model_swaps_config_and_keeps_in_flight(tmp_path: Path) -> None:
    slow = start_backend(tmp_path, "embedding", extra=["--delay", "1.5"])
    other = start_backend(tmp_path, "embedding", name="Other-Embedding")
    rer = start_backend(tmp_path, "rerank")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(
        f"models:\n  - {{name: {EMB}, kind: embedding, urls: [{slow.url}]}}\n"
        f"  - {{name: {RER}, kind: rerank, urls: [{rer.url}]}}\n"
    )
    gw = start_gateway(tmp_path, "--config", str(cfg))
    try:
        result: dict[str, int] = {}

        def in_flight() -> None:
            result["status"] = gw.post("/v1/embeddings", {"input": "x"}).status_code

        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(0.4)
        cfg.write_text(
            f"models:\n  - {{name: {EMB}, kind: embedding, urls: [{slow.url}]}}\n"
            f"  - {{name: Other-Embedding, kind: embedding, urls: [{other.url}], aliases: [alias-e]}}\n"
            f"  - {{name: {RER}, kind: rerank, urls: [{rer.url}], prompt: none}}\n"
        )
        r = gw.post("/reload_model")
        assert r.status_code == 200, r.text
        names = {m["name"]: m for m in r.json()["models"]}
        assert set(names) == {EMB, "Other-Embedding", RER} and names[RER]["prompt"] == "none"
        t.join(10)
        assert result["status"] == 200  # finished on the old configuration
        r = gw.post("/v1/embeddings", {"model": "alias-e", "input": "x"})
        assert r.status_code == 200 and other.stats()["last_body"]["model"] == "Other-Embedding"
        gw.post("/v1/rerank", {"query": "q", "documents": ["d"]})
        assert rer.stats()["last_body"]["text_1"] == "q"  # prompt mode none now
        cfg.write_text("models: [oops")
        r = gw.post("/reload_model")
        assert r.status_code == 400 and "old configuration kept" in r.json()["error"]["message"]
        assert gw.post("/v1/embeddings", {"model": "alias-e", "input": "x"}).status_code == 200
    finally:
        for p in (gw, slow, other, rer):
            p.stop()


def test_health_degraded_and_unhealthy(tmp_path: Path) -> None:
    e1 = start_backend(tmp_path, "embedding")
    e2 = start_backend(tmp_path, "embedding")
    rer = start_backend(tmp_path, "rerank")
    gw = start_gateway(
        tmp_path, "--embedding-url", f"{e1.url},{e2.url}", "--reranker-url", rer.url, "--health-interval", "0.3"
    )
    try:
        wait_until(lambda: httpx.get(gw.url + "/health").json()["status"] == "healthy", 5, "healthy")
        e2.stop()
        wait_until(lambda: httpx.get(gw.url + "/health").json()["status"] == "degraded", 5, "degraded")
        h = httpx.get(gw.url + "/health")
        assert h.status_code == 200 and h.json()["model_loaded"] is True
        bad = [r for r in h.json()["models"][EMB]["replicas"] if not r["healthy"]]
        assert bad[0]["replica"] == 1 and bad[0]["last_error"]
        e1.stop()
        # no embedding replica left: that model is not ready, but the reranker still serves
        wait_until(lambda: httpx.get(gw.url + f"/health?model={EMB}").status_code == 503, 5, "embedding down")
        h = httpx.get(gw.url + "/health")
        assert h.status_code == 200 and h.json()["status"] == "degraded" and h.json()["model_loaded"] is True
        assert h.json()["models"][EMB]["ready"] is False and h.json()["models"][RER]["ready"] is True
        assert httpx.get(gw.url + f"/health?model={RER}").status_code == 200
        missing = httpx.get(gw.url + "/health?model=nope")
        assert missing.status_code == 404 and RER in missing.json()["error"]["message"]
        start = time.monotonic()
        r = gw.post("/v1/embeddings", {"input": "x"})
        assert r.status_code == 503 and "Retry-After" in r.headers and time.monotonic() - start < 1
        assert gw.post("/v1/rerank", {"query": "q", "documents": ["d"]}).status_code == 200
        rer.stop()  # now nothing can serve
        wait_until(lambda: httpx.get(gw.url + "/health").status_code == 503, 5, "unhealthy")
        h = httpx.get(gw.url + "/health").json()
        assert h["status"] == "unhealthy" and h["model_loaded"] is False
    finally:
        for p in (gw, e1, e2, rer):
            p.stop()


def test_a_reranker_only_host(tmp_path: Path) -> None:
    """`--embedding-url none`: the gateway serves the reranker alone and is healthy."""
    rer = start_backend(tmp_path, "rerank")
    gw = start_gateway(tmp_path, "--embedding-url", "none", "--reranker-url", rer.url)
    try:
        h = httpx.get(gw.url + "/health")
        assert h.status_code == 200 and h.json()["status"] == "healthy" and list(h.json()["models"]) == [RER]
        assert gw.post("/rerank", {"query": "q", "documents": ["a", "b"]}).status_code == 200
        r = gw.post("/v1/embeddings", {"input": "x"})
        assert r.status_code == 404 and "no embedding model is configured" in r.json()["error"]["message"]
        assert [m["id"] for m in gw.get("/v1/models").json()["data"]] == [RER]
    finally:
        gw.stop()
        rer.stop()
    r = run_cli("--embedding-url", "none", "--reranker-url", "none", "--port", "1")
    assert r.returncode == 2 and "no model to serve" in r.stderr


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
def test_rerank_top_n_zero_means_all(stack: Stack, path: str) -> None:
    r = stack.gw.post(path, {"query": "q", "documents": ["a", "b", "c"], "top_n": 0})
    assert len(r.json()["results"]) == 3


def test_max_length_over_the_context_is_lowered_to_fit(stack: Stack) -> None:
    """Older clients send max_length 8192 to a model whose context is smaller (here 512)."""
    long = " ".join(["word"] * 3000)
    r = stack.gw.post("/rerank", {"query": "q", "documents": [long, "short"], "max_length": 8192})
    assert r.status_code == 200, r.text
    applied = int(r.headers["X-Max-Length-Applied"])
    frame = rerank_query_part("q", DEFAULT_INSTRUCTION) + rerank_document_part("")
    # The context less the query and template as the backend's /tokenize counts them (the stand-in
    # counts words), not less a byte bound, which would cut far more than needed.
    assert applied == 512 - len(frame.split()) - 2
    sent = stack.rer.stats()["last_body"]["text_2"][0]
    assert (
        sent.startswith(rerank_document_part("")[:12] + "word word") and applied <= len(sent.split()) < 512
    )  # cut to fit, not refused
    assert len(r.json()["scores"]) == 2
    r = stack.gw.post("/rerank", {"query": "q", "documents": [long], "max_length": 100})
    assert r.status_code == 200 and "X-Max-Length-Applied" not in r.headers  # already fits


def test_reload_with_settings_is_a_409_naming_the_command_when_unmanaged(stack: Stack) -> None:
    """The reload body on a gateway that does not manage vLLM: never a silent 200."""
    seed = {
        "model_path": "/models/Qwen3-Reranker-4B",
        "model_size": "4B",
        "gpu_memory_utilization": 0.8,
        "max_model_len": 4096,
    }
    r = stack.gw.post("/reload_model", seed)
    assert r.status_code == 409, r.text
    msg = r.json()["error"]["message"]
    assert (
        "RERANKER_MODEL_PATH=/models/Qwen3-Reranker-4B MODEL_SIZE=4B RERANKER_GPU_MEMORY_UTILIZATION=0.8 "
        "MAX_MODEL_LEN=4096 ./start_vllm_models.sh --restart --only reranker"
    ) in msg
    assert "--manage-models" in msg
    r = stack.gw.post("/reload_model", {"kind": "embedding", "model_size": "8B"})
    assert r.status_code == 409 and "MODEL_SIZE=8B ./start_vllm_models.sh --restart --only embedding" in r.text
    r = stack.gw.post("/reload_model", {"model_pth": "/x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_pth"
    r = stack.gw.post("/reload_model", {"model_path": "--trust-remote-code"})  # would be read as a vLLM option
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_path"
    r = stack.gw.post("/reload_model", {"model_path": "/m\nforged log line"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_path"
    r = stack.gw.post("/reload_model", {"model_size": "5B"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model_size"
    assert stack.gw.post("/reload_model", {}).json()["status"] == "reloaded"  # {}: re-read the files
