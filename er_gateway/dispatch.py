"""Everything between a service and a replica: concurrency slots, fan-out, decoding, timing.

Services (embeddings.py, rerank.py) build upstream bodies and shape answers; they send them
only through a Dispatcher. It takes a slot of the concurrency cap for each call, lets the
pool pick a replica and retry (upstream.py), checks that what came back is JSON (anything
else is a 502, whatever the endpoint), and accounts the time in the request's RequestInfo
as wall-clock spans, so parts sent at once are not counted twice.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from time import perf_counter, time_ns
from typing import Any, TypeVar

import orjson

from .admission import Admission
from .coalesce import Coalescer, Group, Member
from .concurrency import FairGate, GlobalSlots
from .errors import GatewayError
from .observability import Metrics, RequestInfo
from .observability.tracing import Tracing
from .settings import Settings
from .upstream import Pool, Replica, UpstreamResult

T = TypeVar("T")
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


class Dispatcher:
    def __init__(
        self,
        gate: FairGate,
        metrics: Metrics,
        coalesce: Settings | None = None,
        slots: GlobalSlots | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.gate = gate
        self.tracing = tracing  # spans of upstream calls, queue waits and batches (when exporting)
        self.slots = slots  # --global-max-concurrency: a lease in Redis besides the process's slot
        self.metrics = metrics
        # None: every request goes alone (--no-coalesce)
        self.coalescer = (
            Coalescer(self, coalesce.coalesce_wait_ms, coalesce.coalesce_max_inputs, coalesce.coalesce_max_tokens)
            if coalesce is not None and coalesce.coalesce
            else None
        )

    async def send(
        self, pool: Pool, path: str, body: bytes, adm: Admission, items: int | None = None
    ) -> UpstreamResult:
        """One upstream call; its answer as bytes, checked to look like a JSON object (first and
        last byte) but not decoded: an embeddings answer goes back as vLLM wrote it.

        The tokens the answer reports are added to `adm.done_tokens`: what the backend did is
        charged, whatever becomes of the request afterwards.
        """
        key = adm.info.key_name or ""
        lease = await self._acquire(key, adm.info)
        try:
            return await self.answered(pool, path, body, adm, items)
        finally:
            self.gate.release(key)
            if lease is not None:
                await self._give_back(lease)

    async def answered(
        self, pool: Pool, path: str, body: bytes, adm: Admission, items: int | None = None
    ) -> UpstreamResult:
        """`send` for a request that holds its slot already (coalesce.py sends a member alone).
        `items`: the prompts vLLM will run for it (default: the request's inputs or documents)."""
        result = await self.call(pool, path, body, (adm.info,), adm.info.request_id, items)
        adm.done_tokens += usage_tokens(result.body) or 0
        return result

    async def coalesced(self, group: Group, member: Member) -> Any:
        """`member`'s answer from a call it may share with other requests (coalesce.py), under
        its own concurrency slot; its tokens are added to its own `done_tokens`."""
        assert self.coalescer is not None
        key = member.adm.info.key_name or ""
        lease = await self._acquire(key, member.adm.info)
        try:
            return await self.coalescer.submit(group, member)
        finally:
            self.gate.release(key)
            if lease is not None:
                await self._give_back(lease)

    async def _acquire(self, key: str, info: RequestInfo) -> str | None:
        """The process's slot for `key`, then (with --global-max-concurrency) a global lease,
        returned for `_give_back` (None without the cap, or when Redis failed open)."""
        info.queued(1)
        lease = None
        started = time_ns() if info.trace is not None else 0
        try:
            waited = await self.gate.acquire(key)
            if self.slots is not None:
                start = perf_counter()
                try:
                    lease = await self.slots.acquire(waited)
                except BaseException:
                    self.gate.release(key)
                    raise
                waited += perf_counter() - start
        finally:
            info.queued(-1)
        if waited:
            self.metrics.queue_wait.observe(waited)
            if info.trace is not None and info.trace.span is not None:
                info.trace.children.append(("queue wait", started, time_ns(), {"er.waited_s": waited}))
        return lease

    async def _give_back(self, lease: str) -> None:
        assert self.slots is not None
        await self.slots.release(lease)

    async def call(
        self,
        pool: Pool,
        path: str,
        body: bytes,
        infos: Sequence[RequestInfo],
        request_id: str,
        items: int | None = None,
    ) -> UpstreamResult:
        """POST `body` for the requests in `infos` (one, or the members of a merged call), who
        hold their slots; the answer checked to look like a JSON object. `items` is what vLLM
        counts as requests (one per input or document; default: the requests' own counts), so the
        replica's load can be compared with what its /metrics says (upstream.Pool.pick)."""
        if items is None:
            items = sum(info.items or 1 for info in infos)
        for info in infos:
            info.sending(1)
        start = perf_counter()
        tried: list[Replica] = []
        m = self.metrics
        trace = infos[0].trace
        span = parent = None
        if trace is not None:
            if trace.span is not None and self.tracing is not None:
                span = self.tracing.child(trace, f"upstream {path}")
                started = time_ns()
            parent = trace.upstream_header(span)
        try:
            # A task of its own: the call's wake-ups then resume a short chain of coroutines, not
            # the request's ten, which measured 12 % more small-embedding rps (bench/RESULTS.md).
            result = await asyncio.ensure_future(pool.post(path, body, request_id, tried, items, parent))
        finally:
            if span is not None:
                attrs = {"er.model": pool.model.name, "er.items": items, "er.retries": max(0, len(tried) - 1)}
                span.set_attributes({**attrs, **({"er.replica": tried[-1].url} if tried else {})})
                span.end()
                if len(infos) > 1:  # a coalesced batch: each member's trace shows the shared call
                    batch = {"er.batch": request_id, "er.batch_members": len(infos), "er.items": items}
                    for other in infos:
                        if other.trace is not None and other.trace.span is not None:
                            other.trace.children.append(("coalesced batch", started, time_ns(), batch))
            for info in infos:
                info.sending(-1)
                if tried:  # failed or not, the access log and the metrics say where it went
                    info.replica = tried[-1].url
                    info.retries += len(tried) - 1
            if len(tried) > 1:
                m.retries.labels(pool.model.name).inc(len(tried) - 1)
        m.child(m.upstream, pool.model.name).observe(perf_counter() - start)
        if not _looks_like_object(result.body):
            raise self._not_json(pool, path, result)
        return result

    async def json(self, pool: Pool, path: str, body: bytes, adm: Admission, items: int = 0) -> dict[str, Any]:
        """One upstream call, its answer decoded (a 502 if it is not a JSON object). `items`: the
        prompts it runs (0 for /tokenize and /detokenize, which do not reach the engine)."""
        result = await self.send(pool, path, body, adm, items)
        try:
            data = orjson.loads(result.body)
        except orjson.JSONDecodeError:
            data = None
        if not isinstance(data, dict):
            raise self._not_json(pool, path, result)
        return data

    async def fan_out(
        self, pool: Pool, path: str, bodies: list[bytes], adm: Admission, items: list[int]
    ) -> list[dict[str, Any]]:
        """Parts of one request sent at once (the pool spreads them over its replicas); their
        answers decoded, in order. If a part fails, the first failure in order is raised once
        every part has finished (`adm.done_tokens` then holds what the others cost)."""
        if len(bodies) == 1:
            return [await self.json(pool, path, bodies[0], adm, items[0])]
        return await gather_all(self.json(pool, path, b, adm, n) for b, n in zip(bodies, items, strict=True))

    async def split(
        self, pool: Pool, path: str, items: list[Any], size: int, body: Callable[[list[Any]], bytes], adm: Admission
    ) -> list[tuple[list[Any], dict[str, Any]]]:
        """`items` in consecutive chunks of at most `size`, `body(chunk)` sent for each (fan_out):
        (chunk, its decoded answer) in order."""
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        parts = await self.fan_out(pool, path, [body(c) for c in chunks], adm, [len(c) for c in chunks])
        return list(zip(chunks, parts, strict=True))

    @staticmethod
    def _not_json(pool: Pool, path: str, result: UpstreamResult) -> GatewayError:
        # A replica answering 200 with something else is broken: ejected like one that errs.
        pool.bad_answer(result.replica, f"{path} answered 200 with something that is not a JSON object")
        return GatewayError(502, f"backend answered {path} with something that is not a JSON object")


async def gather_all(aws: Iterable[Awaitable[T]], *, limit: int | None = None) -> list[T]:
    """Run every awaitable to its end (at most `limit` at once), then raise the first failure in
    order, if any.

    Unlike a plain gather, nothing is left running once the request has answered: an orphaned
    upstream call would hold a concurrency slot and spend backend time nobody waits for.
    """
    if limit is not None:
        sem = asyncio.Semaphore(limit)

        async def bounded(aw: Awaitable[T]) -> T:
            async with sem:
                return await aw

        aws = [bounded(aw) for aw in aws]
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]  # no exceptions left in it


def _looks_like_object(body: bytes) -> bool:
    """First and last byte are braces: a cheap test that catches a cut-off or non-JSON answer."""
    if body[:1] == b"{" and body[-1:] == b"}":
        return True  # vLLM's own answers: no copy of a large body on the hot path
    stripped = body.strip()
    return stripped[:1] == b"{" and stripped[-1:] == b"}"


def usage_tokens(body: bytes) -> int | None:
    """`usage.total_tokens` from a vLLM answer without parsing its vectors.

    `usage` is the last field vLLM writes, so searching the tail is enough and
    vector bytes (numbers or base64, never quotes) cannot contain the key.
    """
    m = _TOTAL_TOKENS.search(body[-512:])
    return int(m.group(1)) if m else None
