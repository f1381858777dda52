"""Command line: serve the gateway (default) or manage keys (`keys create|list|revoke|rotate`)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from redis.exceptions import RedisError

from . import keys as keystore
from .keys_redis import open_store
from .settings import OPTIONS, SettingsError, add_arguments, load_settings
from .tokens import TokenizerError, find_tokenizer

BANNER = """
================================================================================
  First start: created API key "default" (admin) in {path}
  Store it now — only its hash is kept, it cannot be shown again:

      {key}

  Try it:  curl -H "Authorization: Bearer {key}" http://127.0.0.1:{port}/v1/models
================================================================================
"""

DESCRIPTION = """\
Authenticated, rate-limited gateway for Qwen3 embedding and reranker models served by vLLM.
Configuration precedence: flag > environment variable (ER_*) > config file (--config) > default.

key management (reads the same settings: --keys-file, --keys-store, --redis-url, ER_*, --config):
  %(prog)s keys create --name NAME [--rpm N] [--tpm N] [--models a,b] [--expires YYYY-MM-DD] [--admin]
  %(prog)s keys list | keys revoke NAME | keys rotate NAME
  %(prog)s keys import [FILE] --keys-store redis --redis-url URL   (copy a keys file into Redis)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedding_reranker_proxy.py",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="{keys}")
    keys = sub.add_parser("keys", help="manage API keys (see `keys -h`)")
    keys.add_argument(
        "--keys-file",
        dest="keys_file",
        default=argparse.SUPPRESS,
        help="keys file [env ER_KEYS_FILE; default: er_api_keys.json]",
    )
    keys.add_argument(
        "--keys-store",
        dest="keys_store",
        default=argparse.SUPPRESS,
        help="file | redis [env ER_KEYS_STORE; default: file]",
    )
    keys.add_argument("--redis-url", dest="redis_url", default=argparse.SUPPRESS, help="[env ER_REDIS_URL]")
    keys.add_argument("--config", dest="config", default=argparse.SUPPRESS, help="config file")
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="{create,list,revoke,rotate,import}")
    create = ks.add_parser("create", help="create a key; prints only the key")
    create.add_argument("--name", required=True)
    create.add_argument("--rpm", type=int, help="requests per minute (default: the gateway's --rate-limit)")
    create.add_argument("--rate-limit", help="any limit spec instead of --rpm, e.g. 10/second")
    create.add_argument("--tpm", type=int, help="token budget per minute (counted from vLLM's usage)")
    create.add_argument("--models", help="comma-separated models this key may use (default: all)")
    create.add_argument("--expires", help="last valid day, YYYY-MM-DD (UTC), or an ISO datetime")
    create.add_argument("--admin", action="store_true", help="may call POST /reload_model")
    ks.add_parser("list", help="list keys (never shows a key)")
    revoke = ks.add_parser("revoke", help="revoke a key (takes effect within 2 s)")
    revoke.add_argument("name")
    rotate = ks.add_parser("rotate", help="give a key a new secret; prints only the new key")
    rotate.add_argument("name")
    imp = ks.add_parser("import", help="copy a keys file's keys into Redis (names already there are kept)")
    imp.add_argument("file", nargs="?", help="keys file to read (default: --keys-file)")
    # For scripts/run.sh: which local vLLM servers these settings need started.
    sub.add_parser("local-models", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command", None)
    if command == "keys":
        return keys_command(args)
    cli = {o.field: args[o.field] for o in OPTIONS if o.field in args}
    try:
        settings = load_settings(cli)
        if command == "local-models":
            return local_models(settings)
        for m in settings.models:
            find_tokenizer(m)  # a configured tokenizer path that is wrong stops here, not in a worker
    except (SettingsError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return serve(settings, cli)


def local_models(settings: Any) -> int:
    """Print `MANAGE yes|no`, `LOGDIR dir`, then `START kind port log_dir` for each loopback replica
    that does not answer /health (scripts/run.sh starts those with start_vllm_models.sh)."""
    import urllib.error
    import urllib.request

    from .manage import local_replicas

    local = local_replicas(settings)
    every = sum(len(m.urls) for m in settings.models)
    manage = local and len(local) == every and settings.workers == 1
    print(f"MANAGE {'yes' if manage else 'no'}")
    print(f"LOGDIR {Path(settings.log_dir).absolute()}")
    for kind, port, log_dir, url in local:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    continue
        except (urllib.error.URLError, OSError):
            pass
        print(f"START {kind} {port} {log_dir}")
    return 0


def keys_command(args: dict[str, Any]) -> int:
    try:
        settings = load_settings({k: args[k] for k in ("keys_file", "keys_store", "redis_url", "config") if k in args})
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    store = open_store(settings)
    cmd = args["keys_command"]
    try:
        if cmd == "create":
            rate = args.get("rate_limit") or (f"{args['rpm']}/minute" if args.get("rpm") else None)
            key = keystore.create_key(
                store,
                args["name"],
                rate_limit=rate,
                token_limit=f"{args['tpm']}/minute" if args.get("tpm") else None,
                models=[m.strip() for m in args["models"].split(",") if m.strip()] if args.get("models") else None,
                expires=args.get("expires"),
                admin=args.get("admin", False),
            )
            print(key)
        elif cmd == "list":
            rows = store.read()
            print(
                f"{'NAME':<20} {'KEY':<10} {'STATE':<8} {'RATE':<14} {'TOKENS':<14} {'MODELS':<30} "
                f"{'EXPIRES':<12} CREATED"
            )
            for k in rows:
                state = k.public(time.time())["state"]
                models = ",".join(k.models) if k.models is not None else "*"
                print(
                    f"{k.name:<20} {k.hint + '…':<10} {state:<8} {k.rate_limit or 'default':<14} "
                    f"{k.token_limit or '-':<14} {models:<30} {k.expires or '-':<12} {k.created}"
                    f"{'  admin' if k.admin else ''}"
                )
        elif cmd == "revoke":
            keystore.revoke_key(store, args["name"])
            print(f"revoked {args['name']!r}", file=sys.stderr)
        elif cmd == "rotate":
            print(keystore.rotate_key(store, args["name"]))
        elif cmd == "import":
            if settings.keys_store != "redis":
                print("error: `keys import` copies a keys file into Redis: give --keys-store redis", file=sys.stderr)
                return 2
            source = args.get("file") or settings.keys_file
            added, skipped = keystore.import_keys(store, keystore.read_keys(source))
            print(f"imported {len(added)} key(s) from {source} into {store}", file=sys.stderr)
            if skipped:
                print(f"kept {len(skipped)} already there: {', '.join(skipped)}", file=sys.stderr)
    except FileNotFoundError as e:
        print(f"error: keys file {e.filename or settings.keys_file} does not exist", file=sys.stderr)
        return 1
    except (keystore.KeysFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RedisError as e:
        print(f"error: Redis at {settings.redis_url} failed: {e}", file=sys.stderr)
        return 1
    return 0


def serve(settings: Any, cli: dict[str, Any]) -> int:
    import uvicorn

    from . import frontdoor, http2
    from .app import SETTINGS_ENV, create_app

    store = open_store(settings)
    try:
        created = store.ensure_default()
    except keystore.KeysFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RedisError as e:  # the gateway starts anyway, and reads the keys once Redis answers
        print(f"warning: Redis at {settings.redis_url} failed ({e}); keys are read once it answers", file=sys.stderr)
        created = None
    if created:
        where = str(store) if settings.keys_store == "redis" else os.path.abspath(settings.keys_file)
        print(BANNER.format(path=where, key=created, port=settings.port), flush=True)

    # Front door (er_gateway/frontdoor.py): header timeout, head size cap, connection cap (per process),
    # lingering close after an early answer. configure() raises RLIMIT_NOFILE (workers inherit it) and
    # logs if the cap had to be lowered: after create_app() so that the line reaches the gateway log.
    def door() -> dict[str, Any]:
        return frontdoor.configure(settings.header_timeout, settings.max_header_bytes, settings.max_connections)

    common: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=frontdoor.H2FrontDoorProtocol if settings.http2 else frontdoor.FrontDoorProtocol,
        ws="none",  # no WebSocket routes; an upgraded connection would leave the front door's accounting
        timeout_keep_alive=settings.keepalive_timeout,
        access_log=False,
        log_config=None,
        ssl_certfile=settings.ssl_certfile,
        ssl_keyfile=settings.ssl_keyfile,
        ssl_context_factory=http2.alpn_context if settings.http2 and settings.ssl_certfile else None,
        timeout_graceful_shutdown=settings.drain_timeout,
        backlog=4096,
    )
    if settings.workers > 1:
        # Workers are fresh processes: they read their settings and the metrics directory from here.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="er-gateway-metrics-")
        env = {o.env: os.environ[o.env] for o in OPTIONS if o.env in os.environ}
        os.environ[SETTINGS_ENV] = orjson.dumps({"cli": cli, "env": env}).decode()
        os.environ[frontdoor.ENV] = orjson.dumps(door()).decode()
        run_workers(
            uvicorn.Config("er_gateway.app:create_app_from_env", factory=True, workers=settings.workers, **common)
        )
    else:
        app = create_app(settings, cli)
        door()
        uvicorn.run(app, **common)
    return 0


def run_workers(config: Any) -> None:
    """uvicorn's multi-process supervisor, but SIGHUP goes to one worker, which reloads and
    broadcasts the reload to the other workers and gateways (reloads.py). uvicorn's own SIGHUP
    would restart every worker, dropping their caches and draining each in turn."""
    import signal

    from uvicorn.supervisors import Multiprocess

    class Supervisor(Multiprocess):
        def handle_hup(self) -> None:
            for p in self.processes:
                if p.pid is not None and p.is_alive(timeout=1):
                    os.kill(p.pid, signal.SIGHUP)
                    return

    sock = config.bind_socket()
    Supervisor(config, sockets=[sock]).run()
