"""Managed vLLM servers (`--manage-models`): `POST /reload_model` restarts them with new settings.

The gateway does not launch vLLM itself. `start_vllm_models.sh` already knows every vLLM
version's flags, CPU mode, the backend key and the health wait, so a reload runs that script
with the new settings in its environment, one replica at a time:

- two or more replicas: a rolling restart. The replica being restarted takes no new requests and
  its in-flight ones finish first; the others serve meanwhile, so no request fails.
- one replica: while it restarts, requests get 503 with Retry-After.

The answer comes when every replica is healthy again. If a replica does not come up, it is
started again with the settings it had, and the answer is a 502 with the end of its log.

Where a replica's pid file and log live (so the gateway restarts the server the scripts
started): the first replica of a kind in `--log-dir`, which is where `./start_vllm_models.sh`
puts them; replica i > 0 in `--log-dir/<kind>-<port>/` (`scripts/run.sh` starts them there).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import GatewayError
from .observability import log_field
from .protocol import ReloadModelRequest
from .settings import Kind, Settings, is_loopback_url
from .upstream import Pool, Replica, Upstreams

log = logging.getLogger("er_gateway")

ROOT = Path(__file__).resolve().parents[1]
START_SCRIPT = ROOT / "start_vllm_models.sh"
DRAIN_TIMEOUT = 60.0  # seconds a replica's in-flight requests get before it is restarted anyway
LOG_TAIL_LINES = 30

# The body's fields, as the scripts' environment variables (True: per kind, EMBEDDING_/RERANKER_).
_VARIABLES = {"model_path": True, "model_size": False, "gpu_memory_utilization": True, "max_model_len": False}


def script_kind(kind: Kind) -> str:
    return "embedding" if kind == "embedding" else "reranker"


def kind_variable(kind: Kind, name: str) -> str:
    """The start script's per-kind variable, e.g. RERANKER_PORT."""
    return f"{script_kind(kind).upper()}_{name}"


def variables(req: ReloadModelRequest) -> dict[str, str]:
    """The scripts' environment for the settings a reload asks for."""
    return {
        (kind_variable(req.kind, f.upper()) if _VARIABLES[f] else f.upper()): str(v) for f, v in req.settings().items()
    }


def command(kind: Kind, env: dict[str, str]) -> str:
    """The shell command that does what a reload with `env` does, for people to run by hand."""
    assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    return f"{assigns} ./start_vllm_models.sh --restart --only {script_kind(kind)}".strip()


def replica_log_dir(settings: Settings, kind: Kind, index: int, url: str) -> Path:
    base = Path(settings.log_dir).absolute()  # the script runs from the repository root
    return base if index == 0 else base / f"{script_kind(kind)}-{urlsplit(url).port}"


