"""The exact-match result cache (er_gateway/cache.py): a hit never reaches vLLM, answers are
what vLLM gave, and a changed or restarted backend is never answered for from old entries."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import Backend, GatewayProc, start_backend, start_gateway, start_redis, wait_until
from hypothesis import given
from hypothesis import strategies as st
from test_coalesce import same_answer, word_tokenizer


def inputs(b: Backend) -> int:
    return int(b.stats()["inputs"])


def metric(gw: GatewayProc, name: str) -> float:
    text = gw.get("/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def gateway(tmp: Path, emb: Backend, rer: Backend | None = None, *extra: str, **kw: Any) -> GatewayProc:
    tmp.mkdir(parents=True, exist_ok=True)
    tok = str(word_tokenizer(tmp / "tokenizer.json"))
    args = ["--embedding-url", emb.url, "--embedding-tokenizer", tok, "--health-interval", "0.2"]
    if rer is not None:
        args += ["--reranker-url", rer.url, "--reranker-tokenizer", tok]
    else:
        args += ["--reranker-url", "none"]
    gw = start_gateway(tmp, *args, *extra, cache=True, **kw)
    wait_until(lambda: httpx.get(gw.url + "/health").status_code == 200, 10, "gateway healthy")
    return gw


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> tuple[Backend, Backend]:
    tmp = tmp_path_factory.mktemp("cache-backends")
    emb, rer = start_backend(tmp, "embedding"), start_backend(tmp, "rerank")
    yield emb, rer
    emb.stop()
    rer.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, backends: tuple[Backend, Backend]) -> GatewayProc:
    g = gateway(tmp_path_factory.mktemp("cache"), *backends)
    yield g
    g.stop()


def test_ingesting_the_same_documents_twice_sends_each_once(gw: GatewayProc, backends: tuple[Backend, Backend]) -> None:
    emb = backends[0]
    emb.admin(reset_stats=True)
    docs = [f"document {i} of the corpus, with words" for i in range(1000)]
    first = [gw.post("/v1/embeddings", {"input": docs[i : i + 100]}) for i in range(0, 1000, 100)]
    assert inputs(emb) == 1000 and all(r.headers["x-cache-hits"] == "0" for r in first)
    second = [gw.post("/v1/embeddings", {"input": docs[i : i + 100]}) for i in range(0, 1000, 100)]
    assert inputs(emb) == 1000  # 1,000 upstream inputs, not 2,000
    assert all(r.status_code == 200 and r.headers["x-cache-hits"] == "100" for r in second)
    for a, b in zip(first, second, strict=True):
        same_answer(a.json(), b.json())  # the same vectors, indexes, model and usage
    assert metric(gw, "er_cache_hits_total") >= 1000
    # base64 is another answer: asked for anew, then cached too
    b64 = gw.post("/v1/embeddings", {"input": docs[:3], "encoding_format": "base64"})
    assert b64.headers["x-cache-hits"] == "0" and inputs(emb) == 1003
    assert isinstance(b64.json()["data"][0]["embedding"], str)


def test_a_request_with_some_inputs_cached_sends_only_the_others(
    gw: GatewayProc, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    emb = backends[0]
    gw.post("/v1/embeddings", {"input": ["alpha one", "gamma three"]})
    emb.admin(reset_stats=True)
    mixed = gw.post("/v1/embeddings", {"input": ["alpha one", "beta two words", "gamma three"]})
    assert mixed.status_code == 200 and mixed.headers["x-cache-hits"] == "2"
    assert inputs(emb) == 1 and emb.stats()["last_body"]["input"] == ["beta two words"]
    plain = gateway(tmp_path / "nocache", emb, None, "--cache-size", "0")
    try:
        alone = plain.post("/v1/embeddings", {"input": ["alpha one", "beta two words", "gamma three"]})
        assert "x-cache-hits" not in alone.headers
        same_answer(mixed.json(), alone.json())  # order, index and usage (cached tokens counted)
        assert mixed.json()["usage"]["total_tokens"] == 3 + 4 + 3
    finally:
        plain.stop()


def test_instructions_and_dimensions_are_part_of_the_key(gw: GatewayProc, backends: tuple[Backend, Backend]) -> None:
    emb = backends[0]
    emb.admin(reset_stats=True)
    gw.post("/v1/embeddings", {"input": "what is paris", "input_type": "query"})
    as_doc = gw.post("/v1/embeddings", {"input": "what is paris"})
    small = gw.post("/v1/embeddings", {"input": "what is paris", "dimensions": 8})
    assert [as_doc.headers["x-cache-hits"], small.headers["x-cache-hits"]] == ["0", "0"]
    # 3 inputs; the stand-in is not Matryoshka: `dimensions` is refused once, then cut by the gateway
    assert inputs(emb) == 4 and len(small.json()["data"][0]["embedding"]) == 8
    again = gw.post("/v1/embeddings", {"input": "what is paris", "dimensions": 8})
    assert again.headers["x-cache-hits"] == "1" and again.json()["data"] == small.json()["data"]


def test_rerank_pairs_are_cached(gw: GatewayProc, backends: tuple[Backend, Backend]) -> None:
    rer = backends[1]
    rer.admin(reset_stats=True)
    body = {"query": "where is paris", "documents": ["paris is in france", "berlin", "a cat"], "top_n": 2}
    first = gw.post("/v1/rerank", body)
    again = gw.post("/v1/rerank", body)
    assert again.headers["x-cache-hits"] == "3" and inputs(rer) == 3
    same_answer(first.json(), again.json())
    more = gw.post("/v1/rerank", {**body, "documents": [*body["documents"], "paris at night"]})
    assert more.headers["x-cache-hits"] == "3" and inputs(rer) == 4
    assert rer.stats()["last_body"]["text_2"][0].startswith("<Document>: paris at night")
    other = gw.post("/v1/rerank", {**body, "instruction": "Find the city"})  # another prompt: no hits
    assert other.headers["x-cache-hits"] == "0" and inputs(rer) == 7
    batch = gw.post("/batch_rerank", {"requests": [body, body]})
    assert batch.status_code == 200 and batch.headers["x-cache-hits"] == "6" and inputs(rer) == 7


def test_cached_tokens_are_in_usage_but_not_charged_to_budgets(gw: GatewayProc) -> None:
    key = gw.cli("keys", "create", "--name", "budgeted", "--tpm", "1000").stdout.strip()
    wait_until(lambda: gw.get("/v1/models", key=key).status_code == 200, 5, "keys reloaded")
    text = {"input": "budgets count what vLLM does"}  # 5 words + 1 special token
    first = gw.post("/v1/embeddings", text, key=key)
    assert first.headers["x-cache-hits"] == "0"
    after_first = int(gw.get("/v1/models", key=key).headers["x-ratelimit-remaining-tokens"])
    assert after_first == 1000 - 6
    hit = gw.post("/v1/embeddings", text, key=key)
    assert hit.headers["x-cache-hits"] == "1" and hit.json()["usage"]["total_tokens"] == 6
    assert int(gw.get("/v1/models", key=key).headers["x-ratelimit-remaining-tokens"]) == after_first


def test_the_cache_stays_within_its_size(backends: tuple[Backend, Backend], tmp_path: Path) -> None:
    emb = backends[0]
    small = gateway(tmp_path, emb, None, "--cache-size", "0.02")  # 20 KiB
    try:
        for i in range(40):  # ~40 x 16 entries of 64 floats as JSON (~1.3 KB each): far more than fits
            assert small.post("/v1/embeddings", {"input": [f"text {i} {j}" for j in range(16)]}).status_code == 200
        held = metric(small, "er_cache_bytes")
        assert 0 < held <= 0.02 * 1024 * 1024
        emb.admin(reset_stats=True)
        assert small.post("/v1/embeddings", {"input": "text 0 0"}).headers["x-cache-hits"] == "0"  # evicted
        assert small.post("/v1/embeddings", {"input": "text 39 15"}).headers["x-cache-hits"] == "1"  # recent
    finally:
        small.stop()


def test_a_backend_restart_or_a_new_served_name_starts_afresh(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    port = int(emb.url.rsplit(":", 1)[1])
    g = gateway(tmp_path / "gw", emb)
    try:
        assert g.post("/v1/embeddings", {"input": "kept until a restart"}).headers["x-cache-hits"] == "0"
        assert g.post("/v1/embeddings", {"input": "kept until a restart"}).headers["x-cache-hits"] == "1"
        emb.stop()
        wait_until(lambda: httpx.get(g.url + "/health").status_code == 503, 10, "restart seen")
        emb = start_backend(tmp_path, "embedding", port=port)  # the same URL, perhaps new weights
        wait_until(lambda: httpx.get(g.url + "/health").status_code == 200, 10, "back")
        time.sleep(0.5)  # one more health interval: the epoch moves
        assert g.post("/v1/embeddings", {"input": "kept until a restart"}).headers["x-cache-hits"] == "0"
        assert g.post("/v1/embeddings", {"input": "kept until a restart"}).headers["x-cache-hits"] == "1"
        emb.stop()
        emb = start_backend(tmp_path, "embedding", name="Qwen3-Embedding-4B", port=port)
        wait_until(lambda: "Qwen3-Embedding-4B" in httpx.get(g.url + "/health").text, 10, "new name seen")
        r = g.post("/v1/embeddings", {"input": "kept until a restart"})
        assert r.headers["x-cache-hits"] == "0" and r.json()["model"] == "Qwen3-Embedding-4B"
    finally:
        g.stop()
        emb.stop()


def test_gateways_share_the_cache_and_its_epochs_through_redis(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    emb = start_backend(tmp_path, "embedding")
    port = int(emb.url.rsplit(":", 1)[1])
    a = gateway(tmp_path / "a", emb, None, "--redis-url", redis.url)
    b = gateway(tmp_path / "b", emb, None, "--redis-url", redis.url, keys_file=a.keys_file)
    b.key = a.key
    try:
        first = a.post("/v1/embeddings", {"input": ["shared one", "shared two"]})
        emb.admin(reset_stats=True)
        wait_until(
            lambda: b.post("/v1/embeddings", {"input": ["shared one", "shared two"]}).headers["x-cache-hits"] == "2",
            5,
            "b finds a's entries",
        )
        assert inputs(emb) == 0
        same_answer(first.json(), b.post("/v1/embeddings", {"input": ["shared one", "shared two"]}).json())
        # a restart seen by the gateways moves the shared epoch; a gateway started after it,
        # which saw nothing, reads that epoch and does not answer from the old entries
        emb.stop()
        wait_until(lambda: httpx.get(a.url + "/health").status_code == 503, 10, "restart seen")
        emb = start_backend(tmp_path, "embedding", port=port)
        wait_until(lambda: httpx.get(a.url + "/health").status_code == 200, 10, "back")
        time.sleep(0.5)
        c = gateway(tmp_path / "c", emb, None, "--redis-url", redis.url, keys_file=a.keys_file)
        c.key = a.key
        try:
            assert c.post("/v1/embeddings", {"input": "shared one"}).headers["x-cache-hits"] == "0"
        finally:
            c.stop()
    finally:
        for p in (a, b, emb, redis):
            p.stop()


def test_a_dead_redis_costs_hits_never_answers(tmp_path: Path, backends: tuple[Backend, Backend]) -> None:
    with __import__("socket").socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    g = gateway(tmp_path, backends[0], None, "--redis-url", dead, "--redis-failure-mode", "open")
    try:
        for _ in range(3):
            r = g.post("/v1/embeddings", {"input": "redis is down"})
            assert r.status_code == 200, r.text
        assert r.headers["x-cache-hits"] == "1"  # memory still answers
    finally:
        g.stop()


def test_no_cache_with_cache_size_0(backends: tuple[Backend, Backend], tmp_path: Path) -> None:
    emb = backends[0]
    g = gateway(tmp_path, emb, None, "--cache-size", "0")
    try:
        emb.admin(reset_stats=True)
        for _ in range(2):
            r = g.post("/v1/embeddings", {"input": "not kept"})
            assert "x-cache-hits" not in r.headers
        assert inputs(emb) == 2
    finally:
        g.stop()


# ---- the one-input fast path: what it finds without decoding equals what decoding finds -----------
@given(
    st.one_of(
        st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=64),
        st.binary(min_size=4, max_size=64).map(lambda b: __import__("base64").b64encode(b).decode()),
    ),
    st.dictionaries(st.sampled_from(["completion_tokens", "prompt_tokens_details", "x"]), st.none(), max_size=3),
    st.integers(0, 10**6),
    st.booleans(),
)
def test_only_embedding_agrees_with_a_json_decoder(
    embedding: Any, extra: dict[str, Any], tokens: int, two: bool
) -> None:
    from er_gateway.embeddings import _only_embedding

    items = [{"index": i, "object": "embedding", "embedding": embedding} for i in range(2 if two else 1)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, **extra}
    body = orjson.dumps({"id": "embd-1", "object": "list", "created": 1, "model": "m", "data": items, "usage": usage})
    found = _only_embedding(body)
    if two:
        assert found is None  # not a one-input answer: decoded the slow way
    else:
        assert found is not None
        value, at = found
        assert orjson.loads(value) == orjson.loads(body)["data"][0]["embedding"]
        assert orjson.loads(body[at:-1]) == usage


def test_one_key_cannot_learn_what_another_embedded(
    gw: GatewayProc, backends: tuple[Backend, Backend], tmp_path: Path
) -> None:
    """With the default --cache-scope key, X-Cache-Hits (and the time a hit saves) cannot tell a
    tenant whether another tenant has embedded a text; --cache-scope shared lets them share."""
    other = gw.cli("keys", "create", "--name", "tenant-b", "--rpm", "1000").stdout.strip()
    wait_until(lambda: gw.get("/v1/models", key=other).status_code == 200, 5, "keys reloaded")
    secret = {"input": "patient 4711 has a rare condition"}
    assert gw.post("/v1/embeddings", secret).headers["x-cache-hits"] == "0"
    assert gw.post("/v1/embeddings", secret, key=other).headers["x-cache-hits"] == "0"
    assert gw.post("/v1/embeddings", secret).headers["x-cache-hits"] == "1"
    rerank = {"query": "who is ill", "documents": ["patient 4711"]}
    gw.post("/v1/rerank", rerank)
    assert gw.post("/v1/rerank", rerank, key=other).headers["x-cache-hits"] == "0"
    shared = start_gateway(
        tmp_path, "--embedding-url", backends[0].url, "--reranker-url", "none", "--cache-scope", "shared",
        cache=True, keys_file=gw.keys_file,
    )  # fmt: skip
    shared.key = gw.key
    try:
        wait_until(lambda: httpx.get(shared.url + "/health").status_code == 200, 10, "gateway healthy")
        shared.post("/v1/embeddings", secret)
        assert shared.post("/v1/embeddings", secret, key=other).headers["x-cache-hits"] == "1"
    finally:
        shared.stop()


async def test_an_epoch_never_goes_back(tmp_path: Path) -> None:
    """A restart seen while Redis is unreachable is told to Redis later, and an epoch Redis lost
    (restarted without persistence, evicted) never brings old entries back."""
    from er_gateway.cache import ResultCache

    redis = start_redis(tmp_path)
    cache = ResultCache(1 << 20, redis.url)
    try:
        await cache.sync_epochs({"fp": 0})
        before = cache.namespace("fp", b"{}", "")
        cache._skip_redis_until = time.monotonic() + 60  # Redis is being skipped (its breaker is open)
        await cache.sync_epochs({"fp": 1})  # a replica came back
        after_restart = cache.namespace("fp", b"{}", "")
        assert after_restart != before
        cache._skip_redis_until = 0.0
        await cache.sync_epochs({"fp": 1})  # now Redis hears of it
        assert cache.redis is not None and int(await cache.redis.get(b"er:cache-epoch:fp")) == 1
        assert cache.namespace("fp", b"{}", "") == after_restart
        await cache.redis.flushall()  # Redis forgets every epoch
        await cache.sync_epochs({"fp": 1})
        assert cache.namespace("fp", b"{}", "") == after_restart  # not back to `before`
    finally:
        await cache.close()
        redis.stop()


async def test_entries_expire_in_redis_after_the_ttl(tmp_path: Path) -> None:
    """--cache-ttl bounds what Redis holds: every entry is written with that expiry."""
    from er_gateway.cache import PREFIX, ResultCache, entry

    redis = start_redis(tmp_path)
    cache = ResultCache(1 << 20, redis.url, ttl=2)
    try:
        key = cache.keys(cache.namespace("fp", b"{}", ""), ["expires"])[0]
        cache.put_many([(key, entry(3, b"[0.5]"))])
        await cache.close()  # waits for the background write
        cache = ResultCache(1 << 20, redis.url, ttl=2)  # a gateway with nothing in memory
        assert cache.redis is not None
        assert 0 < await cache.redis.ttl(PREFIX + key) <= 2
        assert await cache.known([key], "m") == {0: (3, b"[0.5]")}
        await asyncio.sleep(2.2)
        await cache.close()
        cache = ResultCache(1 << 20, redis.url)
        assert await cache.known([key], "m") == {}
    finally:
        await cache.close()
        redis.stop()


def test_cache_settings_are_checked() -> None:
    from er_gateway.settings import SettingsError, load_settings

    for env in ({"ER_CACHE_SIZE": "-1"}, {"ER_CACHE_TTL": "0"}, {"ER_CACHE_SCOPE": "everyone"}):
        with pytest.raises(SettingsError):
            load_settings({}, env)
