"""Replicas: failover under load, fast 503, recovery, even spread, split == unsplit."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import httpx
import orjson
from conftest import EMB, RER, Backend, free_port, start_backend, start_gateway, wait_until


def strip_ids(body: dict) -> dict:  # type: ignore[type-arg]
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def test_failover_under_load_and_recovery(tmp_path: Path) -> None:
    backends = [start_backend(tmp_path, "embedding") for _ in range(3)]
    rer = start_backend(tmp_path, "rerank")
    gw = start_gateway(
        tmp_path,
        "--embedding-url",
        ",".join(b.url for b in backends),
        "--reranker-url",
        rer.url,
        "--health-interval",
        "1",
    )
    try:
        wait_until(lambda: httpx.get(gw.url + "/health").json()["status"] == "healthy", 5, "healthy")

        async def load(seconds: float, clients: int) -> list[int]:
            statuses: list[int] = []
            deadline = time.monotonic() + seconds
            conn = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=30)) as s:

                async def client() -> None:
                    while time.monotonic() < deadline:
                        async with s.post(
                            gw.url + "/v1/embeddings", json={"input": ["a b", "c"]}, headers=gw.auth
                        ) as r:
                            await r.read()
                            statuses.append(r.status)

                async def killer() -> None:
                    await asyncio.sleep(seconds / 3)
                    backends[1].stop(signal.SIGKILL)

                await asyncio.gather(killer(), *(client() for _ in range(clients)))
            return statuses

        statuses = asyncio.run(load(30, 200))
        assert len(statuses) > 1000
        failed = [s for s in statuses if s != 200]
        assert not failed, f"{len(failed)} failed of {len(statuses)}: {set(failed)}"
        access = (gw.logs / "access.log").read_text()
        assert "retries=1" in access  # the failover is visible in the access log
        metrics = httpx.get(gw.url + "/metrics").text
        assert f'er_replica_healthy{{model="{EMB}",replica="1"}} 0.0' in metrics
        health = httpx.get(gw.url + "/health").json()
        assert health["status"] == "degraded"

        # the killed replica comes back on its port: traffic again within one health interval
        port = backends[1].url.rsplit(":", 1)[1]
        backends[1] = start_backend(tmp_path, "embedding", port=int(port))
        time.sleep(1.5)
        for _ in range(30):
            gw.post("/v1/embeddings", {"input": "x"})
        assert backends[1].stats()["requests"] > 0
        assert httpx.get(gw.url + "/health").json()["status"] == "healthy"

        # all replicas dead: 503 with Retry-After within 1 s
        for b in backends:
            b.stop(signal.SIGKILL)
        for _ in range(3):
            start = time.monotonic()
            r = gw.post("/v1/embeddings", {"input": "x"})
            assert r.status_code == 503 and "Retry-After" in r.headers
            assert time.monotonic() - start < 1
    finally:
        gw.stop()
        rer.stop()
        for b in backends:
            b.stop()


def test_load_spreads_evenly(tmp_path: Path) -> None:
    backends = [start_backend(tmp_path, "embedding", extra=["--delay", "0.005"]) for _ in range(3)]
    gw = start_gateway(tmp_path, "--embedding-url", ",".join(b.url for b in backends))
    try:

        async def run() -> None:
            async with aiohttp.ClientSession() as s:
                sem = asyncio.Semaphore(16)

                async def one() -> None:
                    async with sem, s.post(gw.url + "/v1/embeddings", json={"input": "x"}, headers=gw.auth) as r:
                        assert r.status == 200

                await asyncio.gather(*(one() for _ in range(900)))

        asyncio.run(run())
        counts = [b.stats()["by_path"].get("/v1/embeddings", 0) for b in backends]
        assert sum(counts) == 900
        for c in counts:
            assert abs(c - 300) <= 60, counts  # within ±20 %
    finally:
        gw.stop()
        for b in backends:
            b.stop()


def _depth(url: str) -> float:
    """vLLM's running + waiting requests, read from its /metrics as the gateway reads them."""
    page = httpx.get(url + "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in page.splitlines() if line.startswith("vllm:num_requests_"))


def _load(clients: list[tuple[str, dict[str, str]]], replicas: list[str], seconds: float) -> dict[str, float]:
    """Each (url, headers) a client embedding one input at a time for `seconds`; returns each
    replica's mean queue depth (running + waiting, sampled from its /metrics every 50 ms)."""
    depths: dict[str, list[float]] = {u: [] for u in replicas}

    async def run() -> None:
        stop = asyncio.Event()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

            async def client(url: str, headers: dict[str, str]) -> None:
                while not stop.is_set():
                    body = {"input": "x", "model": EMB}
                    async with s.post(url + "/v1/embeddings", json=body, headers=headers) as r:
                        assert r.status == 200, await r.text()

            async def sample() -> None:
                await asyncio.sleep(1.0)  # past the first health checks under load
                while not stop.is_set():
                    for url in depths:
                        depths[url].append(await asyncio.to_thread(_depth, url))
                    await asyncio.sleep(0.05)

            tasks = [asyncio.create_task(client(u, h)) for u, h in clients]
            sampler = asyncio.create_task(sample())
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks, sampler)

    asyncio.run(run())
    return {u: sum(d) / len(d) for u, d in depths.items()}


