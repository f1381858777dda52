"""Coalescing (er_gateway/coalesce.py): concurrent small requests share one upstream call, and
each client still gets exactly what it would have got alone.

The stand-in vLLM answers after `DELAY`, so a first request keeps the model busy while the
others arrive; they then wait (`--coalesce-wait-ms 100` here) and go upstream together. A
second gateway with `--no-coalesce` in front of the same stand-ins gives the answers "alone".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from conftest import Backend, GatewayProc, start_backend, start_gateway, wait_until
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from er_gateway.coalesce import apportion

DELAY = 0.3  # seconds the stand-ins take per call


def word_tokenizer(path: Path) -> Path:
    """A tokenizer.json that counts what the stand-in counts (one token a word, before the one
    special token it adds per input), standing in for the model's own."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


@dataclass
class Pair:
    co: GatewayProc  # coalescing
    alone: GatewayProc  # --no-coalesce, same backends and keys
    emb: Backend
    rer: Backend


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("coalesce")
    emb = start_backend(tmp, "embedding", extra=["--delay", str(DELAY)])
    rer = start_backend(tmp, "rerank", extra=["--delay", str(DELAY)])
    tok = str(word_tokenizer(tmp / "tokenizer.json"))
    common = ["--embedding-url", emb.url, "--reranker-url", rer.url, "--embedding-tokenizer", tok]
    common += ["--reranker-tokenizer", tok, "--health-interval", "0.5", "--eject-cooldown", "0"]
    co = start_gateway(
        tmp / "co", *common, "--coalesce-wait-ms", "100", "--coalesce-max-inputs", "32",
        "--coalesce-max-tokens", "20000",
    )  # fmt: skip
    alone = start_gateway(tmp / "alone", *common, "--no-coalesce", keys_file=co.keys_file)
    alone.key = co.key
    for gw in (co, alone):
        wait_until(lambda gw=gw: httpx.get(gw.url + "/health").status_code == 200, 10, "gateway healthy")
    yield Pair(co, alone, emb, rer)
    for p in (co, alone, emb, rer):
        p.stop()


def calls(b: Backend, path: str) -> int:
    return int(b.stats()["by_path"].get(path, 0))


def reset(*backends: Backend) -> None:
    for b in backends:
        b.admin(reset_stats=True, fault=None)


async def burst(gw: GatewayProc, path: str, bodies: list[Any], **kw: Any) -> list[httpx.Response]:
    """One request to make the model busy, then `bodies` at once (they merge while it runs)."""
    headers = kw.pop("headers", None) or [{} for _ in bodies]
    key = kw.pop("key", gw.key)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, **kw) as c:

        async def post(body: Any, h: dict[str, str]) -> httpx.Response:
            return await c.post(path, json=body, headers={"Authorization": f"Bearer {key}", **h})

        pacer = asyncio.create_task(post(bodies[0], {}))
        await asyncio.sleep(DELAY / 3)
        answers = await asyncio.gather(*(post(b, h) for b, h in zip(bodies, headers, strict=True)))
        await pacer
        return list(answers)


def alone(gw: GatewayProc, path: str, bodies: list[Any]) -> list[httpx.Response]:
    return asyncio.run(_sequential(gw, path, bodies))


