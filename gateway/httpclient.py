"""The one HTTP client: pooled keep-alive connections, timeouts, errors as values, redaction."""

from __future__ import annotations

import json as jsonlib
from typing import Any

import attrs
import treq
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed, ResponseNeverReceived

from gateway.errors import Retryable

log = Logger()

REDACTED_HEADERS = {b"authorization", b"cookie"}


@attrs.frozen
class Response:
    """A whole HTTP answer, read."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def excerpt(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace")


class HttpClient:
    """Makes requests to PBX and CRM APIs; network trouble comes back as ``Retryable``."""

    def __init__(self, reactor: Any, timeout: float = 10.0, per_host: int = 16,
                 client: Any = None) -> None:
        self.timeout = timeout
        if client is None:
            pool = HTTPConnectionPool(reactor, persistent=True)
            pool.maxPersistentPerHost = per_host
            pool.cachedConnectionTimeout = 120
            self.pool = pool
            client = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=timeout))
        else:
            self.pool = None
        self._client = client

    async def request(self, method: str, url: str, *, json: Any = None,
                      data: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> Response:
        kwargs: dict[str, Any] = {"headers": headers or {}}
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        try:
            resp = await self._client.request(method, url, timeout=self.timeout, **kwargs)
            body = await resp.content()
        except (CancelledError, TimeoutError):
            raise Retryable(f"{method} {_safe(url)}: no answer in {self.timeout:g} s") from None
        except (ConnectError, DNSLookupError, ConnectionLost, ResponseFailed,
                ResponseNeverReceived) as e:
            raise Retryable(f"{method} {_safe(url)}: {type(e).__name__}") from None
        answer = Response(
            status=resp.code,
            headers={k.decode().lower(): v[-1].decode("latin-1")
                     for k, v in resp.headers.getAllRawHeaders()},
            body=body,
        )
        log.debug("{method} {url} → {status}", method=method, url=_safe(url),
                  status=answer.status)
        return answer

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.closeCachedConnections()


def _safe(url: str) -> str:
    """The URL without its query string, which may carry a key."""
    return url.split("?", 1)[0]


def retry_after(resp: Response) -> float | None:
    """``Retry-After`` in seconds (delta form; an HTTP date is read as a minute)."""
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return 60.0
