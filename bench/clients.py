"""Library upstream clients with exactly HTTPPool's interface, for bench/gateway_with_client.py.

    HTTPPool(url, *, connect_timeout, timeout, headers=None, max_idle=1024, **future kwargs)
    await pool.request(method, path, body=b"", headers=None, timeout=None) -> HTTPResponse(status, body)
    await pool.close()

Each adapter raises the home client's errors: ConnectError (nothing was sent; a connect timeout
counts here, as in httpclient.py), DisconnectError (broke mid-exchange), ProtocolError (not HTTP),
TimeoutError (total timeout). Each is configured the way one would run it in production: one
long-lived pooled client per backend URL, keep-alive, no cookies, no redirects, no decompression,
no proxy lookup, and the fixed headers set once on the client.
"""

from __future__ import annotations

import asyncio
import socket
from functools import partial
from typing import Any
from urllib.parse import urlsplit

from er_gateway.httpclient import ConnectError, DisconnectError, HTTPPool, HTTPResponse, ProtocolError


class _Adapter:
    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        timeout: float,
        headers: dict[str, str] | None = None,
        max_idle: int = 1024,
        **_future: Any,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend URL must be http(s)://host[:port], got {url!r}")
        self.url = url
        self.base = url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.max_idle = max_idle
        self.headers = {"User-Agent": "er-gateway", **(headers or {})}


class AiohttpPool(_Adapter):
    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        import aiohttp

        self._aiohttp = aiohttp
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, Any] = {}  # parsed yarl URLs per path: parsing is not what we measure
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _open(self) -> Any:
        # Created on first use: a ClientSession belongs to the running loop.
        a = self._aiohttp
        self._session = a.ClientSession(
            connector=a.TCPConnector(limit=self.max_idle, limit_per_host=0),
            timeout=a.ClientTimeout(total=self.timeout, connect=self.connect_timeout),
            headers=self.headers,
            cookie_jar=a.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept", "Accept-Encoding"),
        )
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> HTTPResponse:
        a = self._aiohttp
        session = self._session or self._open()
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = a.client.URL(self.base + path)
        kw: dict[str, Any] = {}
        if timeout is not None:
            kw["timeout"] = self._timeouts.get(timeout) or self._timeouts.setdefault(
                timeout, a.ClientTimeout(total=timeout, connect=min(timeout, self.connect_timeout))
            )
        try:
            async with session.request(method, url, data=body, headers=headers, allow_redirects=False, **kw) as r:
                return HTTPResponse(r.status, await r.read())
        except (a.ConnectionTimeoutError, a.ClientConnectorError) as e:  # before TimeoutError: a subclass
            raise ConnectError(str(e)) from None
        except TimeoutError:
            raise TimeoutError from None
        except a.ClientResponseError as e:  # raise_for_status is off: only unparsable answers get here
            raise ProtocolError(e.message) from None
        except a.ClientError as e:  # ServerDisconnectedError, ClientPayloadError, ClientOSError
            raise DisconnectError(str(e) or type(e).__name__) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class AiosonicPool(_Adapter):
    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        import aiosonic
        from aiosonic import exceptions
        from aiosonic.pools import PoolConfig

        self._exc = exceptions
        self._timeouts_cls = aiosonic.Timeouts
        self._timeouts: dict[float, aiosonic.Timeouts] = {}
        default = self._timeouts_for(self.timeout)
        # max_conn_requests=None: the home client never recycles a healthy connection either.
        connector = aiosonic.TCPConnector(
            pool_configs={":default": PoolConfig(size=self.max_idle, max_conn_requests=None)},
            timeouts=default,
        )
        self._client = aiosonic.HTTPClient(connector=connector, handle_cookies=False, follow=False)

    def _timeouts_for(self, total: float) -> Any:
        t = self._timeouts.get(total)
        if t is None:
            t = self._timeouts[total] = self._timeouts_cls(
                sock_connect=min(total, self.connect_timeout), sock_read=total, request_timeout=total
            )
        return t

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> HTTPResponse:
        x = self._exc
        h = {**self.headers, **headers} if headers else self.headers
        send = partial(
            self._client.request,
            self.base + path,
            method,
            headers=h,
            data=body,
            timeouts=self._timeouts_for(timeout or self.timeout),
        )
        try:
            try:
                r = await send()
            except x.ConnectionDisconnected as e:
                # aiosonic resends only idempotent methods when a reused keep-alive connection turns
                # out closed (it does not notice an idle connection the server closed); the home
                # client resends any request that got no answer byte. Same semantics here.
                if not e.reused_connection:
                    raise
                r = await send()
            return HTTPResponse(r.status_code, await r.content())
        except (x.ConnectTimeout, ConnectionRefusedError, socket.gaierror) as e:
            raise ConnectError(str(e) or type(e).__name__) from None
        except x.BaseTimeout:
            raise TimeoutError from None
        except x.HttpParsingError as e:
            raise ProtocolError(str(e)) from None
        except (x.ConnectionDisconnected, asyncio.IncompleteReadError, OSError) as e:
            raise DisconnectError(str(e) or type(e).__name__) from None

    async def close(self) -> None:
        await self._client.connector.cleanup()


