"""Packaging and deployment: download_models.py, Docker files, systemd units, load tester, fresh clone."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import yaml
from conftest import PY, ROOT, Stack, free_port, run_cli, wait_until


def test_download_models_offline_is_a_clear_error(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_ENDPOINT": "http://127.0.0.1:9",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    env.pop("HF_HUB_OFFLINE", None)
    r = subprocess.run(
        [
            PY,
            str(ROOT / "download_models.py"),
            "--model-size",
            "0.6B",
            "--kind",
            "embedding",
            "--output-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "could not download Qwen/Qwen3-Embedding-0.6B" in r.stderr and "online" in r.stderr
    assert "Traceback" not in r.stderr


def test_download_models_verification(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    import download_models as dm

    good = tmp_path / "m"
    good.mkdir()
    (good / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (good / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")
    assert dm.verify(good, {"config.json": 2, "model.safetensors": None}) == []
    assert "config.json has 2 bytes, expected 3" in dm.verify(good, {"config.json": 3})[0]
    (good / "model.safetensors").write_bytes(b"garbage")
    assert any("not a readable safetensors" in p for p in dm.verify(good, {}))
    assert dm.repo_ids("4B", "all") == ["Qwen/Qwen3-Embedding-4B", "Qwen/Qwen3-Reranker-4B"]
    help_text = subprocess.run([PY, str(ROOT / "download_models.py"), "--help"], capture_output=True, text=True).stdout
    for flag in ("--model-size", "--kind", "--output-dir", "--source"):
        assert flag in help_text


def test_compose_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"embedding", "reranker", "gateway", "redis"}
    for name, gpu in (("embedding", "${EMBEDDING_GPU:-1}"), ("reranker", "${RERANKER_GPU:-0}")):
        svc = services[name]
        assert svc["image"].startswith("vllm/vllm-openai")
        dev = svc["deploy"]["resources"]["reservations"]["devices"][0]
        assert dev["device_ids"] == [gpu] and dev["capabilities"] == ["gpu"] and dev["driver"] == "nvidia"
        # reachable only on the compose network, i.e. only through the gateway; the key from the environment
        assert "ports" not in svc and svc["expose"] == ["8000"]
        assert svc["environment"]["VLLM_API_KEY"].startswith("${VLLM_API_KEY")
        cmd = " ".join(svc["command"])
        assert "--api-key" not in cmd
        assert "--runner=pooling" in cmd and "MODEL_SIZE" in cmd and "MAX_MODEL_LEN" in cmd
        assert "GPU_MEMORY_UTILIZATION" in cmd
    assert "--convert=embed" in " ".join(services["embedding"]["command"])
    assert "is_original_qwen3_reranker" in " ".join(services["reranker"]["command"])
    assert "MODEL_PATH" in " ".join(services["reranker"]["command"])
    gw = services["gateway"]
    assert gw["build"] == "." and any(p.endswith(":2048") for p in gw["ports"])
    env = gw["environment"]
    assert env["ER_EMBEDDING_URLS"] == "http://embedding:8000" and env["ER_RERANKER_URLS"] == "http://reranker:8000"
    assert env["ER_REDIS_URL"].startswith("redis://redis:") and "ER_WORKERS" in env
    assert env["ER_BACKEND_API_KEY"] == services["embedding"]["environment"]["VLLM_API_KEY"]  # one key, both sides
    assert gw["depends_on"]["embedding"]["condition"] == "service_healthy"
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        r = subprocess.run(["docker", "compose", "config", "-q"], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_dockerfile_and_deploy_script() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text and "\nUSER " not in text and "HEALTHCHECK" in text
    assert 'ENTRYPOINT ["docker-entrypoint.sh", "python", "embedding_reranker_proxy.py"]' in text
    assert "/health" in text and "EXPOSE 2048" in text
    r = subprocess.run([str(ROOT / "docker-deploy.sh"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("deploy", "build", "start", "stop", "status", "logs"):
        assert cmd in r.stdout
    assert subprocess.run([str(ROOT / "docker-deploy.sh"), "bogus"], capture_output=True).returncode == 2
    assert "VLLM_API_KEY" in r.stdout


def test_deploy_script_generates_the_backend_key_once(tmp_path: Path) -> None:
    """`start` writes VLLM_API_KEY into .env (0600, kept across runs, never printed); docker is a stub."""
    shutil.copy(ROOT / "docker-deploy.sh", tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "docker").write_text('#!/bin/sh\necho "docker $*" >> "$(dirname "$0")/../docker.log"\n')
    (tmp_path / "bin" / "docker").chmod(0o755)
    (tmp_path / ".env").write_text("MODEL_SIZE=4B\nVLLM_API_KEY=\n")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"

    def start() -> str:
        r = subprocess.run(["./docker-deploy.sh", "start"], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout + r.stderr

    out = start()
    text = (tmp_path / ".env").read_text()
    (key,) = re.findall(r"^VLLM_API_KEY=([0-9a-f]{64})$", text, re.M)
    assert "MODEL_SIZE=4B" in text and key not in out
    assert (tmp_path / ".env").stat().st_mode & 0o777 == 0o600
    assert "compose up -d" in (tmp_path / "docker.log").read_text()
    start()
    assert (tmp_path / ".env").read_text() == text  # reused, not regenerated


def test_systemd_units() -> None:
    units = {p.name: p.read_text() for p in (ROOT / "deploy" / "systemd").glob("*.service")}
    assert set(units) == {"er-gateway.service", "vllm-embedding.service", "vllm-reranker.service"}
    assert "embedding_reranker_proxy.py" in units["er-gateway.service"] and "kill -HUP" in units["er-gateway.service"]
    assert (
        "CUDA_VISIBLE_DEVICES=1" in units["vllm-embedding.service"] and "--port 8000" in units["vllm-embedding.service"]
    )
    assert (
        "CUDA_VISIBLE_DEVICES=0" in units["vllm-reranker.service"]
        and "--hf-overrides" in units["vllm-reranker.service"]
    )
    for text in units.values():
        assert "[Service]" in text and "ExecStart=" in text and "[Install]" in text
        # the backend key comes from a root-only EnvironmentFile: not in ExecStart (ps) nor Environment=
        assert re.search(r"^EnvironmentFile=/\S+$", text, re.M)
        assert "--api-key" not in text and not re.search(r"^Environment=.*(API_KEY)", text, re.M)
    for name in ("vllm-embedding.service", "vllm-reranker.service"):
        (exec_start,) = re.findall(r"^ExecStart=(.*)$", units[name], re.M)
        assert "--host 127.0.0.1" in exec_start and "0.0.0.0" not in exec_start


def test_performance_test_tool(stack: Stack) -> None:
    for endpoint, batch in (("embeddings", 4), ("rerank", 3), ("batch_rerank", 2)):
        r = subprocess.run(
            [
                PY,
                str(ROOT / "performance_test.py"),
                "--url",
                stack.gw.url,
                "--key",
                stack.gw.key,
                "--endpoint",
                endpoint,
                "--requests",
                "60",
                "--concurrency",
                "8",
                "--batch-size",
                str(batch),
                "--instruction",
                "Find it",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout)
        assert summary["requests"] == 60 and summary["ok"] == 60 and summary["by_status"] == {"200": 60}
        assert summary["latency_ms"]["p50"] > 0 and summary["throughput_rps"] > 0
        assert "%" in r.stderr  # the progress bar
    bad = subprocess.run(
        [
            PY,
            str(ROOT / "performance_test.py"),
            "--url",
            stack.gw.url,
            "--key",
            "er-wrong",
            "--requests",
            "5",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "401:" in bad.stderr and "ER_KEY" in bad.stderr  # stops at once, says why


def test_fresh_clone_runs_from_the_readme_command(tmp_path: Path) -> None:
    """Clone the committed repo and run the README's run command until /health answers."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{ROOT}", str(clone)], check=True)
    assert "bash scripts/run.sh" in (clone / "README.md").read_text()
    port, emb, rer = free_port(), free_port(), free_port()
    log = open(tmp_path / "run.log", "wb")
    # vLLM is the stand-in `vllm` executable (no weights here); everything else is the clone's own.
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")},
        "VLLM_BIN": str(ROOT / "tests" / "fake_vllm_bin.sh"),
        "FAKE_VLLM_PYTHON": PY,
        "DEVICE": "cpu",
    }
    p = subprocess.Popen(
        [
            "bash",
            "scripts/run.sh",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--embedding-url",
            f"http://127.0.0.1:{emb}",
            "--reranker-url",
            f"http://127.0.0.1:{rer}",
        ],
        cwd=clone,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    try:
        wait_until(
            lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code in (200, 503),
            600,
            "fresh clone's gateway",
            p,
        )
        body = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert body["status"] == "healthy", body  # the one command started both models, then served
        out = (tmp_path / "run.log").read_text()
        assert "First start" in out and (clone / "er_api_keys.json").exists()
        assert (clone / "logs" / "embedding.pid").exists() and (clone / "logs" / "reranker.pid").exists()
    finally:
        os.killpg(p.pid, 15)  # what Ctrl-C in its terminal does to its process group
        p.wait(30)
    assert not (clone / "logs" / "embedding.pid").exists()  # and it stopped what it started


def test_cli_version_of_help_matches_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    r = run_cli("--help")
    for flag in (
        "--embedding-url",
        "--reranker-url",
        "--rate-limit",
        "--redis-url",
        "--max-concurrency",
        "--workers",
        "--log-format",
        "--max-body-bytes",
        "--backend-api-key",
    ):
        assert flag in r.stdout and flag in readme
    assert sys.version_info >= (3, 11)


def test_requirements_txt_pins_every_dependency_within_pyproject() -> None:
    """requirements.txt (the README's `pip install -r requirements.txt`) cannot rot: CI installs from
    it (scripts/setup_gateway.sh) and every pyproject dependency is pinned inside its range."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[canonicalize_name(name)] = version.strip()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not pinned in requirements.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} is outside {req.specifier}"
    assert "-r requirements.txt" in (ROOT / "scripts" / "setup_gateway.sh").read_text()
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"] == "Apache-2.0"


def test_container_entrypoint_gives_a_root_owned_data_dir_to_the_gateway_user(tmp_path: Path) -> None:
    """What `docker compose up -d` does without docker-deploy.sh: Docker creates ./data root-owned;
    the entrypoint (run as root, as the image does) hands it to the unprivileged user and runs the
    command as that user, which can then create the keys file and its lock."""
    assert os.geteuid() == 0, "the test suite runs as root (scripts/test.sh, CI)"
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # pytest's own tmp dirs are 0700: `nobody` could not enter
    try:
        top.chmod(0o755)
        data = top / "data"
        data.mkdir()
        (data / "logs").mkdir()
        (data / "logs" / "old.log").write_text("x")  # root-owned leftovers are handed over too
        env = {
            **os.environ,
            "ER_DATA_DIR": str(data),
            "ER_RUN_AS": "nobody",
            "ER_KEYS_FILE": str(data / "er_api_keys.json"),
        }
        # What the gateway does first: create its keys file and the lock beside it (the command
        # stands in for the gateway so the test does not depend on `nobody` reading this checkout).
        write = 'touch "$ER_KEYS_FILE" "$ER_KEYS_FILE.lock" && id -u'
        r = subprocess.run(
            [str(ROOT / "deploy" / "docker-entrypoint.sh"), "sh", "-c", write],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        nobody = pwd.getpwnam("nobody").pw_uid
        assert r.returncode == 0 and r.stdout.strip() == str(nobody), r.stderr
        for p in (data, data / "logs", data / "logs" / "old.log", data / "er_api_keys.json"):
            assert p.stat().st_uid == nobody, p
        # Not root: the command runs as it is, as whoever started the container.
        r = subprocess.run(
            [
                "setpriv",
                f"--reuid={nobody}",
                f"--regid={nobody}",
                "--clear-groups",
                str(ROOT / "deploy" / "docker-entrypoint.sh"),
                "id",
                "-u",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0 and r.stdout.strip() == str(nobody), r.stderr
    finally:
        shutil.rmtree(top)


def test_deploy_script_on_a_one_gpu_host(tmp_path: Path) -> None:
    """With one GPU (nvidia-smi -L), `start` runs compose with both models on GPU 0 and the memory
    split, unless the user set those in the environment or .env."""
    shutil.copy(ROOT / "docker-deploy.sh", tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "docker").write_text(
        '#!/bin/sh\necho "docker $* EMBEDDING_GPU=$EMBEDDING_GPU RERANKER_GPU=$RERANKER_GPU '
        'MEM=$EMBEDDING_GPU_MEMORY_UTILIZATION/$RERANKER_GPU_MEMORY_UTILIZATION" >> "$(dirname "$0")/../docker.log"\n'
    )
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A10 (UUID: GPU-0)'\n")
    for f in ("docker", "nvidia-smi"):
        (tmp_path / "bin" / f).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if "GPU" not in k}
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    env["VLLM_API_KEY"] = "k"
    r = subprocess.run(["./docker-deploy.sh", "start"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "one GPU: both models on GPU 0" in r.stdout
    assert "EMBEDDING_GPU=0 RERANKER_GPU=0 MEM=0.40/0.50" in (tmp_path / "docker.log").read_text()
    (tmp_path / ".env").write_text("RERANKER_GPU_MEMORY_UTILIZATION=0.45\n")
    (tmp_path / "docker.log").unlink()
    r = subprocess.run(["./docker-deploy.sh", "start"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "memory split" not in r.stdout
    assert "EMBEDDING_GPU=0 RERANKER_GPU=0 MEM=/" in (tmp_path / "docker.log").read_text()  # .env decides


def test_deploy_script_one_gpu_with_the_gpu_ids_only_in_dot_env(tmp_path: Path) -> None:
    shutil.copy(ROOT / "docker-deploy.sh", tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "docker").write_text('#!/bin/sh\necho "docker $*" >> "$(dirname "$0")/../docker.log"\n')
    (tmp_path / "bin" / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A10 (UUID: GPU-0)'\n")
    for f in ("docker", "nvidia-smi"):
        (tmp_path / "bin" / f).chmod(0o755)
    (tmp_path / ".env").write_text("EMBEDDING_GPU=0\nRERANKER_GPU=0\n")
    env = {k: v for k, v in os.environ.items() if "GPU" not in k}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", VLLM_API_KEY="k")
    r = subprocess.run(["./docker-deploy.sh", "start"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr  # read from .env, not an unbound variable
    assert "one GPU: both models on GPU 0, memory split" in r.stdout
