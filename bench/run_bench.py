#!/usr/bin/env python3
"""Reproducible gateway benchmark: direct vs through the gateway (vs LiteLLM, optionally).

    .venv/bin/python bench/run_bench.py [--duration 10] [--litellm] [--soak 300] [--workers 2] [--http2 3]
    .venv/bin/python bench/run_bench.py --clients home,aiohttp,aiosonic,pyreqwest [--rounds 3]

--clients compares upstream HTTP clients instead (README, "Upstream HTTP client"): one gateway per
client (bench/gateway_with_client.py, adapters in bench/clients.py), all with the same defaults and
pinning, measured in interleaved rounds at c=64 (--conns to change), median round reported with
its ratio to `home` (httpclient.py); each client's answer must equal the first client's (bar the
rerank "id" the gateway makes up), else the row says WRONG ANSWER.
The libraries: .venv/bin/pip install -e '.[bench]'   (aiohttp, aiosonic, pyreqwest; newest)

A static nginx (Debian's) serves vLLM-shaped answers; the gateway runs with its default features
(auth, a per-key limit set high, metrics, access log) pinned to core 0; nginx and wrk share core 1.
Scenarios: small embeddings (1 input, base64 ~5.6 KB), large embeddings (8x1024 floats ~77 KB),
rerank (query + 8 documents, gateway prompt mode), each at 1 and 64 connections.
Prints rps, p50, p99 and the latency the gateway adds (p50 through it minus p50 direct).
The anchor, "(nginx proxy)": a second nginx (one worker, pinned to core 0 like the gateway) as a
keep-alive reverse proxy to the same backend, i.e. what a thin proxy costs. This machine's figures
move between runs, so compare same-run ratios: "vs proxy" is gateway rps / proxy rps, then the
gateway's p50 minus the proxy's (with --clients: each client's rps / proxy rps).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def embedding_answer(n: int, dim: int, fmt: str) -> bytes:
    rnd = random.Random(n * 7 + dim)
    data = []
    for i in range(n):
        vec = [round(rnd.uniform(-0.1, 0.1), 6) for _ in range(dim)]
        emb = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if fmt == "base64" else vec
        data.append({"index": i, "object": "embedding", "embedding": emb})
    return json.dumps(
        {
            "id": "embd-bench",
            "object": "list",
            "created": 1,
            "model": "Qwen3-Embedding-0.6B",
            "data": data,
            "usage": {
                "prompt_tokens": 8 * n,
                "total_tokens": 8 * n,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
            },
        }
    ).encode()


def score_answer(n: int) -> bytes:
    data = [{"index": i, "object": "score", "score": round(0.9 - i * 0.1, 4)} for i in range(n)]
    return json.dumps(
        {
            "id": "score-bench",
            "object": "list",
            "created": 1,
            "model": "Qwen3-Reranker-0.6B",
            "data": data,
            "usage": {"prompt_tokens": 400, "total_tokens": 400},
        }
    ).encode()


SCENARIOS = {
    # name: (backend root, direct path, gateway path, request body)
    "small-embeddings": (
        "small",
        "/v1/embeddings",
        "/v1/embeddings",
        {"model": "Qwen3-Embedding-0.6B", "input": "What is the capital of France?", "encoding_format": "base64"},
    ),
    "large-embeddings": (
        "large",
        "/v1/embeddings",
        "/v1/embeddings",
        {"model": "Qwen3-Embedding-0.6B", "input": [f"passage number {i} about Paris" for i in range(8)]},
    ),
    "rerank": (
        "rerank",
        "/score",
        "/v1/rerank",
        {
            "model": "Qwen3-Reranker-0.6B",
            "query": "What is the capital of France?",
            "documents": [f"Document {i}: Paris is the capital and largest city of France." for i in range(8)],
        },
    ),
}


def write_backend(work: Path) -> dict[str, int]:
    roots = {
        "small": {"v1/embeddings": embedding_answer(1, 1024, "base64")},
        "large": {"v1/embeddings": embedding_answer(8, 1024, "float")},
        "rerank": {"score": score_answer(8)},
    }
    ports = {}
    servers = []
    for name, files in roots.items():
        for rel, body in files.items():
            f = work / "www" / name / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(body)
        (work / "www" / name / "health").write_text("")
        (work / "www" / name / "version").write_text('{"version":"bench"}')
        ports[name] = free_port()
        servers.append(f"""
    server {{
        listen 127.0.0.1:{ports[name]} reuseport backlog=4096;
        root {work / "www" / name};
        default_type application/json;
        keepalive_requests 1000000;
        location / {{ error_page 405 =200 $uri; }}
    }}""")
    (work / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_buffer_size 64k;
    {"".join(servers)}
}}
""")
    print(
        f"sizes: small {len(roots['small']['v1/embeddings'])} B, large {len(roots['large']['v1/embeddings'])} B, "
        f"rerank /score {len(roots['rerank']['score'])} B"
    )
    return ports


