"""Merging concurrent small requests into one upstream call, and splitting the answer back.

vLLM's HTTP front end, not the model, limits small requests: one input per request reaches a
third of the inputs/s that 16 per request do. RAG clients send one query at a time, so the
gateway merges what arrives together (README, "Coalescing"):

- a request whose model has nothing of ours in flight is sent at once, from its own task (no
  added wait when idle);
- otherwise it waits at most `--coalesce-wait-ms` for company, or until the batch holds
  `--coalesce-max-inputs` inputs or `--coalesce-max-tokens` (bounded by UTF-8 bytes);
- a batch of one is the request's own body, sent as it is;
- a request with an input too long for the model never joins one (a batch's inputs are counted
  with the model's tokenizer, in one call, before it is sent);
- a merged call vLLM still refuses with a 4xx or a 500 may be one member's doing: each half is
  then sent on its own, down to single requests, so each gets the answer or the error it would
  have got alone.

What a merged answer means for each member (its slice, its exact `usage`) is the service's
business: a `Codec` (embeddings.py, rerank.py) builds the merged body and splits the answer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .admission import Admission
from .errors import GatewayError
from .tokens import ModelTokenizer
from .upstream import Pool

if TYPE_CHECKING:
    from .dispatch import Dispatcher

log = logging.getLogger("er_gateway.coalesce")


@dataclass(eq=False)
class Member:
    """One request's share of a batch."""

    adm: Admission
    body: bytes  # the request's own upstream body: what is sent when it goes alone
    items: list[str]  # the texts it adds to the merged call (inputs, or rendered documents)
    head: str | None  # rerank: the rendered query its documents are scored against
    size: int  # UTF-8 bytes of its texts, an upper bound of its tokens
    # each item's tokens by the model's tokenizer (rerank: query + document), counted for all
    # members of a merged call at once (Codec.count) just before it is sent
    counts: list[int] = field(default_factory=list)
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class Codec(Protocol):
    """How one kind of request is merged and split (a service defines it)."""

    path: str

    def merged_body(self, base: dict[str, Any], members: Sequence[Member]) -> bytes:
        """One upstream body for every member's items, in order."""
        ...

    async def count(self, members: Sequence[Member], tokenizer: ModelTokenizer) -> None:
        """Fill each member's `counts` (one tokenizer call for the whole batch)."""
        ...

    def too_long(self, member: Member, max_model_len: int) -> bool:
        """Whether vLLM will refuse one of the member's items (it then goes alone)."""
        ...

    def split(self, answer: bytes, members: Sequence[Member]) -> list[tuple[Any, int]]:
        """Each member's answer and its tokens, from the merged answer (a GatewayError if it does
        not hold one result per item)."""
        ...

    def alone(self, answer: bytes) -> Any:
        """A member's answer from the answer to its own body."""
        ...


@dataclass(eq=False)
class Group:
    """What the members of a batch share: where they go, how they merge (built by a service)."""

    pool: Pool
    codec: Codec
    base: dict[str, Any]  # the fields every member shares (all of its body but its items)
    key: bytes  # `base` serialised: requests merge only when theirs are identical
    limit: int  # most items in one upstream call (--max-batch-inputs / --max-batch-docs)
    tokenizer: ModelTokenizer


@dataclass(eq=False)
class Batch:
    key: tuple[Any, ...]
    group: Group
    limit: int  # the smaller of the group's and --coalesce-max-inputs
    members: list[Member] = field(default_factory=list)
    items: int = 0
    size: int = 0
    timer: asyncio.TimerHandle | asyncio.Handle | None = None


_BATCH_PREFIX = secrets.token_hex(4)
_BATCH_COUNTER = itertools.count(1)
# Refusals that may be one member's doing (an input vLLM will not take, or one it fails on).
_ONE_MEMBERS = frozenset(range(400, 500)) - {401, 403, 404, 408, 429} | {500}


