#!/usr/bin/env python3
"""Run the gateway with another upstream HTTP client (bench/clients.py) in place of httpclient.py.

    .venv/bin/python bench/gateway_with_client.py {home,aiohttp,aiosonic,pyreqwest} [gateway args...]

`home` runs the gateway unchanged. The swap is a monkeypatch of er_gateway.upstream.HTTPPool made
before the app is built, so it holds in this process only: --workers N (fresh processes) is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.clients import CLIENTS  # noqa: E402
from er_gateway import cli, upstream  # noqa: E402


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in CLIENTS:
        print(__doc__, file=sys.stderr)
        return 2
    name, args = argv[0], argv[1:]
    workers = [a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args) if a.startswith("--workers")]
    if name != "home" and workers and workers[-1] != "1":
        print("error: the client swap only reaches one worker process; drop --workers", file=sys.stderr)
        return 2
    if name != "home":
        # Upstreams._client looks HTTPPool up in this module at call time.
        if not hasattr(upstream, "HTTPPool"):
            print("error: er_gateway.upstream.HTTPPool is gone; update bench/gateway_with_client.py", file=sys.stderr)
            return 2
        upstream.HTTPPool = CLIENTS[name]  # type: ignore[attr-defined]
    print(f"upstream client: {name}", file=sys.stderr, flush=True)  # lands in the bench's out.log
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