def _within(mean: dict[str, float], spread: float) -> bool:
    overall = sum(mean.values()) / len(mean)
    return all(abs(m - overall) <= spread * overall for m in mean.values())


def _fast_and_slow(tmp_path: Path) -> tuple[Backend, Backend, tuple[str, ...]]:
    fast = start_backend(tmp_path, "embedding", extra=["--step-time", "0.01", "--step-capacity", "2"])
    slow = start_backend(tmp_path, "embedding", extra=["--step-time", "0.03", "--step-capacity", "2"])
    args = ("--embedding-url", f"{fast.url},{slow.url}", "--reranker-url", "none", "--health-interval", "0.5")
    return fast, slow, (*args, "--no-coalesce")


def test_three_gateways_balance_a_fast_and_a_slow_replica(tmp_path: Path) -> None:
    """3 gateways x 2 replicas, one 3x slower: the slow one gets about a quarter of the requests,
    and both replicas' queues stay within 20 % of their mean."""
    fast, slow, args = _fast_and_slow(tmp_path)
    keys = tmp_path / "er_api_keys.json"
    gws = [start_gateway(tmp_path / "g0", *args, keys_file=keys)]
    gws += [start_gateway(tmp_path / f"g{i}", *args, keys_file=keys) for i in (1, 2)]
    try:
        mean = _load([(g.url, gws[0].auth) for g in gws for _ in range(8)], [fast.url, slow.url], 5.0)
        served = {b.url: b.stats()["by_path"].get("/v1/embeddings", 0) for b in (fast, slow)}
        share = served[slow.url] / sum(served.values())
        assert 0.15 <= share <= 0.35, served  # 1/4 is proportional to speed
        assert _within(mean, 0.2), mean
    finally:
        for g in gws:
            g.stop()
        fast.stop()
        slow.stop()


def test_load_from_outside_the_gateway_is_balanced_too(tmp_path: Path) -> None:
    """8 clients send to the fast replica directly (another gateway, another team): the gateway
    reads vLLM's queue and sends its own 16 clients so that both queues end up level (12 and 12;
    counting only its own requests it would make them 16 and 8)."""
    fast, slow, args = _fast_and_slow(tmp_path)
    gw = start_gateway(tmp_path, *args)
    try:
        clients = [(fast.url, {}) for _ in range(8)] + [(gw.url, gw.auth) for _ in range(16)]
        mean = _load(clients, [fast.url, slow.url], 5.0)
        assert _within(mean, 0.2), mean
    finally:
        gw.stop()
        fast.stop()
        slow.stop()