def wrk(url: str, body: dict, key: str | None, conns: int, duration: int, work: Path) -> dict[str, float]:
    lua = work / "post.lua"
    headers = 'wrk.headers["Content-Type"] = "application/json"\n'
    if key:
        headers += f'wrk.headers["Authorization"] = "Bearer {key}"\n'
    lua.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(json.dumps(body))}\n{headers}')
    threads = 1 if conns == 1 else 2
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
    ).stdout

    return parse_wrk(out)


def parse_wrk(out: str) -> dict[str, float]:
    """rps, p50/p99 in ms, non-2xx count and socket errors from `wrk --latency` output."""

    def lat(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(rps.group(1)) if rps else 0.0,
        "p50": lat("50"),
        "p99": lat("99"),
        "non2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def rss_kb(pid: int) -> int:
    total = 0
    for p in [pid, *map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split())]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def start_gateway(
    work: Path,
    ports: dict[str, int],
    scenario_root: str,
    workers: int,
    redis_url: str | None,
    client: str | None = None,
    extra: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], str, str]:
    gdir = Path(tempfile.mkdtemp(prefix=f"gw-{scenario_root}-{workers}-{client or ''}-", dir=work))
    keys = gdir / "keys.json"
    key = subprocess.run(
        [
            PY,
            str(ROOT / "embedding_reranker_proxy.py"),
            "keys",
            "--keys-file",
            str(keys),
            "create",
            "--name",
            "bench",
            "--rate-limit",
            "100000000/minute",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    port = free_port()
    backend = f"http://127.0.0.1:{ports[scenario_root]}"
    # one worker: core 0 alone; more workers: every core (shared with nginx and wrk on core 1)
    cores = "0" if workers == 1 else f"0-{os.cpu_count() - 1}"
    entry = (
        [str(ROOT / "bench" / "gateway_with_client.py"), client]
        if client
        else [str(ROOT / "embedding_reranker_proxy.py")]
    )
    cmd = [
        "taskset",
        "-c",
        cores,
        PY,
        *entry,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--keys-file",
        str(keys),
        "--log-dir",
        str(gdir / "logs"),
        "--embedding-url",
        backend,
        "--reranker-url",
        backend,
        "--workers",
        str(workers),
        # nginx answers every request with the same canned body: a result cache would answer
        # them all itself and a merged call would get a one-input answer. What the proxy path
        # costs is measured here; coalescing and the cache are measured against real vLLM
        # (bench/real_vllm.py).
        "--cache-size",
        "0",
        "--no-coalesce",
    ]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    cmd += extra
    p = subprocess.Popen(cmd, stdout=open(gdir / "out.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
    except TimeoutError:
        stop(p)  # never leave a gateway behind
        raise SystemExit(f"gateway did not start; see {gdir / 'out.log'}") from None
    return p, f"http://127.0.0.1:{port}", key


def measure_tracing(args: argparse.Namespace, work: Path, ports: dict[str, int], results: list[Any]) -> None:
    """Small embeddings at c=64 through a gateway exporting a span tree per request to a local
    OTLP/HTTP receiver that discards them, against one that does not export; interleaved rounds."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Discard(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", free_port()), Discard)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    _, _, _, body = SCENARIOS["small-embeddings"]
    rps: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(args.tracing):
            for mode, extra in (("off", ()), ("on", ("--otlp-endpoint", endpoint))):
                gw, gw_url, key = start_gateway(work, ports, "small", 1, None, extra=extra)
                try:
                    wrk(gw_url + "/v1/embeddings", body, key, 64, 2, work)
                    r = wrk(gw_url + "/v1/embeddings", body, key, 64, args.duration, work)
                    rps[mode].append(r["rps"])
                    print(f"tracing {mode}: {r['rps']:.0f} rps, p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms")
                    results.append({"scenario": f"tracing-{mode}", "conns": 64, **r})
                finally:
                    stop(gw)
    finally:
        receiver.shutdown()
    ratios = [on / off for on, off in zip(rps["on"], rps["off"], strict=True)]
    print("tracing on / off (same round): " + ", ".join(f"{x:.2f}x" for x in ratios))


def h2load(url: str, body: dict, key: str, conns: int, streams: int, duration: int, work: Path, h1: bool) -> dict:
    """nghttp2's h2load (HTTP/2, or HTTP/1.1 with --h1: the same client both ways), pinned like wrk."""
    data = work / "h2load-body.json"
    data.write_text(json.dumps(body))
    cmd = ["taskset", "-c", "1", "h2load", "-t", "1", "-c", str(conns), "-m", str(streams), "-D", str(duration)]
    cmd += ["-d", str(data), "-H", f"authorization: Bearer {key}", "-H", "content-type: application/json"]
    out = subprocess.run([*cmd, *(["--h1"] if h1 else []), url], capture_output=True, text=True).stdout
    rps = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)
    ok = re.search(r"requests: .*?(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    ms = float(mean.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[mean.group(2)] if mean else float("nan")
    failed = int(ok.group(2)) + int(ok.group(3)) if ok else -1
    return {"rps": float(rps.group(1)) if rps else 0.0, "mean_ms": ms, "failed": failed}


def measure_http2(args: argparse.Namespace, work: Path, ports: dict[str, int], results: list[Any]) -> None:
    """Small embeddings, 64 requests in flight: HTTP/1.1 (wrk) through a gateway without --http2
    and one with it (what enabling it costs HTTP/1.1 clients), then on the --http2 gateway h2load
    over HTTP/1.1, h2c with one stream per connection, and h2c with 8 streams on each of 8
    connections; interleaved rounds, each round's ratio to HTTP/1.1 by the same client."""
    if not shutil.which("h2load"):
        sys.exit("h2load is missing: apt-get install nghttp2-client")
    _, _, _, body = SCENARIOS["small-embeddings"]
    rows: dict[str, list[dict]] = {}
    for _ in range(args.http2):
        for flag in ((), ("--http2",)):
            gw, gw_url, key = start_gateway(work, ports, "small", 1, None, extra=flag)
            url = gw_url + "/v1/embeddings"
            try:
                wrk(url, body, key, 64, 2, work)
                r = wrk(url, body, key, 64, args.duration, work)
                rows.setdefault("wrk http/1.1" + (", --http2 on" if flag else ""), []).append(r)
                if flag:
                    for label, c, m, h1 in (("h2load http/1.1", 64, 1, True), ("h2load h2c 64x1", 64, 1, False),
                                            ("h2load h2c 8x8", 8, 8, False)):  # fmt: skip
                        rows.setdefault(label, []).append(h2load(url, body, key, c, m, args.duration, work, h1))
            finally:
                stop(gw)
    base = {"wrk": rows["wrk http/1.1"], "h2load": rows["h2load http/1.1"]}
    for label, runs in rows.items():
        ref = base["wrk" if label.startswith("wrk") else "h2load"]
        ratios = ", ".join(f"{r['rps'] / b['rps']:.2f}x" for r, b in zip(runs, ref, strict=True) if b["rps"])
        lat = ", ".join(f"{r.get('p50', r.get('mean_ms', 0)):.2f}" for r in runs)
        bad = sum(int(r.get("failed", 0)) + int(r.get("non2xx", 0)) for r in runs)
        rps = ", ".join(f"{r['rps']:.0f}" for r in runs)
        print(
            f"{label:<26} rps {rps:<20} vs HTTP/1.1 {ratios:<18} "
            f"{'p50' if label.startswith('wrk') else 'mean'} ms {lat}" + (f"  FAILED {bad}" if bad else "")
        )
        results.append({"scenario": "http2", "path": label, "runs": runs})


def redis_load(port: int) -> tuple[int, int, float]:
    """What the Redis server has done so far: (EVALSHA calls, i.e. the rate limit's scripts;
    commands run in all, those the scripts run included; CPU seconds)."""
    import redis

    r = redis.Redis(port=port)
    stats = r.info("commandstats")
    scripts = int(stats.get("cmdstat_evalsha", {}).get("calls", 0))
    total = sum(int(v["calls"]) for v in stats.values())
    cpu = r.info("cpu")
    return scripts, total, float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def stop(p: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(p.pid, signal.SIGKILL)


def start_proxy(work: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """The anchor: nginx as a keep-alive reverse proxy to each backend, pinned to core 0 like the gateway."""
    pdir = work / "proxy"
    pdir.mkdir()
    proxy_ports = {name: free_port() for name in ports}
    servers = "".join(
        f"""
    upstream {name} {{ server 127.0.0.1:{ports[name]}; keepalive 128; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{proxy_ports[name]} backlog=4096;
        keepalive_requests 1000000;
        location / {{ proxy_pass http://{name}; }}
    }}"""
        for name in ports
    )
    (pdir / "nginx.conf").write_text(f"""
worker_processes 1;
daemon off;
pid {pdir}/nginx.pid;
error_log {pdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffers 32 8k;  # the 86 KB answer stays in memory, as in the gateway
    {servers}
}}
""")
    p = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            shutil.which("nginx") or "/usr/sbin/nginx",
            "-c",
            str(pdir / "nginx.conf"),
            "-p",
            str(pdir),
        ],
        start_new_session=True,
    )
    try:
        for port in proxy_ports.values():
            wait_http(f"http://127.0.0.1:{port}/health")
    except TimeoutError:
        stop(p)
        raise SystemExit(f"nginx proxy did not start; see {pdir / 'nginx-error.log'}") from None
    return p, proxy_ports


def client_versions(clients: list[str]) -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from bench.clients import versions

    version = versions()
    missing = [c for c in clients if version.get(c, "not installed") == "not installed"]
    if missing:
        sys.exit(f"unknown or not installed: {', '.join(missing)} (.venv/bin/pip install -e '.[bench]')")
    return version


def compare_clients(
    clients: list[str],
    scenarios: list[str],
    conns: list[int],
    rounds: int,
    duration: int,
    work: Path,
    ports: dict[str, int],
    proxy_ports: dict[str, int],
    results: list[dict],
) -> None:
    version = client_versions(clients)
    print("clients: " + ", ".join(f"{c} {version[c]}" for c in clients))
    print(
        f"{'scenario':<18} {'c':>3} {'client':<13} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs home':>8}"
        f" {'vs proxy':>8}"
    )
    for name in scenarios:
        root, direct_path, gw_path, body = SCENARIOS[name]
        gws: dict[str, tuple[subprocess.Popen[bytes], str, str]] = {}
        try:
            # All gateways up at once, idle but for health checks while another one is measured.
            for cl in clients:
                gws[cl] = start_gateway(work, ports, root, 1, None, cl)
            wrong = {}
            answers = {}
            for cl, (_, url, key) in gws.items():
                r = httpx.post(url + gw_path, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
                answers[cl] = comparable(r.content) if r.status_code == 200 else None
                if answers[cl] is None or answers[cl] != answers[clients[0]]:
                    wrong[cl] = f"WRONG ANSWER: HTTP {r.status_code} {r.content[:120]!r}"
            for c in conns:
                d = wrk(
                    f"http://127.0.0.1:{ports[root]}{direct_path}", direct_body(name, body), None, c, duration, work
                )
                px = wrk(
                    f"http://127.0.0.1:{proxy_ports[root]}{direct_path}",
                    direct_body(name, body),
                    None,
                    c,
                    duration,
                    work,
                )
                for label, path, r in (("(direct)", "direct", d), ("(nginx proxy)", "nginx-proxy", px)):
                    print(
                        f"{name:<18} {c:>3} {label:<13} {r['rps']:>9.0f} {r['p50']:>8.3f} {r['p99']:>8.3f}"
                        + (f"  non-2xx {r['non2xx']}" if r["non2xx"] else "")
                    )
                    results.append({"scenario": name, "conns": c, "path": path, **r})
                runs: dict[str, list[dict]] = {cl: [] for cl in clients}
                for _ in range(rounds):  # interleaved, so drift in the machine's load hits every client alike
                    for cl in clients:
                        _, url, key = gws[cl]
                        wrk(url + gw_path, body, key, c, 2, work)  # warm-up (pools refilled after idling)
                        runs[cl].append(wrk(url + gw_path, body, key, c, duration, work))
                median = {cl: sorted(rs, key=lambda r: r["rps"])[len(rs) // 2] for cl, rs in runs.items()}
                for cl in clients:
                    m = median[cl]
                    ratio = f"{m['rps'] / median['home']['rps']:.2f}x" if median.get("home", {}).get("rps") else ""
                    note = "  ".join(
                        filter(
                            None,
                            [
                                wrong.get(cl, ""),
                                f"non-2xx {m['non2xx']}" if m["non2xx"] else "",
                                f"socket errors {m['socket_errors']}" if m["socket_errors"] else "",
                                "rounds " + "/".join(f"{r['rps']:.0f}" for r in runs[cl]) if rounds > 1 else "",
                            ],
                        )
                    )
                    vs_proxy = f"{m['rps'] / px['rps']:.2f}x" if px["rps"] else ""
                    print(
                        f"{'':<18} {c:>3} {cl:<13} {m['rps']:>9.0f} {m['p50']:>8.3f} {m['p99']:>8.3f} {ratio:>8}"
                        f" {vs_proxy:>8}  {note}"
                    )
                    results.append(
                        {
                            "scenario": name,
                            "conns": c,
                            "path": "gateway",
                            "client": cl,
                            "version": version[cl],
                            "correct": cl not in wrong,
                            **m,
                            "rounds": runs[cl],
                        }
                    )
        finally:
            for p, _, _ in gws.values():
                stop(p)


def comparable(answer: bytes) -> object:
    """The answer without what the gateway makes up per request (the rerank "id")."""
    try:
        d = json.loads(answer)
    except ValueError:
        return answer
    if isinstance(d, dict):
        d.pop("id", None)
    return d


def direct_body(name: str, body: dict) -> dict:
    if name == "rerank":  # vLLM's /score takes text_1/text_2; the gateway builds them from query/documents
        return {"model": body["model"], "text_1": body["query"], "text_2": body["documents"]}
    return body


def start_litellm(work: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[bytes], str, str]:
    venv = Path(os.environ.get("LITELLM_VENV", Path.home() / ".cache" / "er-gateway" / "litellm-1.100.5"))
    if not (venv / "bin" / "litellm").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        with open(work / "litellm-install.log", "wb") as log:
            subprocess.run(
                [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]==1.100.5"],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    cfg = work / "litellm.yaml"
    cfg.write_text(f"""model_list:
  - model_name: Qwen3-Embedding-0.6B
    litellm_params:
      model: hosted_vllm/Qwen3-Embedding-0.6B
      api_base: http://127.0.0.1:{ports["small"]}/v1
general_settings:
  master_key: sk-bench
""")
    port = free_port()
    p = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            str(venv / "bin" / "litellm"),
            "--config",
            str(cfg),
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        stdout=open(work / "litellm.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", 120)
    return p, f"http://127.0.0.1:{port}", "sk-bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    ap.add_argument("--conns", help="comma-separated connection counts (default 1,64; with --clients 64)")
    ap.add_argument("--clients", help="compare upstream clients instead, e.g. home,aiohttp,aiosonic,pyreqwest")
    ap.add_argument("--rounds", type=int, default=1, help="with --clients: interleaved rounds, median reported")
    ap.add_argument("--litellm", action="store_true", help="also measure LiteLLM 1.100.5 (small embeddings)")
    ap.add_argument("--soak", type=int, default=0, help="seconds of full load on small embeddings, RSS sampled")
    ap.add_argument("--workers", type=int, default=0, help="also measure --workers N with Redis (small, c=64)")
    ap.add_argument(
        "--tracing", type=int, default=0, help="also N rounds with and without --otlp-endpoint (small, c=64)"
    )
    ap.add_argument(
        "--http2", type=int, default=0, help="also N rounds of HTTP/1.1 vs HTTP/2 (h2load; small, 64 in flight)"
    )
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    for tool in ("nginx", "wrk", "taskset"):
        if not shutil.which(tool) and not Path("/usr/sbin/nginx").exists():
            sys.exit(f"{tool} is missing: apt-get install nginx-light wrk util-linux")
    if args.clients:
        client_versions(args.clients.split(","))  # fail before starting anything
    work = Path(tempfile.mkdtemp(prefix="er-bench-"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user
    ports = write_backend(work)
    nginx = subprocess.Popen(
        [
            "taskset",
            "-c",
            "1",
            shutil.which("nginx") or "/usr/sbin/nginx",
            "-c",
            str(work / "nginx.conf"),
            "-p",
            str(work),
        ],
        start_new_session=True,
    )
    results: list[dict] = []
    proxy = None
    try:
        for port in ports.values():
            wait_http(f"http://127.0.0.1:{port}/health")
        proxy, proxy_ports = start_proxy(work, ports)
        conns = [int(c) for c in (args.conns or ("64" if args.clients else "1,64")).split(",")]
        scenarios = list(filter(None, args.scenarios.split(",")))
        if args.clients:
            compare_clients(
                args.clients.split(","), scenarios, conns, args.rounds, args.duration, work, ports, proxy_ports, results
            )
            scenarios = []  # the clients replace the usual direct-vs-gateway table
        else:
            print(
                f"{'scenario':<18} {'c':>3} {'path':<13} {'rps':>9} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10}"
                f" {'vs proxy':>8} {'p50 vs proxy':>12}"
            )
        for name in scenarios:
            root, direct_path, gw_path, body = SCENARIOS[name]
            gw, gw_url, key = start_gateway(work, ports, root, 1, None)
            try:
                for c in conns:
                    wrk(gw_url + gw_path, body, key, c, 2, work)  # warm-up
                    d = wrk(
                        f"http://127.0.0.1:{ports[root]}{direct_path}",
                        direct_body(name, body),
                        None,
                        c,
                        args.duration,
                        work,
                    )
                    px = wrk(
                        f"http://127.0.0.1:{proxy_ports[root]}{direct_path}",
                        direct_body(name, body),
                        None,
                        c,
                        args.duration,
                        work,
                    )
                    g = wrk(gw_url + gw_path, body, key, c, args.duration, work)  # last: --soak reuses its post.lua
                    for label, path, r in (
                        ("direct", "direct", d),
                        ("(nginx proxy)", "nginx-proxy", px),
                        ("gateway", "gateway", g),
                    ):
                        added = "" if path == "direct" else f"{r['p50'] - d['p50']:+.3f} ms"
                        vs = (
                            f"{g['rps'] / px['rps']:>7.2f}x {g['p50'] - px['p50']:>+9.3f} ms"
                            if path == "gateway" and px["rps"]
                            else ""
                        )
                        print(
                            f"{name:<18} {c:>3} {label:<13} {r['rps']:>9.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} "
                            f"{added:>10} {vs}" + (f"  non-2xx {r['non2xx']}" if r["non2xx"] else "")
                        )
                        results.append({"scenario": name, "conns": c, "path": path, **r})
                if args.soak and name == "small-embeddings":
                    samples = []
                    t_end = time.monotonic() + args.soak
                    soak = subprocess.Popen(
                        [
                            "taskset",
                            "-c",
                            "1",
                            "wrk",
                            "-t2",
                            "-c64",
                            f"-d{args.soak}s",
                            "-s",
                            str(work / "post.lua"),
                            gw_url + gw_path,
                        ],
                        stdout=subprocess.PIPE,
                    )
                    while time.monotonic() < t_end:
                        time.sleep(max(1, args.soak // 30))
                        samples.append(rss_kb(gw.pid))
                    soak.wait()
                    first, last = samples[len(samples) // 5], samples[-1]
                    print(
                        f"soak {args.soak}s: RSS after warm-up {first / 1024:.1f} MiB, at end {last / 1024:.1f} "
                        f"MiB ({(last - first) / first * 100:+.1f} %)"
                    )
                    results.append({"scenario": "soak", "rss_start_kb": first, "rss_end_kb": last, "samples": samples})
            finally:
                stop(gw)
        if args.workers:
            redis_port = free_port()
            redis = subprocess.Popen(
                ["taskset", "-c", "1", "redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
                start_new_session=True,
            )
            time.sleep(0.5)
            _, _, _, body = SCENARIOS["small-embeddings"]
            try:
                redis_url = f"redis://127.0.0.1:{redis_port}/0"
                rps: dict[str, float] = {}
                # one worker in memory, then with Redis, then N workers with Redis: same-run ratios
                for w, url in ((1, None), (1, redis_url), (args.workers, redis_url)):
                    name = f"workers-{w}-{'redis' if url else 'memory'}"
                    gw, gw_url, key = start_gateway(work, ports, "small", w, url)
                    try:
                        wrk(gw_url + "/v1/embeddings", body, key, 64, 2, work)
                        before = redis_load(redis_port)
                        r = wrk(gw_url + "/v1/embeddings", body, key, 64, args.duration, work)
                        rps[name] = r["rps"]
                        load = ""
                        if url:  # what the gateway asks of Redis, per 1,000 requests
                            after = redis_load(redis_port)
                            n = r["rps"] * args.duration / 1000
                            r["redis_scripts_per_1000"] = (after[0] - before[0]) / n
                            r["redis_commands_per_1000"] = (after[1] - before[1]) / n
                            r["redis_cpu_s_per_1000"] = (after[2] - before[2]) / n
                            load = (
                                f"; Redis per 1,000 requests: {r['redis_scripts_per_1000']:.0f} EVALSHA, "
                                f"{r['redis_commands_per_1000']:.0f} commands in all, "
                                f"{r['redis_cpu_s_per_1000'] * 1000:.1f} ms of CPU"
                            )
                        print(f"{name}: {r['rps']:.0f} rps, p50 {r['p50']:.3f} ms, p99 {r['p99']:.3f} ms{load}")
                        results.append({"scenario": name, "conns": 64, **r})
                    finally:
                        stop(gw)
                one = rps["workers-1-redis"]
                print(
                    f"redis / memory (1 worker): {one / rps['workers-1-memory']:.2f}x; "
                    f"{args.workers} workers / 1 (redis): {rps[f'workers-{args.workers}-redis'] / one:.2f}x"
                )
            finally:
                stop(redis)
        if args.tracing:
            measure_tracing(args, work, ports, results)
        if args.http2:
            measure_http2(args, work, ports, results)
        if args.litellm:
            ll, ll_url, ll_key = start_litellm(work, ports)
            try:
                _, _, _, body = SCENARIOS["small-embeddings"]
                for c in conns:
                    r = wrk(ll_url + "/v1/embeddings", body, ll_key, c, args.duration, work)
                    print(
                        f"{'litellm small':<18} {c:>3} {'litellm':<13} {r['rps']:>9.0f} "
                        f"{r['p50']:>8.3f} {r['p99']:>8.3f}"
                    )
                    results.append({"scenario": "small-embeddings", "conns": c, "path": "litellm", **r})
            finally:
                stop(ll)
    finally:
        if proxy:
            stop(proxy)
        stop(nginx)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
