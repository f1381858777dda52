"""Whatever a client sends, the answer is 2xx or a 4xx in the error envelope — never a 5xx."""

from __future__ import annotations

import json

import httpx
from conftest import Stack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FIELDS = [
    "model",
    "input",
    "encoding_format",
    "dimensions",
    "user",
    "instruction",
    "input_type",
    "query",
    "documents",
    "top_n",
    "return_documents",
    "max_length",
    "truncate_prompt_tokens",
    "text_1",
    "text_2",
    "requests",
]
bodies = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    json_values,
    st.binary(max_size=64),
)
PATHS = ["/v1/embeddings", "/v1/rerank", "/v2/rerank", "/rerank", "/batch_rerank", "/score", "/v1/score"]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), body=bodies)
def test_no_5xx_for_client_input(stack: Stack, path: str, body: object) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # json: ints beyond 64 bits too
    r = httpx.post(stack.gw.url + path, content=raw, headers=stack.gw.auth, timeout=30)
    assert r.status_code < 500, (path, raw, r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["code"] == r.status_code and err["message"]
    elif path == "/batch_rerank":
        for item in r.json():
            assert "results" in item or item["error"]["code"] < 500, item