def test_split_and_unsplit_answers_are_identical(tmp_path: Path) -> None:
    backends = [start_backend(tmp_path, "embedding", extra=["--matryoshka"]) for _ in range(2)]
    rer = [start_backend(tmp_path, "rerank") for _ in range(2)]
    urls = ["--embedding-url", ",".join(b.url for b in backends), "--reranker-url", ",".join(r.url for r in rer)]
    split = start_gateway(tmp_path / "s", *urls, "--max-batch-inputs", "4", "--max-batch-docs", "3")
    whole = start_gateway(tmp_path / "w", *urls)
    try:
        for body in (
            {"input": [f"text {i}" for i in range(10)]},
            {"input": [f"text {i}" for i in range(9)], "encoding_format": "base64", "dimensions": 16},
            {"input": [[1, 2, i] for i in range(7)]},
        ):
            a = split.post("/v1/embeddings", body)
            b = whole.post("/v1/embeddings", body)
            assert a.status_code == b.status_code == 200
            assert strip_ids(a.json()) == strip_ids(b.json())  # vectors exactly, indices, usage summed
        assert sum(x.stats()["requests"] for x in backends) >= 3 + 3 + 2 + 3
        assert all(x.stats()["requests"] > 0 for x in backends)  # chunks went to both replicas
        docs = [f"doc {i} about capital cities" for i in range(11)]
        for path in ("/v1/rerank", "/rerank"):
            for top_n in (None, 4):
                body = {"query": "capital cities", "documents": docs}
                if top_n:
                    body["top_n"] = top_n
                a, b = split.post(path, body).json(), whole.post(path, body).json()
                assert strip_ids(a) == strip_ids(b)
        # a failed chunk fails the whole request with that chunk's error (no partial answer)
        long = " ".join(["w"] * 600)
        r = split.post("/v1/embeddings", {"input": ["a", "b", "c", "d", "e", long]})
        assert r.status_code == 400 and "maximum context length" in r.json()["error"]["message"]
        r = split.post("/v1/rerank", {"query": "q", "documents": ["a", "b", "c", "d", long]})
        assert r.status_code == 400 and "document 4" in r.json()["error"]["message"]
    finally:
        for p in (split, whole, *backends, *rer):
            p.stop()


def test_dead_replica_at_start_is_skipped(tmp_path: Path) -> None:
    good = start_backend(tmp_path, "embedding")
    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    gw = start_gateway(tmp_path, "--embedding-url", f"{dead},{good.url}", "--health-interval", "0.5")
    try:
        for _ in range(10):
            r = gw.post("/v1/embeddings", {"input": "x"})
            assert r.status_code == 200
        h = httpx.get(gw.url + "/health").json()["models"][EMB]["replicas"]
        assert [x["healthy"] for x in h] == [False, True]
        assert orjson.loads(httpx.get(gw.url + "/health").content)["models"][RER]["replicas"][0]["healthy"] is False
    finally:
        gw.stop()
        good.stop()


