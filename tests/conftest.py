"""Real processes on free loopback ports: stand-in vLLM servers, gateways, Redis."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
EMB = "Qwen3-Embedding-0.6B"
RER = "Qwen3-Reranker-0.6B"
# Every gateway the tests start (directly or through the scripts) stops at once on SIGTERM; the
# drain's own tests (tests/test_drain.py) pass --drain-delay.
os.environ.setdefault("ER_DRAIN_DELAY", "0")


def self_signed_cert(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by openssl, for TLS tests."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


# The fields of a text access-log line, in order (README, "Logs and monitoring").
ACCESS_FIELDS = (
    "time", "request_id", "key", "method", "path", "model", "status", "total_ms", "upstream_ms", "queue_ms",
    "replica", "retries", "items", "tokens", "client",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout} s")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "wb")
    full_env = {**os.environ, **(env or {})}
    p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=cwd or ROOT, start_new_session=True)
    return Proc(p, log)


@dataclass
class Backend(Proc):
    url: str = ""
    name: str = ""
    kind: str = ""

    def stats(self) -> dict[str, Any]:
        return httpx.get(self.url + "/_stats").json()

    def admin(self, **kw: Any) -> None:
        httpx.post(self.url + "/_admin", json=kw).raise_for_status()


def start_backend(
    tmp: Path,
    kind: str = "embedding",
    name: str | None = None,
    port: int | None = None,
    extra: list[str] | None = None,
    host: str = "127.0.0.1",
) -> Backend:
    port = port or free_port()
    name = name or (EMB if kind == "embedding" else RER)
    cmd = [
        PY,
        str(ROOT / "tests" / "fake_vllm.py"),
        "--host",
        host,
        "--port",
        str(port),
        "--kind",
        kind,
        "--name",
        name,
        *(extra or []),
    ]
    p = spawn(cmd, tmp / f"backend-{host}-{port}.log")
    b = Backend(p.proc, p.log, f"http://{host}:{port}", name, kind)
    wait_until(lambda: httpx.get(b.url + "/health").status_code == 200, 20, "stand-in vLLM", b.proc)
    return b


@dataclass
class GatewayProc(Proc):
    url: str = ""
    key: str = ""
    dir: Path = field(default_factory=Path)
    keys_file: Path = field(default_factory=Path)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("--keys-file", str(self.keys_file), *args)

    def post(self, path: str, json: Any = None, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}", **kw.pop("headers", {})}
        return httpx.post(self.url + path, json=json, headers=headers, timeout=60, **kw)

    def get(self, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key or self.key}", **kw.pop("headers", {})}
        return httpx.get(self.url + path, headers=headers, timeout=60, **kw)

    @property
    def logs(self) -> Path:
        return self.dir / "logs"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, str(ROOT / "embedding_reranker_proxy.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        timeout=60,
    )


def start_gateway(
    tmp: Path,
    *args: str,
    env: dict[str, str] | None = None,
    keys_file: Path | None = None,
    port: int | None = None,
    admin_key: bool = True,
    wait: bool = True,
    cache: bool = False,
    prefix: tuple[str, ...] = (),
) -> GatewayProc:
    """A gateway process. The result cache is off unless `cache` (or a --cache-size is given):
    a test of upstream behaviour must reach the upstream every time; tests/test_cache.py, the
    clients' tests and the real-vLLM tier run it as users do."""
    if not cache and "--cache-size" not in args:
        args = (*args, "--cache-size", "0")
    tmp.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    keys_file = keys_file or tmp / "er_api_keys.json"
    key = ""
    if admin_key and not keys_file.exists():
        r = run_cli(
            "--keys-file",
            str(keys_file),
            "keys",
            "create",
            "--name",
            "admin",
            "--admin",
            "--rate-limit",
            "1000000/minute",
        )
        assert r.returncode == 0, r.stderr
        key = r.stdout.strip()
    cmd = [
        *prefix,  # e.g. a command that runs the gateway in its own mount namespace
        PY,
        str(ROOT / "embedding_reranker_proxy.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--keys-file",
        str(keys_file),
        "--log-dir",
        str(tmp / "logs"),
        *args,
    ]
    p = spawn(cmd, tmp / f"gateway-{port}.out", env=env)
    g = GatewayProc(p.proc, p.log, f"http://127.0.0.1:{port}", key, tmp, keys_file)
    if wait:
        wait_until(lambda: httpx.get(g.url + "/health").status_code in (200, 503), 30, "gateway", g.proc)
    return g


def backend_args(emb: Backend | None, rer: Backend | None) -> list[str]:
    args = []
    if emb:
        args += ["--embedding-url", emb.url]
    if rer:
        args += ["--reranker-url", rer.url]
    return args


@dataclass
class Stack:
    emb: Backend
    rer: Backend
    gw: GatewayProc


def make_stack(tmp: Path, *, cache: bool = False) -> Stack:
    emb = start_backend(tmp, "embedding", extra=["--matryoshka"])
    rer = start_backend(tmp, "rerank")
    gw = start_gateway(tmp, *backend_args(emb, rer), "--health-interval", "0.5", cache=cache)
    wait_until(lambda: httpx.get(gw.url + "/health").status_code == 200, 10, "gateway healthy")
    return Stack(emb, rer, gw)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway in front of an embedding and a reranker stand-in, shared by a test module."""
    st = make_stack(tmp_path_factory.mktemp("stack"))
    yield st
    for p in (st.gw, st.emb, st.rer):
        p.stop()


@dataclass
class Redis(Proc):
    url: str = ""
    port: int = 0


def start_redis(tmp: Path, port: int | None = None) -> Redis:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; scripts/test.sh installs it")
    port = port or free_port()
    p = spawn(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp)],
        tmp / f"redis-{port}.log",
    )
    r = Redis(p.proc, p.log, f"redis://127.0.0.1:{port}/0", port)

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_until(up, 10, "redis", r.proc)
    return r