class PyreqwestPool(_Adapter):
    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        from datetime import timedelta

        from pyreqwest import exceptions
        from pyreqwest.client import ClientBuilder

        self._exc = exceptions
        self._td = timedelta
        self._timeouts: dict[float, timedelta] = {}
        # Defaults kept: the single-threaded Tokio runtime (its thread shares the gateway's pinned
        # core), HTTP/1 only, no cookie store, no error_for_status.
        self._client = (
            ClientBuilder()
            .default_headers(self.headers)
            .user_agent("er-gateway")
            .connect_timeout(timedelta(seconds=self.connect_timeout))
            .timeout(timedelta(seconds=self.timeout))
            .pool_max_idle_per_host(self.max_idle)
            .gzip(False)
            .brotli(False)
            .zstd(False)
            .deflate(False)
            .follow_redirects(False)
            .referer(False)
            .no_proxy()
            .build()
        )

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> HTTPResponse:
        x = self._exc
        req = self._client.request(method, self.base + path).body_bytes(body)
        if headers:
            req = req.headers(headers)
        if timeout is not None:
            td = self._timeouts.get(timeout) or self._timeouts.setdefault(timeout, self._td(seconds=timeout))
            req = req.timeout(td)
        try:
            r = await req.build().send()
            return HTTPResponse(r.status, (await r.bytes()).to_bytes())
        except x.ConnectError as e:
            raise ConnectError(e.message) from None
        except x.RequestTimeoutError as e:
            # pyreqwest 0.15 raises ConnectTimeoutError for the total timeout too; only the cause
            # chain tells a timed-out connect ("client error (Connect)") from a slow answer.
            if isinstance(e, x.ConnectTimeoutError) and _caused_by(e, "(Connect)"):
                raise ConnectError(e.message) from None
            raise TimeoutError from None
        except (x.NetworkError, x.BodyDecodeError, x.ClientClosedError) as e:  # the answer broke off
            raise DisconnectError(e.message) from None
        except x.RequestError as e:  # DecodeError: hyper could not parse the answer
            raise ProtocolError(e.message) from None

    async def close(self) -> None:
        await self._client.close()


def _caused_by(e: Any, text: str) -> bool:
    return any(text in c["message"] for c in (e.details.get("causes") or ()))


CLIENTS: dict[str, type] = {
    "home": HTTPPool,
    "aiohttp": AiohttpPool,
    "aiosonic": AiosonicPool,
    "pyreqwest": PyreqwestPool,
}


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in CLIENTS:
        try:
            out[name] = "httpclient.py" if name == "home" else version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
