"""Reading, parsing and validating a client's JSON body, at a cost bounded before it is paid.

A body is checked in three steps, each cheap enough to run before the next, dearer one:
1. while it arrives: its size (`--max-body-bytes`) and how many JSON values it can hold,
   counted from commas and opening brackets (`--max-json-values`). Parsing turns every
   value into a Python object of 8 to 64 bytes, so 32 MiB of `[1,1,...]` or `[{},{},...]`
   would cost 0.1 to 0.8 GB; this bound keeps any body's parse under ~64 MB.
2. after parsing: the item counts of the fields that fan out (`--max-inputs`,
   `--max-documents`, `--max-batch-items`), with `len()`, before the schema is checked;
3. the schema (pydantic), whose error lists at most `MAX_PROBLEMS` problems.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .errors import GatewayError
from .settings import Settings

M = TypeVar("M", bound=BaseModel)
MAX_PROBLEMS = 10
# The rest of a refused body is not read: the connection closes after the answer (the front
# door drains a bounded amount first, so a client that sends before reading still sees it).
CLOSE = {"Connection": "close"}


async def read_body(request: Request, settings: Settings) -> bytes:
    """The body, refused as soon as it is known to exceed the size or value limits."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_big = int(declared) > limit
        except ValueError:
            raise GatewayError(400, "invalid Content-Length header") from None
        if too_big:
            raise GatewayError(
                413, f"request body is {declared} bytes; the limit is {limit} (--max-body-bytes)", headers=CLOSE
            )
    try:
        async with asyncio.timeout(settings.body_timeout):
            return await _read_counted(request, settings)
    except TimeoutError:
        raise GatewayError(
            408, f"request body not received within {settings.body_timeout:g} s (--body-timeout)", headers=CLOSE
        ) from None


async def _read_counted(request: Request, settings: Settings) -> bytes:
    limit, max_values = settings.max_body_bytes, settings.max_json_values
    chunks: list[bytes] = []
    size = values = 0
    async for chunk in request.stream():
        if not chunk:
            continue
        size += len(chunk)
        if size > limit:
            raise GatewayError(
                413, f"request body exceeds the limit of {limit} bytes (--max-body-bytes)", headers=CLOSE
            )
        # An upper bound of the values in the body: every array item but the first follows a
        # comma, and every object or array opens with a bracket (commas inside strings only
        # make the bound more cautious).
        values += chunk.count(b",") + chunk.count(b"[") + chunk.count(b"{")
        if values > max_values:
            raise GatewayError(
                413,
                f"request body holds more than {max_values} JSON values (array items, object members); "
                "the limit is --max-json-values. Split the request.",
                headers=CLOSE,
            )
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json(request: Request, settings: Settings, *, empty: Any = ...) -> tuple[Any, bytes]:
    """The body parsed; an empty body is a 400, or `empty` where the route gives it a meaning."""
    raw = await read_body(request, settings)
    if not raw or raw.isspace():
        if empty is not ...:
            return empty, raw
        raise GatewayError(400, "request body is empty; send a JSON object")
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError as e:
        raise GatewayError(400, f"malformed JSON: {e}") from None


# ---- fan-out caps (step 2) --------------------------------------------------------------------
def _too_many(field: str, count: int, limit: int, flag: str, what: str) -> GatewayError:
    return GatewayError(
        400, f"'{field}' has {count} {what}; at most {limit} are accepted per request ({flag})", param=field
    )


def check_inputs(data: dict[str, Any], settings: Settings) -> None:
    """The count and the shape of `input`, before the schema: one pass that stops at the 10th bad
    item. (pydantic would report every bad item of every union member: 2 million error objects,
    12 s and 2 GB for a 4 MB `[1, "x", "x", ...]`.)"""
    inputs = data.get("input")
    if not isinstance(inputs, list) or not inputs:
        return  # a string, a wrong type or an empty list: the schema says what is wrong
    first = type(inputs[0])
    if first is int:  # one tokenized input: a flat list of token ids
        if all(type(x) is int for x in inputs):
            return
        raise _bad_items("input", inputs, lambda x: type(x) is int, "a token id (an integer), like input[0]")
    if len(inputs) > settings.max_inputs:
        raise _too_many("input", len(inputs), settings.max_inputs, "--max-inputs", "inputs")
    if first is str:
        if all(type(x) is str for x in inputs):
            return
        raise _bad_items("input", inputs, lambda x: type(x) is str, "a string, like input[0]")
    if first is list:

        def token_list(x: Any) -> bool:
            return type(x) is list and bool(x) and all(type(t) is int for t in x)

        if all(token_list(x) for x in inputs):
            return
        raise _bad_items("input", inputs, token_list, "a non-empty list of token ids, like input[0]")
    # anything else: the schema's message for the whole field


