"""start/stop/check scripts against a stand-in `vllm` (VLLM_BIN): flags, failures, pid files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import ROOT, free_port, start_gateway, wait_until

FAKE = ROOT / "tests" / "fake_vllm_bin.sh"


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "VLLM_HOST")}
    env = {
        **inherited,
        "VLLM_BIN": str(FAKE),
        "FAKE_VLLM_PYTHON": sys.executable,
        "FAKE_VLLM_RECORD": str(tmp / "record.txt"),
        "LOG_DIR": str(tmp / "logs"),
        "EMBEDDING_PORT": str(free_port()),
        "RERANKER_PORT": str(free_port()),
        "HEALTH_TIMEOUT": "20",
        "STOP_TIMEOUT": "3",
        "DEVICE": "cpu",
    }
    env.update(extra)
    return env


def run(name: str, env: dict[str, str], *args: str, timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ROOT / name), *args], capture_output=True, text=True, env=env, timeout=timeout, **kw)


@pytest.fixture
def started(tmp_path: Path):  # type: ignore[no-untyped-def]
    env = env_for(tmp_path)
    yield env
    run("stop_vllm_models.sh", env)


def gone(pid: int) -> bool:
    """Not running: no such process, or a zombie waiting for a reaper (some sandboxes have none)."""
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return state == "" or state.startswith("Z")


def record(env: dict[str, str]) -> list[str]:
    return Path(env["FAKE_VLLM_RECORD"]).read_text().splitlines()


def listening(port: int) -> set[str]:
    """The local addresses with a socket listening on `port` (`ss -ltn`)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3].rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def group_cmdlines(pgid: int) -> list[bytes]:
    """Command lines of every process in a process group: what `ps` shows any local user."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if int(fields[2]) == pgid:
                out.append((proc / "cmdline").read_bytes())
        except (OSError, IndexError):
            continue
    return out


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("name", ["start_vllm_models.sh", "stop_vllm_models.sh", "check_models_status.sh"])
def test_help(name: str, tmp_path: Path) -> None:
    r = run(name, env_for(tmp_path), "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout and "Exit codes" in r.stdout


def test_help_lists_every_variable(tmp_path: Path) -> None:
    out = run("start_vllm_models.sh", env_for(tmp_path), "--help").stdout
    for var in (
        "MODEL_SIZE",
        "EMBEDDING_MODEL_PATH",
        "RERANKER_MODEL_PATH",
        "MODEL_PATH",
        "EMBEDDING_SERVED_NAME",
        "RERANKER_SERVED_NAME",
        "EMBEDDING_GPU",
        "RERANKER_GPU",
        "EMBEDDING_PORT",
        "RERANKER_PORT",
        "GPU_MEMORY_UTILIZATION",
        "MAX_MODEL_LEN",
        "DEVICE",
        "VLLM_BIN",
        "VLLM_EXTRA_ARGS",
        "EMBEDDING_EXTRA_ARGS",
        "RERANKER_EXTRA_ARGS",
        "LOG_DIR",
        "HEALTH_TIMEOUT",
        "RERANKER_PROMPT",
        "VLLM_CPU_KVCACHE_SPACE",
        "VLLM_HOST",
        "VLLM_API_KEY",
    ):
        assert var in out, var


def test_start_writes_pids_logs_and_new_vllm_flags(started: dict[str, str]) -> None:
    r = run("start_vllm_models.sh", started)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = Path(started["LOG_DIR"])
    for f in ("embedding.pid", "reranker.pid", "embedding_model.log", "reranker_model.log"):
        assert (logs / f).exists(), f
    emb, rer = sorted(record(started), key=lambda l: "--convert" not in l)
    assert "Qwen/Qwen3-Embedding-0.6B" in emb and "--runner pooling --convert embed" in emb
    assert "--served-model-name Qwen3-Embedding-0.6B" in emb and "--max-model-len 8192" in emb
    assert "Qwen/Qwen3-Reranker-0.6B" in rer and "--runner pooling" in rer and "--convert" not in rer
    assert '"is_original_qwen3_reranker":true' in rer and "--chat-template" not in rer
    assert "VLLM_CPU_KVCACHE_SPACE=1" in emb and "--dtype bfloat16" in emb
    # each server leads its own process group (setsid)
    for f in ("embedding.pid", "reranker.pid"):
        pid = int((logs / f).read_text())
        assert os.getpgid(pid) == pid
    again = run("start_vllm_models.sh", started)
    assert again.returncode == 0 and again.stdout.count("already running") == 2
    status = run("check_models_status.sh", started, "--json", "--no-gateway")
    assert status.returncode == 0 and json.loads(status.stdout)["all_up"] is True


def test_loopback_key_file_and_a_gateway_next_to_vllm(started: dict[str, str], tmp_path: Path) -> None:
    r = run("start_vllm_models.sh", started, umask=0)  # the key file is 0600 even under umask 000
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr
    logs = Path(started["LOG_DIR"])
    key_file = logs / "vllm_api_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    emb = f"http://127.0.0.1:{started['EMBEDDING_PORT']}"
    rer = f"http://127.0.0.1:{started['RERANKER_PORT']}"
    # loopback only, by default
    for line in record(started):
        assert "--host 127.0.0.1" in line and "VLLM_API_KEY=<set>" in line
    for port in (started["EMBEDDING_PORT"], started["RERANKER_PORT"]):
        assert listening(int(port)) == {"127.0.0.1"}
    # the key is in vLLM's environment and nowhere a local user or a log reader could see it
    for f in ("embedding.pid", "reranker.pid"):
        pid = int((logs / f).read_text())
        assert f"VLLM_API_KEY={key}".encode() in Path(f"/proc/{pid}/environ").read_bytes()
        cmdlines = group_cmdlines(pid)
        assert cmdlines and not any(key.encode() in c for c in cmdlines)
    model_log = (logs / "embedding_model.log").read_text()
    assert "VLLM_API_KEY=<redacted>" in model_log
    seen = r.stdout + r.stderr + model_log + (logs / "reranker_model.log").read_text()
    assert key not in seen and key not in "\n".join(record(started))
    # like vLLM: /v1 needs the key; /score, /rerank, /tokenize and /health do not
    denied = httpx.post(emb + "/v1/embeddings", json={"input": "x"})
    assert denied.status_code == 401 and denied.json() == {"error": "Unauthorized"}
    assert httpx.get(emb + "/v1/models", headers=bearer("wrong")).status_code == 401
    assert httpx.post(emb + "/v1/embeddings", json={"input": "x"}, headers=bearer(key)).status_code == 200
    for path, body in (
        ("/score", {"text_1": "a", "text_2": ["b"]}),
        ("/rerank", {"query": "a", "documents": ["b"]}),
        ("/tokenize", {"prompt": "a b"}),
    ):
        assert httpx.post(rer + path, json=body).status_code == 200, path
    assert httpx.get(rer + "/health").status_code == 200
    # the status script still reads the served names (it asks /v1/models with the key)
    status = run("check_models_status.sh", started, "--json", "--no-gateway")
    assert (
        status.returncode == 0
        and json.loads(status.stdout)["models"]["embedding"]["served_names"] == "Qwen3-Embedding-0.6B"
    )
    # a gateway with the same log directory picks the key up from the file
    gw = start_gateway(tmp_path, "--embedding-url", emb, "--reranker-url", rer)
    try:
        ok = gw.post("/v1/embeddings", {"input": "x"})
        assert ok.status_code == 200, ok.text
        assert gw.post("/v1/rerank", {"query": "a", "documents": ["b", "c"]}).status_code == 200
        assert key not in gw.output()
    finally:
        gw.stop()
    # a restart reuses the key, so running gateways keep working
    assert run("start_vllm_models.sh", started, "--restart").returncode == 0
    assert key_file.read_text().strip() == key and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert httpx.post(emb + "/v1/embeddings", json={"input": "x"}, headers=bearer(key)).status_code == 200


def test_public_vllm_host_warns_and_key_from_environment(tmp_path: Path) -> None:
    env = env_for(tmp_path, VLLM_HOST="0.0.0.0", VLLM_API_KEY="env-key-0123456789")
    try:
        r = run("start_vllm_models.sh", env, "--only", "embedding")
        assert r.returncode == 0, r.stdout + r.stderr
        warning = " ".join(r.stderr.split())
        assert "warning: VLLM_HOST=0.0.0.0" in warning and env["EMBEDDING_PORT"] in warning
        assert "only protects /v1" in warning and "/score" in warning and "/tokenize" in warning
        assert "Firewall" in warning
        (line,) = record(env)
        assert "--host 0.0.0.0" in line
        assert listening(int(env["EMBEDDING_PORT"])) == {"0.0.0.0"}
        assert not (Path(env["LOG_DIR"]) / "vllm_api_key").exists()  # the environment's key is not written down
        url = f"http://127.0.0.1:{env['EMBEDDING_PORT']}/v1/embeddings"
        assert httpx.post(url, json={"input": "x"}).status_code == 401
        assert httpx.post(url, json={"input": "x"}, headers=bearer("env-key-0123456789")).status_code == 200
        seen = r.stdout + r.stderr + (Path(env["LOG_DIR"]) / "embedding_model.log").read_text()
        assert "env-key-0123456789" not in seen
        assert "env-key-0123456789" not in run("start_vllm_models.sh", env, "--help").stdout
    finally:
        run("stop_vllm_models.sh", env)


def test_old_vllm_gets_task_flags_and_gpu_settings(tmp_path: Path) -> None:
    env = env_for(
        tmp_path,
        FAKE_VLLM_VERSION="0.9.2",
        DEVICE="cuda",
        MODEL_SIZE="4B",
        MODEL_PATH="/models/rr",
        GPU_MEMORY_UTILIZATION="0.5",
        EMBEDDING_EXTRA_ARGS="--max-num-seqs 8",
    )
    try:
        assert run("start_vllm_models.sh", env).returncode == 0
        emb, rer = sorted(record(env), key=lambda l: "--task embed" not in l)
        assert "--task embed" in emb and "Qwen/Qwen3-Embedding-4B" in emb and "Qwen3-Embedding-4B" in emb
        assert "--task score" in rer and "/models/rr" in rer and "--runner" not in rer
        assert "--gpu-memory-utilization 0.5" in emb and "CUDA_VISIBLE_DEVICES=1" in emb
        assert "CUDA_VISIBLE_DEVICES=0" in rer and "--max-num-seqs 8" in emb and "--max-num-seqs" not in rer
        assert "--hf-overrides" in rer
    finally:
        run("stop_vllm_models.sh", env)


def test_reranker_overrides_can_be_dropped(tmp_path: Path) -> None:
    env = env_for(tmp_path, RERANKER_HF_OVERRIDES="")
    try:
        assert run("start_vllm_models.sh", env, "--only", "reranker").returncode == 0
        (rer,) = record(env)
        assert "--hf-overrides" not in rer and "--runner pooling" in rer
    finally:
        run("stop_vllm_models.sh", env)


def test_gpu_defaults(tmp_path: Path) -> None:
    env = env_for(tmp_path, DEVICE="cuda")
    try:
        assert run("start_vllm_models.sh", env).returncode == 0
        emb, rer = sorted(record(env), key=lambda l: "--convert" not in l)
        assert "--gpu-memory-utilization 0.90" in emb and "--gpu-memory-utilization 0.97" in rer
    finally:
        run("stop_vllm_models.sh", env)


def test_server_prompt_mode_adds_template_and_needs_new_vllm(tmp_path: Path) -> None:
    env = env_for(tmp_path, RERANKER_PROMPT="server")
    try:
        assert run("start_vllm_models.sh", env, "--only", "reranker").returncode == 0
        (rer,) = record(env)
        assert "--chat-template" in rer and "qwen3_reranker.jinja" in rer
    finally:
        run("stop_vllm_models.sh", env)
    old = env_for(tmp_path, RERANKER_PROMPT="server", FAKE_VLLM_VERSION="0.12.0")
    r = run("start_vllm_models.sh", old)
    assert r.returncode == 2 and "0.14" in r.stderr


def test_crash_at_start_shows_log_tail(tmp_path: Path) -> None:
    env = env_for(tmp_path, FAKE_VLLM_MODE="crash")
    r = run("start_vllm_models.sh", env, "--only", "embedding")
    assert r.returncode == 1
    assert "exited before becoming healthy" in r.stderr and "CUDA out of memory (fake)" in r.stderr
    assert "log line 12" in r.stderr and "log line 11" not in r.stderr  # exactly the last 30 lines
    assert not (Path(env["LOG_DIR"]) / "embedding.pid").exists()


def test_never_healthy_times_out_and_cleans_up(tmp_path: Path) -> None:
    env = env_for(tmp_path, FAKE_VLLM_MODE="never", HEALTH_TIMEOUT="3")
    r = run("start_vllm_models.sh", env, "--only", "reranker")
    assert r.returncode == 1 and "not healthy after 3 s" in r.stderr
    assert not (Path(env["LOG_DIR"]) / "reranker.pid").exists()


def test_port_taken_starts_nothing(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(env["RERANKER_PORT"])))
        s.listen()
        r = run("start_vllm_models.sh", env)
    assert r.returncode == 3 and "already in use" in r.stderr
    assert not Path(env["FAKE_VLLM_RECORD"]).exists()  # nothing was started, not even the embedding model


def test_stale_pid_file_is_cleaned(started: dict[str, str]) -> None:
    logs = Path(started["LOG_DIR"])
    logs.mkdir(parents=True)
    (logs / "embedding.pid").write_text("999999\n")
    stop = run("stop_vllm_models.sh", started, "--only", "embedding")
    assert stop.returncode == 0 and "stale" in stop.stdout and not (logs / "embedding.pid").exists()
    (logs / "embedding.pid").write_text("999999\n")
    r = run("start_vllm_models.sh", started, "--only", "embedding")
    assert r.returncode == 0 and "stale pid file" in r.stdout
    assert int((logs / "embedding.pid").read_text()) != 999999


def test_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    env = env_for(tmp_path, FAKE_VLLM_MODE="stubborn", HEALTH_TIMEOUT="1", STOP_TIMEOUT="1")
    # start it by hand the way the script does, then let stop deal with it
    logs = Path(env["LOG_DIR"])
    logs.mkdir(parents=True)
    # started from a shell that exits, as start_vllm_models.sh does, so init reaps it
    out = subprocess.run(
        ["bash", "-c", f"setsid {FAKE} serve m --port 1 >/dev/null 2>&1 </dev/null & echo $!"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    pid = int(out.strip())
    (logs / "embedding.pid").write_text(str(pid))
    time.sleep(0.3)
    r = run("stop_vllm_models.sh", env, "--only", "embedding")
    assert r.returncode == 0 and "SIGKILL" in r.stdout, r.stdout
    assert gone(pid)


def test_restart_and_not_running(started: dict[str, str]) -> None:
    assert run("start_vllm_models.sh", started, "--only", "embedding").returncode == 0
    first = int((Path(started["LOG_DIR"]) / "embedding.pid").read_text())
    assert run("start_vllm_models.sh", started, "--only", "embedding", "--restart").returncode == 0
    second = int((Path(started["LOG_DIR"]) / "embedding.pid").read_text())
    assert first != second
    assert gone(first)
    assert run("stop_vllm_models.sh", started).returncode == 0
    r = run("stop_vllm_models.sh", started)
    assert r.returncode == 0 and r.stdout.count("not running") == 2
    status = run("check_models_status.sh", started, "--no-gateway")
    assert status.returncode == 1 and "DOWN" in status.stdout


def test_bad_usage(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    assert run("start_vllm_models.sh", env, "--only", "nope").returncode == 2
    assert run("stop_vllm_models.sh", env, "--bogus").returncode == 2
    assert run("start_vllm_models.sh", {**env, "MODEL_SIZE": "3B"}).returncode == 2
    assert run("start_vllm_models.sh", {**env, "VLLM_BIN": "/nonexistent/vllm"}).returncode == 2


@pytest.mark.parametrize(
    "given, sent",
    [
        (None, '{"is_matryoshka":true}'),
        ('{"max_position_embeddings": 1024}', '{"max_position_embeddings":1024,"is_matryoshka":true}'),
        ('{"matryoshka_dimensions": [64, 128]}', '{"matryoshka_dimensions":[64,128]}'),  # the user's choice wins
        ("none", None),
    ],
)
def test_embedding_gets_the_matryoshka_override_merged(tmp_path: Path, given: str | None, sent: str | None) -> None:
    env = env_for(tmp_path, **({"EMBEDDING_HF_OVERRIDES": given} if given is not None else {}))
    try:
        assert run("start_vllm_models.sh", env, "--only", "embedding").returncode == 0
        (emb,) = record(env)
        if sent is None:
            assert "--hf-overrides" not in emb
        else:
            assert f"--hf-overrides {sent}" in emb, emb
    finally:
        run("stop_vllm_models.sh", env)


def test_compose_and_systemd_start_the_embedding_with_matryoshka() -> None:
    assert '--hf-overrides={"is_matryoshka":true}' in (ROOT / "docker-compose.yml").read_text()
    unit = (ROOT / "deploy" / "systemd" / "vllm-embedding.service").read_text()
    assert "--hf-overrides '{\"is_matryoshka\":true}'" in unit


def fake_nvidia_smi(tmp: Path, gpus: int) -> str:
    """A PATH with an `nvidia-smi` that lists `gpus` GPUs (-L), before the real PATH."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    lines = "".join(f"echo 'GPU {i}: NVIDIA A10 (UUID: GPU-{i})'\n" for i in range(gpus))
    smi.write_text(f"#!/bin/sh\n{lines}")
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def test_one_gpu_host_puts_both_models_on_it_and_splits_memory(tmp_path: Path) -> None:
    env = env_for(tmp_path, DEVICE="auto", PATH=fake_nvidia_smi(tmp_path, 1))
    try:
        r = run("start_vllm_models.sh", env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert (
            "device cuda" in r.stdout
            and "both models on GPU 0: memory split embedding 0.40 + reranker 0.50" in r.stdout
        )
        emb, rer = sorted(record(env), key=lambda l: "--convert" not in l)
        assert "CUDA_VISIBLE_DEVICES=0" in emb and "--gpu-memory-utilization 0.40" in emb
        assert "CUDA_VISIBLE_DEVICES=0" in rer and "--gpu-memory-utilization 0.50" in rer
    finally:
        run("stop_vllm_models.sh", env)


def test_same_gpu_given_explicitly_and_single_model_hosts(tmp_path: Path) -> None:
    two = fake_nvidia_smi(tmp_path, 2)
    env = env_for(tmp_path, DEVICE="cuda", PATH=two, EMBEDDING_GPU="1", RERANKER_GPU="1")
    try:
        assert run("start_vllm_models.sh", env).returncode == 0
        assert all("CUDA_VISIBLE_DEVICES=1" in l for l in record(env))
        assert sorted("--gpu-memory-utilization 0.40" in l for l in record(env)) == [False, True]
    finally:
        run("stop_vllm_models.sh", env)
    # Only the reranker on this host: it keeps the whole default share.
    env = env_for(tmp_path / "b", DEVICE="cuda", PATH=two, EMBEDDING_GPU="1", RERANKER_GPU="1")
    try:
        r = run("start_vllm_models.sh", env, "--only", "reranker")
        assert r.returncode == 0 and "split" not in r.stdout
        (rer,) = record(env)
        assert "--gpu-memory-utilization 0.97" in rer
    finally:
        run("stop_vllm_models.sh", env)
    # Settings that cannot both fit are warned about, not changed.
    env = env_for(
        tmp_path / "c", DEVICE="cuda", PATH=two, EMBEDDING_GPU="0", RERANKER_GPU="0", GPU_MEMORY_UTILIZATION="0.6"
    )
    try:
        r = run("start_vllm_models.sh", env)
        assert r.returncode == 0 and "warning: both models on GPU 0 ask for 0.6 + 0.6" in r.stderr
        assert all("--gpu-memory-utilization 0.6" in l for l in record(env))
    finally:
        run("stop_vllm_models.sh", env)


def test_run_sh_starts_the_local_models_serves_manages_and_stops_them(tmp_path: Path) -> None:
    """The README's first command, end to end with the stand-in `vllm`: nothing running before,
    everything up after, /reload_model managed, and SIGTERM leaves nothing behind."""
    env = env_for(tmp_path)
    logs, port = tmp_path / "logs", free_port()
    keys = tmp_path / "keys.json"
    made = subprocess.run(
        [
            sys.executable,
            str(ROOT / "embedding_reranker_proxy.py"),
            "--keys-file",
            str(keys),
            "keys",
            "create",
            "--name",
            "ops",
            "--admin",
        ],
        capture_output=True,
        text=True,
    )
    key = made.stdout.strip()
    out = tmp_path / "run.out"
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [
                "bash",
                str(ROOT / "scripts" / "run.sh"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--embedding-url",
                f"http://127.0.0.1:{env['EMBEDDING_PORT']}",
                "--reranker-url",
                f"http://127.0.0.1:{env['RERANKER_PORT']}",
                "--log-dir",
                str(logs),
                "--keys-file",
                str(keys),
                "--health-interval",
                "0.3",
            ],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {key}"}
    try:

        def ready() -> bool:
            h = httpx.get(url + "/health", timeout=2)
            return h.status_code == 200 and h.json()["status"] == "healthy"

        wait_until(ready, 90, "gateway with both models", proc)  # type: ignore[arg-type]
        text = out.read_text()
        assert "starting the embedding reranker model(s)" in text and "reranker model healthy on port" in text
        assert (logs / "embedding.pid").exists() and (logs / "reranker.pid").exists()
        pids = [int((logs / f).read_text()) for f in ("embedding.pid", "reranker.pid")]
        r = httpx.post(url + "/v1/embeddings", json={"input": "x"}, headers=auth)
        assert r.status_code == 200, r.text  # the backend key reached both sides
        r = httpx.post(url + "/reload_model", json={"model_size": "4B"}, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["served_as"] == "Qwen3-Reranker-4B", r.text  # --manage-models is on
        pids[1] = int((logs / "reranker.pid").read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
        assert all(gone(p) for p in pids), "a vLLM server started by run.sh survived its SIGTERM"
        assert not (logs / "embedding.pid").exists() and not (logs / "reranker.pid").exists()
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        run("stop_vllm_models.sh", {**env, "LOG_DIR": str(logs)})


def test_run_sh_no_models_starts_only_the_gateway(tmp_path: Path) -> None:
    env = env_for(tmp_path)
    port = free_port()
    proc = subprocess.Popen(
        [
            "bash",
            str(ROOT / "scripts" / "run.sh"),
            "--no-models",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--embedding-url",
            f"http://127.0.0.1:{env['EMBEDDING_PORT']}",
            "--reranker-url",
            "none",
            "--log-dir",
            str(tmp_path / "logs"),
            "--keys-file",
            str(tmp_path / "keys.json"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 503, 60, "gateway", proc)  # type: ignore[arg-type]
        assert not Path(env["FAKE_VLLM_RECORD"]).exists()  # no vLLM was started
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
