"""The two sites: public (PBXs and CRMs call it) and admin (operators).

Both are served by :func:`site`, which puts limits on every connection before a byte of a
request reaches a resource:

- a body is never larger than the site's ``max_body``: a ``Content-Length`` above it is
  answered ``413`` before the body is read, a chunked body is cut off (``413``) the moment it
  passes it, and bodies are kept in memory, never spooled to a temporary file;
- a request's line, headers and body must arrive within ``deadline`` seconds of its first
  byte (``408`` after), however slowly the bytes trickle in;
- one source address holds at most ``max_per_source`` connections (``503`` for more), so a
  client that hogs connections does not starve the others;
- the request line is at most :data:`MAX_LINE` bytes (``414``), a header line at most
  :data:`MAX_LINE` bytes, all headers together at most :data:`MAX_HEADERS_SIZE` bytes and
  :data:`MAX_HEADER_COUNT` fields (``431``).

And one function, :func:`mask`, hides secrets (``key=``, ``token=``, ``client_secret=`` …,
whatever their case or percent-encoding) in what is logged about a request: the access log,
a request's ``repr`` (which twisted.web puts in its own log lines), and the gateway's own
lines (:func:`loggable_uri`).
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from typing import Any, AnyStr
from urllib.parse import unquote_to_bytes

from twisted.internet import address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.http import combinedLogFormatter
from twisted.web.iweb import IRequest

log = Logger()

# Limits (see the module docstring).  ``site()`` takes the first three per site.
ADMIN_MAX_BODY = 1024 * 1024
REQUEST_DEADLINE = 30.0
MAX_PER_SOURCE = 128  # above the bench's 100 keep-alive connections from one address
MAX_LINE = 8192
MAX_HEADERS_SIZE = 16384
MAX_HEADER_COUNT = 100

# A query parameter whose name (percent-decoded, case-folded) contains one of these is a
# secret: key, token, access_token, crm_token, partner_token, client_secret, password, ...
SECRET_WORDS = ("key", "token", "secret", "passw", "pwd", "auth", "sign", "cred", "session")
MASK = b"***"

_SECRET = re.compile("|".join(SECRET_WORDS).encode())  # searched in lowered names
# A ``name=`` further inside a parameter's value, after a character another parser might
# take for a separator (``a=1;key=…``, ``a=1?key=…``).
_INNER = re.compile(rb"[;?/,\s]([^=;?/,\s]*)=")


def json_response(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    # allow_nan=False: an infinite or NaN number is a bug to see (a 500 and a traceback),
    # never an answer no JSON parser reads.
    return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()


# Secrets in logs


def answer(request: Any, status: int, content_type: bytes, body: bytes) -> None:
    """Finish a request answered later (after a store write, a lookup, a CRM request),
    unless the client has gone meanwhile."""
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    request.write(body)
    request.finish()


def same_origin(request: Any) -> bool:
    """A browser's ``Origin`` (when it sends one) names this site: the CSRF check the
    gateway's own pages add to their form tokens."""
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    host = request.getHeader(b"host") or b""
    return origin.split(b"://", 1)[-1] == host


def _is_secret(name: bytes) -> bool:
    if b"%" in name or b"+" in name:
        # However many times it was percent-encoded (a parser decodes once; be generous).
        for _ in range(4):
            decoded = unquote_to_bytes(name.replace(b"+", b" "))
            if decoded == name:
                break
            name = decoded
    if name.isascii():
        name = name.lower()
    else:
        name = name.decode("utf-8", "replace").casefold().encode("utf-8", "replace")
    return _SECRET.search(name) is not None


def _mask_part(part: bytes) -> bytes:
    """One ``&``-separated part of a query: from the first secret ``name=`` on, masked."""
    name, eq, value = part.partition(b"=")
    if not eq:
        return part
    if _is_secret(name):
        return name + b"=" + MASK
    if b"=" in value:
        for match in _INNER.finditer(value):
            if _is_secret(match.group(1)):
                return part[:len(name) + 1 + match.end()] + MASK
    return part


def _mask_bytes(uri: bytes) -> bytes:
    path, sep, query = uri.partition(b"?")
    if not sep or b"=" not in query:
        return uri
    parts = query.split(b"&")
    changed = False
    for i, part in enumerate(parts):
        masked = _mask_part(part)
        if masked is not part:
            parts[i] = masked
            changed = True
    return path + b"?" + b"&".join(parts) if changed else uri