def _bad_items(field: str, items: list[Any], ok: Any, want: str) -> GatewayError:
    problems: list[str] = []
    total = 0
    for i, x in enumerate(items):
        if not ok(x):
            total += 1
            if len(problems) < MAX_PROBLEMS:
                problems.append(f"'{field}[{i}]' must be {want}")
    if total == 1:
        return GatewayError(400, problems[0], param=field)
    more = f" (showing the first {MAX_PROBLEMS})" if total > MAX_PROBLEMS else ""
    return GatewayError(400, f"{total} problems{more}: " + "; ".join(problems), param=field)


def check_documents(data: dict[str, Any], settings: Settings, fields: tuple[str, ...] = ("documents",)) -> None:
    for f in fields:
        docs = data.get(f)
        if isinstance(docs, list) and len(docs) > settings.max_documents:
            raise _too_many(f, len(docs), settings.max_documents, "--max-documents", "documents")


def check_texts(data: dict[str, Any], settings: Settings, fields: tuple[str, ...] = ("texts", "inputs")) -> None:
    """Cohere's /v2/embed lists, counted against --max-inputs before the schema."""
    for f in fields:
        items = data.get(f)
        if isinstance(items, list) and len(items) > settings.max_inputs:
            raise _too_many(f, len(items), settings.max_inputs, "--max-inputs", "inputs")


def check_batch(items: list[Any], settings: Settings) -> None:
    if len(items) > settings.max_batch_items:
        raise _too_many("requests", len(items), settings.max_batch_items, "--max-batch-items", "requests")


# ---- schema (step 3) --------------------------------------------------------------------------
def validate(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise GatewayError(400, "request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


UNION_HINTS = {
    "input": "a non-empty string, a list of strings, a list of token ids or a list of lists of token ids",
    "documents": 'a non-empty list of strings or of {"text": ...} objects',
    "text_1": "a non-empty string or a non-empty list of strings",
    "text_2": "a non-empty string or a non-empty list of strings",
}


def validation_error(e: ValidationError) -> GatewayError:
    """One 400 naming at most MAX_PROBLEMS problems, the first one's field as `param`."""
    errors = e.errors(include_url=False, include_input=False, include_context=False)
    # A union (`input`, each document) reports one error per member it tried: when it does,
    # say once what is accepted there instead.
    per_item: dict[tuple[Any, ...], int] = {}
    for err in errors:
        if err["loc"] and str(err["loc"][0]) in UNION_HINTS:
            item = _union_item(err["loc"])
            per_item[item] = per_item.get(item, 0) + 1
    problems: list[str] = []
    seen: set[tuple[Any, ...]] = set()
    for err in errors:
        loc = err["loc"]
        member = _union_item(loc) if loc and str(loc[0]) in UNION_HINTS else None
        union = member is not None and per_item[member] > 1
        key: tuple[Any, ...] = member if member is not None and union else tuple(loc)
        if key in seen:
            continue
        seen.add(key)
        problems.append(_describe(err, member if union else None) if len(seen) <= MAX_PROBLEMS else "")
    first = errors[0]["loc"]
    param = str(first[0]) if first else None
    if len(problems) == 1:
        return GatewayError(400, problems[0], param=param)
    shown = "; ".join(problems[:MAX_PROBLEMS])
    more = f" (showing the first {MAX_PROBLEMS})" if len(problems) > MAX_PROBLEMS else ""
    return GatewayError(400, f"{len(problems)} problems{more}: {shown}", param=param)


def _union_item(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a union member's error is about: the whole `input`, or one item ('documents', 3)."""
    if loc[0] == "input" or len(loc) < 2 or not isinstance(loc[1], int):
        return loc[:1]
    return loc[:2]


def _describe(err: Any, union_item: tuple[Any, ...] | None) -> str:
    loc = err["loc"]
    if union_item is not None and err["type"] != "missing":
        where = _where(union_item)
        if len(union_item) == 1:
            return f"'{where}' must be {UNION_HINTS[str(union_item[0])]}"
        return f"'{where}' is not a valid item of '{union_item[0]}' ({UNION_HINTS[str(union_item[0])]})"
    if err["type"] == "missing":
        return f"'{_where(loc)}' is required"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"'{_where(loc)}': {msg}"


def _where(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not out:
            out = str(p)
        elif not p.startswith(("str", "list[", "function-", "RerankDocument", "int")):
            out += f".{p}"
    return out
