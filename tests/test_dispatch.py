"""The dispatch layer (er_gateway/dispatch.py): time is wall-clock spans, non-JSON is a 502 on
every upstream endpoint, and a route's own bookkeeping (`items`) is not overwritten."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest
from conftest import RER, Backend, GatewayProc, start_backend, start_gateway, wait_until


def overhead(r: httpx.Response) -> float:
    return float(r.headers["x-gateway-overhead-ms"])


def access_line(gw: GatewayProc, request_id: str) -> str:
    log = gw.logs / "access.log"
    pattern = re.compile(rf"request_id={re.escape(request_id)} ")
    wait_until(lambda: log.exists() and pattern.search(log.read_text()), 5, "access-log line")
    return next(line for line in log.read_text().splitlines() if pattern.search(line))


def field(line: str, name: str) -> str:
    m = re.search(rf" {name}=(\S+)", line)
    assert m, (name, line)
    return m.group(1)


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> tuple[GatewayProc, list[Backend], list[Backend]]:
    tmp = tmp_path_factory.mktemp("dispatch")
    embs = [start_backend(tmp, "embedding") for _ in range(2)]
    rers = [start_backend(tmp, "rerank") for _ in range(2)]
    urls = ["--embedding-url", ",".join(b.url for b in embs), "--reranker-url", ",".join(b.url for b in rers)]
    gw = start_gateway(tmp / "gw", *urls, "--max-batch-inputs", "4", "--max-batch-docs", "2", "--eject-cooldown", "0")
    yield gw, embs, rers
    gw.stop()
    for b in (*embs, *rers):
        b.stop()


def test_a_retried_request_counts_both_attempts_as_upstream(
    split: tuple[GatewayProc, list[Backend], list[Backend]],
) -> None:
    """The first embeddings request goes to replica 0, which waits 0.3 s and answers 503: the
    gateway retries on replica 1. Both attempts are upstream time, none of it overhead."""
    gw, embs, _ = split
    embs[0].admin(fault="503", delay=0.3)
    try:
        r = gw.post("/v1/embeddings", {"input": "hello"}, headers={"X-Request-ID": "retried-1"})
    finally:
        embs[0].admin(fault=None, delay=0)
    assert r.status_code == 200, r.text
    line = access_line(gw, "retried-1")
    assert field(line, "retries") == "1"
    assert float(field(line, "upstream_ms")) >= 300
    assert 0 <= overhead(r) < 100, overhead(r)


def test_a_request_that_fails_after_retrying_logs_its_retries(
    split: tuple[GatewayProc, list[Backend], list[Backend]],
) -> None:
    gw, embs, _ = split
    for b in embs:
        b.admin(fault="503")
    try:
        r = gw.post("/v1/embeddings", {"input": "hello"}, headers={"X-Request-ID": "retried-2"})
    finally:
        for b in embs:
            b.admin(fault=None)
    assert r.status_code == 503, r.text
    line = access_line(gw, "retried-2")
    assert field(line, "retries") == "1" and field(line, "replica") != "-"
    assert 'er_upstream_retries_total{model="Qwen3-Embedding-0.6B"}' in httpx.get(gw.url + "/metrics").text


def test_overhead_is_never_negative_on_split_requests(split: tuple[GatewayProc, list[Backend], list[Backend]]) -> None:
    """40 inputs in 10 parts and 10 documents in 5, each part 0.1 s upstream, sent at once: summed,
    upstream time would be ~1 s and the overhead ~-0.9 s."""
    gw, embs, rers = split
    for b in (*embs, *rers):
        b.admin(delay=0.1)
    try:
        r = gw.post("/v1/embeddings", {"input": [f"text {i}" for i in range(40)]}, headers={"X-Request-ID": "split-e"})
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 40
        assert overhead(r) >= 0, overhead(r)
        line = access_line(gw, "split-e")
        assert field(line, "items") == "40"
        assert float(field(line, "upstream_ms")) <= float(field(line, "total_ms"))

        r = gw.post("/v1/rerank", {"query": "q", "documents": [f"d {i}" for i in range(10)]})
        assert r.status_code == 200, r.text
        assert overhead(r) >= 0, overhead(r)
    finally:
        for b in (*embs, *rers):
            b.admin(delay=0)


def test_batch_rerank_overhead_and_items(split: tuple[GatewayProc, list[Backend], list[Backend]]) -> None:
    """5 items of 4 documents (2 parts each), up to 4 items at a time: the access log says 5 items
    (the route's count, not the last item's 4) and the overhead is not negative."""
    gw, _, rers = split
    for b in rers:
        b.admin(delay=0.1)
    try:
        items = [{"model": RER, "query": f"q{i}", "documents": ["a", "b", "c", "d"]} for i in range(5)]
        r = gw.post("/batch_rerank", items, headers={"X-Request-ID": "batch-5"})
    finally:
        for b in rers:
            b.admin(delay=0)
    assert r.status_code == 200, r.text
    assert all("results" in item for item in r.json())
    assert overhead(r) >= 0, overhead(r)
    line = access_line(gw, "batch-5")
    assert field(line, "items") == "5"
    assert float(field(line, "upstream_ms")) <= float(field(line, "total_ms"))


def test_non_json_from_tokenize_is_a_502(tmp_path: Path) -> None:
    """Without a tokenizer, `max_length` truncates through vLLM's /tokenize: an answer there that
    is not JSON is the backend's fault (502 in the envelope), as it is on /score."""
    rer = start_backend(tmp_path, "rerank", name="plain-reranker")
    gw = start_gateway(
        tmp_path / "gw", "--embedding-url", "none", "--reranker-url", rer.url, "--reranker-model", "plain-reranker"
    )
    try:
        rer.admin(fault="garbage", fault_path="/tokenize")
        body = {"query": "q", "documents": ["a long document " * 20], "max_length": 4}
        t0 = time.monotonic()
        r = gw.post("/v1/rerank", body)
        assert r.status_code == 502, r.text
        err = r.json()["error"]
        assert err["code"] == 502 and "/tokenize" in err["message"]
        assert time.monotonic() - t0 < 5
        assert gw.post("/v1/rerank", {"query": "q", "documents": ["short"]}).status_code == 200  # /score is fine
        rer.admin(fault="garbage", fault_path="/score")
        r = gw.post("/v1/rerank", {"query": "q", "documents": ["short"]})
        assert r.status_code == 502 and "/score" in r.json()["error"]["message"]
    finally:
        gw.stop()
        rer.stop()


