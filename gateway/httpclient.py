"""The one HTTP client: pooled keep-alive connections, timeouts, errors as values, redaction."""

from __future__ import annotations

import datetime
import email.utils
import json as jsonlib
import math
import re
import time
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
    received: float | None = None  # the client's clock when it arrived (for Retry-After)

    def json(self) -> Any:
        return jsonlib.loads(self.body)

    def excerpt(self, limit: int = 300) -> str:
        return self.body[:limit].decode("utf-8", "replace")


class HttpClient:
    """Makes requests to PBX and CRM APIs; network trouble comes back as ``Retryable``."""

    def __init__(self, reactor: Any, timeout: float = 10.0, per_host: int = 16,
                 client: Any = None) -> None:
        self.timeout = timeout
        self.clock = reactor
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
            received=self.clock.seconds(),
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


# Retry-After (RFC 9110 §10.2.3) is a CRM asking for a pause.  What the gateway obeys is
# bounded twice: here, to a finite number of seconds no larger than RETRY_AFTER_LIMIT, and by
# the dispatcher, to its Policy.max_retry_after (the operator's bound, 300 s by default).
RETRY_AFTER_LIMIT = 86400.0  # [I] a day: no pause a CRM asks for can matter beyond max-age
RETRY_AFTER_DEFAULT = 60.0  # [I] a header that is present but unreadable: a minute
_DELTA = re.compile(r"[0-9]+(\.[0-9]*)?")  # delta-seconds (a decimal fraction tolerated)


def retry_after(resp: Response, now: float | None = None,
                limit: float = RETRY_AFTER_LIMIT) -> float | None:
    """The pause ``Retry-After`` asks for, in seconds between 0 and ``limit``; None if absent.

    Both RFC 9110 forms: delta-seconds (``120``), and an HTTP-date, read relative to ``now``
    (the client's clock when the answer arrived: ``resp.received`` unless given; a date
    already past is 0).  Anything else (a sign, an exponent, ``inf``, ``nan``, garbage) is
    not a number of seconds the CRM could mean: RETRY_AFTER_DEFAULT.  A huge value is
    ``limit``: the result is always finite.
    """
    value = resp.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    if _DELTA.fullmatch(value):
        # Digits only, so float() cannot be nan or negative; 400 digits are inf: the limit.
        seconds = float(value) if len(value) < 20 else limit
        return min(seconds, limit)
    if now is None:
        now = resp.received if resp.received is not None else time.time()
    try:
        date = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return min(RETRY_AFTER_DEFAULT, limit)
    if date.tzinfo is None:  # asctime() form: HTTP dates are always GMT
        date = date.replace(tzinfo=datetime.timezone.utc)
    seconds = date.timestamp() - now
    if not math.isfinite(seconds):
        return min(RETRY_AFTER_DEFAULT, limit)
    return min(max(0.0, seconds), limit)
