"""The exact-match cache of embedding vectors and rerank scores (README, "Cache").

RAG pipelines re-embed the same documents (re-ingestion, several indexes) and re-rank the
same (query, document) pairs; a hit never reaches vLLM. An entry is one input's result: the
embedding exactly as vLLM wrote it (JSON bytes, never re-encoded) or a pair's score, with the
tokens vLLM counted for it, under a key made of

- the model's *fingerprint*: configured name, the name vLLM serves it under, each replica's
  URL and the weights it reports (`root` in /v1/models), and an *epoch* that moves whenever a
  replica comes back after failing its health check (a restart, perhaps with new weights at
  the same path);
- everything else in the request that changes the result (`encoding_format`, `dimensions`,
  the rendered query and instruction for a rerank, ...);
- the input text itself (after the gateway's Qwen3 rendering).

So a reload that changes a served name, URLs or weights, or a restart the health checks see,
makes the model's old entries unreachable; they age out of the LRU (or Redis's TTL).

Memory: an LRU bounded in bytes (`--cache-size`, MB). With `--redis-url` it is also shared
through Redis (one MGET per request for what memory lacks, writes in the background, entries
expire after `--cache-ttl`); the epochs are then kept in Redis too, so every gateway moves to
a new epoch within one health interval of any of them seeing a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger("er_gateway.cache")

# Bytes an entry costs beyond its key's and value's lengths: two bytes objects' headers (33
# each), the OrderedDict's hash slot and link node; measured with tracemalloc at ~140.
ENTRY_OVERHEAD = 160
PREFIX = b"er:cache:"
EPOCH_PREFIX = b"er:cache-epoch:"


class ResultCache:
    def __init__(
        self,
        max_bytes: int,
        redis_url: str | None = None,
        *,
        ttl: float = 86400.0,
        scope: str = "key",
        timeout: float = 0.5,
        breaker_interval: float = 5.0,
        on_lookup: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self.ttl = ttl
        self.on_lookup = on_lookup  # (model, hits, misses) for metrics
        self.per_key = scope == "key"
        self.breaker_interval = breaker_interval
        self._skip_redis_until = 0.0
        self._epochs: dict[str, int] = {}  # model fingerprint -> epoch
        self._seen: dict[str, int] = {}  # model fingerprint -> restarts seen when last synced
        self._pending: set[str] = set()  # restarts seen that Redis has not been told of yet
        self._tasks: set[asyncio.Task[None]] = set()
        self.redis = None
        if redis_url:
            from redis.asyncio import Redis

            self.redis = Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)

    # ---- keys ---------------------------------------------------------------------------------
    def namespace(self, fingerprint: str, params: bytes, owner: str) -> bytes:
        """The part of every key shared by one request's inputs (and, with `--cache-scope key`,
        by the requests of one API key, `owner`, only)."""
        epoch = self._epochs.get(fingerprint, 0)
        owner = owner if self.per_key else ""
        return hashlib.sha256(f"{fingerprint}\0{epoch}\0{owner}\0".encode() + params).digest()

    @staticmethod
    def keys(namespace: bytes, texts: Iterable[str]) -> list[bytes]:
        return [hashlib.sha256(namespace + t.encode("utf-8", "surrogatepass")).digest() for t in texts]

    # ---- entries --------------------------------------------------------------------------------
    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """The entries under `keys` (None for a miss): memory first, then Redis for the rest."""
        lru = self._lru
        found: list[bytes | None] = []
        for k in keys:
            v = lru.get(k)
            if v is not None:
                lru.move_to_end(k)
            found.append(v)
        missing = [i for i, v in enumerate(found) if v is None]
        if missing and self.redis is not None and self._redis_ok():
            try:
                values = await self.redis.mget([PREFIX + keys[i] for i in missing])
            except Exception as e:  # noqa: BLE001 - a cache that fails is a miss, never an error
                self._redis_failed(e)
                return found
            for i, got in zip(missing, values, strict=True):
                if isinstance(got, bytes):
                    found[i] = got
                    self._remember(keys[i], got)
        return found

    async def known(self, keys: Sequence[bytes], model: str) -> dict[int, tuple[int, bytes]]:
        """The entries under `keys` that are ours, by position: (tokens, JSON result). Hits and
        misses are counted for `model` (`on_lookup`)."""
        found: dict[int, tuple[int, bytes]] = {}
        for i, raw in enumerate(await self.get_many(keys)):
            parsed = parse_entry(raw) if raw is not None else None
            if parsed is not None:
                found[i] = parsed
        if self.on_lookup is not None:
            self.on_lookup(model, len(found), len(keys) - len(found))
        return found

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        for k, v in items:
            self._remember(k, v)
        if items and self.redis is not None and self._redis_ok():
            task = asyncio.get_running_loop().create_task(self._write(items))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _remember(self, key: bytes, value: bytes) -> None:
        cost = len(key) + len(value) + ENTRY_OVERHEAD
        if cost > self.max_bytes:
            return
        old = self._lru.pop(key, None)
        if old is not None:
            self.size -= len(key) + len(old) + ENTRY_OVERHEAD
        self._lru[key] = value
        self.size += cost
        while self.size > self.max_bytes:
            k, v = self._lru.popitem(last=False)
            self.size -= len(k) + len(v) + ENTRY_OVERHEAD

    async def _write(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        assert self.redis is not None
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for k, v in items:
                    pipe.set(PREFIX + k, v, ex=max(1, int(self.ttl)))
                await pipe.execute()
        except Exception as e:  # noqa: BLE001 - a write that fails costs a future miss, nothing more
            self._redis_failed(e)

    # ---- epochs -----------------------------------------------------------------------------------
    async def sync_epochs(self, seen_restarts: dict[str, int]) -> None:
        """Move each model's epoch on: `seen_restarts` is, per fingerprint, how many times its
        replicas came back after failing (as this process saw it). Called after every round of
        health checks. With Redis, a restart any gateway saw moves the shared epoch, and every
        gateway reads it here. An epoch never goes back: a shared one that is lower than this
        process's (Redis lost it, or could not be told) does not bring old entries back, and a
        restart Redis could not be told of is told at the next sync."""
        for fp, n in seen_restarts.items():
            if n > self._seen.get(fp, 0):
                self._pending.add(fp)
                self._epochs[fp] = self._epochs.get(fp, 0) + 1  # stale here at once, whatever Redis says
        self._seen = dict(seen_restarts)
        # Only the models served now: a backend that reports new weights at every check cannot
        # grow these without bound.
        self._epochs = {fp: e for fp, e in self._epochs.items() if fp in seen_restarts}
        self._pending &= set(seen_restarts)
        if self.redis is None or not self._redis_ok():
            return
        fps = list(seen_restarts)
        bumps = sorted(self._pending)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for fp in bumps:
                    pipe.incr(EPOCH_PREFIX + fp.encode())
                pipe.mget([EPOCH_PREFIX + fp.encode() for fp in fps])
                shared = (await pipe.execute())[-1]
        except Exception as e:  # noqa: BLE001 - told at the next sync
            self._redis_failed(e)
            return
        self._pending.difference_update(bumps)
        for fp, value in zip(fps, shared, strict=True):
            self._epochs[fp] = max(self._epochs.get(fp, 0), int(value or 0))

    # ---- Redis health -----------------------------------------------------------------------------
    def _redis_ok(self) -> bool:
        return time.monotonic() >= self._skip_redis_until

    def _redis_failed(self, e: Exception) -> None:
        if self._redis_ok():
            log.warning("cache: Redis failed (%s); memory only for %g s", e, self.breaker_interval)
        self._skip_redis_until = time.monotonic() + self.breaker_interval

    async def close(self) -> None:
        for t in list(self._tasks):
            await asyncio.gather(t, return_exceptions=True)
        if self.redis is not None:
            await self.redis.aclose()


def entry(tokens: int, value: bytes) -> bytes:
    """An entry's bytes: the tokens vLLM counted for the input, then its result as JSON."""
    return b"%d:" % tokens + value


def parse_entry(raw: bytes) -> tuple[int, bytes] | None:
    """(tokens, JSON result) of an entry, or None for bytes that are not one (a foreign Redis key)."""
    head, sep, value = raw.partition(b":")
    if not sep or not head.isdigit() or not value:
        return None
    return int(head), value