def mask(uri: AnyStr) -> AnyStr:
    """``uri`` (a request target, a Referer; bytes or str) with the value of every query
    parameter named like a secret replaced by ``***``.

    A name is a secret when, percent-decoded (repeatedly) and case-folded, it contains one of
    :data:`SECRET_WORDS`: ``?key=``, ``?%6bey=``, ``?KEY=``, ``?access_token=``,
    ``?client_secret=``, ``?Password=`` ...  A value runs to the next ``&`` (as every query
    parser reads it), and a secret name hidden after ``;``, ``?``, ``/`` or ``,`` inside
    another parameter's value masks the rest of that value too.
    """
    if isinstance(uri, str):
        return _mask_bytes(uri.encode("utf-8", "surrogateescape")).decode(
            "utf-8", "surrogateescape")
    return _mask_bytes(uri)


def _printable(data: bytes | str) -> str:
    """Text safe for a log line: non-ASCII and control bytes backslash-escaped."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    text = data.decode("ascii", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def loggable_uri(request: Any, limit: int = 300) -> str:
    """A request's URI as the gateway's own log lines show it: secrets masked, non-ASCII
    escaped, at most ``limit`` characters."""
    text = _printable(mask(getattr(request, "uri", b"") or b""))
    return text if len(text) <= limit else text[:limit] + "..."


class _Line:
    """The beginning of a request line, for :func:`loggable_uri`."""

    def __init__(self, uri: bytes) -> None:
        self.uri = uri


class _Masked:
    """What ``combinedLogFormatter`` reads of a request, with the URI and Referer masked."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.method = request.method
        self.uri = mask(request.uri)
        self.clientproto = request.clientproto
        self.code = request.code
        self.sentLength = request.sentLength

    def getClientAddress(self) -> Any:
        return self._request.getClientAddress()

    def getHeader(self, name: bytes) -> Any:
        value = self._request.getHeader(name)
        return mask(value) if value and name.lower() == b"referer" else value


def access_log(timestamp: str, request: Any) -> str:
    """Combined log format, with secrets in the URI and the Referer masked (:func:`mask`)."""
    return combinedLogFormatter(timestamp, _Masked(request))


# Requests and connections with limits


class Request(server.Request):
    """A request whose ``repr`` (which twisted.web logs, e.g. "Warning: HEAD request
    <Request …>") masks secrets and never fails, whose body is kept in memory and is cut off
    past the site's ``max_body``."""

    _received = 0

    def __repr__(self) -> str:
        return (f"<Request at 0x{id(self):x} method={_printable(self.method)} "
                f"uri={loggable_uri(self, 1000)} clientproto={_printable(self.clientproto)}>")

    def handleContentChunk(self, data: bytes) -> None:
        if self.finished:  # refused already; the rest of the body is dropped
            return
        self._received += len(data)
        limit = self.channel.site.max_body
        if self._received > limit:
            self.channel.refuse(413, f"body: larger than {limit} bytes")
            return
        self.content.write(data)


class Channel(http.HTTPChannel):
    """An HTTP/1.1 connection with the limits of its :class:`Site`."""

    MAX_LENGTH = MAX_LINE
    totalHeadersSize = MAX_HEADERS_SIZE
    maxHeaders = MAX_HEADER_COUNT

    site: "Site"
    source: str | None = None
    refused = False
    _deadline: Any = None

    # The deadline: armed by a request's first byte, cancelled when its body is complete.

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self._deadline is None and data and not self._handlingRequest:
            self._deadline = self.callLater(self.site.deadline, self._too_slow)
        super().dataReceived(data)

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.requests and not self._buffer.strip(b"\r\n"):
            return  # nothing of a request yet (a stray CRLF): the idle timeout's business
        self.refuse(408, f"request not received within {self.site.deadline:g} s",
                    self._buffer)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def allContentReceived(self) -> None:
        if self.refused:  # a chunked body that went on after it was cut off
            return
        self._cancel_deadline()
        super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self.refused:
            super().rawDataReceived(data)

    # The request line and headers

    def lineLengthExceeded(self, line: bytes) -> None:
        # In line mode a request exists once its request line has been parsed.
        if self.requests:
            self.refuse(431, f"header line longer than {self.MAX_LENGTH} bytes")
        else:
            self.refuse(414, f"request line longer than {self.MAX_LENGTH} bytes", line)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web answers 400 to every malformed request, and to these two limits of
        # its own, which it checks just before calling this: they deserve a 431.
        if self.requests and self._receivedHeaderSize > self.totalHeadersSize:
            self.refuse(431, f"headers larger than {self.totalHeadersSize} bytes")
        elif self.requests and self._receivedHeaderCount > self.maxHeaders:
            self.refuse(431, f"more than {self.maxHeaders} header fields")
        else:
            super()._respondToBadRequestAndDisconnect()

    # The body: its declared length checked before a byte of it is read

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > self.site.max_body:
            self.refuse(413, f"body: larger than {self.site.max_body} bytes")
            return
        super().allHeadersReceived()

    # Answering a request that is refused before it reaches a resource

    def refuse(self, status: int, message: str, start: bytes = b"") -> None:
        """Answer ``status`` with ``message`` and close the connection, without reading
        more of the request.  The answer goes to the access log when the request line was
        read (there is a request to log), else to the gateway's log with ``start``, what
        there is of the request line (masked, cut short)."""
        if self.refused or self.transport is None or self.transport.disconnecting:
            return
        self.refused = True
        self._cancel_deadline()
        self.persistent = False
        body = message.encode() + b"\n"
        reason = http.RESPONSES.get(status, b"Request Header Fields Too Large"
                                    if status == 431 else b"Error")
        request = self.requests[-1] if self.requests else None
        if request is not None and not request.startedWriting and not request.finished:
            request.method = getattr(self, "_command", request.method)
            request.uri = getattr(self, "_path", request.uri)
            request.clientproto = getattr(self, "_version", b"HTTP/1.1")
            request.setResponseCode(status, reason)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Content-Length", b"%d" % len(body))
            request.setHeader(b"Connection", b"close")
            request.write(body)
            request.finish()  # logged; closes the connection (not persistent)
        else:
            self.transport.writeSequence([
                b"HTTP/1.1 %d %s\r\n" % (status, reason),
                b"Content-Type: text/plain; charset=utf-8\r\n",
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body])
            begun = loggable_uri(_Line(start.split(b"\r\n", 1)[0]), 200)
            log.info("refused a request from {client}: {status} {message} ({begun})",
                     client=self.source or "?", status=status, message=message,
                     begun=begun or "nothing")
            self.loseConnection()
        # A client that does not read its answer must not hold the connection either.
        if self._abortingCall is None and self.abortTimeout is not None:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)
        if self.source is not None:
            self.site.connection_gone(self.source)
            self.source = None


