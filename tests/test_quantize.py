"""Embedding types (er_gateway/quantize.py) against numpy as the independent oracle: int8 scales
by the vector's own largest component, binary/ubinary are numpy's packbits of the sign bits (what
sentence-transformers' quantize_embeddings does)."""

from __future__ import annotations

import numpy as np
from fake_vllm import embed_vector
from hypothesis import given
from hypothesis import strategies as st

from er_gateway.quantize import QUANTIZERS, binary, int8, packed, ubinary, uint8


def reference(v: list[float], dtype: str) -> list[int]:
    a = np.asarray(v, dtype=np.float64)
    scale = np.abs(a).max()
    q = np.zeros(len(a), dtype=np.int64) if scale == 0 else np.round(a / scale * 127).astype(np.int64)
    if dtype == "int8":
        return q.astype(np.int8).tolist()
    if dtype == "uint8":
        return (q + 128).astype(np.uint8).tolist()
    bits = np.packbits(a > 0)
    return bits.tolist() if dtype == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8).tolist()


def test_real_shaped_vectors_match_numpy() -> None:
    for text in ("what is a panda?", "Paris is the capital of France", "x"):
        for dim in (64, 1024, 13):
            v = embed_vector(text, dim)
            for dtype, f in QUANTIZERS.items():
                assert f(v) == reference(v, dtype), (text, dim, dtype)


floats = st.floats(min_value=-1.0, max_value=1.0, allow_nan=False, width=32)


@given(st.lists(floats, min_size=1, max_size=300))
def test_any_vector_matches_numpy(v: list[float]) -> None:
    for dtype, f in QUANTIZERS.items():
        assert f(v) == reference(v, dtype), dtype
    assert all(-127 <= q <= 127 for q in int8(v)) and all(1 <= q <= 255 for q in uint8(v)) or max(map(abs, v)) == 0
    assert len(ubinary(v)) == -(-len(v) // 8) == len(binary(v))


def test_bytes_are_the_numpy_dtypes() -> None:
    v = embed_vector("bytes", 64)
    assert packed(int8(v), "int8") == np.asarray(reference(v, "int8"), dtype=np.int8).tobytes()
    assert packed(ubinary(v), "ubinary") == np.packbits(np.asarray(v) > 0).tobytes()
    assert (
        packed(binary(v), "binary") == (np.packbits(np.asarray(v) > 0).astype(np.int16) - 128).astype(np.int8).tobytes()
    )


def test_zero_vector_and_ties() -> None:
    assert int8([0.0, 0.0]) == [0, 0] and ubinary([0.0] * 9) == [0, 0]
    # round half to even, as numpy: 0.5/1*127 = 63.5 -> 64; -63.5 -> -64
    assert int8([1.0, 0.5, -0.5]) == reference([1.0, 0.5, -0.5], "int8")
