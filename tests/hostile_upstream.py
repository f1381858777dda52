"""A raw-socket upstream that misbehaves on purpose, one scripted behaviour at a time.

It runs its own event loop in a thread of the test process so a test can switch its behaviour
between requests. Every answer to `POST /v1/embeddings` carries the request's own `input`
text, so a test can tell whether each client got its own answer or somebody else's.
`GET /health` is always answered cleanly: the faults under test are on the request path.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# (writer, request body, this connection's request number, the answer it deserves) -> keep open?
Behaviour = Callable[[asyncio.StreamWriter, bytes, int, bytes], Awaitable[bool]]


def answer_body(text: str) -> bytes:
    return json.dumps(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": text}],
            "model": "m",
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    ).encode()


def http_answer(body: bytes, status: int = 200, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        len(body),
        extra,
        body,
    )


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request from a raw connection: (head with its blank line, body by Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, (await reader.readexactly(length) if length else b"")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST rather than a FIN (SO_LINGER 0)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def normal(writer: asyncio.StreamWriter, body: bytes, n: int, answer: bytes) -> bool:
    writer.write(http_answer(answer))
    return True


@dataclass
class HostileUpstream:
    behaviour: Behaviour = normal
    port: int = 0
    connections: int = 0
    requests: int = 0
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def start(self) -> None:
        ready = threading.Event()

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=1 << 20)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await server.serve_forever()

        threading.Thread(target=lambda: self._loop.run_until_complete(serve()), daemon=True).start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def drop_connections(self) -> None:
        """Close every open connection (between cases, so each starts from a clean pool)."""

        def close_all() -> None:
            for w in list(self._writers):
                w.close()

        self._loop.call_soon_threadsafe(close_all)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        n = 0
        try:
            while True:
                head, body = await read_request(reader)
                if head.startswith(b"GET "):  # the gateway's health checks: /health, /v1/models
                    writer.write(http_answer(b"{}"))
                    await writer.drain()
                    continue
                n += 1
                self.requests += 1
                text = json.loads(body).get("input", "")
                if not await self.behaviour(writer, body, n, answer_body(str(text))):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.close()
