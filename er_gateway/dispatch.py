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
from time import perf_counter
from typing import Any

import orjson

from .admission import Admission
from .concurrency import FairGate
from .errors import GatewayError
from .observability import Metrics
from .upstream import Pool, UpstreamResult

_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


class Dispatcher:
    def __init__(self, gate: FairGate, metrics: Metrics) -> None:
        self.gate = gate
        self.metrics = metrics

    async def send(self, pool: Pool, path: str, body: bytes, adm: Admission) -> UpstreamResult:
        """One upstream call; its answer as bytes, checked to be a JSON object but not decoded
        (an embeddings answer goes back to the client as vLLM wrote it)."""
        info = adm.info
        key = info.key_name or ""
        info.queued(1)
        try:
            waited = await self.gate.acquire(key)
        finally:
            info.queued(-1)
        info.sending(1)
        start = perf_counter()
        try:
            result = await pool.post(path, body, info.request_id)
        finally:
            info.sending(-1)
            self.gate.release(key)
        info.replica = result.replica
        info.retries += result.retries
        m = self.metrics
        if waited:
            m.queue_wait.observe(waited)
        m.child(m.upstream, pool.model.name).observe(perf_counter() - start)
        if result.retries:
            m.retries.labels(pool.model.name).inc(result.retries)
        if result.body.lstrip()[:1] != b"{":
            raise GatewayError(502, f"backend answered {path} with something that is not a JSON object")
        return result

    async def json(self, pool: Pool, path: str, body: bytes, adm: Admission) -> dict[str, Any]:
        """One upstream call, its answer decoded (a 502 if it is not a JSON object)."""
        return decode(path, await self.send(pool, path, body, adm))

    async def fan_out(self, pool: Pool, path: str, bodies: list[bytes], adm: Admission) -> list[dict[str, Any]]:
        """Parts of one request sent at once (the pool spreads them over its replicas); their
        answers decoded, in order.

        If a part fails, the first failure in order is raised once all have finished, and
        `adm.done_tokens` says what the backend did for the parts it answered: that much is
        charged even though the request fails.
        """
        if len(bodies) == 1:
            return [await self.json(pool, path, bodies[0], adm)]
        answers = await asyncio.gather(*(self.send(pool, path, b, adm) for b in bodies), return_exceptions=True)
        adm.done_tokens = sum(usage_tokens(a.body) or 0 for a in answers if isinstance(a, UpstreamResult))
        parts = []
        for a in answers:
            if isinstance(a, BaseException):
                raise a
            parts.append(decode(path, a))
        return parts


def decode(path: str, result: UpstreamResult) -> dict[str, Any]:
    try:
        data = orjson.loads(result.body)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise GatewayError(502, f"backend answered {path} with something that is not a JSON object")
    return data


def usage_tokens(body: bytes) -> int | None:
    """`usage.total_tokens` from a vLLM answer without parsing its vectors.

    `usage` is the last field vLLM writes, so searching the tail is enough and
    vector bytes (numbers or base64, never quotes) cannot contain the key.
    """
    m = _TOTAL_TOKENS.search(body[-512:])
    return int(m.group(1)) if m else None
