"""Prometheus's instant-query API (``GET /api/v1/query``) over one aiohttp session.

An answer is the response's ``data.result`` or the reason there is none; nothing here raises
for a failed query. The session is opened by ``PrometheusHttp`` and closed by its ``aclose``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
from collections.abc import Mapping
from typing import Protocol

import aiohttp

from rollbackd import __version__
from rollbackd.readings import excerpt

MAX_RESPONSE_BYTES = 16 * 2**20
"""A larger answer (decompressed) is an error: its parsed JSON would cost far more memory."""
ERROR_BODY_BYTES = 64 * 2**10
"""How much of a non-200 answer is read for Prometheus's error JSON."""

Answer = tuple[object, str]
"""``(data.result, "")`` or ``(None, why there is no result)``."""


class InstantQueries(Protocol):
    """What ``PrometheusSource`` queries through; tests hand in fakes."""

    async def query(self, query: str) -> Answer:
        """Run one instant query; never raises for a failed request or a malformed answer."""

    async def aclose(self) -> None:
        """Close every connection; no query is made afterwards."""


class PrometheusHttp:
    """One ``aiohttp.ClientSession`` for one Prometheus, its headers and TLS fixed when built.

    Build it in a running event loop; ``aclose`` it there.

    Answers are asked for uncompressed: gzip of a small answer costs Prometheus and the daemon
    more CPU than it saves (a 1,000-rule cycle takes about 3x as long with it on loopback). Proxy
    variables and ``~/.netrc`` are not read (``trust_env`` off, as in the HTTP actions): each
    request would otherwise parse ``~/.netrc`` on the default executor.
    """

    def __init__(
        self, url: str, headers: Mapping[str, str], tls: ssl.SSLContext | bool, connections: int
    ) -> None:
        self.url = url
        self._endpoint = f"{url}/api/v1/query"
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls, limit=connections),
            headers={
                "User-Agent": f"rollbackd/{__version__}",
                "Accept-Encoding": "identity",
                **headers,
            },
            timeout=aiohttp.ClientTimeout(total=None),  # the source bounds each query
        )

    @property
    def closed(self) -> bool:
        """Whether ``aclose`` has closed the session."""
        return self._session.closed

    async def aclose(self) -> None:
        """Close the session and its kept-alive connections."""
        await self._session.close()

    async def query(self, query: str) -> Answer:
        """``GET /api/v1/query?query=...``: its ``data.result``, or why there is none."""
        if self._session.closed:  # a read that waited for a slot while the source closed
            return None, "the source is closed"
        try:
            async with self._session.get(self._endpoint, params={"query": query}) as response:
                status = response.status
                limit = MAX_RESPONSE_BYTES if status == 200 else ERROR_BODY_BYTES
                body = await _body(response, limit)
        except aiohttp.ClientConnectorError as exc:
            return None, f"cannot connect to {self.url}: {_connect_problem(exc)}"
        except aiohttp.ClientError as exc:
            return None, f"request failed: {type(exc).__name__} {excerpt(str(exc))}".rstrip()
        if status != 200:
            return None, _http_problem(status, body)
        if body is None:
            return None, (
                f"response larger than {MAX_RESPONSE_BYTES // 2**20} MiB: narrow the query "
                "(e.g. aggregate with sum by (...))"
            )
        return _result(body)


async def _body(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    # None when over limit; counted after decompression, so a gzip bomb stops at the limit too
    if response.content_length is not None and response.content_length > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _result(body: bytes) -> Answer:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, f"malformed JSON in response: {excerpt(str(exc))}"
    except ValueError as exc:  # e.g. a JSON integer of more than 4300 digits
        return None, f"malformed response: ValueError {excerpt(str(exc))}"
    except RecursionError:
        return None, "malformed response: JSON nested too deep"
    try:
        return payload["data"]["result"], ""
    except (KeyError, TypeError, IndexError) as exc:  # no data.result, or not an object
        return None, f"malformed response: {type(exc).__name__} {excerpt(str(exc))}"


def _http_problem(status: int, body: bytes | None) -> str:
    # Prometheus answers {"status": "error", "errorType": ..., "error": ...} with 4xx/5xx
    if body is None:
        return f"HTTP {status}: (a body of more than {ERROR_BODY_BYTES // 2**10} KiB)"
    try:
        payload = json.loads(body)
        kind, error = excerpt(str(payload["errorType"])), excerpt(str(payload["error"]))
    except (ValueError, RecursionError, TypeError, KeyError):
        said = excerpt(" ".join(body.decode("utf-8", "replace").split()))
        return f"HTTP {status}: {said or '(empty body)'}"
    return f"HTTP {status}: {kind}: {error}"


def _connect_problem(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
        reason = getattr(cause, "verify_message", "") or str(cause)
        return (
            f"certificate verification failed: {excerpt(reason)} "
            "(set ca_file to the PEM bundle of the CA that signed it)"
        )
    cause, code = exc.os_error, exc.os_error.errno
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {excerpt(str(cause.reason or cause))}"
    if code is None or code not in errno.errorcode or isinstance(cause, socket.gaierror):
        text = cause.strerror or str(cause)  # "Name or service not known"
    else:
        text = os.strerror(code)  # asyncio's own text is "Connect call failed (...)"
    return excerpt(text[:1].lower() + text[1:])  # "connection refused", as requests' was


__all__ = ["ERROR_BODY_BYTES", "MAX_RESPONSE_BYTES", "Answer", "InstantQueries", "PrometheusHttp"]