def test_half_a_json_answer_is_a_502_and_ejects_the_replica(tmp_path: Path) -> None:
    """An answer that starts like JSON and is cut off is not passed through as a 200."""
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path / "gw", "--embedding-url", emb.url, "--reranker-url", "none")
    try:
        emb.admin(fault="truncated")
        r = gw.post("/v1/embeddings", {"input": "x"})
        assert r.status_code == 502, r.text
        assert "not a JSON object" in r.json()["error"]["message"]
        replica = gw.get("/health").json()["models"]["Qwen3-Embedding-0.6B"]["replicas"][0]
        assert replica["last_error"].startswith("bad_answer:")
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'er_upstream_errors_total{kind="bad_answer",model="Qwen3-Embedding-0.6B",replica="0"} 1.0' in metrics
    finally:
        gw.stop()
        emb.stop()


def test_no_upstream_call_outlives_its_request(tmp_path: Path) -> None:
    """Nine documents truncated through vLLM's /tokenize, four at a time, all failing: the answer
    comes once every call has finished, so none runs on (holding a slot) after it."""
    rer = start_backend(tmp_path, "rerank", name="plain-reranker")
    gw = start_gateway(
        tmp_path / "gw", "--embedding-url", "none", "--reranker-url", rer.url, "--reranker-model", "plain-reranker"
    )
    try:
        rer.admin(fault="503", fault_path="/tokenize", delay=0.2)
        body = {"query": "q", "documents": [f"document {i} " * 20 for i in range(9)], "max_length": 4}
        r = gw.post("/v1/rerank", body)
        assert r.status_code == 503, r.text
        calls = rer.stats()["by_path"]["/tokenize"]
        time.sleep(0.6)  # three more rounds of 0.2 s, had anything been left running
        assert rer.stats()["by_path"]["/tokenize"] == calls
        assert rer.stats()["current"] == 0
    finally:
        gw.stop()
        rer.stop()