def ids(gw, key: str | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    return [m["id"] for m in gw.get("/v1/models", key=key).json()["data"]]


def test_model_names_follow_the_backends(tmp_path: Path) -> None:
    """`MODEL_SIZE=4B` behind a gateway started without model flags (configured for 0.6B)."""
    emb = start_backend(tmp_path, "embedding", name="Qwen3-Embedding-4B")
    rer = start_backend(tmp_path, "rerank", name="Qwen3-Reranker-4B")
    gw = start_gateway(tmp_path, "--embedding-url", emb.url, "--reranker-url", rer.url, "--health-interval", "0.3")
    try:
        # The first health check runs before the gateway serves: no window with the old names.
        assert ids(gw) == ["Qwen3-Embedding-4B", EMB, "Qwen3-Reranker-4B", RER]
        for name in ("Qwen3-Embedding-4B", None, EMB):
            r = gw.post("/v1/embeddings", {"input": "x", **({"model": name} if name else {})})
            assert r.status_code == 200, (name, r.text)
            assert emb.stats()["last_body"].get("model") == (name and "Qwen3-Embedding-4B")
        for name in ("Qwen3-Reranker-4B", None, RER):
            r = gw.post("/v1/rerank", {"query": "q", "documents": ["d"], **({"model": name} if name else {})})
            assert r.status_code == 200, (name, r.text)
            assert rer.stats()["last_body"]["model"] == "Qwen3-Reranker-4B"
            assert r.json()["model"] == "Qwen3-Reranker-4B"
        r = gw.post("/v1/score", {"model": RER, "text_1": "q", "text_2": ["d"]})
        assert r.status_code == 200 and rer.stats()["last_body"]["model"] == "Qwen3-Reranker-4B"
        card = gw.get("/v1/models").json()["data"][0]
        assert card["root"] == "Qwen3-Embedding-4B" and card["max_model_len"] == 512
        assert httpx.get(gw.url + "/health", params={"model": "Qwen3-Reranker-4B"}).status_code == 200
        r = gw.post("/v1/embeddings", {"input": "x", "model": "Qwen3-Embedding-8B"})
        assert r.status_code == 404 and "Qwen3-Embedding-4B" in r.json()["error"]["message"]
        # A key may be limited by the served name as well as by the configured one.
        made = gw.cli("keys", "create", "--name", "only-4b", "--models", "Qwen3-Embedding-4B")
        key = made.stdout.strip()
        wait_until(lambda: gw.get("/v1/models", key=key).status_code == 200, 5, "key loaded")
        assert ids(gw, key) == ["Qwen3-Embedding-4B", EMB]
        assert gw.post("/v1/embeddings", {"input": "x", "model": EMB}, key=key).status_code == 200
        assert gw.post("/v1/rerank", {"query": "q", "documents": ["d"]}, key=key).status_code == 403
    finally:
        for p in (gw, emb, rer):
            p.stop()


def test_a_backend_restarted_with_another_model_is_followed(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding", name="Qwen3-Embedding-0.6B")
    gw = start_gateway(tmp_path, "--embedding-url", emb.url, "--reranker-url", "none", "--health-interval", "0.3")
    port = int(emb.url.rsplit(":", 1)[1])
    try:
        assert gw.post("/v1/embeddings", {"input": "x", "model": EMB}).status_code == 200
        emb.stop()
        emb = start_backend(tmp_path, "embedding", name="Qwen3-Embedding-8B", port=port)
        wait_until(lambda: ids(gw)[0] == "Qwen3-Embedding-8B", 10, "new name learned")
        r = gw.post("/v1/embeddings", {"input": "x", "model": EMB})
        assert r.status_code == 200 and emb.stats()["last_body"]["model"] == "Qwen3-Embedding-8B"
        assert EMB in ids(gw) and "Qwen3-Embedding-0.6B" == ids(gw)[1]  # the configured name stays an alias
    finally:
        gw.stop()
        emb.stop()


def test_replicas_serving_different_names_get_no_model_field(tmp_path: Path) -> None:
    a = start_backend(tmp_path, "embedding", name="emb-a")
    b = start_backend(tmp_path, "embedding", name="emb-b")
    gw = start_gateway(
        tmp_path,
        "--embedding-url",
        f"{a.url},{b.url}",
        "--embedding-model",
        "emb-a",
        "--reranker-url",
        "none",
        "--health-interval",
        "0.3",
    )
    try:
        assert ids(gw) == ["emb-a", "emb-b"]
        for name in ("emb-a", "emb-b", None) * 4:
            r = gw.post("/v1/embeddings", {"input": "x", **({"model": name} if name else {})})
            assert r.status_code == 200, r.text
        for backend in (a, b):
            assert backend.stats()["requests"] >= 3  # both served, each with its own model
            assert "model" not in backend.stats()["last_body"]
    finally:
        for p in (gw, a, b):
            p.stop()


def test_a_backend_cannot_claim_another_models_name(tmp_path: Path) -> None:
    """A reranker backend that reports the embedding model's name (hostile, or started with the
    wrong --served-model-name) gets neither that model's traffic nor keys limited to it."""
    emb = start_backend(tmp_path, "embedding", name="emb-real")
    rer = start_backend(tmp_path, "rerank", name=EMB)
    gw = start_gateway(tmp_path, "--embedding-url", emb.url, "--reranker-url", rer.url, "--health-interval", "0.3")
    try:
        assert ids(gw) == ["emb-real", EMB, RER]  # EMB is listed once, as the embedding model's
        assert gw.post("/v1/embeddings", {"input": "x", "model": EMB}).status_code == 200
        assert emb.stats()["requests"] >= 1 and rer.stats()["by_path"].get("/v1/embeddings") is None
        key = gw.cli("keys", "create", "--name", "emb-only", "--models", EMB).stdout.strip()
        wait_until(lambda: gw.get("/v1/models", key=key).status_code == 200, 5, "key loaded")
        assert gw.post("/v1/rerank", {"query": "q", "documents": ["d"]}, key=key).status_code == 403
        assert "belong(s) to another model" in (gw.logs / "embedding_reranker_proxy.log").read_text()
    finally:
        for p in (gw, emb, rer):
            p.stop()


def test_a_name_with_several_addresses_is_one_replica_per_address(tmp_path: Path) -> None:
    """A Kubernetes headless Service: one name, one address per vLLM pod. The gateway, in its own
    mount namespace with its own /etc/hosts, follows the name as pods come and go."""
    port = free_port()
    backends = {ip: start_backend(tmp_path, "embedding", port=port, host=ip) for ip in ("127.0.0.2", "127.0.0.3")}
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 vllm-headless\n127.0.0.3 vllm-headless\n")
    own_hosts = ("unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts))
    gw = start_gateway(
        tmp_path,
        *("--embedding-url", f"http://vllm-headless:{port}", "--reranker-url", "none", "--health-interval", "0.3"),
        prefix=own_hosts,
    )

    def replicas() -> list[str]:
        return [r["url"] for r in gw.get("/health").json()["models"][EMB]["replicas"]]

    def spread(n: int) -> dict[str, int]:
        for b in backends.values():
            b.admin(reset_stats=True)
        for i in range(n):
            assert gw.post("/v1/embeddings", {"input": f"t{i}"}).status_code == 200
        return {ip: b.stats()["requests"] for ip, b in backends.items()}

    try:
        assert replicas() == [f"http://127.0.0.2:{port}", f"http://127.0.0.3:{port}"]
        assert spread(20) == {"127.0.0.2": 10, "127.0.0.3": 10}
        # sent to an address, still named as configured: a proxy in between routes by the name
        assert backends["127.0.0.2"].stats()["last_headers"]["Host"] == f"vllm-headless:{port}"
        # scale up: a third pod appears in DNS
        backends["127.0.0.4"] = start_backend(tmp_path, "embedding", port=port, host="127.0.0.4")
        hosts.write_text("127.0.0.2 vllm-headless\n127.0.0.3 vllm-headless\n127.0.0.4 vllm-headless\n")
        wait_until(lambda: len(replicas()) == 3, 5, "third replica")
        assert spread(30) == {"127.0.0.2": 10, "127.0.0.3": 10, "127.0.0.4": 10}
        # scale down: a pod leaves DNS (and is stopped); nothing is sent to it again
        hosts.write_text("127.0.0.3 vllm-headless\n127.0.0.4 vllm-headless\n")
        wait_until(lambda: len(replicas()) == 2, 5, "two replicas")
        backends.pop("127.0.0.2").stop()
        assert spread(10) == {"127.0.0.3": 5, "127.0.0.4": 5}
        # one address left: the name itself is the replica again
        hosts.write_text("127.0.0.4 vllm-headless\n")
        wait_until(lambda: replicas() == [f"http://vllm-headless:{port}"], 5, "the name again")
        assert spread(4) == {"127.0.0.3": 0, "127.0.0.4": 4}
    finally:
        gw.stop()
        for b in backends.values():
            b.stop()
