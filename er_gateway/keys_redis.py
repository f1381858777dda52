"""API keys kept in Redis (`--keys-store redis`), shared by every gateway and worker.

One hash holds the records the keys file would (name -> the same JSON, hash of the key and
never the key). Every change replaces it in one MULTI/EXEC under WATCH (so two `keys`
commands cannot lose each other's change), increments a version and publishes on a channel.
A gateway swaps in the whole set when a message arrives, and also compares the version once a
second, so a message missed while its connection was down heals within a second: a create or
revoke reaches every gateway within 2 s. A request never waits on Redis: keys are looked up in
the process's own dict (keys.Keys). If Redis is unreachable the keys already read stay in use.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from .keys import ApiKey, FileStore, Keys, KeysFileError, Store, _record, generate_key, new_record

log = logging.getLogger("er_gateway")

HASH = "er:keys"
VERSION = "er:keys:version"
CHANNEL = "er:keys:changed"
POLL = 1.0  # seconds between version checks, the bound on how late a missed message is healed


def parse(raw: dict[Any, Any]) -> list[ApiKey]:
    """The records of HGETALL's answer, checked as strictly as the keys file's (keys.read_keys)."""
    keys = []
    for field, value in sorted(raw.items()):
        name = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
        try:
            k = _record(orjson.loads(value))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise KeysFileError(
                f"key {name!r} in Redis ({HASH}) is corrupt ({type(e).__name__}: {e}); left untouched"
            ) from None
        if name != k.name:
            raise KeysFileError(f"keys in Redis ({HASH}): field {name!r} holds the key named {k.name!r}")
        keys.append(k)
    return keys


class RedisStore:
    """The keys in Redis as the `keys` commands change them (keys.Store)."""

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.redis = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def __str__(self) -> str:
        return f"Redis {HASH}"

    def read(self) -> list[ApiKey]:
        return parse(self.redis.hgetall(HASH))

    def update(self, change: Callable[[list[ApiKey]], list[ApiKey]]) -> None:
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(HASH)  # type: ignore[no-untyped-call]
                    after = change(parse(pipe.hgetall(HASH)))
                    pipe.multi()
                    pipe.delete(HASH)
                    if after:
                        pipe.hset(HASH, mapping={k.name: orjson.dumps(k.to_json()) for k in after})
                    pipe.incr(VERSION)
                    pipe.publish(CHANNEL, b"changed")
                    pipe.execute()
                    return
                except redis.WatchError:  # another command changed the keys first: read them again
                    continue

    def ensure_default(self) -> str | None:
        """With no key in Redis yet, create one admin key named "default" and return it."""
        created: list[str] = []

        def change(keys: list[ApiKey]) -> list[ApiKey]:
            created.clear()
            if keys:
                return keys
            created.append(generate_key())
            return [new_record("default", created[0], admin=True)]

        self.update(change)
        return created[0] if created else None


class RedisKeys(Keys):
    """The keys a running gateway accepts, followed in Redis (module docstring)."""

    loaded = False

    def __init__(self, url: str, timeout: float) -> None:
        super().__init__()
        self.url = url
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.version: bytes | None = None

    async def refresh(self) -> int:
        """Read every key (and the version they belong to) in one transaction and use them."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.get(VERSION)
            pipe.hgetall(HASH)
            version, raw = await pipe.execute()
        keys = parse(raw)
        if version is None and not keys and self._by_hash:
            # A Redis without our keys at all (flushed, or another instance behind the same name):
            # taking that as "no key is valid" would lock every client out at once. Every change
            # the commands make sets the version, so a real empty set always has one.
            log.error("Redis has no API keys and no %s (flushed?); keeping the %d in use", VERSION, len(self._by_hash))
            self.version = None  # checked again when a command changes the keys
            return len(self._by_hash)
        self.use(keys)
        self.version = version
        return len(keys)

    async def _refresh_if_changed(self) -> None:
        if not self.loaded or await self.redis.get(VERSION) != self.version:
            n = await self.refresh()
            log.info("API keys: %d read from Redis", n)

    async def follow(self) -> None:
        """Forever: apply every change published, and check the version every POLL seconds."""
        while True:
            listener = aioredis.Redis.from_url(self.url)  # no socket timeout: it waits for messages
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                await self._refresh_if_changed()  # subscribed first: nothing falls in between
                while True:
                    message = await pubsub.get_message(timeout=POLL)
                    if message is not None:
                        n = await self.refresh()
                        log.info("API keys changed: %d read from Redis", n)
                    else:
                        await self._refresh_if_changed()
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError, KeysFileError) as e:
                log.warning("API keys in Redis not followed (%s); keeping the %s keys", e, len(self._by_hash))
                await asyncio.sleep(POLL)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await listener.aclose()

    async def close(self) -> None:
        await self.redis.aclose()


def open_store(settings: Any) -> Store:
    """Where keys live for these settings: the keys file, or Redis (`--keys-store redis`)."""
    if settings.keys_store == "redis":
        return RedisStore(settings.redis_url)
    return FileStore(settings.keys_file)
