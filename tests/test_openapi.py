"""/openapi.json and /docs come from the route table (er_gateway/routes.py, openapi.py): a valid
OpenAPI 3.1 document with request schemas, examples and the error envelope on every error
answer, rendered by the gateway's own Swagger UI in a real (headless) browser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import jsonschema
from conftest import Stack
from openapi_spec_validator import validate

from er_gateway.routes import ROUTES

API_POSTS = (
    "/v1/embeddings",
    "/embeddings",
    "/v1/rerank",
    "/v2/rerank",
    "/rerank",
    "/batch_rerank",
    "/score",
    "/v1/score",
)


def _spec(stack: Stack) -> dict:
    r = httpx.get(stack.gw.url + "/openapi.json")
    assert r.status_code == 200
    return r.json()


def test_the_document_is_valid_and_covers_the_route_table(stack: Stack) -> None:
    spec = _spec(stack)
    validate(spec)  # raises on any violation of the OpenAPI 3.1 schema
    documented = {(r.method.lower(), r.path) for r in ROUTES if r.documented}
    served = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert served == documented
    for path in API_POSTS:
        op = spec["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]
        assert body["schema"]["$ref"].startswith("#/components/schemas/"), path
        assert op["security"] == [{"bearer": []}]
        for code in ("400", "401", "413", "429"):
            assert op["responses"][code]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorEnvelope"
            }, (path, code)
    for path, ops in spec["paths"].items():
        for op in ops.values():
            if "requestBody" in op:
                assert op["requestBody"]["content"]["application/json"]["example"], path
            assert op["responses"]["500"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    every_error = [
        (path, code, resp)
        for path, ops in spec["paths"].items()
        for op in ops.values()
        for code, resp in op["responses"].items()
        if int(code) >= 400
    ]
    assert every_error
    own = {("/health", "503"): "/Health", ("/health/ready", "503"): "/Probe"}
    for path, code, resp in every_error:  # the envelope, but for the health routes' own 503 reports
        want = own.get((path, code), "/ErrorEnvelope")
        assert resp["content"]["application/json"]["schema"]["$ref"].endswith(want), (path, code)


def _validator(spec: dict, name: str) -> jsonschema.Draft202012Validator:
    schema = {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    return jsonschema.Draft202012Validator(schema)


def test_real_answers_match_their_documented_schemas(stack: Stack) -> None:
    """The document describes what the gateway really answers: the examples are accepted and
    the answers (and an error) validate against the schemas the document gives them."""
    spec = _spec(stack)
    gw = stack.gw
    for path, name in (
        ("/v1/embeddings", "EmbeddingResponse"),
        ("/v1/rerank", "RerankResponse"),
        ("/rerank", "RerankResponse"),
        ("/score", "ScoreResponse"),
    ):
        example = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["example"]
        r = gw.post(path, example)
        assert r.status_code == 200, (path, r.text)
        _validator(spec, name).validate(r.json())
    r = gw.get("/v1/models")
    _validator(spec, "ModelList").validate(r.json())
    r = gw.post("/v1/rerank", {"query": "q"})
    assert r.status_code == 400
    _validator(spec, "ErrorEnvelope").validate(r.json())
    example = spec["paths"]["/batch_rerank"]["post"]["requestBody"]["content"]["application/json"]["example"]
    r = gw.post("/batch_rerank", {"requests": [*example["requests"], {"query": ""}]})
    assert r.status_code == 200 and "error" in r.json()[-1]
    _validator(spec, "BatchRerankResponse").validate(r.json())
    r = httpx.put(gw.url + "/v1/embeddings")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    _validator(spec, "ErrorEnvelope").validate(r.json())
    for probe in ("/health/live", "/health/ready"):
        r = httpx.get(gw.url + probe)
        assert r.status_code == 200, probe
        _validator(spec, "Probe").validate(r.json())


def test_health_503_matches_its_documented_schema(tmp_path: Path) -> None:
    from conftest import free_port, start_gateway

    gw = start_gateway(tmp_path, "--embedding-url", f"http://127.0.0.1:{free_port()}", "--reranker-url", "none")
    try:
        spec = httpx.get(gw.url + "/openapi.json").json()
        schema = spec["paths"]["/health"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
        r = httpx.get(gw.url + "/health")
        assert r.status_code == 503
        jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(r.json())
        assert r.json()["status"] == "unhealthy"
        r = httpx.get(gw.url + "/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "unready"
        _validator(spec, "Probe").validate(r.json())
    finally:
        gw.stop()


def test_docs_render_in_headless_chromium_without_the_internet(stack: Stack, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is installed by scripts/test.sh"
    html = httpx.get(stack.gw.url + "/docs").text
    assert "/docs/swagger-ui-bundle.js" in html and "cdn" not in html  # the gateway's own copy
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome'}",
        "--virtual-time-budget=8000",
        "--window-size=1200,1000",
    ]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", stack.gw.url + "/docs"], capture_output=True, text=True, timeout=120
    ).stdout
    # Swagger UI has fetched /openapi.json and drawn one block per operation.
    assert "opblock-summary-path" in dom, dom[:2000]
    for path in ("/v1/embeddings", "/v1/rerank", "/batch_rerank", "/score", "/reload_model"):
        assert f'data-path="{path}"' in dom, path
    assert "Create embeddings (OpenAI)" in dom
    assert "Qwen3 embedding &amp; reranker gateway" in dom
