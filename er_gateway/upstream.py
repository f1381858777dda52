"""Upstream vLLM replicas: pooled clients, replica choice, retries, health, error mapping.

One keep-alive HTTPPool per backend URL (httpclient.py; why not httpx or aiohttp: README,
"Upstream HTTP client"), created at start-up and closed at shutdown.
Every route that talks to vLLM goes through `Pool.post`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import GatewayError, parse_backend_error
from .observability import log_field
from .httpclient import ConnectError, DisconnectError, HTTPPool, ProtocolError, TooLargeError, UpstreamError
from .settings import ModelConfig, Settings

log = logging.getLogger("er_gateway.upstream")


@dataclass(eq=False)
class Replica:
    url: str
    client: HTTPPool
    outstanding: int = 0
    # Active health: False only after a failed check or a refused connection.
    healthy: bool = True
    # Passive ejection after a timeout, 5xx or broken connection: no traffic until then,
    # unless every replica is ejected (then they are used anyway rather than failing).
    ejected_until: float = 0.0
    last_error: str | None = None
    latency_ms: float | None = None
    requests: int = 0

    def state(self, index: int, *, with_url: bool = False) -> dict[str, object]:
        return {
            "replica": index,
            **({"url": self.url} if with_url else {}),
            "healthy": self.healthy and time.monotonic() >= self.ejected_until,
            "last_error": self.last_error,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "outstanding": self.outstanding,
            "requests": self.requests,
        }


@dataclass
class UpstreamResult:
    body: bytes
    status: int
    replica: str  # URL, for the operator's access log
    upstream_ms: float
    retries: int = 0


@dataclass
class Pool:
    """The replicas of one model."""

    model: ModelConfig
    replicas: list[Replica]
    settings: Settings
    on_error: object = None  # callable(replica_url, kind) for metrics
    # Set when the backend refused `dimensions` (not started as a Matryoshka model): the gateway
    # then cuts the vectors itself (embeddings.py).
    refuses_dimensions: bool = False
    _rr: itertools.count = field(default_factory=itertools.count)

    def pick(self, exclude: Iterable[Replica] = ()) -> Replica | None:
        """Least outstanding requests among usable replicas; ties go round-robin."""
        now = time.monotonic()
        excluded = set(exclude)
        usable = [r for r in self.replicas if r.healthy and r not in excluded]
        if not usable:
            return None
        fresh = [r for r in usable if now >= r.ejected_until]
        candidates = fresh or usable
        if len(candidates) == 1:
            return candidates[0]
        low = min(r.outstanding for r in candidates)
        best = [r for r in candidates if r.outstanding == low]
        return best[next(self._rr) % len(best)]

    async def post(self, path: str, body: bytes, request_id: str | None = None) -> UpstreamResult:
        """POST `body` to a replica; retry elsewhere on connect errors and 503s.

        Returns the 2xx answer; anything else becomes a GatewayError per SPEC.md.
        4xx answers are the client's fault and are never retried.
        """
        headers = None if request_id is None else {"X-Request-ID": request_id}
        tried: list[Replica] = []
        last: GatewayError | None = None
        while True:
            replica = self.pick(tried)
            if replica is None:
                if last is not None:
                    raise last
                raise GatewayError(
                    503,
                    f"no healthy backend for model {self.model.name!r}",
                    headers={"Retry-After": str(max(1, round(self.settings.health_interval)))},
                )
            tried.append(replica)
            retries = len(tried) - 1
            replica.outstanding += 1
            replica.requests += 1
            start = time.perf_counter()
            # Failures another replica may not have (connect errors, broken connections, 503)
            # are retried there; everything else is final.
            try:
                resp = await replica.client.request("POST", path, body, headers)
            except ConnectError as e:
                self._fail(replica, "connect", f"cannot connect: {e}", down=True)
                last = GatewayError(503, f"{self.describe(replica)} refused the connection", headers={"Retry-After": "1"})
            except TimeoutError:
                self._fail(replica, "timeout", "timed out")
                raise GatewayError(504, f"{self.describe(replica)} did not answer within {self.settings.timeout:g} s") from None
            except DisconnectError as e:
                # The connection broke mid-request (replica killed, keep-alive dropped). Embedding
                # and scoring are idempotent, so trying another replica is safe.
                self._fail(replica, "disconnect", str(e))
                last = GatewayError(502, f"{self.describe(replica)} closed the connection before answering in full")
            except TooLargeError as e:
                self._fail(replica, "too_large", str(e))
                raise GatewayError(502, f"{self.describe(replica)} sent an answer over the gateway's limit: {e} "
                                        "(--max-upstream-bytes)") from None
            except ProtocolError as e:
                self._fail(replica, "protocol", str(e))
                raise GatewayError(502, f"bad answer from {self.describe(replica)}: {e}") from None
            else:
                answer = self._answer(replica, resp.status, resp.body, (time.perf_counter() - start) * 1000, retries)
                if isinstance(answer, UpstreamResult):
                    return answer
                last = answer
            finally:
                replica.outstanding -= 1
            if retries >= self.settings.max_retries:
                raise last

    def _answer(
        self, replica: Replica, status: int, body: bytes, elapsed_ms: float, retries: int
    ) -> UpstreamResult | GatewayError:
        """A 2xx result, or a 503 worth retrying elsewhere; other statuses raise."""
        if 200 <= status < 300:
            replica.latency_ms = elapsed_ms
            return UpstreamResult(body, status, replica.url, elapsed_ms, retries)
        if status < 400:
            # vLLM never redirects; following one would send the request somewhere unvetted.
            self._fail(replica, f"http_{status}", "unexpected redirect")
            raise GatewayError(502, f"{self.describe(replica)} answered with an unexpected {status}")
        if status == 401:
            # vLLM's own key check: the gateway's configuration is wrong, not the client's key.
            self._fail(replica, "http_401", "backend key rejected")
            raise GatewayError(502, f"{self.describe(replica)} rejected the gateway's backend key "
                                    "(--backend-api-key / ER_BACKEND_API_KEY)")
        message, param = parse_backend_error(body)
        if status == 503:
            self._fail(replica, "http_503", message)
            return GatewayError(503, f"backend unavailable: {message}", headers={"Retry-After": "1"})
        if status >= 500:
            self._fail(replica, f"http_{status}", message)
            raise GatewayError(502, f"backend error ({status}): {message}")
        raise GatewayError(status, message, param=param)

    def describe(self, replica: Replica) -> str:
        """How client-facing messages name a replica: model and index, never an address.

        Clients and public pages name a replica by its position in its model's list: internal
        hosts and ports are the operator's business (logs and admin views show URLs).
        """
        return f"backend replica {self.replicas.index(replica)} of model {self.model.name!r}"

    def _fail(self, replica: Replica, kind: str, message: str, *, down: bool = False) -> None:
        replica.last_error = f"{kind}: {message}"
        replica.ejected_until = time.monotonic() + self.settings.eject_cooldown
        if down:
            replica.healthy = False
        if self.on_error is not None:
            self.on_error(self.model.name, str(self.replicas.index(replica)), kind)  # type: ignore[operator]
        # `message` comes from the backend's body: escaped, so a hostile upstream cannot forge log lines.
        log.warning("replica %s of %s failed (%s): %s", replica.url, self.model.name, kind, log_field(message))


class Upstreams:
    """All pools, one HTTP client per backend URL, and the health-check loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients: dict[str, HTTPPool] = {}
        self.pools: dict[str, Pool] = {}
        self._task: asyncio.Task[None] | None = None
        self.on_error = None

    def _client(self, url: str) -> HTTPPool:
        client = self.clients.get(url)
        if client is None:
            s = self.settings
            headers = {"Content-Type": "application/json"}
            if s.backend_api_key:
                headers["Authorization"] = f"Bearer {s.backend_api_key}"
            client = self.clients[url] = HTTPPool(
                url, connect_timeout=s.connect_timeout, timeout=s.timeout, headers=headers,
                max_body=s.max_upstream_bytes,
            )
        return client

    def build(self, models: list[ModelConfig]) -> dict[str, Pool]:
        """Pools for `models`, reusing clients and replica state for URLs already known."""
        known = {r.url: r for p in self.pools.values() for r in p.replicas}
        pools: dict[str, Pool] = {}
        for m in models:
            replicas = [known.get(u) or Replica(u, self._client(u)) for u in m.urls]
            pools[m.name] = Pool(m, replicas, self.settings, self.on_error)
        return pools

    async def start(self, models: list[ModelConfig]) -> None:
        self.pools = self.build(models)
        self._task = asyncio.create_task(self._health_loop())

    def replace(self, models: list[ModelConfig]) -> None:
        self.pools = self.build(models)

    def replicas(self) -> list[Replica]:
        seen: dict[str, Replica] = {}
        for p in self.pools.values():
            for r in p.replicas:
                seen.setdefault(r.url, r)
        return list(seen.values())

    async def check(self, replica: Replica) -> None:
        start = time.perf_counter()
        try:
            resp = await replica.client.request("GET", "/health", timeout=self.settings.health_timeout)
            ok = resp.status == 200
            error = None if ok else f"health: HTTP {resp.status}"
        except (UpstreamError, TimeoutError) as e:
            ok, error = False, f"health: {type(e).__name__} {e}".strip()
        if ok and not replica.healthy:
            log.info("replica %s is healthy again", replica.url)
            replica.ejected_until = 0.0
        elif not ok and replica.healthy:
            log.warning("replica %s failed its health check: %s", replica.url, error)
        replica.healthy = ok
        replica.latency_ms = (time.perf_counter() - start) * 1000 if ok else replica.latency_ms
        if error:
            replica.last_error = error

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas()))

    async def _health_loop(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("health check loop failed")
            await asyncio.sleep(self.settings.health_interval)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for c in self.clients.values():
            await c.close()