class Coalescer:
    def __init__(self, dispatch: Dispatcher, wait_ms: float, max_inputs: int, max_tokens: int) -> None:
        self.dispatch = dispatch
        self.wait = wait_ms / 1000
        self.max_inputs = max_inputs
        self.max_tokens = max_tokens
        self._open: dict[tuple[Any, ...], Batch] = {}
        self._busy: dict[str, int] = {}  # model -> upstream calls of ours in flight
        self._tasks: set[asyncio.Task[None]] = set()

    def fits(self, inputs: int, size: int) -> bool:
        """Whether a request this large is worth merging (larger ones go alone, or are split)."""
        return inputs <= self.max_inputs and size <= self.max_tokens

    async def submit(self, group: Group, member: Member) -> Any:
        """`member`'s answer, once the batch it joined has been answered. The caller holds the
        member's concurrency slot for as long as this runs."""
        pool, codec = group.pool, group.codec
        key = (pool.model.name, codec.path, group.key)
        batch = self._open.get(key)
        model = pool.model.name
        if batch is None and not self._busy.get(model):
            # Idle: nothing to merge with and nothing to wait for; sent at once from the request's
            # own task (no batch, no extra turn of the loop). Others arriving meanwhile batch up.
            self._busy[model] = 1
            try:
                return await self._send_alone(pool, codec, member)
            finally:
                self._busy[model] -= 1
        if batch is not None and (
            batch.items + len(member.items) > batch.limit or batch.size + member.size > self.max_tokens
        ):
            self._flush(batch)
            batch = None
        if batch is None:
            batch = self._open[key] = Batch(key, group, min(group.limit, self.max_inputs))
            batch.timer = asyncio.get_running_loop().call_later(self.wait, self._flush, batch)
        batch.members.append(member)
        batch.items += len(member.items)
        batch.size += member.size
        if batch.items >= batch.limit or batch.size >= self.max_tokens:
            self._flush(batch)
        return await member.future

    def _flush(self, batch: Batch) -> None:
        if self._open.get(batch.key) is not batch:
            return  # already sent (full, or its timer and a fill raced)
        del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: Batch) -> None:
        model = batch.group.pool.model.name
        self._busy[model] = self._busy.get(model, 0) + 1
        members = [m for m in batch.members if not m.future.done()]  # a client that left is dropped
        try:
            if len(members) > 1:
                await batch.group.codec.count(members, batch.group.tokenizer)
                limit = batch.group.pool.max_model_len
                if limit:  # an item vLLM will refuse never joins: alone, it fails only its own request
                    long = [m for m in members if batch.group.codec.too_long(m, limit)]
                    if long:
                        members = [m for m in members if m not in long]
                        await asyncio.gather(self._resolve(batch, members), *(self._alone(batch, m) for m in long))
                        return
            await self._resolve(batch, members)
        except BaseException as e:  # noqa: BLE001 - whatever happened, no member may wait forever
            if not isinstance(e, (GatewayError, asyncio.CancelledError)):
                log.exception("a shared upstream call failed")
            for m in members:
                if not m.future.done():
                    m.future.set_exception(_own_copy(e))
            if not isinstance(e, Exception):
                raise
        finally:
            self._busy[model] -= 1

    async def _resolve(self, batch: Batch, members: list[Member]) -> None:
        """Answer `members`: together, or, if vLLM refuses them together in a way one member's
        input may cause, each half on its own, down to single requests. One bad input among
        n costs about 2·log2(n) calls, not n, and fails only its own request."""
        if len(members) == 1:
            await self._alone(batch, members[0])
        elif members and not await self._merged(batch, members):
            half = len(members) // 2
            await asyncio.gather(self._resolve(batch, members[:half]), self._resolve(batch, members[half:]))

    async def _merged(self, batch: Batch, members: list[Member]) -> bool:
        """One call for every member; False when vLLM refused it as one member's input may make it."""
        batch_id = f"batch-{_BATCH_PREFIX}{next(_BATCH_COUNTER):08x}"
        infos = [m.adm.info for m in members]
        for info in infos:
            info.extra["batch"] = batch_id
        try:
            body = batch.group.codec.merged_body(batch.group.base, members)
            result = await self.dispatch.call(batch.group.pool, batch.group.codec.path, body, infos, batch_id)
        except GatewayError as e:
            if e.status not in _ONE_MEMBERS:
                raise
            for info in infos:
                info.extra.pop("batch", None)
            return False
        try:
            answers = batch.group.codec.split(result.body, members)
        except GatewayError as e:
            batch.group.pool.bad_answer(result.replica, e.message)  # a 200 that is not the answer asked for
            raise
        m = self.dispatch.metrics
        m.child(m.coalesced, batch.group.pool.model.name).observe(len(members))
        for member, (answer, tokens) in zip(members, answers, strict=True):
            member.adm.done_tokens += tokens
            if not member.future.done():
                member.future.set_result(answer)
        return True

    async def _send_alone(self, pool: Pool, codec: Codec, m: Member) -> Any:
        """`m`'s own body, its answer (or its error) its own."""
        return codec.alone((await self.dispatch.answered(pool, codec.path, m.body, m.adm)).body)

    async def _alone(self, batch: Batch, m: Member) -> None:
        try:
            answer = await self._send_alone(batch.group.pool, batch.group.codec, m)
        except Exception as e:  # noqa: BLE001 - the member's own error, raised in its own request
            if not m.future.done():
                m.future.set_exception(e)
            return
        if not m.future.done():
            m.future.set_result(answer)


