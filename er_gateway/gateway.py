"""The running gateway's state and the steps every proxied request shares.

`Gateway.admit` authenticates and rate-limits; `Gateway.resolve` finds the
model's pool and checks the key may use it; `Gateway.call` takes a concurrency
slot and posts upstream. Routes compose these; none talks to vLLM directly.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from .errors import GatewayError
from .keys import ApiKey, KeysFileError, KeyStore
from .manage import ModelManager
from .observability import Metrics, Recent, RequestInfo
from .concurrency import FairGate
from .ratelimit import RateLimiter
from .tokens import ModelTokenizer, TokenizerError, load_tokenizers
from .settings import Kind, ModelConfig, Settings, SettingsError, load_settings
from .upstream import Pool, UpstreamResult, Upstreams

log = logging.getLogger("er_gateway")

EXACT_COUNT_MAX_CHARS = 64 * 1024  # texts counted exactly for a reservation (~60 ms); above, a bound
_TOTAL_TOKENS = re.compile(rb'"total_tokens"\s*:\s*(\d+)')


@dataclass
class Admission:
    key: ApiKey
    headers: dict[str, str]
    info: RequestInfo
    reserved: int = 0  # tokens taken from the key's budget before forwarding, settled after
    done_tokens: int = 0  # tokens of the parts the backend answered, should the whole fail


class Gateway:
    def __init__(self, settings: Settings, cli_overrides: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.cli_overrides = cli_overrides or {}
        self.keys = KeyStore(settings.keys_file)
        self.metrics = Metrics()
        self.recent = Recent()
        self.limiter = RateLimiter(
            settings.rate_limit, settings.token_limit, settings.redis_url, settings.redis_failure_mode,
            redis_timeout=settings.redis_timeout, breaker_interval=settings.redis_breaker_interval,
        )
        self.limiter.on_storage_error = self.metrics.storage_errors.inc
        # Each worker process gets its share of the caps, so N workers still send at most N×share.
        per_worker = max(1, -(-settings.max_concurrency // settings.workers))
        per_key = max(1, -(-settings.per_key_concurrency // settings.workers))
        self.gate = FairGate(per_worker, per_key, settings.queue_timeout)
        self.upstreams = Upstreams(settings)
        self.upstreams.on_error = self._upstream_error  # type: ignore[assignment]
        self._index_models(settings.models)
        self.manager = ModelManager(settings, self.upstreams)
        self.tokenizers: dict[str, ModelTokenizer] = load_tokenizers(settings.models)
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.upstreams.start(self.settings.models)
        self._tasks.append(asyncio.create_task(self._watch_keys()))
        if self.metrics.multiprocess:
            # /metrics sums every worker's files, but only the answering worker refreshes its
            # gauges on a scrape; the others keep theirs at most a second old.
            self._tasks.append(asyncio.create_task(self._refresh_gauges_forever()))
        # `kill -HUP <pid>`: re-read the keys file now (the watcher would within a second anyway).
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_keys)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await self.upstreams.close()

    def _index_models(self, models: list[ModelConfig]) -> None:
        by_name: dict[str, ModelConfig] = {}
        for m in models:
            by_name[m.name] = m
            for a in m.aliases:
                by_name[a] = m
        self.models_by_name = by_name

    async def _watch_keys(self) -> None:
        # Polling a stat() once a second is cheap and works on every filesystem.
        while True:
            await asyncio.sleep(1.0)
            if self.keys.changed():
                self.reload_keys()

    async def _refresh_gauges_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.refresh_gauges()

    def reload_keys(self) -> bool:
        try:
            n = self.keys.reload()
        except (KeysFileError, FileNotFoundError, OSError) as e:
            log.error("keys file not reloaded, keeping the previous keys: %s", e)
            return False
        log.info("reloaded %d API keys from %s", n, self.keys.path)
        return True

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and keys; swap atomically (in-flight requests keep the old)."""
        try:
            new = load_settings(self.cli_overrides)
        except SettingsError as e:
            raise GatewayError(400, f"reload failed, old configuration kept: {e}") from None
        try:
            self.keys.reload()
            tokenizers = load_tokenizers(new.models)
        except (KeysFileError, FileNotFoundError, TokenizerError) as e:
            raise GatewayError(400, f"reload failed, old configuration kept: {e}") from None
        self.upstreams.settings = new
        self.upstreams.replace(new.models)
        self._index_models(new.models)
        self.tokenizers = tokenizers
        self.limiter.default_rate = new.rate_limit
        self.limiter.default_tokens = new.token_limit
        self.settings = self.manager.settings = new
        log.info("configuration reloaded: %s", ", ".join(m.name for m in new.models))
        return self.model_table()

    # ---- per request -----------------------------------------------------------------------
    async def admit(self, request: Request, route: str, cost: int = 1) -> Admission:
        """Authenticate the caller and count the request against its limits."""
        info: RequestInfo = request.scope["state"]["er"]
        info.route = route
        key = self.keys.authenticate(api_key_of(request))
        info.key_name = key.name
        headers = await self.limiter.hit_request(key, cost) if cost else {}
        if key.token_limit or self.limiter.default_tokens:
            try:
                headers.update(await self.limiter.check_tokens(key))
            except GatewayError as e:
                e.headers = {**headers, **e.headers}
                raise
        return Admission(key, headers, info)

    def require_admin(self, key: ApiKey) -> None:
        if not key.admin:
            raise GatewayError(403, f"key {key.name!r} is not an admin key")

    def is_admin(self, request: Request) -> bool:
        """Whether the request carries a valid admin key (for pages that are public otherwise)."""
        key = api_key_of(request)
        if key is None:
            return False  # the common case (a load balancer's probe): no error object built
        try:
            return self.keys.authenticate(key).admin
        except GatewayError:
            return False

    def resolve(self, name: str | None, kind: Kind, key: ApiKey) -> Pool:
        if name is None:
            model = self.settings.default_model(kind)
            if model is None:
                raise GatewayError(404, f"no {kind} model is configured; available: {self._names()}", param="model")
        else:
            model = self.lookup(name)
            if model is None:
                raise GatewayError(
                    404, f"model {name!r} not found; available models: {self._names()}", param="model"
                )
        if model.kind != kind:
            others = ", ".join(m.name for m in self.settings.models if m.kind == kind) or "none"
            verb = "rerank/score" if kind == "rerank" else "embed"
            raise GatewayError(
                400,
                f"model {model.name!r} is a{'n' if model.kind == 'embedding' else ''} {model.kind} "
                f"model and cannot {verb}; {kind} models: {others}",
                param="model",
            )
        if not self.may_use(key, model):
            raise GatewayError(403, f"key {key.name!r} may not use model {model.name!r}", param="model")
        return self.upstreams.pools[model.name]

    def lookup(self, name: str) -> ModelConfig | None:
        """A model by a configured name or alias, else by a name its backends report serving."""
        return self.models_by_name.get(name) or self.upstreams.served.get(name)

    def names_of(self, model: ModelConfig) -> list[str]:
        """Every name that reaches `model`: what its backends serve first, then the configured ones."""
        return list(dict.fromkeys([*self.upstreams.pools[model.name].own_names, model.name, *model.aliases]))

    def may_use(self, key: ApiKey, model: ModelConfig) -> bool:
        return key.models is None or not set(self.names_of(model)).isdisjoint(key.models)

    async def call(self, pool: Pool, path: str, body: bytes, info: RequestInfo) -> UpstreamResult:
        """One upstream request under the concurrency cap; timing goes into `info`."""
        key = info.key_name or ""
        waited = await self.gate.acquire(key)
        try:
            result = await pool.post(path, body, info.request_id)
        finally:
            self.gate.release(key)
        info.queue_ms += waited * 1000
        info.upstream_ms += result.upstream_ms
        info.replica = result.replica
        info.retries += result.retries
        if waited:
            self.metrics.queue_wait.observe(waited)
        self.metrics.child(self.metrics.upstream, pool.model.name).observe(result.upstream_ms / 1000)
        if result.retries:
            self.metrics.retries.labels(pool.model.name).inc(result.retries)
        return result

    async def count_tokens(self, model: ModelConfig, texts: list[str]) -> int:
        """Tokens in `texts`: exact with the model's tokenizer, else an upper bound.

        The bound is the UTF-8 length (a byte-level BPE token, as Qwen3's are, covers at least one
        byte). It is also used above EXACT_COUNT_MAX_CHARS: tokenizing costs ~0.5 s of CPU per MB
        and this is only a reservation, settled to vLLM's own count after the answer.
        """
        tok = self.tokenizers.get(model.name)
        if tok is not None and sum(map(len, texts)) <= EXACT_COUNT_MAX_CHARS:
            return sum(await tok.count_many_async(texts))
        return sum(len(t) if t.isascii() else len(t.encode()) for t in texts)

    def budgets_tokens(self, key: ApiKey) -> bool:
        """Whether `key` has a token budget (only then are tokens counted before forwarding)."""
        return bool(key.token_limit or self.limiter.default_tokens)

    async def reserve_tokens(self, admission: Admission, tokens: int) -> None:
        """Take an estimate of the request's tokens from the key's budget (429 if it does not fit)."""
        try:
            reserved, headers = await self.limiter.reserve_tokens(admission.key, tokens)
        except GatewayError as e:
            e.headers = {**admission.headers, **e.headers}
            raise
        admission.reserved += reserved
        admission.headers.update(headers)

    async def charge_tokens(self, admission: Admission, model: str, tokens: int | None) -> None:
        """Count what the backend reported; settle the reservation against it."""
        if tokens:
            admission.info.tokens = (admission.info.tokens or 0) + tokens
            self.metrics.child(self.metrics.tokens, model, admission.key.name).inc(tokens)
        if admission.reserved:
            reserved, admission.reserved = admission.reserved, 0
            await self.limiter.settle_tokens(admission.key, reserved, tokens)
        elif tokens and self.budgets_tokens(admission.key):
            await self.limiter.add_tokens(admission.key, tokens)

    async def refund_tokens(self, admission: Admission) -> None:
        """Settle a failed request's reservation to the parts the backend did answer (if any)."""
        if admission.reserved:
            reserved, admission.reserved = admission.reserved, 0
            await self.limiter.settle_tokens(admission.key, reserved, admission.done_tokens or None)

    # ---- views -----------------------------------------------------------------------------
    def _names(self) -> str:
        return ", ".join(sorted({*self.models_by_name, *self.upstreams.served}))

    def model_table(self) -> dict[str, Any]:
        return {
            "models": [
                {"name": m.name, "kind": m.kind, "urls": m.urls, "aliases": m.aliases,
                 **({"prompt": m.prompt} if m.kind == "rerank" else {})}
                for m in self.settings.models
            ]
        }

    def health(self, *, admin: bool = False, model: str | None = None) -> tuple[int, dict[str, Any]]:
        """Readiness per model and replica; replica URLs only for an admin key.

        200 while at least one model can serve (a host may serve only a reranker, and one model
        being down must not take the other out of a load balancer); 503 when none can. With
        `model`, that model's readiness alone: 200 if it can serve, 503 if not, 404 if unknown.
        """
        models: dict[str, Any] = {}
        all_up = True
        for name, pool in self.upstreams.pools.items():
            states = [r.state(i, with_url=admin) for i, r in enumerate(pool.replicas)]
            ready = any(s["healthy"] for s in states)
            models[name] = {"kind": pool.model.kind, "ready": ready, "replicas": states}
            all_up = all_up and all(s["healthy"] for s in states)
        if model is not None:
            config = self.lookup(model)
            if config is None:
                return 404, GatewayError(404, f"model {model!r} not found; available models: {self._names()}",
                                         param="model").payload()
            entry = models[config.name]
            return (200 if entry["ready"] else 503), {"model": config.name, **entry}
        serving = any(m["ready"] for m in models.values())
        status = "healthy" if all_up and serving else "degraded" if serving else "unhealthy"
        return (200 if serving else 503), {"status": status, "model_loaded": serving, "models": models}

    def status_snapshot(self, *, admin: bool = False) -> dict[str, Any]:
        """Everything the /status page shows: health plus the last minute of traffic."""
        _, health = self.health(admin=admin)
        traffic = self.recent.summary()
        for name, entry in health["models"].items():
            entry["traffic"] = traffic.get(name)
        return {
            **health,
            "in_flight": self.gate.in_flight,
            "queued": self.gate.waiting,
            "max_concurrency": self.gate.limit,
            "ratelimit_storage": "redis" if self.limiter.shared else "memory",
            "time": time.time(),
        }

    def _upstream_error(self, model: str, replica: str, kind: str) -> None:
        self.metrics.upstream_errors.labels(model, replica, kind).inc()

    def refresh_gauges(self) -> None:
        m = self.metrics
        m.in_flight.set(self.gate.in_flight)
        m.waiting.set(self.gate.waiting)
        now = time.monotonic()
        for name, pool in self.upstreams.pools.items():
            for i, r in enumerate(pool.replicas):
                m.replica_healthy.labels(name, str(i)).set(1 if r.healthy and now >= r.ejected_until else 0)
                m.replica_outstanding.labels(name, str(i)).set(r.outstanding)


def api_key_of(request: Request) -> str | None:
    auth = request.headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.query_params.get("api_key") or None


def use_backend_name(data: dict[str, Any], pool: Pool) -> bool:
    """Point a client body at the name vLLM serves (an alias or the configured name may differ).

    A body without `model` is left alone: vLLM then uses its one served model; so is one whose
    replicas serve different names (the field is dropped). Returns whether `data` changed (and
    so must be re-serialised).
    """
    requested = data.get("model")
    name = pool.upstream_name
    if requested is None or requested == name:
        return False
    if name is None:
        del data["model"]
    else:
        data["model"] = name
    return True


def usage_tokens(body: bytes) -> int | None:
    """`usage.total_tokens` from a vLLM answer without parsing its vectors.

    `usage` is the last field vLLM writes, so searching the tail is enough and
    vector bytes (numbers or base64, never quotes) cannot contain the key.
    """
    tail = body[-512:]
    m = _TOTAL_TOKENS.search(tail)
    return int(m.group(1)) if m else None
