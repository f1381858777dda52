"""The gateway log and the access log, written off the event loop.

The hot path only builds one string and puts it on a queue; a background
thread does the file I/O (and rotation), so `tail -f` sees whole lines at once
without the request waiting on the disk.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ..settings import Settings

if TYPE_CHECKING:
    from .context import RequestInfo

GATEWAY_LOG = "embedding_reranker_proxy.log"
ACCESS_LOG = "access.log"


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


class _LineWriter(threading.Thread):
    """Writes finished lines from a queue to a rotating file (and optionally stdout)."""

    def __init__(self, handlers: list[logging.Handler]) -> None:
        super().__init__(name="er-log-writer", daemon=True)
        self.queue: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
        self.handlers = handlers

    def run(self) -> None:
        while (record := self.queue.get()) is not None:
            for h in self.handlers:
                if record.levelno >= h.level:
                    try:
                        h.handle(record)
                    except Exception:  # noqa: BLE001 - a full disk must not kill logging
                        pass

    def stop(self) -> None:
        self.queue.put(None)
        self.join(timeout=5)
        for h in self.handlers:
            h.close()


class _AccessWriter(threading.Thread):
    """The access log's writer: drains every queued line, writes them in one call, flushes.

    One write per burst instead of one per line keeps the thread from competing with the
    event loop for the GIL at thousands of requests per second; lines still reach the
    file within milliseconds, whole, for `tail -f`.
    """

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        super().__init__(name="er-access-log", daemon=True)
        self.queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self.file = open(path, "a", encoding="utf-8")

    def run(self) -> None:
        done = False
        while not done:
            got = [self.queue.get()]
            while True:
                try:
                    got.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            lines = [x for x in got if x is not None]
            done = len(lines) < len(got)  # None: stop, once what came before it is written
            if not lines:
                continue
            try:
                self.file.write("\n".join(lines) + "\n")
                self.file.flush()
                if self.file.tell() >= self.max_bytes:
                    self._rotate()
            except OSError:
                pass  # a full disk must not take the gateway down

    def _rotate(self) -> None:
        self.file.close()
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def stop(self) -> None:
        self.queue.put(None)
        self.join(timeout=5)
        self.file.close()


class Logs:
    """Owns the writer threads of the gateway log and the access log."""

    def __init__(self, settings: Settings) -> None:
        log_dir = Path(settings.log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.json = settings.log_format == "json"
        fmt: logging.Formatter = (
            _JsonFormatter() if self.json else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        file_h = logging.handlers.RotatingFileHandler(
            log_dir / GATEWAY_LOG,
            maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backups,
            encoding="utf-8",
        )
        out_h = logging.StreamHandler(sys.stdout)
        handlers: list[logging.Handler] = [file_h, out_h]
        for handler in handlers:
            handler.setFormatter(fmt)
        self._main = _LineWriter(handlers)
        self._main.start()
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.handlers.QueueHandler):
                root.removeHandler(h)
        qh = logging.handlers.QueueHandler(self._main.queue)
        root.addHandler(qh)
        root.setLevel(settings.log_level.upper())
        for name in ("uvicorn", "uvicorn.error"):
            lg = logging.getLogger(name)
            lg.handlers = []
            lg.propagate = True
        logging.getLogger("uvicorn.access").disabled = True  # our access log replaces it

        self._access: _AccessWriter | None = None
        if settings.access_log:
            self._access = _AccessWriter(log_dir / ACCESS_LOG, settings.log_max_bytes, settings.log_backups)
            self._access.start()

    def access(
        self,
        when: str,
        info: RequestInfo,
        method: str,
        path: str,
        status: int,
        total_ms: float,
        client: str | None,
    ) -> None:
        """One access-log line (this runs on every request).

        Text: `name=value` fields separated by one space; a value from the request (request id,
        method, path, client, ...) is written bare when it is plain, else quoted and escaped
        (`log_field`), so no value can end a line or start a field. JSON: one orjson object a line.
        """
        if self._access is None:
            return
        if self.json:
            line = orjson.dumps(
                {
                    "time": when,
                    "request_id": info.request_id,
                    "key": info.key_name,
                    "method": method,
                    "path": path,
                    "model": info.model,
                    "status": status,
                    "total_ms": round(total_ms, 3),
                    "upstream_ms": round(info.upstream_ms, 3),
                    "queue_ms": round(info.queue_ms, 3),
                    "replica": info.replica,
                    "retries": info.retries,
                    "items": info.items,
                    "tokens": info.tokens,
                    "client": client,
                    **info.extra,
                }
            ).decode()
            if not line.isascii():  # orjson leaves U+0085/U+2028/U+2029 raw; str.splitlines() splits on them
                line = line.translate(_JSON_LINE_BREAKS)
        else:
            rid, key, model, replica = info.request_id, info.key_name, info.model, info.replica
            items, tokens = info.items, info.tokens
            values = (rid, key, method, path, model, replica, client)
            # The common case in one test over all values at once rather than one per value: each
            # is plain (see log_field) iff their concatenation is printable ASCII without space, ",
            # \ or =, and none of them is "" or "-". (None passes as "None" and is written "-".)
            probe = f"{rid}{key}{method}{path}{model}{replica}{client}"
            if not (
                probe.isascii()
                and probe.isprintable()
                and " " not in probe
                and '"' not in probe
                and "\\" not in probe
                and "=" not in probe
                and "" not in values
                and "-" not in values
            ):
                rid, key, method, path, model, replica, client = map(log_field, values)
            # None is "-"; a real "" or "-" was quoted above, so `or` only ever replaces None.
            line = (
                f"time={when} request_id={rid} key={key or '-'} method={method} path={path} "
                f"model={model or '-'} status={status} total_ms={total_ms:.2f} upstream_ms={info.upstream_ms:.2f} "
                f"queue_ms={info.queue_ms:.2f} replica={replica or '-'} retries={info.retries} "
                f"items={items if items.__class__ is int else log_field(items)} "
                f"tokens={tokens if tokens.__class__ is int else log_field(tokens)} client={client or '-'}"
            )
            if info.extra:
                line += "".join(f" {log_field(k)}={log_field(v)}" for k, v in info.extra.items())
        self._access.queue.put(line)

    def close(self) -> None:
        root = logging.getLogger()
        for h in list(root.handlers):
            if isinstance(h, logging.handlers.QueueHandler):
                root.removeHandler(h)
        self._main.stop()
        if self._access:
            self._access.stop()


_JSON_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Everything but printable ASCII other than " and \, and printable Latin-1: what _escape_char looks at.
_NEEDS_LOOK = re.compile(r"[^ !#-\[\]-~\xa1-\xac\xae-\xff]")


def _escape_char(m: re.Match[str]) -> str:
    c = m.group()
    e = _ESCAPES.get(c)
    if e is not None:
        return e
    if c.isprintable():  # non-ASCII printable (CJK, accents, emoji) stays as it is
        return c
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def log_field(v: Any) -> str:
    """One value of a text access-log line (or of a gateway-log message) that may come from a client.

    Bare when plain: non-empty printable ASCII without space, `"`, `\\` or `=`, and not `-`
    (which stands for None). Otherwise in double quotes with `\\` -> `\\\\`, `"` -> `\\"`,
    newline/CR/tab -> `\\n`/`\\r`/`\\t`, and every other non-printable character (controls, DEL,
    U+0085, U+2028/2029, NBSP, ...) as `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`; printable non-ASCII
    characters are kept. So a value can neither end the line nor be mistaken for more fields.
    """
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    s = v if isinstance(v, str) else str(v)
    if (
        s.isascii()
        and s.isprintable()
        and s
        and s != "-"
        and " " not in s
        and '"' not in s
        and "\\" not in s
        and "=" not in s
    ):
        return s
    if s.isprintable():  # only quotes, backslashes, spaces or printable non-ASCII to take care of
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return '"' + _NEEDS_LOOK.sub(_escape_char, s) + '"'


_clock: tuple[int, str] = (0, "")


def now_text() -> str:
    """Local time to the second, formatted once per second rather than once per request."""
    global _clock
    now = int(time.time())
    if now != _clock[0]:
        _clock = (now, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)))
    return _clock[1]