class ModelManager:
    """Restarts the vLLM servers behind one kind's default model through the start script."""

    def __init__(self, current: Callable[[], tuple[Settings, Upstreams]]) -> None:
        # The configuration being served now (a reload swaps it; see gateway.py).
        self._now = current
        self._lock = asyncio.Lock()
        # The settings each kind's servers were last (re)started with by this gateway, as script
        # variables; empty: what the gateway's own environment says (how run.sh started them).
        self._current: dict[Kind, dict[str, str]] = {"embedding": {}, "rerank": {}}

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @property
    def settings(self) -> Settings:
        return self._now()[0]

    @property
    def upstreams(self) -> Upstreams:
        return self._now()[1]

    def refuse_unmanaged(self, req: ReloadModelRequest) -> GatewayError:
        return GatewayError(
            409,
            "this gateway does not manage its vLLM servers, so it cannot restart them with new settings; "
            f"on the vLLM host run `{command(req.kind, variables(req))}` (the gateway follows the new "
            "model by itself), or start the gateway with --manage-models (scripts/run.sh does for "
            "local backends)",
        )

    async def reload(self, req: ReloadModelRequest) -> dict[str, Any]:
        pool = self._pool(req.kind)
        wanted = variables(req)
        for i, r in enumerate(pool.replicas):
            if not is_loopback_url(r.url):
                raise GatewayError(
                    409,
                    f"replica {i} of model {pool.model.name!r} is not on this machine, so "
                    f"this gateway cannot restart it; run `{command(req.kind, wanted)}` there",
                )
        if not START_SCRIPT.exists():
            raise GatewayError(
                409,
                "--manage-models needs start_vllm_models.sh beside the gateway's package "
                "(a source checkout, as scripts/run.sh uses)",
            )
        if self._lock.locked():
            raise GatewayError(409, "a reload is already in progress; try again when it has answered")
        async with self._lock:
            previous = self._current[req.kind]
            new = {**previous, **wanted}
            path_var = kind_variable(req.kind, "MODEL_PATH")
            if "MODEL_SIZE" in wanted and path_var not in wanted:
                new.pop(path_var, None)  # a new size means that size's weights, not an older path
            start = time.monotonic()
            log.info(
                "reloading %s (%d replica(s)) with %s",
                pool.model.name,
                len(pool.replicas),
                log_field(command(req.kind, new)),
            )
            for i, replica in enumerate(pool.replicas):
                ok, tail = await self._restart(pool, i, replica, new)
                if not ok:
                    restored = all([await self._restart(pool, j, pool.replicas[j], previous) for j in range(i + 1)])
                    log.error(
                        "reload of %s failed at replica %d; previous settings %s",
                        pool.model.name,
                        i,
                        "restored" if restored else "NOT restored (see the vLLM logs)",
                    )
                    raise GatewayError(
                        502,
                        f"replica {i} of model {pool.model.name!r} did not start with the new "
                        f"settings; previous settings "
                        f"{'restored' if restored else 'could not be restored'}. "
                        f"End of its log:\n{tail}",
                    )
            self._current[req.kind] = new
        return {
            "status": "reloaded",
            "kind": script_kind(req.kind),
            "model": pool.model.name,
            "served_as": pool.upstream_name,
            "settings": req.settings(),
            "replicas": len(pool.replicas),
            "seconds": round(time.monotonic() - start, 1),
        }

    def _pool(self, kind: Kind) -> Pool:
        model = self.settings.default_model(kind)
        if model is None:
            raise GatewayError(404, f"no {script_kind(kind)} model is configured", param="kind")
        return self.upstreams.pools[model.name]

    async def _restart(self, pool: Pool, index: int, replica: Replica, env: dict[str, str]) -> tuple[bool, str]:
        """Restart one replica with `env`; (healthy, end of its log)."""
        kind = pool.model.kind
        replica.draining = True  # no new requests: the others take them (or a 503 when it is alone)
        try:
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while replica.outstanding and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            log_dir = replica_log_dir(self.settings, kind, index, replica.url)
            full = {
                **os.environ,
                **env,
                "LOG_DIR": str(log_dir),
                kind_variable(kind, "PORT"): str(urlsplit(replica.url).port),
            }
            if self.settings.backend_api_key:
                full["VLLM_API_KEY"] = self.settings.backend_api_key  # every replica keeps the gateway's key
            # The script's output goes to a file, not a pipe: the vLLM server it leaves running
            # could inherit a pipe's end (uvloop does not mark it close-on-exec) and hold it open.
            with tempfile.TemporaryFile() as out:
                proc = await asyncio.create_subprocess_exec(
                    str(START_SCRIPT),
                    "--restart",
                    "--only",
                    script_kind(kind),
                    env=full,
                    cwd=str(ROOT),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    close_fds=True,
                )
                await proc.wait()
                out.seek(0)
                text = out.read().decode(errors="replace")
            log.info("start_vllm_models.sh for replica %s of %s exited %s", index, pool.model.name, proc.returncode)
            ok = proc.returncode == 0
            await self.upstreams.check(replica)
            self.upstreams.learn_names()
            return ok and replica.healthy, "\n".join(text.splitlines()[-LOG_TAIL_LINES:])
        finally:
            replica.draining = False


def local_replicas(settings: Settings) -> list[tuple[str, int, Path, str]]:
    """(script kind, port, log dir, URL) of every loopback replica, in the layout reloads expect."""
    out = []
    for m in settings.models:
        for i, url in enumerate(m.urls):
            port = urlsplit(url).port
            if is_loopback_url(url) and port:
                out.append((script_kind(m.kind), port, replica_log_dir(settings, m.kind, i, url), url))
    return out