async def _sequential(gw: GatewayProc, path: str, bodies: list[Any]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30, headers={"Authorization": f"Bearer {gw.key}"}) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def same_answer(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Equal but for what differs between any two calls (`id`, `created`)."""
    assert {k: v for k, v in a.items() if k not in ("id", "created")} == {
        k: v for k, v in b.items() if k not in ("id", "created")
    }


def log_lines(gw: GatewayProc, request_ids: list[str]) -> dict[str, str]:
    log = gw.logs / "access.log"

    def found() -> dict[str, str]:
        lines = log.read_text().splitlines() if log.exists() else []
        out = {}
        for line in lines:
            m = re.search(r"request_id=(\S+) ", line)
            if m and m.group(1) in request_ids:
                out[m.group(1)] = line
        return out

    wait_until(lambda: len(found()) == len(request_ids), 5, "access-log lines")
    return found()


# ---- embeddings -----------------------------------------------------------------------------
def test_concurrent_embeddings_share_one_call_and_each_gets_its_own_answer(pair: Pair) -> None:
    reset(pair.emb)
    bodies: list[dict[str, Any]] = [{"input": f"query number {i} " + "word " * i} for i in range(12)]
    bodies += [{"input": [f"doc {i} a", f"doc {i} b c"]} for i in range(4)]  # members of 2 inputs
    answers = asyncio.run(burst(pair.co, "/v1/embeddings", bodies))
    assert [r.status_code for r in answers] == [200] * len(bodies)
    # the pacer alone, then 12 + 8 = 20 inputs in one call (--coalesce-max-inputs 32)
    assert calls(pair.emb, "/v1/embeddings") == 2
    expected = alone(pair.alone, "/v1/embeddings", bodies)
    for got, want in zip(answers, expected, strict=True):
        same_answer(got.json(), want.json())  # vectors, their order and index, the model, usage
    assert answers[0].json()["usage"]["total_tokens"] == 4  # "query number 0" + 1 special token
    assert answers[-1].json()["usage"]["total_tokens"] == 4 + 5  # "doc 3 a", "doc 3 b c"
    ids = {r.json()["id"] for r in answers}
    assert len(ids) == len(answers)  # each answer its own id


def test_members_are_merged_only_with_the_same_parameters(pair: Pair) -> None:
    reset(pair.emb)
    bodies = [{"input": f"text {i}", "encoding_format": "base64" if i % 2 else "float"} for i in range(10)]
    answers = asyncio.run(burst(pair.co, "/v1/embeddings", bodies))
    assert calls(pair.emb, "/v1/embeddings") == 3  # the pacer, one call per encoding_format
    for got, want in zip(answers, alone(pair.alone, "/v1/embeddings", bodies), strict=True):
        same_answer(got.json(), want.json())
    assert isinstance(answers[1].json()["data"][0]["embedding"], str)


def test_flushes_at_max_inputs_and_sends_big_requests_alone(pair: Pair) -> None:
    reset(pair.emb)
    bodies: list[dict[str, Any]] = [{"input": [f"q {i} {j}" for j in range(8)]} for i in range(6)]  # 48 inputs
    bodies.append({"input": "x" * 21000})  # 21,000 bytes > --coalesce-max-tokens 20000: alone
    answers = asyncio.run(burst(pair.co, "/v1/embeddings", bodies))
    assert [r.status_code for r in answers] == [200] * 7
    # pacer + 48 inputs in calls of at most 32 (32 + 16) + the big one alone
    assert calls(pair.emb, "/v1/embeddings") == 4
    lines = log_lines(pair.co, [r.headers["x-request-id"] for r in answers])
    assert "batch=" not in lines[answers[-1].headers["x-request-id"]]
    batches = {re.search(r" batch=(\S+)", lines[r.headers["x-request-id"]]).group(1) for r in answers[:6]}  # type: ignore[union-attr]
    assert len(batches) == 2


def test_an_idle_model_gets_each_request_at_once(pair: Pair) -> None:
    reset(pair.emb)
    answers = [pair.co.post("/v1/embeddings", {"input": f"one at a time {i}"}) for i in range(3)]
    assert calls(pair.emb, "/v1/embeddings") == 3
    lines = log_lines(pair.co, [r.headers["x-request-id"] for r in answers])
    assert not any("batch=" in line for line in lines.values())
    for r in answers:
        # nothing was waited for: the upstream call took the stand-in's delay, the rest is small
        assert float(r.headers["x-gateway-overhead-ms"]) < 50


def test_one_bad_input_fails_only_its_own_request(pair: Pair) -> None:
    reset(pair.emb)
    bodies = [{"input": f"fine text {i}"} for i in range(8)]
    bodies[3] = {"input": "many " * 600}  # over the stand-in's max_model_len 512: vLLM's 400
    answers = asyncio.run(burst(pair.co, "/v1/embeddings", bodies))
    assert [r.status_code for r in answers] == [200, 200, 200, 400, 200, 200, 200, 200]
    err = answers[3].json()["error"]
    assert err["code"] == 400 and "maximum context length is 512" in err["message"]
    # counted with the tokenizer first, the over-long one never joined: pacer, 7 together, it alone
    assert calls(pair.emb, "/v1/embeddings") == 3
    lines = log_lines(pair.co, [r.headers["x-request-id"] for r in answers])
    assert "batch=" not in lines[answers[3].headers["x-request-id"]]
    for i, (got, want) in enumerate(zip(answers, alone(pair.alone, "/v1/embeddings", bodies), strict=True)):
        if i != 3:
            same_answer(got.json(), want.json())


def test_an_input_vllm_refuses_unforeseen_costs_halving_not_one_call_each(pair: Pair) -> None:
    reset(pair.emb)
    pair.emb.admin(refuse_text="poison")
    try:
        bodies = [{"input": f"fine text {i}"} for i in range(16)]
        bodies[11] = {"input": "a poison pill"}
        answers = asyncio.run(burst(pair.co, "/v1/embeddings", bodies))
    finally:
        pair.emb.admin(refuse_text=None)
    assert [r.status_code for r in answers] == [400 if i == 11 else 200 for i in range(16)]
    assert "poison" in answers[11].json()["error"]["message"]
    # pacer; 16 refused; halves of 8 (one refused), 4, 2, 1: 2 calls each level = 1 + 1 + 4 * 2
    assert calls(pair.emb, "/v1/embeddings") == 10
    for i, (got, want) in enumerate(zip(answers, alone(pair.alone, "/v1/embeddings", bodies), strict=True)):
        if i != 11:
            same_answer(got.json(), want.json())


def test_access_log_has_each_request_id_and_the_shared_call(pair: Pair) -> None:
    reset(pair.emb)
    ids = [f"client-{i}" for i in range(5)]
    answers = asyncio.run(
        burst(
            pair.co,
            "/v1/embeddings",
            [{"input": f"t {i}"} for i in range(5)],
            headers=[{"X-Request-ID": i} for i in ids],
        )
    )
    assert [r.headers["x-request-id"] for r in answers] == ids
    lines = log_lines(pair.co, ids)
    batches = {re.search(r" batch=(batch-\S+)", line).group(1) for line in lines.values()}  # type: ignore[union-attr]
    assert len(batches) == 1
    # vLLM saw the merged call's id, not a client's
    assert pair.emb.stats()["last_headers"].get("X-Request-ID") == batches.pop()
    for i, line in lines.items():
        assert " items=1 " in line and " tokens=3 " in line and " status=200 " in line, (i, line)


def test_each_key_is_charged_its_own_tokens_and_requests(pair: Pair) -> None:
    reset(pair.emb)
    small = pair.co.cli("keys", "create", "--name", "small", "--rate-limit", "3/minute").stdout.strip()
    big = pair.co.cli("keys", "create", "--name", "big", "--tpm", "100000").stdout.strip()
    wait_until(lambda: pair.co.get("/v1/models", key=big).status_code == 200, 5, "keys reloaded")

    async def both() -> tuple[list[httpx.Response], list[httpx.Response]]:
        a = burst(pair.co, "/v1/embeddings", [{"input": f"small {i}"} for i in range(5)], key=small)
        b = burst(pair.co, "/v1/embeddings", [{"input": "big " * (i + 1)} for i in range(4)], key=big)
        return await asyncio.gather(a, b)

    small_answers, big_answers = asyncio.run(both())
    # small's pacer took 1 of its 3 requests: 2 of its 5 merged ones fit
    assert sorted(r.status_code for r in small_answers) == [200, 200, 429, 429, 429]
    assert [r.status_code for r in big_answers] == [200] * 4
    metrics = pair.co.get("/metrics").text
    # big: pacer "big" (2) + 2 + 3 + 4 + 5 tokens, each charged to its own key
    assert re.search(r'er_tokens_total\{key="big",model="[^"]+"\} 16\.0', metrics), metrics
    assert re.search(r'er_tokens_total\{key="small",model="[^"]+"\} 9\.0', metrics), metrics
    assert all(r.json()["usage"]["total_tokens"] == i + 2 for i, r in enumerate(big_answers))


def test_no_coalesce_sends_every_request_alone(pair: Pair) -> None:
    reset(pair.emb)
    answers = asyncio.run(burst(pair.alone, "/v1/embeddings", [{"input": f"x {i}"} for i in range(6)]))
    assert all(r.status_code == 200 for r in answers)
    assert calls(pair.emb, "/v1/embeddings") == 7


def test_a_merged_answer_one_short_is_a_502_for_every_member_and_ejects_the_replica(pair: Pair) -> None:
    reset(pair.emb)
    pair.emb.admin(fault="one_short", fault_path="/v1/embeddings")
    answers = asyncio.run(burst(pair.co, "/v1/embeddings", [{"input": f"y {i}"} for i in range(4)]))
    pair.emb.admin(fault=None)
    assert [r.status_code for r in answers] == [502] * 4
    assert "3 embeddings for 4 inputs" in answers[0].json()["error"]["message"]
    metrics = pair.co.get("/metrics").text
    assert re.search(r'er_upstream_errors_total\{kind="bad_answer",model="[^"]+",replica="[^"]+"\} [1-9]', metrics)
    wait_until(lambda: pair.co.post("/v1/embeddings", {"input": "back"}).status_code == 200, 10, "replica back")


def test_a_client_that_leaves_does_not_disturb_the_others(pair: Pair) -> None:
    reset(pair.emb)

    async def run() -> list[Any]:
        async with httpx.AsyncClient(base_url=pair.co.url, headers=pair.co.auth, timeout=30) as c:
            pacer = asyncio.create_task(c.post("/v1/embeddings", json={"input": "pacer"}))
            await asyncio.sleep(DELAY / 3)
            leaver = asyncio.create_task(c.post("/v1/embeddings", json={"input": "I leave"}))
            stayers = [asyncio.create_task(c.post("/v1/embeddings", json={"input": f"stay {i}"})) for i in range(3)]
            await asyncio.sleep(0.05)
            leaver.cancel()
            return [await pacer, *(await asyncio.gather(*stayers))]

    answers = asyncio.run(run())
    assert [r.status_code for r in answers] == [200] * 4
    assert [r.json()["data"][0]["index"] for r in answers] == [0] * 4
    assert pair.co.post("/v1/embeddings", {"input": "still fine"}).status_code == 200


# ---- rerank ---------------------------------------------------------------------------------
def test_rerank_pairs_of_several_requests_go_in_one_score_call(pair: Pair) -> None:
    reset(pair.rer)
    bodies = [
        {"query": f"where is city {i}", "documents": [f"city {i} is here", "nothing", f"is {i} big"], "top_n": 2}
        for i in range(6)
    ]
    bodies.append({"query": "capital", "documents": ["the capital of france is paris"], "return_documents": True})
    answers = asyncio.run(burst(pair.co, "/v1/rerank", bodies))
    assert [r.status_code for r in answers] == [200] * 7
    assert calls(pair.rer, "/score") == 2
    sent = pair.rer.stats()["last_body"]
    assert isinstance(sent["text_1"], list) and len(sent["text_1"]) == len(sent["text_2"]) == 19
    for got, want in zip(answers, alone(pair.alone, "/v1/rerank", bodies), strict=True):
        same_answer(got.json(), want.json())  # scores, order, documents, usage


def test_rerank_one_over_long_document_fails_only_its_request(pair: Pair) -> None:
    reset(pair.rer)
    bodies = [{"query": f"q {i}", "documents": ["short doc", f"doc {i}"]} for i in range(4)]
    bodies[2]["documents"] = ["short", "long " * 600]
    answers = asyncio.run(burst(pair.co, "/v1/rerank", bodies))
    assert [r.status_code for r in answers] == [200, 200, 400, 200]
    assert answers[2].json()["error"]["param"] == "documents[1]"
    for i, (got, want) in enumerate(zip(answers, alone(pair.alone, "/v1/rerank", bodies), strict=True)):
        if i != 2:
            same_answer(got.json(), want.json())


def test_coalescing_settings_are_checked() -> None:
    from er_gateway.settings import SettingsError, load_settings

    for env in ({"ER_COALESCE_WAIT_MS": "-1"}, {"ER_COALESCE_MAX_INPUTS": "0"}):
        with pytest.raises(SettingsError):
            load_settings({}, env)
    assert load_settings({}, {"ER_COALESCE": "false"}).coalesce is False


# ---- apportion: each member's share of a merged call's usage ---------------------------------
@given(
    st.lists(st.tuples(st.integers(0, 500), st.integers(1, 8)), min_size=1, max_size=20),
    st.integers(0, 3),
)
def test_apportion_is_exact_when_the_tokenizer_agrees(members: list[tuple[int, int]], special: int) -> None:
    counts, items = [c for c, _ in members], [k for _, k in members]
    # the oracle: what each member's own call would have reported
    alone_usage = [c + special * k for c, k in members]
    assert apportion(sum(alone_usage), counts, items) == alone_usage


@given(
    st.lists(st.tuples(st.integers(0, 500), st.integers(1, 8)), min_size=1, max_size=20),
    st.integers(0, 20000),
)
def test_apportion_always_adds_up_to_what_the_backend_counted(members: list[tuple[int, int]], total: int) -> None:
    shares = apportion(total, [c for c, _ in members], [k for _, k in members])
    assert sum(shares) == total and all(s >= 0 for s in shares)


def test_merged_body_is_valid_json_for_any_text() -> None:
    from er_gateway.coalesce import Member
    from er_gateway.embeddings import CODEC

    async def build() -> bytes:
        m = Member(None, b"", ['a "quoted"\n', "ü"], None, 3)  # type: ignore[arg-type]
        return CODEC.merged_body({"model": "m"}, [m, m])

    assert orjson.loads(asyncio.run(build())) == {"model": "m", "input": ['a "quoted"\n', "ü"] * 2}


@pytest.mark.parametrize(
    "items",
    [
        [{"index": 0}, {"index": 1}, {"index": 0.5}],  # one too many, with an index that is no index
        [{"index": 0}, {"index": 0}],  # one result twice, the other missing
        [{"index": 0}, {"index": None}],
        [{"index": 0}, {}],
        [{"index": True}, {"index": 1}],
        [{"index": 0}, "x"],
        {"index": 0},
    ],
)
def test_a_merged_answer_must_hold_each_result_once(items: Any) -> None:
    from er_gateway.coalesce import in_order
    from er_gateway.errors import GatewayError

    with pytest.raises(GatewayError) as e:
        in_order(items, 2, "embeddings")
    assert e.value.status == 502
    assert [x["index"] for x in in_order([{"index": 1}, {"index": 0}], 2, "embeddings")] == [0, 1]


def test_a_negative_count_from_the_backend_charges_nothing() -> None:
    assert apportion(-10, [3, 4], [1, 1]) == [0, 0]
