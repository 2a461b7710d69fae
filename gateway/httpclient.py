"""The one HTTP client: pooled keep-alive connections, one deadline for the whole exchange,
a cap on the answer's size, one classification of answers, errors as values, redaction."""

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
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, ConnectionLost, DNSLookupError
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (Agent, HTTPConnectionPool, PotentialDataLoss, ResponseDone,
                                ResponseFailed, ResponseNeverReceived)
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.errors import Permanent, Retryable

log = Logger()

REDACTED_HEADERS = {b"authorization", b"cookie"}
MAX_ANSWER = 1 << 20  # [I] 1 MiB: a CRM or PBX API answer is a few kB of JSON

# What an answer's status means for the request that got it (``classify``).
DONE, RETRY, PERMANENT = "done", "retry", "permanent"
# 408 Request Timeout, 425 Too Early and 429 Too Many Requests say "not now", not "never";
# every 5xx is the server's own trouble.  Everything else that is not 2xx is for good: a 4xx
# is the request's fault, and a 3xx is a redirect the client does not follow (an API that
# moved is a configuration to fix, not a wait).
RETRY_STATUSES = frozenset({408, 425, 429})


def classify(status: int) -> str:
    """``DONE`` for 2xx, ``RETRY`` for 408, 425, 429 and 5xx, ``PERMANENT`` for the rest."""
    if 200 <= status < 300:
        return DONE
    if status in RETRY_STATUSES or 500 <= status < 600:
        return RETRY
    return PERMANENT


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


def raise_for(resp: Response, summary: str) -> Response:
    """``resp`` if its status is done (2xx); else raises what ``classify`` says it is.

    ``Retryable`` carries the status, an excerpt of the answer and its ``Retry-After``;
    ``Permanent`` the status and the excerpt.  ``summary`` says which request it was
    (method, URL without its query, what it did) and starts the message.
    """
    verdict = classify(resp.status)
    if verdict == DONE:
        return resp
    message = f"{summary}: HTTP {resp.status}"
    if verdict == RETRY:
        raise Retryable(message, resp.status, resp.excerpt(), retry_after(resp))
    raise Permanent(message, resp.status, resp.excerpt())


class _TooLarge(Exception):
    """The answer's body is longer than the client's ``max_answer``."""


class _CutShort(Exception):
    """The connection ended before the whole body arrived."""


class _Body(Protocol):
    """Collects a response body up to ``limit`` bytes.

    One byte more and it stops the read (the connection is closed, never returned to the
    pool) and fails with ``_TooLarge``, keeping nothing beyond the limit; a ``Content-Length``
    over the limit fails before the body is read.  Cancelling ``done`` stops the read too.
    """

    def __init__(self, limit: int, length: Any) -> None:
        self.limit = limit
        self.length = length
        self.size = 0
        self.parts: list[bytes] = []
        self.stopped = False
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        if self.length is not UNKNOWN_LENGTH and self.length > self.limit:
            self._stop(_TooLarge(self.length))

    def dataReceived(self, data: bytes) -> None:
        if self.stopped:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._stop(_TooLarge(self.size))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.stopped:
            return
        self.stopped = True
        if reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: a body delimited by the connection's close (no length).
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(_CutShort(_name(reason.value)))

    def _stop(self, error: Exception | None = None) -> None:
        """Stop reading and drop the connection; then fail with ``error`` (when cancelled:
        none, the Deferred fails with CancelledError)."""
        self.stopped = True
        self.parts = []
        if self.transport is not None:
            self.transport.stopProducing()
        if error is not None:
            self.done.errback(error)


def _name(error: BaseException) -> str:
    """The exception's class name; for a wrapper (ResponseFailed), also what it wraps."""
    inner = getattr(error, "reasons", None)
    if inner:
        return f"{type(error).__name__}({', '.join(type(r.value).__name__ for r in inner)})"
    return type(error).__name__


