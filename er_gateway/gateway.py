"""The running gateway: what lives as long as the process, and the configuration it serves.

`Gateway` holds the process's keys, metrics, concurrency gate and model manager, and one
`Runtime`: everything built from one configuration (pools, limiter, catalog, dispatcher).
A reload builds a new Runtime and swaps the reference; requests that started on the old one
finish on it, and its connections are closed once the last of them is done.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limits.errors import ConfigurationError
from redis.exceptions import RedisError

from .admission import Admitter
from .cache import ResultCache
from .catalog import Catalog
from .concurrency import FairGate, GlobalSlots
from .dispatch import Dispatcher
from .drain import Drain
from .errors import GatewayError
from .keys import Keys, KeysFileError, KeyStore
from .keys_redis import RedisKeys
from .manage import ModelManager
from .observability import Metrics, Recent
from .observability.tracing import Tracing
from .protocol import ReloadModelRequest
from .ratelimit import RateLimiter
from .reloads import ReloadBus
from .settings import Settings, SettingsError, load_settings
from .status import refresh_gauges, snapshot
from .tokens import TokenizerError, load_tokenizers
from .upstream import Replica, Upstreams
from .usage import UsageLedger

log = logging.getLogger("er_gateway")


@dataclass(eq=False)
class Runtime:
    """One configuration's objects. Routes and services take everything they use from here."""

    settings: Settings
    upstreams: Upstreams
    catalog: Catalog
    admission: Admitter
    dispatch: Dispatcher
    cache: ResultCache | None  # the process's (it outlives reloads: keys name the model's state)
    users: int = 0  # requests running on it
    retired: bool = False  # replaced by a reload: closed when `users` drops to 0
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.upstreams.close()


# Settings a reload cannot change: the process was built with them (server socket, workers,
# concurrency gate, keys file, front door, logs). A reload that changes one says so.
RESTART_ONLY = (
    "host", "port", "workers", "max_concurrency", "max_concurrency_per_key", "queue_timeout", "keys_file", "keys_store",
    "global_max_concurrency", "global_lease_ttl", "redis_url", "usage_snapshot_interval",
    "header_timeout", "max_header_bytes", "keepalive_timeout", "max_connections", "ssl_certfile", "ssl_keyfile",
    "log_dir", "log_level", "log_format", "log_max_bytes", "log_backups", "access_log", "cache_size", "cache_ttl",
    "cache_scope", "drain_delay", "drain_timeout", "otlp_endpoint",
)  # fmt: skip


