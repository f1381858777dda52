"""Upstream vLLM replicas: pooled clients, replica choice, retries, health, error mapping.

One keep-alive HTTPPool per backend URL (httpclient.py; why not httpx or aiohttp: README,
"Upstream HTTP client"), made for each configuration (at start-up and by every reload) and
closed when the last request using it is done. Everything that talks to vLLM goes through
`Pool.post`, called only by dispatch.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import orjson

from .errors import GatewayError, parse_backend_error
from .httpclient import ConnectError, DisconnectError, HTTPPool, ProtocolError, TooLargeError, UpstreamError
from .observability import log_field
from .settings import ModelConfig, Settings

log = logging.getLogger("er_gateway.upstream")
MODELS_MAX_BYTES = 1 << 20  # a /v1/models answer read for names (vLLM's is a few hundred bytes)
MODELS_MAX_NAMES = 16
METRICS_MAX_BYTES = 8 << 20  # a vLLM /metrics page is ~100 KB; one bigger is not read
# vLLM's scheduler gauges (one line per engine): requests in the batch and in its queue.
_LOAD_LINE = re.compile(rb"^vllm:num_requests_(?:running|waiting)(?:\{[^}\n]*\})? +([^ \n]+)", re.M)
# (model name, replica index, failure kind): counted in er_upstream_errors_total.
ErrorHook = Callable[[str, str, str], None]


@dataclass(eq=False)
class Replica:
    """What the gateway knows of one backend URL. One object per URL for the life of the process
    (a reload's new pools share it), so health, ejection, in-flight counts and draining hold for
    requests on every configuration; the HTTP client is the configuration's (Upstreams.clients)."""

    url: str
    origin: str = ""  # the configured URL it comes from (another when DNS expanded one: Upstreams.discover)
    outstanding: int = 0  # our calls in flight
    items: int = 0  # what vLLM counts of them: one request per input or document
    # Active health: False only after a failed check or a refused connection.
    healthy: bool = True
    # Passive ejection after a timeout, 5xx or broken connection: no traffic until then,
    # unless every replica is ejected (then they are used anyway rather than failing).
    ejected_until: float = 0.0
    last_error: str | None = None
    latency_ms: float | None = None
    requests: int = 0
    # What the backend says it serves (its /v1/models, read with every health check): the
    # model names and the context length. Empty/None until it has answered once.
    served: tuple[str, ...] = ()
    max_model_len: int | None = None
    roots: tuple[str, ...] = ()  # the weights each served model is loaded from (`root`)
    # Times it came back after failing its health check: a restart, perhaps with new weights
    # at the same path; the result cache starts a new epoch for its model (cache.py).
    restarts: int = 0
    # Being restarted by /reload_model (manage.py): takes no new requests meanwhile.
    draining: bool = False
    # vLLM's own load at the last health check (running + waiting requests, from its /metrics:
    # one per input or document), and how much of it was not ours: other gateways' and workers'.
    # Replica choice adds `others` to our own `items`, so N gateways level the same vLLM queues.
    load: float | None = None
    others: float = 0.0

    def state(self, index: int, *, with_url: bool = False) -> dict[str, object]:
        return {
            "replica": index,
            **({"url": self.url} if with_url else {}),
            "healthy": self.healthy and not self.draining and time.monotonic() >= self.ejected_until,
            "draining": self.draining,
            "last_error": self.last_error,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 2),
            "outstanding": self.outstanding,
            "load": self.load,
            "requests": self.requests,
            "served": list(self.served),
            "max_model_len": self.max_model_len,
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
    clients: dict[str, HTTPPool]  # by replica URL, this configuration's
    on_error: ErrorHook | None = None
    # Set when the backend refused `dimensions` (not started as a Matryoshka model): the gateway
    # then cuts the vectors itself (embeddings.py).
    refuses_dimensions: bool = False
    # `usage` fields vLLM writes beside the token counts (they vary by version; vLLM 0.32's
    # until an answer says otherwise), so an embeddings answer made from cached results has
    # vLLM's shape (embeddings.py).
    usage_extra: dict[str, object] = field(
        default_factory=lambda: {
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        }
    )
    # The `model` the backends are asked for: the configured backend name until they say what
    # they serve, then theirs. None when replicas serve different names: bodies then carry no
    # `model` and each vLLM server uses its one model.
    upstream_name: str | None = None
    # The reported names clients may use for this model (no other model's; Upstreams.learn_names).
    own_names: list[str] = field(default_factory=list)
    ignored_names: list[str] = field(default_factory=list)
    _rr: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.learn_names()

    def learn_names(self) -> bool:
        """Follow what the replicas report serving; returns whether the upstream name changed.

        A replica serving the configured name (vLLM takes several --served-model-name) is asked
        for it; one serving only other names is asked for its first, so `MODEL_SIZE=4B` behind a
        gateway configured for 0.6B still works, the configured name acting as an alias.
        """
        configured = self.model.backend_name
        names = {configured if configured in r.served else r.served[0] for r in self.replicas if r.served}
        name = configured if not names else names.pop() if len(names) == 1 else None
        changed = name != self.upstream_name
        self.upstream_name = name
        return changed

    @property
    def served_names(self) -> list[str]:
        """Every name a replica reports serving, in replica order."""
        return list(dict.fromkeys(n for r in self.replicas for n in r.served))

    @property
    def max_model_len(self) -> int | None:
        """The smallest context length a healthy replica reports: a request must fit any of them."""
        lens = [r.max_model_len for r in self.replicas if r.max_model_len and r.healthy]
        return min(lens) if lens else None

    @property
    def fingerprint(self) -> str:
        """What a cached result of this model depends on: its name, the name vLLM serves it
        under, and each replica's URL and weights (cache.py adds the restart epoch)."""
        # By configured URL, not address: a headless Service's pods coming and going (with the
        # same weights) must not empty the cache.
        replicas = ";".join(sorted({f"{r.origin or r.url}={','.join(r.roots)}" for r in self.replicas}))
        return f"{self.model.name}|{self.model.kind}|{self.model.prompt}|{self.upstream_name}|{replicas}"

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    def model_field(self) -> dict[str, str]:
        """`{"model": name}` for an upstream body the gateway builds ({} when replicas differ)."""
        return {"model": self.upstream_name} if self.upstream_name else {}

    def pick(self, exclude: Iterable[Replica] = ()) -> Replica | None:
        """Least load among usable replicas: our inputs and documents in flight plus what vLLM
        last reported of everyone else's (`Replica.others`), in vLLM's unit (one per prompt);
        ties go round-robin."""
        now = time.monotonic()
        excluded = set(exclude)
        usable = [r for r in self.replicas if r.healthy and not r.draining and r not in excluded]
        if not usable:
            return None
        fresh = [r for r in usable if now >= r.ejected_until]
        candidates = fresh or usable
        if len(candidates) == 1:
            return candidates[0]
        low = min(r.items + r.others for r in candidates)
        best = [r for r in candidates if r.items + r.others == low]
        return best[next(self._rr) % len(best)]

    async def post(
        self,
        path: str,
        body: bytes,
        request_id: str | None = None,
        tried: list[Replica] | None = None,
        items: int = 1,
        traceparent: str | None = None,
    ) -> UpstreamResult:
        """POST `body` to a replica; retry elsewhere on connect errors and 503s.

        Returns the 2xx answer; anything else becomes a GatewayError (README, "Errors").
        4xx answers are the client's fault and are never retried. The replicas tried, in order,
        are appended to `tried`, so a caller knows them on failure too.
        """
        headers = None if request_id is None else {"X-Request-ID": request_id}
        if traceparent:
            headers = {**(headers or {}), "traceparent": traceparent}
        tried = [] if tried is None else tried
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
            replica.items += items
            replica.requests += 1
            start = time.perf_counter()
            # Failures another replica may not have (connect errors, broken connections, 503)
            # are retried there; everything else is final.
            try:
                resp = await self.clients[replica.url].request("POST", path, body, headers)
            except ConnectError as e:
                self._fail(replica, "connect", f"cannot connect: {e}", down=True)
                last = GatewayError(
                    503, f"{self.describe(replica)} refused the connection", headers={"Retry-After": "1"}
                )
            except TimeoutError:
                self._fail(replica, "timeout", "timed out")
                raise GatewayError(
                    504, f"{self.describe(replica)} did not answer within {self.settings.timeout:g} s"
                ) from None
            except DisconnectError as e:
                # The connection broke mid-request (replica killed, keep-alive dropped). Embedding
                # and scoring are idempotent, so trying another replica is safe.
                self._fail(replica, "disconnect", str(e))
                last = GatewayError(502, f"{self.describe(replica)} closed the connection before answering in full")
            except TooLargeError as e:
                self._fail(replica, "too_large", str(e))
                raise GatewayError(
                    502, f"{self.describe(replica)} sent an answer over the gateway's limit: {e} (--max-upstream-bytes)"
                ) from None
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
                replica.items -= items
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
            raise GatewayError(
                502,
                f"{self.describe(replica)} rejected the gateway's backend key (--backend-api-key / ER_BACKEND_API_KEY)",
            )
        message, param = parse_backend_error(body)
        if status == 503:
            self._fail(replica, "http_503", message)
            return GatewayError(503, f"backend unavailable: {message}", headers={"Retry-After": "1"})
        if status >= 500:
            self._fail(replica, f"http_{status}", message)
            raise GatewayError(502, f"backend error ({status}): {message}")
        raise GatewayError(status, message, param=param)

    def bad_answer(self, url: str, message: str) -> None:
        """A 2xx answer from `url` that is not what the endpoint answers: count it as a failure."""
        for replica in self.replicas:
            if replica.url == url:
                self._fail(replica, "bad_answer", message)
                return

    def describe(self, replica: Replica) -> str:
        """How client-facing messages name a replica: model and index, never an address.

        Clients and public pages name a replica by its position in its model's list: internal
        hosts and ports are the operator's business (logs and admin views show URLs).
        """
        return f"backend replica {self.index(replica)} of model {self.model.name!r}"

    def index(self, replica: Replica) -> str:
        """A replica's name in metrics and messages: its position in the model's list."""
        try:
            return str(self.replicas.index(replica))
        except ValueError:  # removed by discovery while its request ran
            return "gone"

    def _fail(self, replica: Replica, kind: str, message: str, *, down: bool = False) -> None:
        replica.last_error = f"{kind}: {message}"
        replica.ejected_until = time.monotonic() + self.settings.eject_cooldown
        if down:
            replica.healthy = False
        if self.on_error is not None:
            self.on_error(self.model.name, self.index(replica), kind)
        # `message` comes from the backend's body: escaped, so a hostile upstream cannot forge log lines.
        log.warning("replica %s of %s failed (%s): %s", replica.url, self.model.name, kind, log_field(message))


class Upstreams:
    """All pools of one configuration, one HTTP client per backend URL, and the health checks.

    Built anew by a reload, with new clients (a changed timeout or backend key applies to the
    next request). The replicas come from `registry`, which the gateway keeps across reloads:
    what is known of a URL (health, served names, requests in flight, draining) is the same
    object for the old pools and the new.
    """

    def __init__(
        self,
        settings: Settings,
        on_error: ErrorHook | None = None,
        registry: dict[str, Replica] | None = None,
        expanded: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.settings = settings
        self.on_error = on_error
        self.clients: dict[str, HTTPPool] = {}
        # Health checks, /v1/models and /metrics: GETs with small answers, on their own
        # connections with their own cap (a hostile /metrics cannot make a check buffer 256 MiB).
        self.probes: dict[str, HTTPPool] = {}
        self.pools: dict[str, Pool] = {}
        self.served: dict[str, ModelConfig] = {}  # names the backends report, to their model
        self.registry = {} if registry is None else registry
        # Configured URL -> the replica URLs it stands for: itself, or one per address when its
        # host name resolves to several (discover()). Kept by the gateway across reloads, like
        # `registry`, so a reload whose lookup fails keeps the replicas known.
        self.expanded = {} if expanded is None else expanded
        self._discovered = False  # the first discovery done: addresses found later are new pods
        self._task: asyncio.Task[None] | None = None

    def _client(self, url: str, origin: str) -> HTTPPool:
        client = self.clients.get(url)
        if client is None:
            s = self.settings
            headers = {"Content-Type": "application/json"}
            if s.backend_api_key:
                headers["Authorization"] = f"Bearer {s.backend_api_key}"
            if origin != url:  # an address of a name: proxies in between route by the name
                headers["Host"] = urlsplit(origin).netloc
            client = self.clients[url] = HTTPPool(
                url,
                connect_timeout=s.connect_timeout,
                timeout=s.timeout,
                headers=headers,
                max_body=s.max_upstream_bytes,
            )
            self.probes[url] = HTTPPool(
                url,
                connect_timeout=s.connect_timeout,
                timeout=s.health_timeout,
                headers=headers,
                max_body=METRICS_MAX_BYTES,
            )
        return client

    def build(self, models: list[ModelConfig]) -> dict[str, Pool]:
        """Pools for `models`; a URL two models share is one replica with one client."""
        return {m.name: Pool(m, self._replicas(m), self.settings, self.clients, self.on_error) for m in models}

    def _replicas(self, model: ModelConfig) -> list[Replica]:
        replicas = []
        for origin in model.urls:
            for url in self.expanded.get(origin, (origin,)):
                self._client(url, origin)
                replica = self.registry.get(url)
                if replica is None:
                    # A pod that appeared after start may hold other weights under the same name
                    # (a rollout): counted as a restart, it starts a new cache epoch (cache.py).
                    later = self._discovered and url != origin
                    replica = self.registry[url] = Replica(url, origin, restarts=int(later))
                replicas.append(replica)
        return replicas

    async def discover(self) -> bool:
        """Expand each http URL whose host name resolves to several addresses (a Kubernetes
        headless Service) into one replica per address; called every health interval, so
        scaling vLLM needs no configuration change. Returns whether a pool's replicas changed.

        IPv4 addresses are used when there are any (a dual-stack name would otherwise count
        each server twice; `localhost` stays one replica). https URLs are left as they are: a
        certificate names the service, not each pod's address. A failed lookup keeps the
        replicas already known.
        """
        changed = False
        for origin in dict.fromkeys(u for m in self.settings.models for u in m.urls):
            found = await self._addresses(origin)
            if found is None:
                continue
            urls = tuple(found) if len(found) >= 2 else (origin,)
            if self.expanded.get(origin, (origin,)) != urls:
                log.info("%s resolves to %d replica(s): %s", origin, len(urls), ", ".join(urls))
                self.expanded[origin] = urls
                changed = True
        if changed:
            for pool in self.pools.values():
                pool.replicas = self._replicas(pool.model)
            self.learn_names()
        # Addresses gone from DNS: their clients closed once no request uses them (looked at
        # again every interval), their state forgotten.
        live = {r.url for p in self.pools.values() for r in p.replicas}
        for url in [u for u in self.clients if u not in live and not self.registry[u].outstanding]:
            await self.clients.pop(url).close()
            await self.probes.pop(url).close()
            if self.registry[url].origin != url:
                del self.registry[url]
        self._discovered = True
        return changed

    async def _addresses(self, origin: str) -> list[str] | None:
        """The replica URLs `origin`'s host name resolves to (None: not a name, or no answer)."""
        parts = urlsplit(origin)
        host = parts.hostname or ""
        if parts.scheme != "http":
            return None
        try:
            ipaddress.ip_address(host)
            return None  # an address already
        except ValueError:
            pass
        port = parts.port or 80
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                self.settings.health_timeout,
            )
        except (OSError, TimeoutError, UnicodeError, ValueError) as e:  # bad labels raise UnicodeError
            log.debug("cannot resolve %s: %s", host, e)
            return None
        v4 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET}, key=ipaddress.ip_address)
        v6 = sorted({str(i[4][0]) for i in infos if i[0] == socket.AF_INET6}, key=ipaddress.ip_address)
        netloc = [f"{a}:{port}" for a in v4] or [f"[{a}]:{port}" for a in v6]
        return [urlunsplit(("http", n, parts.path, "", "")) for n in netloc]

    async def start(self, *, first_check: bool = True) -> None:
        await self.discover()
        self.pools = self.build(self.settings.models)
        self.learn_names()
        if first_check:
            # One check before serving, so the first request already goes by the names the
            # backends serve; bounded, so a backend that accepts and never answers delays
            # start-up little.
            try:
                await asyncio.wait_for(self.check_all(), self.settings.health_timeout)
            except TimeoutError:
                log.warning(
                    "backends did not all answer the first health check within %g s", self.settings.health_timeout
                )
                self.learn_names()
        self._task = asyncio.create_task(self._health_loop())

    def replicas(self) -> list[Replica]:
        seen: dict[str, Replica] = {}
        for p in self.pools.values():
            for r in p.replicas:
                seen.setdefault(r.url, r)
        return list(seen.values())

    async def check(self, replica: Replica) -> None:
        start = time.perf_counter()
        try:
            resp = await self.probes[replica.url].request("GET", "/health")
            ok = resp.status == 200
            error = None if ok else f"health: HTTP {resp.status}"
        except (UpstreamError, TimeoutError) as e:
            ok, error = False, f"health: {type(e).__name__} {e}".strip()
        if ok:
            try:
                await self._read_models(replica)
                await self._read_load(replica)
            except (UpstreamError, TimeoutError) as e:  # health is /health's to say, not this
                log.debug("replica %s: /v1/models or /metrics not read: %s", replica.url, e)
        if ok and not replica.healthy:
            log.info("replica %s is healthy again", replica.url)
            replica.ejected_until = 0.0
            replica.restarts += 1
        elif not ok and replica.healthy:
            log.warning("replica %s failed its health check: %s", replica.url, error)
        replica.healthy = ok
        replica.latency_ms = (time.perf_counter() - start) * 1000 if ok else replica.latency_ms
        if error:
            replica.last_error = error

    async def _read_models(self, replica: Replica) -> None:
        """Learn the names and context length a replica serves from its /v1/models.

        Read on every health check, so a backend restarted with another model (a reload, or
        `MODEL_SIZE=4B`) is followed within one interval. A backend without the endpoint, or
        with an answer of another shape, keeps what was known: names only ever come from vLLM.
        """
        resp = await self.probes[replica.url].request("GET", "/v1/models")
        if resp.status != 200 or len(resp.body) > MODELS_MAX_BYTES:
            return  # a real vLLM lists one model in a few hundred bytes: anything huge is not one
        try:
            cards = orjson.loads(resp.body)["data"][:MODELS_MAX_NAMES]
            served = tuple(c["id"] for c in cards if isinstance(c.get("id"), str) and 0 < len(c["id"]) <= 256)
            lens = [n for c in cards if type(n := c.get("max_model_len")) is int and 16 <= n <= 1 << 24]
            roots = tuple(str(c.get("root"))[:1024] for c in cards if isinstance(c.get("id"), str))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return
        if served and served != replica.served:
            log.info("replica %s serves %s", replica.url, log_field(", ".join(served)))
        replica.served = served or replica.served
        replica.max_model_len = min(lens) if lens else replica.max_model_len
        replica.roots = roots if served else replica.roots

    async def _read_load(self, replica: Replica) -> None:
        """vLLM's running + waiting requests, from its Prometheus page; what of it is not ours
        becomes `others`. A backend without the gauges (not vLLM, or a version without them)
        keeps `others` at 0: replica choice is then our own load alone."""
        try:
            resp = await self.probes[replica.url].request("GET", "/metrics")
        except UpstreamError:  # too big, broken: nothing known of its load
            resp = None
        if resp is None or resp.status != 200:
            replica.load, replica.others = None, 0.0
            return
        total = 0.0
        found = False
        for m in _LOAD_LINE.finditer(resp.body):
            try:
                v = float(m.group(1))
            except ValueError:
                continue
            if math.isfinite(v) and 0 <= v <= 1e6:  # a hostile page cannot make a replica look idle
                total += v
                found = True
        replica.load = total if found else None
        # Our own prompts on it are counted by vLLM too; they are in `items` already.
        replica.others = max(0.0, total - replica.items) if found else 0.0

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(r) for r in self.replicas()))
        self.learn_names()

    def learn_names(self) -> None:
        """Each pool follows its replicas' names; `served` maps every reported name to its model.

        A reported name that is another model's configured name or alias, or that two models'
        backends both report, is no one's: a backend must not pull another model's traffic (or
        a key limited to that name) to itself.
        """
        configured = {n: p.model.name for p in self.pools.values() for n in (p.model.name, *p.model.aliases)}
        claims: dict[str, set[str]] = {}
        for pool in self.pools.values():
            for name in pool.served_names:
                claims.setdefault(name, set()).add(pool.model.name)
        served: dict[str, ModelConfig] = {}
        for pool in self.pools.values():
            own = [
                n
                for n in pool.served_names
                if claims[n] == {pool.model.name} and configured.get(n, pool.model.name) == pool.model.name
            ]
            ignored = sorted(set(pool.served_names) - set(own))
            if ignored and ignored != pool.ignored_names:
                log.warning(
                    "model %s: a backend reports serving %s, which belong(s) to another model; ignored",
                    pool.model.name,
                    log_field(", ".join(ignored)),
                )
            pool.own_names, pool.ignored_names = own, ignored
            if pool.learn_names():
                log.info(
                    "model %s is now asked for upstream as %s",
                    pool.model.name,
                    log_field(pool.upstream_name or "(each replica's own model)"),
                )
            for name in own:
                served[name] = pool.model
        self.served = served

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                await self.discover()
            except Exception:  # noqa: BLE001 - discovery failing must not stop the health checks
                log.exception("replica discovery failed")
            try:
                await self.check_all()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("health check loop failed")

    def stop_checks(self) -> None:
        if self._task:
            self._task.cancel()

    async def close(self) -> None:
        self.stop_checks()
        for c in (*self.clients.values(), *self.probes.values()):
            await c.close()
