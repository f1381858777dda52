#!/usr/bin/env python3
"""Load-test a running gateway (or vLLM): requests/s, p50/p95/p99 latency, errors by status.

By default it measures what the project's first load tester measured: POST /rerank with
{"query": ..., "documents": [8 passages], "max_length": 512}, 16 at a time for 10 s.

    export ER_KEY=er-...     # a key with a high limit, e.g. from
                             # python embedding_reranker_proxy.py keys create --name bench --rpm 100000
    python performance_test.py --url http://localhost:2048
    python performance_test.py --endpoint embeddings --concurrency 32 --duration 30 --batch-size 8
    python performance_test.py --endpoint rerank --requests 2000 --batch-size 16 --instruction "Find answers"

The key is --key or, if not given, the ER_KEY environment variable (sent as a Bearer token).
--endpoint: seed-rerank (POST /rerank, the default), rerank (POST /v1/rerank),
embeddings (POST /v1/embeddings) or batch_rerank (POST /batch_rerank, two queries per request).
--duration runs for that many seconds; --requests sends exactly that many.

A 401 (no key, or a key the gateway does not know) stops the run at once with an explanation.
429 answers (the key's rate limit, shown with the X-RateLimit-Limit the gateway sent) do not stop
it; the summary says how many there were and how to get a key with a higher limit.
A progress bar goes to stderr; the summary to stdout (--json: one JSON object with rps, p50_ms,
p95_ms, p99_ms, errors as {status or connection error kind: count}, and hints). Explanations
go to stderr. Exit status: 0 if every request succeeded, 2 if the key was refused, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter

import orjson

from er_gateway.httpclient import ConnectError, HTTPPool, UpstreamError, _Connection, check_backend_url

PATHS = {
    "seed-rerank": "/rerank",
    "rerank": "/v1/rerank",
    "embeddings": "/v1/embeddings",
    "batch_rerank": "/batch_rerank",
}
DEFAULT_ENDPOINT = "seed-rerank"
SEED_MAX_LENGTH = 512  # what the first load tester sent to /rerank
CREATE_KEY = "python embedding_reranker_proxy.py keys create --name bench --rpm 100000"


class _RecordingConnection(_Connection):
    """The pool's connection, also noting the X-RateLimit-Limit header of each answer."""

    def __init__(self, max_body: int, seen: Counter[str]) -> None:
        super().__init__(max_body)
        self.seen_limits = seen

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        if name.lower() == b"x-ratelimit-limit":
            self.seen_limits[value.decode("latin-1").strip()] += 1


class RecordingPool(HTTPPool):
    """HTTPPool whose connections record the rate-limit headers they see (in `limits`)."""

    def __init__(self, url: str, **kw: object) -> None:
        super().__init__(url, **kw)  # type: ignore[arg-type]
        self.limits: Counter[str] = Counter()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _RecordingConnection(self.max_body, self.limits), self.host, self.port, ssl=self.ssl
                )
        except TimeoutError:
            raise ConnectError(f"connect timeout after {self.connect_timeout:g} s") from None
        except OSError as e:
            raise ConnectError(e.strerror or "connection failed") from None
        return conn


def request_body(args: argparse.Namespace) -> bytes:
    texts = [
        f"Sample passage {i}: Paris is the capital and the largest city of France." for i in range(args.batch_size)
    ]
    if args.endpoint == "embeddings":
        body: object = {"input": texts if args.batch_size > 1 else texts[0]}
        if args.instruction:
            body["instruction"] = args.instruction  # type: ignore[index]
    else:
        one: dict[str, object] = {"query": "What is the capital of France?", "documents": texts}
        max_length = args.max_length
        if max_length is None and args.endpoint == "seed-rerank":
            max_length = SEED_MAX_LENGTH
        if max_length:
            one["max_length"] = max_length
        if args.instruction:
            one["instruction"] = args.instruction
        body = [one, one] if args.endpoint == "batch_rerank" else one
    if args.model:
        if isinstance(body, dict):
            body["model"] = args.model
        else:
            body = [{**b, "model": args.model} for b in body]  # type: ignore[union-attr]
    return orjson.dumps(body)


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(p / 100 * len(sorted_values)))]


