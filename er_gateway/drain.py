"""Graceful drain on SIGTERM, for load balancers and rolling restarts (README, "Scaling out").

uvicorn stops listening the moment it gets SIGTERM. A load balancer that has not yet noticed
would then send new connections to a closed port, and a Kubernetes Service takes seconds to drop
a terminating pod. So the first SIGTERM only marks the process as draining: `/health/ready` (and
`/health`) answer 503 at once, every answer carries `Connection: close` so keep-alive clients
reconnect to another instance, and the process keeps serving for `--drain-delay` seconds. Then
uvicorn's own graceful shutdown runs: it stops accepting connections, lets in-flight requests
finish for up to `--drain-timeout` seconds, and the process exits 0. A second SIGTERM skips the
rest of the delay.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable

log = logging.getLogger("er_gateway")


class Drain:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.since: float | None = None  # monotonic time of the SIGTERM; None while serving normally
        self._stop: Callable[[], None] | None = None

    @property
    def active(self) -> bool:
        return self.since is not None

    def install(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Take over SIGTERM from the uvicorn server this process runs (False when there is none).

        uvicorn installs its handler with `signal.signal` before the app starts; it is the bound
        `Server.handle_exit`, so the server is reached through it. Setting `should_exit` directly
        (instead of calling the handler) also keeps uvicorn from re-raising SIGTERM on exit, which
        would end the process with status 143 instead of 0.
        """
        server = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
        if server is None or not hasattr(server, "should_exit"):
            return False

        def stop() -> None:
            server.should_exit = True

        self._stop = stop
        loop.add_signal_handler(signal.SIGTERM, self.begin, loop)
        return True

    def begin(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._stop is not None
        if self.since is not None:
            log.info("second SIGTERM: stopping now")
            self._stop()
            return
        self.since = time.monotonic()
        log.info(
            "SIGTERM: draining; /health/ready answers 503, serving for %g s more (--drain-delay), then "
            "finishing in-flight requests (--drain-timeout) and exiting",
            self.delay,
        )
        loop.call_later(self.delay, self._stop)
