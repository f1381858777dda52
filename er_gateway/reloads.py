"""A reload that reaches every gateway process sharing a Redis (README, "Scaling out").

`/reload_model` (no body) and SIGHUP reload the process that got them first, so a configuration
that does not load is a 400 that changes nothing anywhere. Then the reload is published on a
channel; every other process (other workers, other gateways) reloads its own configuration and
pushes an acknowledgement to a list named after the reload (spread over half a second, so a fleet
does not stop serving in the same instant). PUBLISH says how many processes got
the message, so the first one knows how many answers to wait for (at most `ACK_WAIT` s) and
says how many acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

log = logging.getLogger("er_gateway")

CHANNEL = "er:reload"
ACKS = "er:reload:acks:"  # + the reload's id: a list of acknowledgements, expiring
ACK_WAIT = 10.0
ACK_TTL = 60
SPREAD = 0.5  # seconds over which the other processes start their reloads (not all in one instant)


class ReloadBus:
    def __init__(self, url: str, reload: Callable[[], Awaitable[Any]], timeout: float) -> None:
        self.url = url
        # host:pid names the process in answers; the suffix keeps two PID-1 containers apart
        self.instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._reload = reload  # this process's own reload; raises on failure
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        # BLPOP waits up to ACK_WAIT for an answer: a connection with a longer socket timeout
        self.waiter = aioredis.Redis.from_url(url, socket_timeout=ACK_WAIT + 5, socket_connect_timeout=timeout)
        self.subscribed = False

    async def broadcast(self) -> dict[str, Any]:
        """Ask every other process to reload; wait for their answers. The counts include this one."""
        rid = uuid.uuid4().hex
        try:
            reached = int(await self.redis.publish(CHANNEL, orjson.dumps({"id": rid, "from": self.instance})))
        except (redis.RedisError, OSError) as e:
            log.warning("reload not broadcast: Redis failed (%s)", e)
            return {"processes": 1, "acknowledged": 1, "failed": [], "unreached": f"Redis failed: {e}"}
        others = max(0, reached - (1 if self.subscribed else 0))
        acks: list[dict[str, Any]] = []
        deadline = time.monotonic() + ACK_WAIT
        try:
            while len(acks) < others and (left := deadline - time.monotonic()) > 0:
                got = await self.waiter.blpop([ACKS + rid], timeout=max(0.01, left))
                if got is not None:
                    acks.append(orjson.loads(got[1]))
        except (redis.RedisError, OSError, orjson.JSONDecodeError) as e:
            log.warning("reload acknowledgements not all read: %s", e)
        failed = [{"process": a.get("process"), "error": a.get("error")} for a in acks if not a.get("ok")]
        answer: dict[str, Any] = {
            "processes": 1 + others,
            "acknowledged": 1 + len(acks) - len(failed),
            "failed": failed,
        }
        if len(acks) < others:
            answer["silent"] = others - len(acks)  # got the message, did not answer in time
        return answer

    async def follow(self) -> None:
        """Forever: reload when another process asks, and acknowledge."""
        while True:
            # PINGs every 30 s find a connection that died silently (Redis moved, a NAT forgot it)
            listener = aioredis.Redis.from_url(self.url, health_check_interval=30)
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                self.subscribed = True
                async for message in pubsub.listen():
                    try:
                        data = orjson.loads(message["data"])
                        rid, origin = str(data["id"]), data.get("from")
                    except (orjson.JSONDecodeError, KeyError, TypeError):
                        continue
                    if origin == self.instance:
                        continue
                    await self._answer(rid, origin)
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as e:
                log.warning("reload channel lost (%s); subscribing again", e)
                await asyncio.sleep(1.0)
            finally:
                self.subscribed = False
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await listener.aclose()

    async def _answer(self, rid: str, origin: Any) -> None:
        ack: dict[str, Any] = {"process": self.instance, "ok": True}
        await asyncio.sleep(random.uniform(0, SPREAD))
        try:
            await self._reload()
            log.info("configuration reloaded, as %s asked", origin)
        except Exception as e:  # noqa: BLE001 - any failure is reported back, never kills the loop
            ack = {"process": self.instance, "ok": False, "error": str(e)}
            log.error("reload asked by %s failed: %s", origin, e)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(ACKS + rid, orjson.dumps(ack))
                pipe.expire(ACKS + rid, ACK_TTL)
                await pipe.execute()
        except (redis.RedisError, OSError) as e:
            log.warning("reload acknowledgement not sent: %s", e)

    async def close(self) -> None:
        await self.redis.aclose()
        await self.waiter.aclose()