def error_message(body: bytes) -> str:
    """The gateway's error message from an error answer's body (or the start of the body)."""
    try:
        data = orjson.loads(body)
        msg = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("detail")
        if msg:
            return str(msg)[:300]
    except (orjson.JSONDecodeError, AttributeError):
        pass
    return body[:300].decode("utf-8", "replace")


def hints_for(summary: dict[str, object], key_given: bool) -> list[str]:
    errors: dict[str, int] = summary["errors"]  # type: ignore[assignment]
    total: int = summary["requests"]  # type: ignore[assignment]
    samples: dict[str, str] = summary["error_samples"]  # type: ignore[assignment]
    hints = []
    if "401" in errors:
        if key_given:
            hints.append(
                f"401: the gateway refused the key ({samples.get('401', '')}) — pass a valid --key or "
                f"export ER_KEY (create one with `{CREATE_KEY}`)"
            )
        else:
            hints.append(
                f"401: no key was sent and the gateway needs one — pass --key or export ER_KEY "
                f"(create one with `{CREATE_KEY}`)"
            )
    if "429" in errors:
        limit = summary.get("rate_limit")
        shown = f"X-RateLimit-Limit: {limit}" if limit else "no X-RateLimit-Limit header seen"
        hints.append(
            f"429: {errors['429']} of {total} requests hit the key's rate limit ({shown}); the numbers "
            f"above measure the limit, not the gateway — use a key with a higher --rpm "
            f"(`{CREATE_KEY}`)"
        )
    if "403" in errors:
        hints.append(f"403: the key may not use this model or endpoint: {samples.get('403', '')}")
    if "ConnectError" in errors and not summary["ok"]:
        hints.append(
            f"could not connect to {summary['url']} ({samples.get('ConnectError', '')}) — "
            f"is the gateway running there? (--url)"
        )
    for status, msg in samples.items():
        if status not in ("401", "403", "429", "ConnectError"):
            hints.append(f"{status} ({errors[status]}x), e.g.: {msg}")
    return hints


