#!/usr/bin/env python3
"""Load-test any gateway (or vLLM) URL: throughput, latency percentiles, errors by status.

    python performance_test.py --url http://localhost:2048 --key $ER_KEY --endpoint embeddings \\
        --concurrency 32 --duration 30 --batch-size 8
    python performance_test.py --endpoint rerank --requests 2000 --batch-size 16 --instruction "Find answers"

--duration runs for that many seconds; --requests sends exactly that many. A progress bar goes
to stderr; the summary to stdout (--json for machines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import orjson

from er_gateway.httpclient import HTTPPool, UpstreamError

PATHS = {"embeddings": "/v1/embeddings", "rerank": "/v1/rerank", "seed-rerank": "/rerank",
         "batch_rerank": "/batch_rerank"}


def request_body(args: argparse.Namespace) -> bytes:
    texts = [f"Sample passage {i}: Paris is the capital and the largest city of France." for i in range(args.batch_size)]
    if args.endpoint == "embeddings":
        body: object = {"input": texts if args.batch_size > 1 else texts[0]}
        if args.instruction:
            body["instruction"] = args.instruction  # type: ignore[index]
    else:
        one = {"query": "What is the capital of France?", "documents": texts}
        if args.instruction:
            one["instruction"] = args.instruction
        body = [one, one] if args.endpoint == "batch_rerank" else one
    if args.model and isinstance(body, dict):
        body["model"] = args.model
    return orjson.dumps(body)


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


async def run(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    pool = HTTPPool(args.url, connect_timeout=5, timeout=args.timeout,
                    headers={"Content-Type": "application/json", **headers})
    body = request_body(args)
    path = PATHS[args.endpoint]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    start = time.perf_counter()
    deadline = start + args.duration if args.duration else None
    remaining = [args.requests] if args.requests else None

    def more() -> bool:
        if remaining is not None:
            if remaining[0] <= 0:
                return False
            remaining[0] -= 1
            return True
        return time.perf_counter() < deadline  # type: ignore[operator]

    async def worker() -> None:
        while more():
            t = time.perf_counter()
            try:
                r = await pool.request("POST", path, body)
                statuses[str(r.status)] += 1
                if r.status < 400:
                    latencies.append(time.perf_counter() - t)
            except (UpstreamError, TimeoutError) as e:
                statuses[type(e).__name__] += 1

    async def progress() -> None:
        total = args.requests or args.duration
        while True:
            done = sum(statuses.values())
            frac = done / args.requests if args.requests else (time.perf_counter() - start) / args.duration
            frac = min(1.0, frac)
            bar = "#" * int(frac * 30)
            elapsed = time.perf_counter() - start
            sys.stderr.write(f"\r[{bar:<30}] {frac * 100:5.1f}%  {done} requests  "
                             f"{done / elapsed if elapsed else 0:8.1f} req/s  errors {done - len(latencies)}")
            sys.stderr.flush()
            if frac >= 1.0 or total == 0:
                break
            await asyncio.sleep(0.25)

    bar = asyncio.create_task(progress()) if not args.quiet else None
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    if bar:
        await asyncio.sleep(0.3)
        bar.cancel()
        sys.stderr.write("\n")
    await pool.close()
    lat = sorted(latencies)
    total = sum(statuses.values())
    return {
        "url": args.url + path, "concurrency": args.concurrency, "batch_size": args.batch_size,
        "requests": total, "ok": len(lat), "seconds": round(elapsed, 3),
        "throughput_rps": round(total / elapsed, 1) if elapsed else 0,
        "items_per_s": round(len(lat) * args.batch_size / elapsed, 1) if elapsed else 0,
        "latency_ms": {p: round(percentile(lat, q) * 1000, 3) for p, q in
                       (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("max", 100))},
        "by_status": dict(sorted(statuses.items())),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:2048", help="gateway base URL")
    ap.add_argument("--key", help="API key (Bearer)")
    ap.add_argument("--endpoint", choices=list(PATHS), default="embeddings")
    ap.add_argument("--model", help="model name (default: the gateway's default of that kind)")
    ap.add_argument("--concurrency", type=int, default=16)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--duration", type=float, help="seconds to run (default 10)")
    group.add_argument("--requests", type=int, help="number of requests to send")
    ap.add_argument("--batch-size", type=int, default=1, help="inputs (embeddings) or documents (rerank) per request")
    ap.add_argument("--instruction", help="Qwen3 instruction to send")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()
    if not args.duration and not args.requests:
        args.duration = 10.0
    summary = asyncio.run(run(args))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        lat = summary["latency_ms"]
        print(f"{summary['requests']} requests in {summary['seconds']} s to {summary['url']} "
              f"(concurrency {summary['concurrency']}, batch {summary['batch_size']})")
        print(f"throughput: {summary['throughput_rps']} req/s, {summary['items_per_s']} items/s")
        print("latency ms: " + ", ".join(f"{k} {v}" for k, v in lat.items()))  # type: ignore[union-attr]
        print("by status:  " + ", ".join(f"{k}: {v}" for k, v in summary["by_status"].items()))  # type: ignore[union-attr]
    return 0 if summary["ok"] == summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