class HttpClient:
    """Makes requests to PBX and CRM APIs; network trouble comes back as ``Retryable``.

    One deadline covers a whole exchange (connecting, sending, the status line and headers,
    the whole body): ``timeout`` seconds by default, ``timeout=`` per call.  When it passes,
    the request or the body read is cancelled and the connection dropped, so a server that
    stalls mid-body holds no in-flight slot beyond it.  The deadline runs on ``clock`` (the
    reactor unless given); ``Response.received`` is read from the same clock.
    """

    def __init__(self, reactor: Any, timeout: float = 10.0, per_host: int = 16,
                 client: Any = None, *, max_answer: int = MAX_ANSWER,
                 clock: Any = None) -> None:
        self.timeout = timeout
        self.max_answer = max_answer
        self.clock = reactor if clock is None else clock
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
                      headers: dict[str, str] | None = None,
                      params: Any = None, timeout: float | None = None) -> Response:
        """The whole answer, whatever its status (see ``raise_for``); ``Retryable`` when
        there is none: no connection, no whole answer within the deadline, a connection
        lost, an answer over ``max_answer`` bytes."""
        deadline = self.timeout if timeout is None else timeout
        kwargs: dict[str, Any] = {"headers": headers or {}, "unbuffered": True}
        if json is not None:
            kwargs["json"] = json
        if data is not None:
            kwargs["data"] = data
        if params is not None:
            kwargs["params"] = params
        exchange = Deferred.fromCoroutine(self._exchange(method, url, kwargs))
        stopped: list[str] = []  # why the exchange was cancelled, if it was

        def stop(why: str) -> None:
            stopped.append(why)
            exchange.cancel()

        timer = self.clock.callLater(deadline, stop, "deadline")
        outcome: Deferred[Response] = Deferred(lambda _: stop("caller"))
        exchange.chainDeferred(outcome)
        try:
            answer = await outcome
        except Exception:
            # Whatever the cancelled request or read failed with (treq reports a cancelled
            # request as ResponseNeverReceived), it is the deadline, or the caller's own
            # cancellation: that goes up as CancelledError, not as the remote's failure.
            if stopped and stopped[0] == "deadline":
                raise Retryable(
                    f"{method} {_safe(url)}: no answer in {deadline:g} s") from None
            if stopped:
                raise CancelledError() from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        log.debug("{method} {url} → {status}", method=method, url=_safe(url),
                  status=answer.status)
        return answer

    async def _exchange(self, method: str, url: str, kwargs: dict[str, Any]) -> Response:
        try:
            # treq follows redirects unless told not to; a 3xx is the CRM's or PBX's
            # answer (a wrong host name, say), classified like any other.
            resp = await self._client.request(method, url, allow_redirects=False, **kwargs)
        except (ConnectError, DNSLookupError, ConnectionLost, ResponseFailed,
                ResponseNeverReceived, TimeoutError) as e:
            raise Retryable(f"{method} {_safe(url)}: {type(e).__name__}") from None
        headers = {k.decode().lower(): v[-1].decode("latin-1")
                   for k, v in resp.headers.getAllRawHeaders()}
        if resp.length == 0:
            body = b""
        else:
            reader = _Body(self.max_answer, resp.length)
            resp.deliverBody(reader)
            try:
                body = await reader.done
            except _TooLarge as e:
                # Retryable, not Permanent: an answer this size is no API's JSON but most
                # likely a proxy's or a server's error page in the way, which passes; and
                # what it meant is unknown, since it is not read.  Its status and
                # Retry-After are kept.  A CRM that always answers so stops being retried at
                # the dispatcher's max-age, as for any other retryable failure.
                raise Retryable(
                    f"{method} {_safe(url)}: HTTP {resp.code}, an answer of {e.args[0]} bytes"
                    f" or more, over the {self.max_answer}-byte limit", resp.code, "",
                    retry_after(Response(resp.code, headers, b"", self.clock.seconds()))
                ) from None
            except _CutShort as e:
                raise Retryable(f"{method} {_safe(url)}: HTTP {resp.code}, the answer cut"
                                f" short: {e.args[0]}", resp.code) from None
        return Response(status=resp.code, headers=headers, body=body,
                        received=self.clock.seconds())

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