async def run(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    pool = RecordingPool(
        args.url, connect_timeout=5, timeout=args.timeout, headers={"Content-Type": "application/json", **headers}
    )
    body = request_body(args)
    path = PATHS[args.endpoint]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    samples: dict[str, str] = {}  # one error message per non-2xx status / error kind
    stop: list[str] = []  # why the run stopped early, if it did
    start = time.perf_counter()
    deadline = start + args.duration if args.duration else None
    remaining = [args.requests] if args.requests else None

    def more() -> bool:
        if stop:
            return False
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
            except (UpstreamError, TimeoutError) as e:
                kind = type(e).__name__
                statuses[kind] += 1
                samples.setdefault(kind, str(e) or kind)
                if isinstance(e, ConnectError) and not any(s[0].isdigit() for s in statuses):
                    stop.append("connect")  # nothing ever answered: the URL is wrong or down
                continue
            status = str(r.status)
            statuses[status] += 1
            if r.status < 400:
                latencies.append(time.perf_counter() - t)
            else:
                samples.setdefault(status, error_message(r.body))
                if r.status == 401:
                    stop.append("401")  # every further request would be refused too

    def draw() -> float:
        done = sum(statuses.values())
        frac = done / args.requests if args.requests else (time.perf_counter() - start) / args.duration
        frac = min(1.0, frac)
        bar = "#" * int(frac * 30)
        elapsed = time.perf_counter() - start
        sys.stderr.write(
            f"\r[{bar:<30}] {frac * 100:5.1f}%  {done} requests  "
            f"{done / elapsed if elapsed else 0:8.1f} req/s  errors {done - len(latencies)}"
        )
        sys.stderr.flush()
        return frac

    async def progress() -> None:
        while draw() < 1.0 and not stop:
            await asyncio.sleep(0.25)

    bar = asyncio.create_task(progress()) if not args.quiet else None
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    if bar:
        bar.cancel()
        draw()  # the final count
        sys.stderr.write("\n")
    await pool.close()
    lat = sorted(latencies)
    total = sum(statuses.values())

    def ms(q: float) -> float | None:
        v = percentile(lat, q)
        return None if v is None else round(v * 1000, 3)

    rps = round(total / elapsed, 1) if elapsed else 0.0
    errors = {k: v for k, v in sorted(statuses.items()) if not (k.isdigit() and int(k) < 400)}
    limits = pool.limits.most_common()
    items = args.batch_size * (2 if args.endpoint == "batch_rerank" else 1)  # documents scored per request
    return {
        "url": args.url + path,
        "endpoint": args.endpoint,
        "concurrency": args.concurrency,
        "batch_size": args.batch_size,
        "requests": total,
        "ok": len(lat),
        "seconds": round(elapsed, 3),
        "rps": rps,
        "throughput_rps": rps,
        "items_per_s": round(len(lat) * items / elapsed, 1) if elapsed else 0,
        "p50_ms": ms(50),
        "p95_ms": ms(95),
        "p99_ms": ms(99),
        "latency_ms": {p: ms(q) for p, q in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("max", 100))},
        "errors": errors,
        "error_samples": samples,
        "by_status": dict(sorted(statuses.items())),
        "rate_limit": ", ".join(v for v, _ in limits) if limits else None,
        "stopped_early": stop[0] if stop else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:2048", help="gateway base URL (default %(default)s)")
    ap.add_argument(
        "--key",
        default=os.environ.get("ER_KEY") or None,
        help="API key, sent as a Bearer token (default: the ER_KEY environment variable)",
    )
    ap.add_argument(
        "--endpoint",
        choices=list(PATHS),
        default=DEFAULT_ENDPOINT,
        help="what to load: "
        + ", ".join(f"{k} = POST {v}" for k, v in PATHS.items())
        + " (default %(default)s, the first load tester's request)",
    )
    ap.add_argument("--model", help="model name (default: the gateway's default of that kind)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (default %(default)s)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--duration", type=float, help="seconds to run (default 10)")
    group.add_argument("--requests", type=int, help="number of requests to send")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="inputs (embeddings) or documents (rerank) per request (default %(default)s)",
    )
    ap.add_argument(
        "--max-length",
        type=int,
        help=f"rerank max_length to send (default {SEED_MAX_LENGTH} for seed-rerank, none for the "
        "others; 0 sends none)",
    )
    ap.add_argument("--instruction", help="Qwen3 instruction to send")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per request (default %(default)s)")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()
    if not args.duration and not args.requests:
        args.duration = 10.0
    if args.concurrency < 1 or args.batch_size < 1:
        ap.error("--concurrency and --batch-size must be at least 1")
    try:
        check_backend_url(args.url)
    except ValueError as e:
        ap.error(str(e))
    summary = asyncio.run(run(args))
    hints = hints_for(summary, bool(args.key))
    summary["hints"] = hints
    if args.json:
        print(json.dumps(summary, indent=2))
    else:

        def fmt(v: object) -> str:
            return "-" if v is None else f"{v}"

        lat = summary["latency_ms"]
        errors: dict[str, int] = summary["errors"]  # type: ignore[assignment]
        print(
            f"{summary['requests']} requests in {summary['seconds']} s to {summary['url']} "
            f"(concurrency {summary['concurrency']}, batch {summary['batch_size']})"
            + (" — stopped early" if summary["stopped_early"] else "")
        )
        print(f"rps: {summary['rps']} req/s, {summary['items_per_s']} items/s, {summary['ok']} ok")
        print(
            f"latency ms: p50 {fmt(summary['p50_ms'])}, p95 {fmt(summary['p95_ms'])}, "
            f"p99 {fmt(summary['p99_ms'])}, max {fmt(lat['max'])}"
        )  # type: ignore[index]
        print("errors: " + (", ".join(f"{k}: {v}" for k, v in errors.items()) if errors else "none"))
        if summary["rate_limit"]:
            print(f"X-RateLimit-Limit: {summary['rate_limit']}")
    for h in hints:
        print(h, file=sys.stderr)
    if summary["stopped_early"] == "401":
        return 2
    return 0 if summary["ok"] == summary["requests"] and summary["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
