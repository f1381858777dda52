"""Real clients against a real gateway: the OpenAI SDK, the Cohere SDK, curl as the README shows."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cohere
import openai
import pytest
from conftest import EMB, RER, ROOT, GatewayProc, Stack, make_stack
from fake_vllm import embed_vector


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Clients meet the gateway as users run it: every default on, the result cache included."""
    st = make_stack(tmp_path_factory.mktemp("clients"), cache=True)
    yield st
    for p in (st.gw, st.emb, st.rer):
        p.stop()


def test_openai_sdk_embeddings_base64_default(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key=stack.gw.key)
    res = client.embeddings.create(model=EMB, input=["hello world", "second text"])
    # The SDK asked for base64 (its default) and decoded it: vectors equal the backend's float32s.
    assert stack.emb.stats()["last_body"]["encoding_format"] == "base64"
    assert [d.embedding for d in res.data] == [embed_vector("hello world", 64), embed_vector("second text", 64)]
    assert res.usage.total_tokens > 0
    res = client.embeddings.create(model=EMB, input="x", encoding_format="float")
    assert res.data[0].embedding == embed_vector("x", 64)


def test_openai_sdk_models_and_errors(stack: Stack) -> None:
    client = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key=stack.gw.key, max_retries=0)
    assert {m.id for m in client.models.list()} == {EMB, RER}
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model="missing", input="x")
    assert "available models" in str(e.value)
    bad = openai.OpenAI(base_url=stack.gw.url + "/v1", api_key="er-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_cohere_sdk_v2_and_v1(stack: Stack) -> None:
    docs = ["Paris is the capital of France", "Berlin is in Germany", "France capital Paris"]
    v2 = cohere.ClientV2(api_key=stack.gw.key, base_url=stack.gw.url)
    res = v2.rerank(model=RER, query="capital of France", documents=docs, top_n=2, max_tokens_per_doc=64)
    assert len(res.results) == 2
    assert res.results[0].relevance_score >= res.results[1].relevance_score
    # Cohere's meta, which LiteLLM and Dify read to bill a rerank
    assert res.meta is not None and res.meta.billed_units is not None
    assert res.meta.billed_units.search_units == 1
    assert res.meta.tokens is not None and res.meta.tokens.input_tokens and res.meta.tokens.input_tokens > 0
    v1 = cohere.Client(api_key=stack.gw.key, base_url=stack.gw.url)
    res1 = v1.rerank(model=RER, query="capital of France", documents=docs, return_documents=False)
    assert [r.index for r in res1.results] == [r.index for r in res.results] + [
        i for i in range(3) if i not in {r.index for r in res.results}
    ]


def readme_curls() -> list[str]:
    """Every curl command in README.md code blocks (continuation lines joined)."""
    blocks: list[str] = []
    lang, lines = None, []  # lang: the open fence's language ("" when bare), None outside a block
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                if lang in ("", "bash", "sh", "shell"):
                    blocks.append("\n".join(lines) + "\n")
                lang = None
        elif lang is not None:
            lines.append(line)
    cmds = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        cmds += [line.strip() for line in joined.splitlines() if line.strip().startswith("curl ")]
    return cmds


def test_readme_has_curl_examples() -> None:
    assert len(readme_curls()) >= 6


def managed_only(cmd: str) -> bool:
    """A README curl that needs a gateway managing its vLLM servers (tests/test_manage.py runs it)."""
    return "/reload_model" in cmd and "-d " in cmd


def run_readme_curl(cmd: str, gw: GatewayProc, cwd: Path) -> tuple[str, str]:
    """Run a README curl exactly, with its placeholders bound to `gw`; (HTTP status, body)."""
    assert shutil.which("curl")
    env = {"ER_KEY": gw.key, "PATH": "/usr/bin:/bin"}
    bound = cmd.replace("http://localhost:2048", gw.url)
    r = subprocess.run(
        ["bash", "-c", bound + " -sS -o out.json -w '%{http_code}'"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()[-3:], (cwd / "out.json").read_text()


def needs_http2(cmd: str) -> bool:
    """A README curl for a gateway started with --http2 (tests/test_http2.py runs it)."""
    return "--http2" in cmd


@pytest.mark.parametrize("cmd", [c for c in readme_curls() if not managed_only(c) and not needs_http2(c)])
def test_readme_curl(stack: Stack, cmd: str, tmp_path: Path) -> None:
    status, body = run_readme_curl(cmd, stack.gw, tmp_path)
    assert status.startswith("2"), (cmd, status, body)