def in_order(items: Any, n: int, what: str) -> list[dict[str, Any]]:
    """A merged answer's `data`, sorted by `index`, if it holds exactly one result for each of
    the `n` items sent (integer indexes 0..n-1, each once); else a 502 (a broken or hostile
    backend: a result must never reach the member whose item it is not)."""
    if not isinstance(items, list) or not all(isinstance(x, dict) for x in items):
        raise GatewayError(502, f"backend answered with something that is not a list of {what}")
    indexes = [x.get("index") for x in items]
    if len(items) != n or not all(type(i) is int for i in indexes) or sorted(indexes) != list(range(n)):
        raise GatewayError(502, f"backend answered {len(items)} {what} for {n} inputs")
    return sorted(items, key=lambda x: int(x["index"]))


def _own_copy(e: BaseException) -> Exception:
    """The error each member raises in its own request: a GatewayError of its own (its headers
    are changed there), never one exception object shared by several requests."""
    if isinstance(e, GatewayError):
        return GatewayError(e.status, e.message, param=e.param, type=e.type, headers=dict(e.headers))
    if isinstance(e, asyncio.CancelledError):
        return GatewayError(503, "the gateway is shutting down")
    return GatewayError(500, "internal error in a shared upstream call (see the gateway's log)")


def exact_extra(total: int, counts: list[int]) -> int | None:
    """The tokens the backend added to every item of a call whose items' own `counts` are
    known, when its `total` says so exactly (the same for each item), else None."""
    if not counts:
        return None
    extra, rest = divmod(total - sum(counts), len(counts))
    return extra if rest == 0 and extra >= 0 else None


def apportion(total: int, counts: list[int], items: list[int]) -> list[int]:
    """Each member's share of an upstream `total`: its own texts' `counts` plus, per item, the
    tokens the backend adds to every item (its special tokens), found as what is left over.

    When the tokenizer agrees with the backend (the same model's), the left-over is the same for
    every item and each member's share is exactly what it would have been alone. Otherwise the
    total is shared in proportion, so the shares still add up to what the backend counted.
    """
    total = max(0, total)  # a backend reporting a negative count is charged nothing
    n = sum(items)
    extra, rest = divmod(total - sum(counts), n) if n else (0, 1)
    if rest == 0 and extra >= 0:  # (exact_extra, for members' summed counts)
        return [c + extra * k for c, k in zip(counts, items, strict=True)]
    weights = [c + k for c, k in zip(counts, items, strict=True)]
    whole = sum(weights) or 1
    shares = [total * w // whole for w in weights]
    for i in sorted(range(len(shares)), key=lambda i: -(total * weights[i] % whole))[: total - sum(shares)]:
        shares[i] += 1
    return shares
