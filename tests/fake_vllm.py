"""A stand-in `vllm serve` for fast tests: answers like vLLM 0.32's pooling server.

Deterministic: an embedding is derived from a hash of the input, a score from
word overlap and a hash, so the gateway's output can be checked exactly.
Faults vLLM cannot be made to produce on demand are switched on with
POST /_admin (delay, 500, 503, garbage, truncated JSON, one result short, flat pre-0.10.1
errors, hang, drop the connection). GET /_stats reports concurrency and the last headers.

`--step-time T --step-capacity K` model vLLM's scheduler: requests queue first come, first
served, and every T seconds one engine step processes up to K items (inputs or documents;
a request finishes in the step that processes its last item), like max_num_seqs = K.

With a key (VLLM_API_KEY in the environment, or --api-key) it guards exactly
what vLLM 0.32's AuthenticationMiddleware guards and no more: paths starting
with /v1, /v2, /inference or /cohere answer 401 {"error": "Unauthorized"}
without the bearer key, while /score, /rerank, /tokenize, /detokenize and
/health stay open.

    python tests/fake_vllm.py --port 8000 --kind embedding --name Qwen3-Embedding-0.6B
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import math
import os
import secrets
import struct
import time
from typing import Any

import orjson
from aiohttp import web


def embed_vector(item: str | list[int], dim: int) -> list[float]:
    seed = item.encode() if isinstance(item, str) else orjson.dumps(item)
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    vals = [((b / 255.0) * 2 - 1) for b in raw[:dim]]
    norm = math.sqrt(sum(v * v for v in vals)) or 1.0
    # float32 round trip so base64 and float answers agree exactly, as in vLLM
    return [struct.unpack("<f", struct.pack("<f", v / norm))[0] for v in vals]


def pair_score(q: str, d: str) -> float:
    qw, dw = set(q.lower().split()), set(d.lower().split())
    overlap = len(qw & dw) / (len(qw) or 1)
    jitter = int.from_bytes(hashlib.sha256((q + "\x00" + d).encode()).digest()[:4], "little") / 2**32
    return round(0.8 * overlap + 0.2 * jitter, 6)


class Engine:
    """First come, first served steps of at most `capacity` items, `step` seconds each."""

    def __init__(self, capacity: int, step: float) -> None:
        self.capacity, self.step = capacity, step
        self.queue: list[list[Any]] = []  # [items left, future]
        self.running = False

    async def run(self, items: int) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.queue.append([max(1, items), fut])
        if not self.running:
            self.running = True
            asyncio.create_task(self._loop())
        await fut

    async def _loop(self) -> None:
        while self.queue:
            budget, done = self.capacity, []
            while budget and self.queue:
                head = self.queue[0]
                take = min(budget, head[0])
                head[0] -= take
                budget -= take
                if head[0]:
                    break
                done.append(self.queue.pop(0)[1])
            await asyncio.sleep(self.step)
            for f in done:
                f.set_result(None)
        self.running = False


def items_of(data: dict[str, Any]) -> int:
    inputs = data.get("input", data.get("text_2"))
    if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int):
        return len(inputs)
    return 1


def count_tokens(item: str | list[int]) -> int:
    return len(item) if isinstance(item, list) else len(item.split()) + 1


class Fake:
    def __init__(self, args: argparse.Namespace) -> None:
        self.kind = args.kind
        self.name = args.name
        self.dim = args.dim
        self.max_len = args.max_model_len
        self.matryoshka = args.matryoshka
        self.delay = args.delay
        self.fault: str | None = None
        self.fault_path: str | None = None  # the fault on this path only (None: every path)
        self.refuse_text: str | None = None  # a 400 for any call with an input containing it
        self.current = 0
        self.prompts = 0  # inputs and documents in flight: what vLLM's scheduler gauges count
        self.max_seen = 0
        self.requests = 0
        self.inputs = 0  # embedding inputs and score documents asked for
        self.by_path: dict[str, int] = {}
        self.last_headers: dict[str, str] = {}
        self.last_body: Any = None
        self.flat_errors = args.flat_errors
        self.engine = Engine(args.step_capacity, args.step_time) if args.step_time else None

    # --- helpers ---------------------------------------------------------------------------
    def error(self, status: int, message: str, etype: str, param: str | None = None) -> web.Response:
        if self.flat_errors:
            body = {"object": "error", "message": message, "type": etype, "param": param, "code": status}
        else:
            body = {"error": {"message": message, "type": etype, "param": param, "code": status}}
        return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")

    def check_model(self, data: dict[str, Any]) -> web.Response | None:
        model = data.get("model")
        if model is not None and model != self.name:
            return self.error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
        return None

    async def guarded(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests += 1
        self.by_path[request.path] = self.by_path.get(request.path, 0) + 1
        self.current += 1
        self.max_seen = max(self.max_seen, self.current)
        self.last_headers = dict(request.headers)
        prompts = 0
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            fault = self.fault if self.fault_path in (None, request.path) else None
            if fault == "500":
                return self.error(500, "EngineCore encountered an issue", "InternalServerError")
            if fault == "503":
                return self.error(503, "The server is overloaded", "ServiceUnavailableError")
            if fault == "garbage":
                return web.Response(body=b"<html>oops</html>", status=200, content_type="text/html")
            if fault == "truncated":  # the start of a JSON answer, cut off (a broken proxy in between)
                return web.Response(body=b'{"object": "list", "data": [', status=200, content_type="application/json")
            if fault == "hang":
                await asyncio.sleep(3600)
            if fault == "drop":
                assert request.transport is not None
                request.transport.close()
                raise ConnectionResetError
            try:
                data = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                return self.error(400, "Expecting value: line 1 column 1 (char 0)", "BadRequestError")
            self.last_body = data
            if not isinstance(data, dict):
                return self.error(400, "Input should be a valid dictionary", "BadRequestError")
            if self.refuse_text and self.refuse_text in orjson.dumps(data.get("input", data.get("text_2"))).decode():
                # an input this vLLM fails on for reasons the gateway cannot see coming
                return self.error(400, f"input refused: contains {self.refuse_text!r}", "BadRequestError", "input")
            if request.path in ("/v1/embeddings", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"):
                prompts = items_of(data) if "documents" not in data else len(data["documents"] or [1])
                self.prompts += prompts
            if self.engine is not None:
                await self.engine.run(items_of(data))
            if request.path in ("/v1/embeddings", "/score", "/v1/score"):
                self.inputs += items_of(data)
            answer = await handler(data)
            if fault == "one_short" and answer.status == 200:  # a 200 with one result fewer than asked
                body = orjson.loads(answer.body)  # type: ignore[arg-type]
                body["data"] = body["data"][:-1]
                return web.Response(body=orjson.dumps(body), content_type="application/json")
            return answer
        finally:
            self.current -= 1
            self.prompts -= prompts

    # --- routes ----------------------------------------------------------------------------
    async def embeddings(self, data: dict[str, Any]) -> web.Response:
        if self.kind != "embedding":
            return web.Response(body=b'{"detail":"Not Found"}', status=404, content_type="application/json")
        if (bad := self.check_model(data)) is not None:
            return bad
        inp = data.get("input")
        if inp == [] or inp == "" or inp is None:
            return self.error(400, "You must pass at least one prompt", "BadRequestError", "input")
        items: list[Any]
        if isinstance(inp, str) or (isinstance(inp, list) and inp and isinstance(inp[0], int)):
            items = [inp]
        else:
            items = list(inp)
        dim = self.dim
        if data.get("dimensions") is not None:
            if not self.matryoshka:
                return self.error(
                    400,
                    f'Model "{self.name}" does not support matryoshka representation, changing output '
                    "dimensions will lead to poor results.",
                    "BadRequestError",
                    "dimensions",
                )
            dim = int(data["dimensions"])
        tokens = 0
        out = []
        trunc = data.get("truncate_prompt_tokens")
        keep = self.max_len if trunc == -1 else trunc  # vLLM: keep the last k tokens (-1: max_model_len)
        for i, item in enumerate(items):
            if isinstance(keep, int) and keep > 0 and count_tokens(item) > keep:
                item = item[-keep:] if isinstance(item, list) else " ".join(item.split()[-(keep - 1) :])
            n = count_tokens(item)
            if n > self.max_len:
                return self.error(
                    400,
                    f"This model's maximum context length is {self.max_len} tokens. However, your prompt "
                    f"contains at least {n} input tokens, (parameter=input_tokens, value={n})",
                    "BadRequestError",
                    "input_tokens",
                )
            tokens += n
            vec = embed_vector(item, dim)
            if data.get("encoding_format") == "base64":
                emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode()
            else:
                emb = vec
            out.append({"index": i, "object": "embedding", "embedding": emb})
        body = {
            "id": f"embd-{self.requests}",
            "object": "list",
            "created": int(time.time()),
            "model": self.name,
            "data": out,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,  # vLLM 0.32 writes it too
            },
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def score(self, data: dict[str, Any]) -> web.Response:
        if (bad := self.check_model(data)) is not None:
            return bad
        t1, t2 = data.get("text_1"), data.get("text_2")
        if t1 is None or t2 is None:
            return self.error(400, "text_1 and text_2 are required", "BadRequestError")

        def texts(v: Any) -> bool:
            return isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))

        if not texts(t1) or not texts(t2):
            return self.error(400, "1 validation error: text_1/text_2 must be strings", "BadRequestError")
        docs = t2 if isinstance(t2, list) else [t2]
        firsts = t1 if isinstance(t1, list) else [t1]
        if not docs or not firsts:
            return self.error(400, "At least one document is required", "BadRequestError")
        # Like vLLM: 1:1, 1:N or N:N (a list of queries is zipped with the documents).
        if len(firsts) > 1 and len(firsts) != len(docs):
            return self.error(400, "Input lengths must be either 1:1, 1:N or N:N", "BadRequestError")
        pairs = list(zip(firsts * len(docs) if len(firsts) == 1 else firsts, docs, strict=True))
        rows = []
        tokens = 0
        for i, (t1, d) in enumerate(pairs):
            n = count_tokens(t1) + count_tokens(d)
            if n > self.max_len:
                return self.error(
                    400,
                    f"This model's maximum context length is {self.max_len} tokens. However, your prompt "
                    f"contains at least {n} input tokens, (parameter=input_tokens, value={n})",
                    "BadRequestError",
                    "input_tokens",
                )
            tokens += n
            rows.append({"index": i, "object": "score", "score": pair_score(t1, d)})
        body = {
            "id": f"score-{self.requests}",
            "object": "list",
            "created": int(time.time()),
            "model": self.name,
            "data": rows,
            "usage": {
                "prompt_tokens": tokens,
                "total_tokens": tokens,
                "completion_tokens": 0,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,  # vLLM 0.32 writes it too
            },
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def rerank(self, data: dict[str, Any]) -> web.Response:
        # vLLM's Jina-style route; the gateway uses /score, but this one is open without a key.
        if (bad := self.check_model(data)) is not None:
            return bad
        query, docs = str(data.get("query", "")), [str(d) for d in data.get("documents", [])]
        scored = sorted(((i, pair_score(query, d)) for i, d in enumerate(docs)), key=lambda x: -x[1])
        top_n = int(data.get("top_n") or len(docs))
        results = [{"index": i, "document": {"text": docs[i]}, "relevance_score": sc} for i, sc in scored[:top_n]]
        tokens = sum(count_tokens(query) + count_tokens(d) for d in docs)
        return web.json_response(
            {"id": f"rerank-{self.requests}", "model": self.name, "usage": {"total_tokens": tokens}, "results": results}
        )

    async def tokenize(self, data: dict[str, Any]) -> web.Response:
        words = str(data.get("prompt", "")).split()
        # one "token" per word, split as count_tokens splits (vLLM's /tokenize and /score agree too);
        # ids index a per-process table so detokenize can invert them
        ids = []
        for w in words:
            ids.append(VOCAB.setdefault(w, len(VOCAB)))
        return web.json_response({"count": len(ids), "max_model_len": self.max_len, "tokens": ids})

    async def detokenize(self, data: dict[str, Any]) -> web.Response:
        rev = {v: k for k, v in VOCAB.items()}
        return web.json_response({"prompt": " ".join(rev[i] for i in data.get("tokens", []))})


VOCAB: dict[str, int] = {}

# vLLM 0.32's GUARDED_PREFIX, matched with a plain startswith as vLLM does.
GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")


def auth_middleware(key: str) -> Any:
    """vLLM's AuthenticationMiddleware: a bearer key on the guarded prefixes only."""
    want = hashlib.sha256(key.encode()).digest()

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "OPTIONS" and request.path.startswith(GUARDED_PREFIX):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            got = hashlib.sha256(token.encode()).digest()
            if scheme.lower() != "bearer" or not secrets.compare_digest(got, want):
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    return check


