"""The upstream HTTP transport: `openai`'s client over aiohttp's C HTTP parser.

The `openai` client builds requests, authenticates and raises its typed
errors as always; only the bytes travel through aiohttp instead of
`httpcore2`/`h11`. A streamed answer arrives as one HTTP chunk per token,
and parsing each in pure Python (h11) plus anyio's per-read cancel scopes
was most of the server's CPU per turn (bench/README.md, "CPU per turn"):
this transport cuts the upstream call's instructions per streamed answer
by about 2.2× (callgrind, same run).

`openai` ships `DefaultAioHttpClient` for the same purpose, but its vendored
exception map turns a refused connection into a connect *timeout*
(`aiohttp.ClientConnectionError` is matched before its subclass
`ClientConnectorError`), which would change our error table. Here aiohttp's
exceptions are translated to `httpx2`'s in one table, `AIOHTTP_ERRORS`
(most specific class first, a test enumerates aiohttp's classes), so
`openai` and `llm.provider.translate_openai_error` see what they saw with
the default transport.

Closing a response that was not read to its end closes its connection, so
the upstream sees the client go away (a cancelled turn stops costing tokens);
a response read to its end returns the connection to the pool.
"""

from __future__ import annotations

import functools
import ssl
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import httpx2 as httpx

__all__ = ["AIOHTTP_ERRORS", "AiohttpTransport", "translate_aiohttp_error"]

# aiohttp exception -> the httpx2 exception the default transport raises in the
# same situation. Order matters: the first class the exception is an instance of wins.
AIOHTTP_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientHttpProxyError, httpx.ProxyError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientConnectionError, httpx.ReadError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.NonHttpUrlClientError, httpx.UnsupportedProtocol),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.ClientError, httpx.TransportError),
    (TimeoutError, httpx.PoolTimeout),  # aiohttp's `connect` (pool + connect) budget
)


def translate_aiohttp_error(exc: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx2 exception for an aiohttp one (raise it `from exc`)."""
    for source, target in AIOHTTP_ERRORS:
        if isinstance(exc, source):
            return target(_describe(exc), request=request)
    return httpx.TransportError(_describe(exc), request=request)


def _describe(exc: BaseException) -> str:
    try:  # some aiohttp errors format attributes that a partial instance lacks
        return str(exc) or type(exc).__name__
    except Exception:
        return type(exc).__name__


_CAUGHT = (aiohttp.ClientError, TimeoutError)


class _Body(httpx.AsyncByteStream):
    """A response body as aiohttp delivers it: each piece as soon as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.content.iter_any():
                yield data
        except _CAUGHT as exc:
            raise translate_aiohttp_error(exc, self._request) from exc

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # read to its end: the connection is reused
        else:
            self._response.close()  # cut short: the connection is closed, the upstream sees it


@functools.cache
def _default_ssl_context() -> ssl.SSLContext:
    """httpx2's default context (system CAs, verification on), built once per process."""
    return httpx.create_ssl_context()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An `httpx2` transport that sends requests with one `aiohttp.ClientSession`."""

    def __init__(self, *, max_connections: int, keepalive_expiry: float) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        # Built now, as httpx2 does (loading the CA certificates takes 40-100 ms: not
        # something the first turn should wait for), once per process and shared by
        # every transport; the session needs a running loop.
        self._ssl = _default_ssl_context()
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str, int | None], str | None] = {}

    def _proxy(self, url: httpx.URL) -> str | None:
        """HTTP(S)_PROXY / NO_PROXY for this origin, as httpx2 would honour them."""
        origin = (url.scheme, url.host, url.port)
        if origin not in self._proxies:
            proxies = urllib.request.getproxies()
            proxy = proxies.get(url.scheme) or proxies.get("all")
            if proxy and urllib.request.proxy_bypass(url.host):
                proxy = None
            self._proxies[origin] = proxy or None
        return self._proxies[origin]

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use, inside the event loop that will run it.
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                keepalive_timeout=self._keepalive_expiry,
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # Not trust_env: it reads ~/.netrc in a thread on every request.
                # Proxies from the environment are looked up once per origin below.
                trust_env=False,
                auto_decompress=False,  # httpx2 decodes by Content-Encoding
                skip_auto_headers=("User-Agent", "Accept-Encoding"),  # httpx2 sets its own
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeout = request.extensions.get("timeout", {})
        data: bytes | httpx.AsyncByteStream | None
        try:
            data = request.content or None
        except httpx.RequestNotRead:  # a streamed request body
            data = request.stream  # type: ignore[assignment]
            request.headers.pop("transfer-encoding", None)  # aiohttp frames it
        try:
            response = await self._client().request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=data,
                allow_redirects=False,
                compress=False,
                proxy=self._proxy(request.url),
                timeout=aiohttp.ClientTimeout(
                    sock_connect=timeout.get("connect"),
                    sock_read=timeout.get("read"),
                    connect=timeout.get("pool"),
                ),
            )
        except _CAUGHT as exc:
            raise translate_aiohttp_error(exc, request) from exc
        extensions = {"http_version": b"HTTP/1.1"}
        if response.reason:
            extensions["reason_phrase"] = response.reason.encode()
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response, request),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
