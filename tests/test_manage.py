"""`--manage-models`: POST /reload_model restarts the reranker's vLLM servers through the start
script (stand-in `vllm`): one replica answers 503 + Retry-After while it restarts, two or more
restart in turn with no failed request, a failure restores the previous settings (502 + log)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from conftest import RER, GatewayProc, free_port, start_gateway, wait_until
from test_clients import managed_only, readme_curls, run_readme_curl
from test_scripts import env_for, record, run
from test_upstream import serve_models

from er_gateway import manage
from er_gateway.errors import GatewayError
from er_gateway.manage import ModelManager
from er_gateway.protocol import ReloadModelRequest
from er_gateway.settings import SettingsError, load_settings
from er_gateway.upstream import Upstreams


@dataclass
class Managed:
    gw: GatewayProc
    env: dict[str, str]
    ports: list[int]


def managed(tmp: Path, replicas: int) -> Managed:
    """`replicas` reranker servers started by the script where the gateway expects them, and a
    gateway managing them (what scripts/run.sh sets up)."""
    ports = [free_port() for _ in range(replicas)]
    env = env_for(tmp, RERANKER_PORT=str(ports[0]), HEALTH_TIMEOUT="20")
    r = run("start_vllm_models.sh", env, "--only", "reranker")
    assert r.returncode == 0, r.stdout + r.stderr
    key = (Path(env["LOG_DIR"]) / "vllm_api_key").read_text().strip()
    for p in ports[1:]:
        r = run(
            "start_vllm_models.sh",
            {**env, "RERANKER_PORT": str(p), "VLLM_API_KEY": key, "LOG_DIR": f"{env['LOG_DIR']}/reranker-{p}"},
            "--only",
            "reranker",
        )
        assert r.returncode == 0, r.stdout + r.stderr
    urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)
    gw = start_gateway(
        tmp / "gw",
        "--manage-models",
        "--log-dir",
        env["LOG_DIR"],
        "--embedding-url",
        "none",
        "--reranker-url",
        urls,
        "--health-interval",
        "0.3",
        env=env,
    )
    return Managed(gw, env, ports)


def stop(m: Managed) -> None:
    m.gw.stop()
    for i, p in enumerate(m.ports):
        run("stop_vllm_models.sh", {**m.env, "LOG_DIR": m.env["LOG_DIR"] + ("" if i == 0 else f"/reranker-{p}")})


@pytest.fixture
def one(tmp_path: Path) -> Iterator[Managed]:
    yield (m := managed(tmp_path, 1))
    stop(m)


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Managed]:
    yield (m := managed(tmp_path, 2))
    stop(m)


class Load:
    """Rerank requests back to back from a thread while a reload runs; every answer kept."""

    def __init__(self, gw: GatewayProc) -> None:
        self.gw, self.answers = gw, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(headers=self.gw.auth, timeout=30) as client:
            while not self._stop.is_set():
                r = client.post(self.gw.url + "/v1/rerank", json={"model": RER, "query": "q", "documents": ["d"]})
                self.answers.append((r.status_code, r.headers.get("retry-after")))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def reload(gw: GatewayProc, body: dict) -> httpx.Response:  # type: ignore[type-arg]
    return httpx.post(gw.url + "/reload_model", json=body, headers=gw.auth, timeout=120)


def test_one_replica_restarts_with_the_seed_body_then_a_failure_restores_it(one: Managed) -> None:
    gw = one.gw
    with Load(gw) as load:
        time.sleep(0.3)
        r = reload(
            gw,
            {
                "model_path": "/models/other-reranker",
                "model_size": "4B",
                "max_model_len": 4096,
                "gpu_memory_utilization": 0.5,
            },
        )
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "reloaded" and body["kind"] == "reranker" and body["replicas"] == 1
    assert body["served_as"] == "Qwen3-Reranker-4B"  # answered once the new server is healthy and known
    statuses = [s for s, _ in load.answers]
    assert set(statuses) <= {200, 503} and 503 in statuses and statuses[-1] == 200, statuses
    assert all(retry for s, retry in load.answers if s == 503)  # 503s say when to come back
    last = record(one.env)[-1]
    assert "/models/other-reranker" in last and "--max-model-len 4096" in last
    assert "--served-model-name Qwen3-Reranker-4B" in last
    card = gw.get("/v1/models").json()["data"][0]
    assert card["id"] == "Qwen3-Reranker-4B" and card["max_model_len"] == 4096
    assert gw.post("/v1/rerank", {"model": RER, "query": "q", "documents": ["d"]}).status_code == 200

    # A model that cannot start: 502 with the end of its log, and the previous settings are back.
    r = reload(gw, {"model_path": "/nonexistent/model"})
    assert r.status_code == 502, r.text
    message = r.json()["error"]["message"]
    assert "previous settings restored" in message and "not a valid model identifier" in message
    restored = record(one.env)[-1]
    assert "/models/other-reranker" in restored and "--max-model-len 4096" in restored
    wait_until(lambda: gw.post("/v1/rerank", {"query": "q", "documents": ["d"]}).status_code == 200, 10, "serving")


def test_two_replicas_restart_in_turn_with_no_failed_request(two: Managed) -> None:
    gw = two.gw
    with Load(gw) as load:
        time.sleep(0.3)
        result: dict[str, httpx.Response] = {}
        first = threading.Thread(target=lambda: result.setdefault("r", reload(gw, {"model_path": "/models/b"})))
        first.start()
        time.sleep(0.3)
        busy = reload(gw, {"model_path": "/models/c"})  # one reload at a time
        first.join(120)
        time.sleep(0.3)
    assert busy.status_code == 409 and "already in progress" in busy.json()["error"]["message"]
    assert result["r"].status_code == 200 and result["r"].json()["replicas"] == 2, result["r"].text
    statuses = [s for s, _ in load.answers]
    assert statuses and set(statuses) == {200}, statuses  # zero failed requests
    restarted = [line for line in record(two.env) if "/models/b" in line]
    assert sorted(int(line.split("--port ")[1].split()[0]) for line in restarted) == sorted(two.ports)


async def test_replicas_elsewhere_are_not_restarted() -> None:
    """Checked before anything runs (no connection is made: the pools are never started)."""
    settings = load_settings(
        {"embedding_urls": "none", "reranker_urls": "http://gpu-host:8001", "manage_models": True}, environ={}
    )
    ups = Upstreams(settings)
    ups.pools = ups.build(settings.models)
    manager = ModelManager(lambda: (settings, ups))
    with pytest.raises(GatewayError) as e:
        await manager.reload(ReloadModelRequest(model_size="4B"))
    assert (
        e.value.status == 409 and "replica 0 of model 'Qwen3-Reranker-0.6B' is not on this machine" in e.value.message
    )
    assert "`MODEL_SIZE=4B ./start_vllm_models.sh --restart --only reranker`" in e.value.message
    unmanaged = manager.refuse_unmanaged(ReloadModelRequest(kind="embedding", model_path="/m/e b", max_model_len=4096))
    assert unmanaged.status == 409
    assert (
        "EMBEDDING_MODEL_PATH='/m/e b' MAX_MODEL_LEN=4096 ./start_vllm_models.sh --restart --only embedding"
        in unmanaged.message
    )


def test_the_readme_reload_curl_on_a_managed_gateway(one: Managed, tmp_path: Path) -> None:
    (cmd,) = [c for c in readme_curls() if managed_only(c)]
    status, body = run_readme_curl(cmd, one.gw, tmp_path)
    assert status == "200", body
    assert "Qwen/Qwen3-Reranker-4B" in record(one.env)[-1]


def test_managing_needs_one_worker() -> None:
    with pytest.raises(SettingsError) as e:
        load_settings({"manage_models": True, "workers": "2", "redis_url": "redis://127.0.0.1:1/0"}, environ={})
    assert "--manage-models needs --workers 1" in str(e.value)


async def test_a_stuck_request_delays_a_restart_by_the_drain_timeout_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose in-flight request never finishes is restarted after DRAIN_TIMEOUT, not never;
    it takes no new request meanwhile."""
    url, runner = await serve_models(orjson.dumps({"data": [{"id": RER, "max_model_len": 512}]}))
    port = int(url.rsplit(":", 1)[1])
    ran = tmp_path / "ran"
    script = tmp_path / "start_vllm_models.sh"
    script.write_text(f'#!/bin/sh\necho "$* $RERANKER_PORT $MAX_MODEL_LEN" >> {ran}\n')
    script.chmod(0o755)
    monkeypatch.setattr(manage, "START_SCRIPT", script)
    monkeypatch.setattr(manage, "DRAIN_TIMEOUT", 0.5)
    settings = load_settings(
        {"embedding_urls": "none", "reranker_urls": url, "manage_models": True, "log_dir": str(tmp_path / "logs")},
        environ={},
    )
    ups = Upstreams(settings)
    ups.pools = ups.build(settings.models)
    pool = ups.pools[RER]
    pool.replicas[0].outstanding = 1  # a request that never returns
    try:
        reloading = asyncio.ensure_future(
            ModelManager(lambda: (settings, ups)).reload(ReloadModelRequest(max_model_len=256))
        )
        await asyncio.sleep(0.2)
        assert pool.pick() is None  # draining: no new request goes to it
        start = asyncio.get_running_loop().time()
        answer = await asyncio.wait_for(reloading, 5)
        waited = asyncio.get_running_loop().time() - start + 0.2
        assert 0.5 <= waited < 1.5, waited
        assert answer["status"] == "reloaded"
        assert ran.read_text().strip() == f"--restart --only reranker {port} 256"
        assert pool.pick() is pool.replicas[0]  # serving again
    finally:
        await ups.close()
        await runner.cleanup()
