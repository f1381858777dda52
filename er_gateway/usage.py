"""Usage per key, model and UTC day, for GET /v1/usage (README, "Usage per key").

A finished request adds to a counter in memory (one dict operation: nothing on the hot path
waits). Once a second the counters go to Redis with `--redis-url` (HINCRBY on one hash per day,
kept 32 days, so every gateway and worker adds to the same totals); without Redis they are the
totals themselves, written to a file beside the keys file every `--usage-snapshot-interval`
seconds (60) and on shutdown, so a restart loses at most that much.

Counted: `requests` served (status < 400) and their `inputs` (inputs or documents), `errors`
(answered >= 400 after the request named a model), and `tokens`: what vLLM counted doing,
failed parts included, cached inputs not (as token budgets count).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("er_gateway")

DAYS = 31
METRICS = ("requests", "inputs", "errors", "tokens")
PREFIX = "er:usage:"  # + YYYY-MM-DD: a hash of "key\x1fmodel\x1fmetric" -> count
SEP = "\x1f"  # in neither key names (the keys file allows any other) nor model names
TTL = (DAYS + 1) * 86400

Counts = dict[tuple[str, str, str], list[int]]  # (day, key, model) -> [requests, inputs, errors, tokens]


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def last_days(n: int) -> list[str]:
    day = dt.datetime.now(dt.UTC).date()
    return [(day - dt.timedelta(days=i)).isoformat() for i in range(n)]


class UsageLedger:
    def __init__(
        self, redis_url: str | None, timeout: float, snapshot: str | os.PathLike[str], interval: float
    ) -> None:
        self.redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout) if redis_url else None
        self.snapshot = Path(snapshot)
        self.interval = interval
        self.pending: Counts = {}  # not yet in Redis (with Redis) / everything (without)
        if self.redis is None:
            self.pending = self._load()

    # ---- counting (every request) -------------------------------------------------------------
    def add(self, key: str, model: str, status: int, inputs: int | None, tokens: int | None) -> None:
        row = self.pending.get((today(), key, model))
        if row is None:
            row = self.pending[(today(), key, model)] = [0, 0, 0, 0]
        if status < 400:
            row[0] += 1
            row[1] += inputs or 0
        else:
            row[2] += 1
        row[3] += tokens or 0

    # ---- persistence ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Forever: counters to Redis each second, or the snapshot each interval."""
        while True:
            await asyncio.sleep(1.0 if self.redis is not None else self.interval)
            try:
                await self.flush()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("usage not saved")

    async def flush(self) -> None:
        if self.redis is None:
            await asyncio.to_thread(self._save, {k: list(v) for k, v in self.pending.items()})
            return
        if not self.pending:
            return
        counts, self.pending = self.pending, {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for (day, key, model), row in counts.items():
                    for metric, n in zip(METRICS, row, strict=True):
                        if n:
                            pipe.hincrby(PREFIX + day, SEP.join((key, model, metric)), n)
                    pipe.expire(PREFIX + day, TTL)
                await pipe.execute()
        except (RedisError, OSError) as e:
            # Back into the counters: the next flush tries again (a pipeline that half ran may
            # count some twice, which a second's worth of a failing Redis makes rare).
            for k, row in counts.items():
                mine = self.pending.setdefault(k, [0, 0, 0, 0])
                for i, n in enumerate(row):
                    mine[i] += n
            log.warning("usage not written to Redis (%s); kept in memory", e)

    def _save(self, counts: Counts) -> None:
        keep = set(last_days(DAYS))
        rows = [[d, k, m, *r] for (d, k, m), r in counts.items() if d in keep]
        self.snapshot.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.snapshot.name}.", dir=self.snapshot.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(orjson.dumps({"version": 1, "rows": rows}))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.snapshot)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _load(self) -> Counts:
        try:
            rows = orjson.loads(self.snapshot.read_bytes())["rows"]
            return {(str(d), str(k), str(m)): [int(x) for x in r] for d, k, m, *r in rows if len(r) == 4}
        except FileNotFoundError:
            return {}
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            log.error("usage snapshot %s not read (%s); counting from zero", self.snapshot, e)
            return {}

    # ---- reading (GET /v1/usage) ----------------------------------------------------------------
    async def report(self, key: str | None, days: int) -> list[dict[str, Any]]:
        """Rows of the last `days` UTC days, newest first; one key's, or every key's (None)."""
        wanted = last_days(days)
        totals: Counts = {}
        if self.redis is not None:
            await self.flush()
            async with self.redis.pipeline(transaction=False) as pipe:
                for day in wanted:
                    pipe.hgetall(PREFIX + day)
                answers = await pipe.execute()
            for day, fields in zip(wanted, answers, strict=True):
                for field, value in fields.items():
                    name, model, metric = _split(field)
                    if metric in METRICS and (key is None or name == key):
                        totals.setdefault((day, name, model), [0, 0, 0, 0])[METRICS.index(metric)] += int(value)
        for (day, name, model), row in self.pending.items():  # (with Redis: what failed to flush)
            if day in wanted and (key is None or name == key):
                mine = totals.setdefault((day, name, model), [0, 0, 0, 0])
                for i, n in enumerate(row):
                    mine[i] += n
        order = {d: i for i, d in enumerate(wanted)}
        return [
            {"date": d, "key": k, "model": m, **dict(zip(METRICS, r, strict=True))}
            for (d, k, m), r in sorted(totals.items(), key=lambda x: (order[x[0][0]], x[0][1], x[0][2]))
        ]

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self.redis is not None:
            await self.redis.aclose()


def _split(field: Any) -> tuple[str, str, str]:
    text = field.decode(errors="replace") if isinstance(field, bytes) else str(field)
    parts = text.split(SEP)
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else ("", "", "")
