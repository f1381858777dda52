"""performance_test.py run as a user would, against a real gateway and stand-in vLLM servers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT, Stack

SCRIPT = str(ROOT / "performance_test.py")


def perf(url: str, *args: str, key: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ER_KEY"}
    if key is not None:
        env["ER_KEY"] = key
    return subprocess.run(
        [sys.executable, SCRIPT, "--url", url, "--quiet", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def test_default_is_seed_rerank_with_er_key_from_env(stack: Stack) -> None:
    before = stack.rer.stats()["by_path"].get("/score", 0)
    r = perf(stack.gw.url, "--requests", "50", key=stack.gw.key)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert re.search(r"^50 requests in .* to http://127\.0\.0\.1:\d+/rerank ", out, re.M), out
    rps = float(re.search(r"rps: ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    assert rps > 0
    assert re.search(r"p50 [\d.]+, p95 [\d.]+, p99 [\d.]+", out), out
    assert "errors: none" in out
    assert r.stderr.strip() == ""  # no hints when all is well
    assert stack.rer.stats()["by_path"].get("/score", 0) - before >= 50  # reranked, not embedded


def test_no_key_stops_at_once_with_401_explanation(stack: Stack) -> None:
    t = time.monotonic()
    r = perf(stack.gw.url, "--duration", "30")
    assert time.monotonic() - t < 10
    assert r.returncode == 2, r.stdout + r.stderr
    hint = [line for line in r.stderr.splitlines() if line.startswith("401:")]
    assert len(hint) == 1, r.stderr
    assert "ER_KEY" in hint[0] and "--key" in hint[0] and "keys create" in hint[0]
    n = int(re.search(r"^(\d+) requests", r.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert n <= 16  # at most the requests already in flight, no hammering


def test_rate_limited_key_is_explained(stack: Stack) -> None:
    c = stack.gw.cli("keys", "create", "--name", "slow", "--rpm", "5")
    assert c.returncode == 0, c.stderr
    os.kill(stack.gw.proc.pid, signal.SIGHUP)
    time.sleep(0.3)
    r = perf(stack.gw.url, "--requests", "30", key=c.stdout.strip())
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^30 requests", r.stdout, re.M), r.stdout
    assert "errors: 429: 25" in r.stdout
    assert "X-RateLimit-Limit: 5" in r.stdout
    hint = [line for line in r.stderr.splitlines() if line.startswith("429:")]
    assert len(hint) == 1, r.stderr
    assert "25 of 30" in hint[0] and "X-RateLimit-Limit: 5" in hint[0]
    assert "higher --rpm" in hint[0] and "keys create" in hint[0]


def test_json_summary(stack: Stack) -> None:
    r = perf(stack.gw.url, "--requests", "20", "--json", "--endpoint", "embeddings", key=stack.gw.key)
    assert r.returncode == 0, r.stdout + r.stderr
    s = json.loads(r.stdout)
    assert s["requests"] == 20 and s["ok"] == 20
    assert s["url"].endswith("/v1/embeddings")
    assert s["rps"] > 0
    assert 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"]
    assert s["errors"] == {} and s["hints"] == []

    r = perf(stack.gw.url, "--requests", "5", "--json", key="er-not-a-key")
    assert r.returncode == 2
    s = json.loads(r.stdout)
    assert s["errors"]["401"] >= 1 and s["p50_ms"] is None
    assert any(h.startswith("401:") for h in s["hints"])
