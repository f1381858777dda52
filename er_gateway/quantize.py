"""Compact embedding types for vector stores: int8, uint8, binary, ubinary (README, "Embedding types").

Every formula depends on one vector alone, so the same text gives the same bytes whatever else
was in its request or merged with it (coalesce.py):

* int8:  q = round(x / max|x| * 127) per component, in [-127, 127] (round half to even). Qwen3
  embeddings are unit vectors compared by cosine, which a per-vector scale leaves unchanged.
* uint8: q + 128, in [1, 255].
* ubinary: one bit per component, 1 where x > 0, packed 8 per byte, first component in the high
  bit (numpy's `packbits`), as sentence-transformers' `quantize_embeddings(..., "ubinary")`.
* binary: the ubinary bytes minus 128, as int8 (sentence-transformers' "binary").

A dimension count that is not a multiple of 8 is padded with 0 bits, as `packbits` does.
"""

from __future__ import annotations

import base64
from array import array
from collections.abc import Sequence
from typing import Any

import orjson

from .errors import GatewayError


def int8(vector: Sequence[float]) -> list[int]:
    scale = max((abs(x) for x in vector), default=0.0)
    if scale == 0.0:
        return [0] * len(vector)
    return [round(x / scale * 127) for x in vector]


def uint8(vector: Sequence[float]) -> list[int]:
    return [q + 128 for q in int8(vector)]


def ubinary(vector: Sequence[float]) -> list[int]:
    out = []
    for start in range(0, len(vector), 8):
        byte = 0
        for i, x in enumerate(vector[start : start + 8]):
            if x > 0:
                byte |= 0x80 >> i
        out.append(byte)
    return out


def binary(vector: Sequence[float]) -> list[int]:
    return [b - 128 for b in ubinary(vector)]


QUANTIZERS = {"int8": int8, "uint8": uint8, "binary": binary, "ubinary": ubinary}


def packed(values: list[int], dtype: str) -> bytes:
    """The bytes of a quantized vector (int8 and binary signed, uint8 and ubinary unsigned)."""
    return array("b" if dtype in ("int8", "binary") else "B", values).tobytes()


def embedding_items(body: bytes) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An embeddings answer with float vectors, and its `data` items in index order (502 if the
    backend's answer is not one)."""
    try:
        answer = orjson.loads(body)
        items = sorted(answer["data"], key=lambda d: d["index"])
        ok = all(isinstance(d["embedding"], list) for d in items)
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise GatewayError(502, f"backend answered with something that is not an embeddings list ({e})") from None
    if not ok:
        raise GatewayError(502, "backend answered embeddings that are not lists of floats")
    return answer, items


def quantize_answer(body: bytes, dtype: str, *, base64_bytes: bool = False) -> bytes:
    """An OpenAI embeddings answer with each vector as `dtype` (Voyage's `output_dtype`); with
    `base64_bytes`, each as the base64 of its bytes (Voyage's encoding_format "base64")."""
    answer, items = embedding_items(body)
    for item in items:
        q = QUANTIZERS[dtype](item["embedding"])
        item["embedding"] = base64.b64encode(packed(q, dtype)).decode() if base64_bytes else q
    return orjson.dumps(answer)
