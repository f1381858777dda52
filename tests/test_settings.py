"""Settings: one object, precedence flag > env > file > default, --help documents everything."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli, self_signed_cert

from er_gateway.settings import OPTIONS, SettingsError, load_settings


def test_defaults_match_spec() -> None:
    s = load_settings({}, environ={})
    assert (s.host, s.port) == ("0.0.0.0", 2048)
    assert s.embedding_urls == ["http://127.0.0.1:8000"] and s.reranker_urls == ["http://127.0.0.1:8001"]
    assert (s.embedding_model, s.reranker_model) == ("Qwen3-Embedding-0.6B", "Qwen3-Reranker-0.6B")
    assert (s.rate_limit, s.max_concurrency, s.queue_timeout) == ("100/minute", 500, 30)
    assert (s.timeout, s.connect_timeout, s.max_body_bytes) == (600, 5, 32 * 1024 * 1024)
    assert (s.workers, s.log_dir, s.log_level, s.log_format) == (1, "logs", "info", "text")
    assert s.keys_file == "er_api_keys.json" and s.redis_url is None
    assert [m.kind for m in s.models] == ["embedding", "rerank"]


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: 1111\nrate_limit: 5/second\ntimeout: 11\nmax_concurrency: 7\n")
    env = {"ER_CONFIG": str(cfg), "ER_PORT": "2222", "ER_TIMEOUT": "22"}
    s = load_settings({"port": "3333"}, environ=env)
    assert s.port == 3333  # flag beats env and file
    assert s.timeout == 22  # env beats file
    assert s.rate_limit == "5/second" and s.max_concurrency == 7  # file beats default
    assert s.queue_timeout == 30  # default


def test_toml_and_models_list(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'redis-url = "redis://x:1/0"\nworkers = 2\n'
        '[[models]]\nname = "E"\nkind = "embedding"\nurls = ["http://a:1", "http://b:1/"]\naliases = ["e"]\n'
        '[[models]]\nname = "R"\nkind = "reranker"\nurls = "http://c:1"\nprompt = "server"\n'
    )
    s = load_settings({"config": str(cfg)}, environ={})
    assert s.models[0].urls == ["http://a:1", "http://b:1"] and s.models[0].aliases == ["e"]
    assert s.models[1].kind == "rerank" and s.models[1].prompt == "server"
    assert s.default_model("embedding").name == "E"  # type: ignore[union-attr]


def test_comma_separated_urls_from_env() -> None:
    s = load_settings({}, environ={"ER_EMBEDDING_URLS": "http://a:1, http://b:2"})
    assert s.models[0].urls == ["http://a:1", "http://b:2"]


def test_reranker_prompt_shared_with_scripts() -> None:
    assert load_settings({}, environ={"RERANKER_PROMPT": "server"}).models[1].prompt == "server"
    assert (
        load_settings({}, environ={"RERANKER_PROMPT": "server", "ER_RERANKER_PROMPT": "none"}).models[1].prompt
        == "none"
    )


@pytest.mark.parametrize(
    "cli,needle",
    [
        ({"workers": "2"}, "redis"),
        ({"port": "x"}, "port"),
        ({"rate_limit": "x", "reranker_prompt": "bogus"}, "reranker_prompt"),
        ({"config": "/nonexistent.yaml"}, "cannot read"),
    ],
)
def test_invalid_settings_explain(cli: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(cli, environ={})


def test_help_documents_every_option() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for o in OPTIONS:
        assert o.cli in r.stdout, o.cli
        assert o.env in r.stdout.replace("\n", " ").replace("  ", ""), o.env


def test_workers_without_redis_refuses_to_start() -> None:
    r = run_cli("--workers", "2")
    assert r.returncode == 2
    assert "--redis-url" in r.stderr and "N times" in r.stderr


def test_gateway_serves_https_with_ssl_flags(tmp_path: Path) -> None:

    import httpx
    from conftest import start_gateway

    cert, key = self_signed_cert(tmp_path)
    gw = start_gateway(tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), wait=False)
    try:
        import ssl

        from conftest import wait_until

        url = gw.url.replace("http://", "https://")
        trust = ssl.create_default_context(cafile=str(cert))
        wait_until(lambda: httpx.get(url + "/health", verify=trust).status_code in (200, 503), 20, "https", gw.proc)
        r = httpx.get(url + "/v1/models", verify=trust, headers=gw.auth)
        assert r.status_code == 200
    finally:
        gw.stop()


def test_backend_key_from_the_start_scripts_file(tmp_path: Path) -> None:
    (tmp_path / "vllm_api_key").write_text("k1\n")
    here = {"log_dir": str(tmp_path)}
    assert load_settings(here, environ={}).backend_api_key == "k1"
    local = {**here, "embedding_urls": "http://localhost:1,http://[::1]:2"}
    assert load_settings(local, environ={}).backend_api_key == "k1"
    # a configured key wins
    assert load_settings({**here, "backend_api_key": "mine"}, environ={}).backend_api_key == "mine"
    assert load_settings(here, environ={"ER_BACKEND_API_KEY": "env"}).backend_api_key == "env"
    # never sent to another host, never invented
    assert load_settings({**here, "reranker_urls": "http://10.0.0.2:8001"}, environ={}).backend_api_key is None
    assert load_settings({"log_dir": str(tmp_path / "elsewhere")}, environ={}).backend_api_key is None
    # a file that is there but unusable is an error, not a silent stream of 401s
    (tmp_path / "vllm_api_key").write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        load_settings(here, environ={})
    (tmp_path / "vllm_api_key").unlink()
    (tmp_path / "vllm_api_key").mkdir()
    with pytest.raises(SettingsError, match="cannot read the vLLM key"):
        load_settings(here, environ={})


def test_backend_urls_with_credentials_are_refused() -> None:
    for flags in (
        {"embedding_urls": "http://user:secret@10.0.0.7:8000"},
        {"reranker_urls": "http://127.0.0.1:8001,http://u:p@h:8001"},
    ):
        with pytest.raises(SettingsError) as e:
            load_settings(flags, environ={})
        assert "user:password" in str(e.value) and "secret" not in str(e.value)
    with pytest.raises(SettingsError, match="http"):
        load_settings({"embedding_urls": "ftp://h:21"}, environ={})