class _TooMany(Protocol):
    """The answer to a connection over its source's cap: ``503``, then close."""

    def __init__(self, cap: int) -> None:
        self.body = (f"more than {cap} connections from your address; retry later\n").encode()

    def connectionMade(self) -> None:
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                             b"Content-Type: text/plain; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(self.body), self.body))
        self.transport.loseConnection()


class Site(server.Site):
    """A ``Site`` whose connections are :class:`Channel` and requests :class:`Request`,
    with the limits they enforce."""

    requestFactory = Request

    def __init__(self, resource: Any, max_body: int, deadline: float, max_per_source: int,
                 **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        self.max_body = max_body
        self.deadline = deadline
        self.max_per_source = max_per_source
        self.sources: dict[str, int] = {}
        self._capped: set[str] = set()

    def protocol(self) -> Any:  # what HTTPFactory.protocol builds, with our channel
        return http._GenericHTTPChannelProtocol(Channel())

    def getContentFile(self, length: int | None) -> BytesIO:
        # Bounded by max_body, so memory; twisted.web would spool >100 kB to a temp file.
        return BytesIO()

    def buildProtocol(self, addr: Any) -> Any:
        source = (addr.host if isinstance(addr, (address.IPv4Address, address.IPv6Address))
                  else None)
        if source is not None and self.max_per_source:
            if self.sources.get(source, 0) >= self.max_per_source:
                if source not in self._capped:
                    self._capped.add(source)
                    log.warn("{source} holds {cap} connections: refusing more (503) until "
                             "some close", source=source, cap=self.max_per_source)
                return _TooMany(self.max_per_source)
        proto = super().buildProtocol(addr)
        if source is not None:
            self.sources[source] = self.sources.get(source, 0) + 1
            proto._channel.source = source
        return proto

    def connection_gone(self, source: str) -> None:
        left = self.sources.get(source, 0) - 1
        if left > 0:
            self.sources[source] = left
        else:
            self.sources.pop(source, None)
        if left < self.max_per_source:
            self._capped.discard(source)


def site(resource: Any, max_body: int = ADMIN_MAX_BODY, *,
         deadline: float = REQUEST_DEADLINE, max_per_source: int = MAX_PER_SOURCE,
         reactor: Any = None) -> Site:
    """The ``Site`` both sites (and the bench's baselines) are served by.

    ``max_body`` is the largest request body in bytes (the public site: the gateway's
    ``--max-body``; the admin site: :data:`ADMIN_MAX_BODY`); ``deadline`` the seconds a
    client has to send a request's line, headers and body from its first byte;
    ``max_per_source`` the most connections one source address may hold (0: no cap).

    Form bodies are not parsed into ``request.args``: the webhook handler parses them
    itself (strict UTF-8, first value wins), and twisted.web's parse costs more per request
    than the rest of the request line and headers together (its Content-Type check builds
    an ``email`` message).
    """
    kwargs: dict[str, Any] = {} if reactor is None else {"reactor": reactor}
    out = Site(resource, max_body, deadline, max_per_source, logFormatter=access_log,
               parsePOSTFormSubmission=False, **kwargs)
    out.displayTracebacks = False
    return out
