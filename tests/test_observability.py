"""Log files, the access log, /metrics after known traffic, and the /status page in Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from conftest import ACCESS_FIELDS, EMB, RER, backend_args, start_backend, start_gateway, start_redis, wait_until


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (labels in any order), or 0."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, rest = head.partition("{")
        if sample == name and dict(re.findall(r'(\w+)="([^"]*)"', rest)) == labels:
            return float(value)
    return 0.0


def test_access_log_and_metrics_count_known_traffic(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    rer = start_backend(tmp_path, "rerank")
    gw = start_gateway(tmp_path, *backend_args(emb, rer))
    try:
        limited = gw.cli("keys", "create", "--name", "tiny", "--rpm", "2").stdout.strip()
        time.sleep(1.5)
        for _ in range(5):
            assert gw.post("/v1/embeddings", {"input": ["a b", "c"]}).status_code == 200
        for _ in range(3):
            assert gw.post("/v1/rerank", {"query": "q", "documents": ["d1", "d2", "d3"]}).status_code == 200
        assert gw.post("/v1/embeddings", {"model": "nope", "input": "x"}).status_code == 404
        codes = [gw.get("/v1/models", key=limited).status_code for _ in range(4)]
        assert codes == [200, 200, 429, 429]
        r = gw.post("/v1/embeddings", {"input": "x"}, headers={"X-Request-ID": "trace-me-1"})
        assert r.headers["X-Request-ID"] == "trace-me-1" and float(r.headers["X-Gateway-Overhead-Ms"]) < 50
        assert emb.stats()["last_headers"]["X-Request-ID"] == "trace-me-1"

        text = httpx.get(gw.url + "/metrics").text
        assert metric(text, "er_requests_total", route="/v1/embeddings", model=EMB, status="200", key="admin") == 6
        assert metric(text, "er_requests_total", route="/v1/rerank", model=RER, status="200", key="admin") == 3
        assert metric(text, "er_requests_total", route="/v1/embeddings", model="", status="404", key="admin") == 1
        assert metric(text, "er_rate_limited_total", key="tiny") == 2
        assert metric(text, "er_upstream_duration_seconds_count", model=EMB) == 6
        assert metric(text, "er_request_duration_seconds_count", route="/v1/rerank") == 3
        # tokens by model and key = the sum of the backend's usage
        assert metric(text, "er_tokens_total", model=EMB, key="admin") == 5 * (3 + 2) + 2
        assert metric(text, "er_replica_healthy", model=EMB, replica="0") == 1
        assert "er_in_flight_requests" in text and "er_queue_wait_seconds_bucket" in text
        assert "er_upstream_errors_total" in text

        wait_until(lambda: len((gw.logs / "access.log").read_text().splitlines()) >= 15, 3, "access log flushed")
        lines = (gw.logs / "access.log").read_text().splitlines()
        emb_lines = [l for l in lines if "path=/v1/embeddings" in l and "status=200" in l]
        assert len(emb_lines) == 6
        first = dict(kv.split("=", 1) for kv in emb_lines[0].split(" "))
        for field in ACCESS_FIELDS:
            assert field in first, field
        assert first["key"] == "admin" and first["model"] == EMB and first["items"] == "2"
        assert first["tokens"] == "5" and first["replica"] == emb.url and first["method"] == "POST"
        assert any("request_id=trace-me-1" in l for l in lines)
        assert sum("key=tiny" in l and "status=429" in l for l in lines) == 2
        assert "gateway pid" in (gw.logs / "embedding_reranker_proxy.log").read_text()
    finally:
        gw.stop()
        emb.stop()
        rer.stop()
    for f in gw.logs.glob("*"):
        assert gw.key not in f.read_text() and limited not in f.read_text()


def test_json_logs_and_rotation(tmp_path: Path) -> None:
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(
        tmp_path, "--embedding-url", emb.url, "--log-format", "json", "--log-max-bytes", "2048", "--log-backups", "2"
    )
    try:
        for _ in range(40):
            gw.post("/v1/embeddings", {"input": "x"})
        time.sleep(0.5)
    finally:
        gw.stop()
        emb.stop()
    access = gw.logs / "access.log"
    assert (gw.logs / "access.log.1").exists() and not (gw.logs / "access.log.3").exists()
    rows = [json.loads(l) for f in (access, gw.logs / "access.log.1") for l in f.read_text().splitlines()]
    assert all(r["path"] for r in rows) and any(r["status"] == 200 and r["tokens"] == 2 for r in rows)
    main = [json.loads(l) for l in (gw.logs / "embedding_reranker_proxy.log").read_text().splitlines()]
    assert any("gateway pid" in r["message"] for r in main) and all("level" in r for r in main)


def test_metrics_are_summed_across_workers(tmp_path: Path) -> None:
    redis = start_redis(tmp_path)
    emb = start_backend(tmp_path, "embedding")
    gw = start_gateway(tmp_path, "--embedding-url", emb.url, "--redis-url", redis.url, "--workers", "2")
    try:
        for _ in range(40):
            # new connections, so both workers get some
            assert httpx.post(gw.url + "/v1/embeddings", json={"input": "x"}, headers=gw.auth).status_code == 200
        text = httpx.get(gw.url + "/metrics").text
        assert metric(text, "er_requests_total", route="/v1/embeddings", model=EMB, status="200", key="admin") == 40
    finally:
        gw.stop()
        emb.stop()
        redis.stop()


def test_metrics_auth_option(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, "--metrics-auth")
    try:
        assert httpx.get(gw.url + "/metrics").status_code == 401
        assert gw.get("/metrics").status_code == 200
        assert httpx.get(gw.url + "/status").status_code == 401  # protected like the API by default
    finally:
        gw.stop()


def test_status_page_in_headless_chromium(tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/test.sh"
    e1 = start_backend(tmp_path, "embedding")
    e2 = start_backend(tmp_path, "embedding")
    rer = start_backend(tmp_path, "rerank")
    gw = start_gateway(
        tmp_path, "--embedding-url", f"{e1.url},{e2.url}", "--reranker-url", rer.url, "--health-interval", "0.5"
    )
    try:
        for _ in range(20):
            gw.post("/v1/embeddings", {"input": "x"})
        gw.post("/v1/rerank", {"query": "q", "documents": ["d"]})
        e2.stop()
        wait_until(lambda: httpx.get(gw.url + "/health").json()["status"] == "degraded", 5, "degraded")
        url = f"{gw.url}/status?api_key={gw.key}"
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chrome'}",
            "--virtual-time-budget=4000",
            "--window-size=1200,1000",
        ]
        shot = tmp_path / "status.png"
        subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=90)
        assert shot.exists() and shot.stat().st_size > 10_000
        shutil.copy(shot, "/tmp/er-status-page.png")  # for a human look after a run
        dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=90).stdout
        assert e1.url in dom and e2.url in dom and rer.url in dom  # every replica is shown
        assert "degraded" in dom and ">down<" in dom and ">up<" in dom
        assert re.search(r"<td class=\"num\">\d+(\.\d+)?</td>", dom)  # live numbers rendered
        assert "p95 ms" in dom and "rate-limited" in dom
        assert "http://" not in re.sub(r"http://127\.0\.0\.1:\d+", "", dom.split("<body>")[0])  # no external assets
    finally:
        for p in (gw, e1, e2, rer):
            p.stop()


def test_recent_rate_is_right_when_the_window_is_full() -> None:
    from er_gateway.observability import Recent

    r = Recent(horizon=60, maxlen=100)
    for _ in range(100):
        r.add("m", 200, 0.002)
    time.sleep(0.1)
    s = r.summary()["m"]
    assert s["requests"] == 100 and s["rps"] > 100 * 0.5 / 0.2  # ~1,000/s, not 100/60
    assert s["p50_ms"] == 2.0 and s["error_rate"] == 0