class Gateway:
    def __init__(self, settings: Settings, cli_overrides: dict[str, Any] | None = None) -> None:
        self.cli_overrides = cli_overrides or {}
        self.keys: Keys = (
            RedisKeys(settings.redis_url, settings.redis_timeout)
            if settings.keys_store == "redis" and settings.redis_url
            else KeyStore(settings.keys_file)
        )
        self.metrics = Metrics()
        self.recent = Recent()
        self.drain = Drain(settings.drain_delay)
        self.tracing = Tracing(settings.otlp_endpoint) if settings.otlp_endpoint else None
        # Each worker process gets its share of the caps, so N workers still send at most N×share.
        per_worker = max(1, -(-settings.max_concurrency // settings.workers))
        per_key = max(1, -(-settings.per_key_concurrency // settings.workers))
        self.gate = FairGate(per_worker, per_key, settings.queue_timeout)
        self.slots = (
            GlobalSlots(
                settings.redis_url,
                settings.global_max_concurrency,
                settings.global_lease_ttl,
                settings.redis_timeout,
                settings.queue_timeout,
                fail_open=settings.redis_failure_mode == "open",
            )
            if settings.global_max_concurrency and settings.redis_url
            else None
        )
        self.replicas: dict[str, Replica] = {}  # every backend URL's state, across reloads
        self.expanded: dict[str, tuple[str, ...]] = {}  # what DNS discovery found, across reloads
        self.cache = (
            ResultCache(
                int(settings.cache_size * 1024 * 1024),
                settings.redis_url,
                ttl=settings.cache_ttl,
                scope=settings.cache_scope,
                timeout=settings.redis_timeout,
                breaker_interval=settings.redis_breaker_interval,
                on_lookup=self._count_lookup,
            )
            if settings.cache_size > 0
            else None
        )
        self.runtime = self._build(settings, load_tokenizers(settings.models), None)
        self.manager = ModelManager(lambda: (self.runtime.settings, self.runtime.upstreams))
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired: list[Runtime] = []  # replaced by a reload, not closed yet
        # With Redis, a reload reaches every worker and gateway sharing it (reloads.py).
        self.bus = ReloadBus(settings.redis_url, self.reload, settings.redis_timeout) if settings.redis_url else None
        # GET /v1/usage: counted per key, model and day, in Redis or beside the keys file.
        self.usage = UsageLedger(
            settings.redis_url,
            settings.redis_timeout,
            Path(settings.keys_file).with_suffix(".usage.json"),
            settings.usage_snapshot_interval,
        )
        self._reloading = asyncio.Lock()  # one reload at a time: two would both retire the same Runtime

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    def _build(self, settings: Settings, tokenizers: dict[str, Any], previous: Runtime | None) -> Runtime:
        m = self.metrics
        storage = None
        if previous is not None:
            before = previous.settings
            if before.redis_url == settings.redis_url and (
                settings.redis_url is None or before.redis_timeout == settings.redis_timeout
            ):
                storage = previous.admission.limiter.storage
        limiter = RateLimiter(
            settings.rate_limit,
            settings.token_limit,
            settings.redis_url,
            settings.redis_failure_mode,
            redis_timeout=settings.redis_timeout,
            breaker_interval=settings.redis_breaker_interval,
            # Memory counters survive a reload: a reload must not hand every key a fresh budget.
            storage=storage,
            on_storage_error=m.storage_errors.inc,
        )
        upstreams = Upstreams(
            settings,
            on_error=lambda model, replica, kind: m.upstream_errors.labels(model, replica, kind).inc(),
            registry=self.replicas,
            expanded=self.expanded,
        )
        return Runtime(
            settings=settings,
            upstreams=upstreams,
            catalog=Catalog(settings, upstreams, tokenizers),
            admission=Admitter(self.keys, limiter, lambda model, key, n: m.child(m.tokens, model, key).inc(n)),
            dispatch=Dispatcher(self.gate, m, settings, self.slots, self.tracing),
            cache=self.cache,
        )

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.runtime.upstreams.start()
        if self.cache is not None:
            await self.sync_cache()
            self._spawn(self._sync_cache_forever())
        if isinstance(self.keys, RedisKeys):
            await self._refresh_keys()
            self._spawn(self.keys.follow())
        else:
            self._spawn(self._watch_keys())
        if self.metrics.multiprocess:
            # /metrics sums every worker's files, but only the answering worker refreshes its
            # gauges on a scrape; the others keep theirs at most a second old.
            self._spawn(self._refresh_gauges_forever())
        if self.bus is not None:
            self._spawn(self.bus.follow())
        if self.slots is not None:
            self._spawn(self.slots.renew_forever())
        self._spawn(self.usage.run())
        loop = asyncio.get_running_loop()
        # `kill -HUP <pid>`: what /reload_model does (config and keys, every process).
        loop.add_signal_handler(signal.SIGHUP, self._sighup)
        self.drain.install(loop)

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for rt in (*self._retired, self.runtime):
            await rt.close()
        if self.cache is not None:
            await self.cache.close()
        if isinstance(self.keys, RedisKeys):
            await self.keys.close()
        if self.bus is not None:
            await self.bus.close()
        if self.slots is not None:
            await self.slots.close()
        await self.usage.close()  # the last counts saved (or sent to Redis)
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def keys_changed(self) -> None:
        """The key store was just changed by this process: use it now, not at the next check."""
        if isinstance(self.keys, RedisKeys):
            await self._refresh_keys()
        else:
            self.reload_keys()

    async def _refresh_keys(self) -> None:
        assert isinstance(self.keys, RedisKeys)
        try:
            n = await self.keys.refresh()
            log.info("API keys: %d read from Redis", n)
        except (RedisError, OSError, KeysFileError) as e:
            # Not fatal: follow() keeps trying; meanwhile a request with a key gets 503, not 401.
            log.error("API keys not read from Redis (%s); %d keys in use", e, len(self.keys._by_hash))

    async def _watch_keys(self) -> None:
        # Polling a stat() once a second is cheap and works on every filesystem.
        assert isinstance(self.keys, KeyStore)
        while True:
            await asyncio.sleep(1.0)
            if self.keys.changed():
                self.reload_keys()

    def _count_lookup(self, model: str, hits: int, misses: int) -> None:
        m = self.metrics
        if hits:
            m.child(m.cache_hits, model).inc(hits)
        if misses:
            m.child(m.cache_misses, model).inc(misses)

    async def sync_cache(self) -> None:
        """Start a new cache epoch for every model a replica of which came back (cache.py)."""
        assert self.cache is not None
        pools = self.runtime.upstreams.pools.values()
        await self.cache.sync_epochs({p.fingerprint: p.restarts for p in pools})

    async def _sync_cache_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                await self.sync_cache()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("cache epoch sync failed")

    async def _refresh_gauges_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.refresh_gauges()

    def refresh_gauges(self) -> None:
        refresh_gauges(self.metrics, self.gate, self.runtime.upstreams, self.cache)

    # ---- what the operational routes show ------------------------------------------------------
    def metrics_text(self) -> bytes:
        """The Prometheus exposition, gauges refreshed first."""
        self.refresh_gauges()
        return self.metrics.exposition()

    def status(self, rt: Runtime, *, admin: bool) -> dict[str, Any]:
        return snapshot(rt.catalog, self.gate, self.recent, shared_limits=rt.admission.limiter.shared, admin=admin)

    async def restart_models(self, req: ReloadModelRequest) -> dict[str, Any]:
        """`/reload_model` with a body: restart a kind's vLLM servers (409 unless managed)."""
        if not self.settings.manage_models:
            raise self.manager.refuse_unmanaged(req)
        return await self.manager.reload(req)

    # ---- requests and reloads ----------------------------------------------------------------
    def enter(self) -> Runtime:
        """The configuration a request runs on, start to end (pair with `leave`)."""
        rt = self.runtime
        rt.users += 1
        return rt

    def leave(self, rt: Runtime) -> None:
        rt.users -= 1
        if rt.retired and rt.users == 0:
            self._spawn(self._close_retired(rt))

    async def _close_retired(self, rt: Runtime) -> None:
        await rt.close()
        if rt in self._retired:
            self._retired.remove(rt)

    def reload_keys(self) -> bool:
        """Re-read the keys file (its watcher calls this when the file changed)."""
        assert isinstance(self.keys, KeyStore)
        try:
            n = self.keys.reload()
        except (KeysFileError, FileNotFoundError, OSError) as e:
            log.error("keys file not reloaded, keeping the previous keys: %s", e)
            return False
        log.info("reloaded %d API keys from %s", n, self.keys.path)
        return True

    async def reload_everywhere(self) -> dict[str, Any]:
        """Reload here (a 400 changes nothing anywhere), then in every other process (reloads.py)."""
        answer = await self.reload()
        if self.bus is not None:
            answer["processes"] = await self.bus.broadcast()
        else:
            answer["processes"] = {"processes": 1, "acknowledged": 1, "failed": []}
        return answer

    def _sighup(self) -> None:
        if isinstance(self.keys, KeyStore):
            self.reload_keys()  # at once, as before the full reload: a new key works right away
        self._spawn(self._reload_on_signal())

    async def _reload_on_signal(self) -> None:
        try:
            answer = await self.reload_everywhere()
        except GatewayError as e:
            log.error("SIGHUP: %s", e.message)
            return
        p = answer["processes"]
        log.info("SIGHUP: reloaded; %d of %d process(es) acknowledged", p["acknowledged"], p["processes"])

    async def reload(self) -> dict[str, Any]:
        """Re-read the config file and keys; build a new Runtime and swap it in."""
        async with self._reloading:
            return await self._reload()

    async def _reload(self) -> dict[str, Any]:
        if self.manager.busy:
            raise GatewayError(409, "a model reload is in progress; try again when it has answered")
        old = self.runtime
        try:
            new = load_settings(self.cli_overrides)
            tokenizers = await asyncio.to_thread(load_tokenizers, new.models)  # the loop keeps serving
            rt = self._build(new, tokenizers, old)
            if isinstance(self.keys, KeyStore):
                self.keys.reload()  # last: a reload that fails changes nothing
        except (SettingsError, KeysFileError, FileNotFoundError, TokenizerError, ValueError, ConfigurationError) as e:
            raise GatewayError(400, f"reload failed, old configuration kept: {e}") from None
        if isinstance(self.keys, RedisKeys):
            await self._refresh_keys()
        await rt.upstreams.start(first_check=False)
        self.runtime = rt
        old.retired = True
        old.upstreams.stop_checks()
        self._retired.append(old)
        if old.users == 0:
            self._spawn(self._close_retired(old))
        log.info("configuration reloaded: %s", ", ".join(m.name for m in new.models))
        kept = [f for f in RESTART_ONLY if getattr(old.settings, f) != getattr(new, f)]
        if kept:
            log.warning("reload: %s changed but take effect only on a restart", ", ".join(kept))
        return {**rt.catalog.model_table(), **({"restart_needed": kept} if kept else {})}