def make_app(fake: Fake, api_key: str | None = None) -> web.Application:
    app = web.Application(client_max_size=256 * 1024 * 1024, middlewares=[auth_middleware(api_key)] if api_key else [])

    def wrap(handler: Any) -> Any:
        async def route(request: web.Request) -> web.StreamResponse:
            return await fake.guarded(request, handler)

        return route

    async def health(request: web.Request) -> web.Response:
        if fake.fault == "unhealthy":
            return web.Response(status=503)
        return web.Response(status=200)

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {
                        "id": fake.name,
                        "object": "model",
                        "created": 0,
                        "owned_by": "vllm",
                        "root": fake.name,
                        "parent": None,
                        "max_model_len": fake.max_len,
                        "permission": [],
                    }
                ],
            }
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "max_concurrent": fake.max_seen,
                "current": fake.current,
                "requests": fake.requests,
                "inputs": fake.inputs,
                "by_path": fake.by_path,
                "last_headers": fake.last_headers,
                "last_body": fake.last_body,
            }
        )

    async def admin(request: web.Request) -> web.Response:
        data = await request.json()
        if "delay" in data:
            fake.delay = float(data["delay"])
        if "fault" in data:
            fake.fault = data["fault"]
            fake.fault_path = data.get("fault_path")
        if "refuse_text" in data:
            fake.refuse_text = data["refuse_text"]
        if "flat_errors" in data:
            fake.flat_errors = bool(data["flat_errors"])
        if data.get("reset_stats"):
            fake.max_seen = fake.requests = fake.inputs = 0
            fake.by_path = {}
        return web.json_response({"ok": True})

    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)

    async def metrics(request: web.Request) -> web.Response:
        # vLLM's scheduler gauges, in its format (one line per engine, labelled by engine and model):
        # one request per prompt (an input or a document), as vLLM's engine counts them
        capacity = fake.engine.capacity if fake.engine else fake.prompts
        running = min(fake.prompts, capacity)
        labels = f'{{engine="0",model_name="{fake.name}"}}'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(fake.prompts - running)}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/_stats", stats)
    app.router.add_post("/_admin", admin)
    app.router.add_post("/v1/embeddings", wrap(fake.embeddings))
    app.router.add_post("/score", wrap(fake.score))
    app.router.add_post("/v1/score", wrap(fake.score))
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        app.router.add_post(path, wrap(fake.rerank))
    app.router.add_post("/tokenize", wrap(fake.tokenize))
    app.router.add_post("/detokenize", wrap(fake.detokenize))
    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kind", choices=["embedding", "rerank"], default="embedding")
    p.add_argument("--name", default="Qwen3-Embedding-0.6B")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--matryoshka", action="store_true")
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--step-time", type=float, default=0.0, help="seconds per engine step (0: no engine)")
    p.add_argument("--step-capacity", type=int, default=256, help="items per engine step")
    p.add_argument("--flat-errors", action="store_true", help="answer errors like vLLM < 0.10.1")
    p.add_argument("--api-key", help="like vLLM: require this bearer key on /v1 (default: $VLLM_API_KEY)")
    args = p.parse_args()
    api_key = args.api_key or os.environ.get("VLLM_API_KEY") or None
    web.run_app(
        make_app(Fake(args), api_key), host=args.host, port=args.port, print=None, access_log=None, backlog=4096
    )


if __name__ == "__main__":
    main()
