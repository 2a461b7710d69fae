"""Limits before buffering (issue 8, cases 5 and 8): what ``gateway.web.site()`` does to a
request before any resource sees it.

Most tests drive a site's connection through ``twisted.internet.testing`` transports and a
``task.Clock``, so deadlines are tested without sleeping; the per-source cap and one huge
``Content-Length`` also run through a real site on loopback.
"""

from __future__ import annotations

import io
import socket
import tempfile
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gateway import web
from gateway.web import site


class Recorder(Resource):
    """Answers ``ok`` and records what it was given; with ``hold`` it answers later."""

    isLeaf = True

    def __init__(self, hold: bool = False) -> None:
        super().__init__()
        self.hold = hold
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        self.pending: list[Any] = []

    def render(self, request: Any) -> Any:
        body = request.content.read() if request.content is not None else b""
        self.seen.append((request.method, request.uri, body))
        if self.hold:
            self.pending.append(request)
            return NOT_DONE_YET
        return b"ok"


class Conn:
    """One connection to a site, driven by hand."""

    def __init__(self, the_site: Any, host: str = "10.0.0.1", port: int = 40000) -> None:
        addr = IPv4Address("TCP", host, port)
        self.proto = the_site.buildProtocol(addr)
        self.transport = StringTransport(peerAddress=addr)
        self.proto.makeConnection(self.transport)

    @property
    def channel(self) -> Any:
        return self.proto._channel

    def send(self, data: bytes) -> "Conn":
        self.proto.dataReceived(data)
        return self

    def answer(self) -> bytes:
        return self.transport.value()

    def status(self) -> int | None:
        head = self.answer().split(b"\r\n", 1)[0]
        return int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else None

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)

    def close(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))


def make(resource: Any = None, clock: Clock | None = None, **limits: Any) -> tuple[Any, Any]:
    resource = resource if resource is not None else Recorder()
    the_site = site(resource, reactor=clock or Clock(), **limits)
    log = io.StringIO()
    the_site.logFile = log  # the access log, without starting the factory
    the_site._logDateTime = "[-]"
    return the_site, resource


@pytest.fixture
def no_temp_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if twisted.web spools a body to a temporary file."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a request body was spooled to a temporary file")
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)


HEAD = b"POST /events/807/dial-in/TLP55522?key=SECRET HTTP/1.1\r\nHost: gw\r\n"


# The body limit


def test_a_content_length_over_the_limit_is_413_before_the_body_is_read(
        no_temp_files: None) -> None:
    the_site, resource = make(max_body=1024)
    bodies: list[Any] = []
    the_site.getContentFile = lambda length: bodies.append(io.BytesIO()) or bodies[-1]
    conn = Conn(the_site)
    conn.send(HEAD + b"Content-Length: 1000000000\r\n\r\n")
    assert conn.status() == 413
    assert b"larger than 1024 bytes" in conn.answer()
    assert conn.closing
    # No body file was even made, the body that follows is never read into one, and the
    # resource never runs.
    conn.send(b"x" * 100_000)
    assert bodies == []
    assert resource.seen == []
    assert conn.channel.requests == []
    assert the_site.logFile.getvalue().count(" 413 ") == 1


def test_expect_100_continue_over_the_limit_gets_413_not_100(no_temp_files: None) -> None:
    the_site, resource = make(max_body=1024)
    conn = Conn(the_site).send(HEAD + b"Expect: 100-continue\r\nContent-Length: 5000\r\n\r\n")
    assert conn.answer().startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in conn.answer()


def test_a_body_of_exactly_the_limit_is_read_in_memory(no_temp_files: None) -> None:
    # 200 kB: above the 100 kB twisted.web would spool to a temporary file.
    limit = 200_000
    the_site, resource = make(max_body=limit)
    conn = Conn(the_site).send(HEAD + b"Content-Length: %d\r\n\r\n" % limit)
    for _ in range(limit // 10_000):
        conn.send(b"y" * 10_000)
    assert conn.status() == 200
    assert resource.seen[0][2] == b"y" * limit


class Body(io.BytesIO):
    """A request body that remembers how much was ever written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0

    def write(self, data: Any) -> int:
        self.written += len(data)
        return super().write(data)


def test_a_chunked_body_is_cut_off_as_soon_as_it_passes_the_limit(no_temp_files: None) -> None:
    the_site, resource = make(max_body=1000)
    body = Body()
    the_site.getContentFile = lambda length: body
    conn = Conn(the_site).send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    conn.send(b"200\r\n" + b"a" * 0x200 + b"\r\n")  # 512: under the limit
    assert conn.answer() == b""
    assert body.written == 512
    conn.send(b"200\r\n" + b"b" * 0x200 + b"\r\n")  # 1024: over it
    assert conn.status() == 413
    assert conn.closing
    assert body.written == 512  # the chunk that passed the limit was not kept
    # What was already on its way, including the terminal chunk, is dropped unread.
    conn.send(b"200\r\n" + b"c" * 0x200 + b"\r\n0\r\n\r\n")
    assert resource.seen == []
    assert body.written == 512
    assert conn.answer().count(b"HTTP/1.1") == 1


def test_a_chunked_body_in_one_packet_is_cut_off_too(no_temp_files: None) -> None:
    the_site, resource = make(max_body=1000)
    conn = Conn(the_site).send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                               + (b"100\r\n" + b"z" * 0x100 + b"\r\n") * 8 + b"0\r\n\r\n")
    assert conn.status() == 413
    assert resource.seen == []


def test_a_chunked_body_under_the_limit_is_read() -> None:
    the_site, resource = make(max_body=1000)
    conn = Conn(the_site).send(HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
                               + b"3\r\nabc\r\n0\r\n\r\n")
    assert conn.status() == 200
    assert resource.seen[0][2] == b"abc"


def test_the_default_limit_is_the_admin_sites_one_mib() -> None:
    the_site = site(Recorder())
    assert the_site.max_body == web.ADMIN_MAX_BODY == 1024 * 1024
    assert the_site.deadline == web.REQUEST_DEADLINE
    assert the_site.max_per_source == web.MAX_PER_SOURCE


# The deadline


def test_a_slowloris_is_cut_off_at_the_deadline() -> None:
    """One byte every 25 s keeps twisted.web's idle timeout (60 s) from ever firing; the
    request's deadline (30 s from its first byte) does not care."""
    clock = Clock()
    the_site, resource = make(clock=clock, deadline=30)
    conn = Conn(the_site)
    conn.send(b"G")
    for byte in b"ET / HTTP/1.1\r\nX":
        clock.advance(25)
        if conn.closing:
            break
        conn.send(bytes([byte]))
    assert conn.status() == 408
    assert conn.closing
    assert clock.seconds() <= 50
    assert resource.seen == []


def test_a_slow_header_section_gets_408_and_is_logged() -> None:
    clock = Clock()
    the_site, resource = make(clock=clock, deadline=30)
    conn = Conn(the_site).send(b"GET /x?token=T0KEN HTTP/1.1\r\nHost: gw\r\n")
    clock.advance(29.9)
    assert conn.answer() == b""
    clock.advance(0.2)
    assert conn.status() == 408
    line = the_site.logFile.getvalue()
    assert " 408 " in line and "token=***" in line and "T0KEN" not in line


def test_a_slow_body_gets_408() -> None:
    clock = Clock()
    the_site, resource = make(clock=clock, deadline=30)
    conn = Conn(the_site).send(HEAD + b"Content-Length: 100\r\n\r\n")
    for _ in range(10):
        clock.advance(4)
        conn.send(b"0123456789"[: 1])
    clock.advance(10)
    assert conn.status() == 408
    assert resource.seen == []


def test_the_deadline_does_not_cut_off_a_request_being_answered() -> None:
    clock = Clock()
    resource = Recorder(hold=True)
    the_site, _ = make(resource, clock=clock, deadline=30)
    conn = Conn(the_site).send(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
    clock.advance(100)  # the gateway takes its time (a store commit, say)
    assert not conn.closing
    request = resource.pending.pop()
    request.write(b"done")
    request.finish()
    assert conn.status() == 200
    # The next request on the same connection has a deadline of its own.
    conn.transport.clear()
    resource.hold = False
    conn.send(b"GET /next HTTP/1.1\r\n")
    clock.advance(31)
    assert conn.status() == 408


def test_an_idle_keep_alive_connection_is_left_to_the_idle_timeout() -> None:
    clock = Clock()
    the_site, resource = make(clock=clock, deadline=30)
    conn = Conn(the_site).send(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert conn.status() == 200
    conn.transport.clear()
    clock.advance(45)  # between requests: no deadline, the 60 s idle timeout
    assert not conn.closing
    clock.advance(20)
    assert conn.closing and conn.answer() == b""


def test_a_request_line_that_never_ends_gets_408_from_the_channel() -> None:
    clock = Clock()
    the_site, resource = make(clock=clock, deadline=5)
    conn = Conn(the_site).send(b"GET /events/807?key=S3CRET")
    clock.advance(5)
    assert conn.status() == 408
    assert conn.closing


def test_a_client_that_does_not_read_its_refusal_is_aborted() -> None:
    clock = Clock()
    the_site, resource = make(clock=clock, deadline=5)
    conn = Conn(the_site).send(b"GET / HTTP/1.1\r\n")
    clock.advance(5)
    assert conn.status() == 408
    assert not conn.transport.disconnected
    clock.advance(conn.channel.abortTimeout)
    assert conn.transport.disconnected  # abortConnection


# Request line and headers


def test_a_request_line_over_the_limit_is_414() -> None:
    the_site, resource = make()
    conn = Conn(the_site).send(b"GET /" + b"a" * web.MAX_LINE + b" HTTP/1.1\r\n")
    assert conn.status() == 414
    assert conn.closing
    assert resource.seen == []


def test_a_request_line_over_the_limit_is_414_before_its_end_arrives() -> None:
    the_site, resource = make()
    conn = Conn(the_site).send(b"GET /?" + b"a" * (web.MAX_LINE + 10))
    assert conn.status() == 414


def test_a_request_line_at_the_limit_is_served() -> None:
    the_site, resource = make()
    start = b"GET /"
    end = b" HTTP/1.1"
    line = start + b"a" * (web.MAX_LINE - len(start) - len(end)) + end
    conn = Conn(the_site).send(line + b"\r\nHost: gw\r\n\r\n")
    assert conn.status() == 200


def test_a_header_line_over_the_limit_is_431() -> None:
    the_site, resource = make()
    conn = Conn(the_site).send(b"GET /?key=K HTTP/1.1\r\nX-Big: " + b"b" * web.MAX_LINE
                               + b"\r\n\r\n")
    assert conn.status() == 431
    assert b"Request Header Fields Too Large" in conn.answer().split(b"\r\n")[0]
    assert resource.seen == []
    assert "key=***" in the_site.logFile.getvalue()


def test_headers_over_the_total_limit_are_431() -> None:
    the_site, resource = make()
    conn = Conn(the_site).send(b"GET / HTTP/1.1\r\n")
    for i in range(web.MAX_HEADERS_SIZE // 4000 + 1):
        conn.send(b"X-H%d: " % i + b"h" * 4000 + b"\r\n")
    assert conn.status() == 431
    assert resource.seen == []


def test_too_many_header_fields_are_431() -> None:
    the_site, resource = make()
    conn = Conn(the_site).send(b"GET / HTTP/1.1\r\n"
                               + b"".join(b"X-%d: 1\r\n" % i
                                          for i in range(web.MAX_HEADER_COUNT + 1))
                               + b"\r\n")
    assert conn.status() == 431
    assert resource.seen == []


def test_a_malformed_request_is_still_twisteds_400() -> None:
    the_site, resource = make()
    conn = Conn(the_site).send(HEAD + b"Content-Length: nope\r\n\r\n")
    assert conn.status() == 400


# Connections per source


def test_one_source_cannot_take_every_connection() -> None:
    the_site, resource = make(max_per_source=2)
    hogs = [Conn(the_site, "10.0.0.1", 40000 + i) for i in range(2)]
    for hog in hogs:
        hog.send(b"GET / HTTP/1.1\r\nX-Slow: ")  # and never finishes
    third = Conn(the_site, "10.0.0.1", 40002)
    assert third.answer().startswith(b"HTTP/1.1 503 ")
    assert third.closing
    # Another source is served.
    other = Conn(the_site, "10.0.0.2").send(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert other.status() == 200
    # A connection that closes gives its place back.
    hogs[0].close()
    again = Conn(the_site, "10.0.0.1", 40003).send(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert again.status() == 200
    assert the_site.sources == {"10.0.0.1": 2, "10.0.0.2": 1}
    for conn in (hogs[1], other, again):
        conn.close()
    assert the_site.sources == {}


def test_no_cap_when_max_per_source_is_0() -> None:
    the_site, resource = make(max_per_source=0)
    conns = [Conn(the_site, "10.0.0.1", 40000 + i) for i in range(300)]
    assert all(c.answer() == b"" and not c.closing for c in conns)


class _Hold(Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.data += data

    def connectionLost(self, reason: Any) -> None:
        if not self.factory.lost.called:
            self.factory.lost.callback(self.factory.data)


class _HoldFactory(ClientFactory):
    protocol = _Hold

    def __init__(self) -> None:
        self.made: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self.data = b""


@pytest_twisted.ensureDeferred
async def test_on_loopback_a_hogging_address_does_not_stop_another() -> None:
    """127.0.0.2 holds its three connections and gets 503 for a fourth; 127.0.0.1 is served."""
    the_site = site(Recorder(), max_per_source=3)
    port = reactor.listenTCP(0, the_site, interface="127.0.0.1")
    number = port.getHost().port
    held = []
    try:
        for _ in range(3):
            factory = _HoldFactory()
            reactor.connectTCP("127.0.0.1", number, factory, bindAddress=("127.0.0.2", 0))
            held.append(await factory.made)
            held[-1].transport.write(b"GET / HTTP/1.1\r\nX-Slow: ")
        factory = _HoldFactory()
        reactor.connectTCP("127.0.0.1", number, factory, bindAddress=("127.0.0.2", 0))
        answer = await factory.lost
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        factory = _HoldFactory()
        reactor.connectTCP("127.0.0.1", number, factory)
        proto = await factory.made
        proto.transport.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        answer = await factory.lost
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        for proto in held:
            proto.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_on_loopback_a_huge_content_length_is_413_without_sending_the_body() -> None:
    the_site = site(Recorder(), max_body=65536)
    port = reactor.listenTCP(0, the_site, interface="127.0.0.1")
    try:
        factory = _HoldFactory()
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        proto = await factory.made
        proto.transport.write(HEAD + b"Content-Length: 1073741824\r\n\r\n")
        answer = await factory.lost  # answered and closed, no byte of the body sent
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        assert b"Connection: close" in answer
    finally:
        await port.stopListening()


def test_loopback_has_a_second_address() -> None:
    """The loopback test above binds 127.0.0.2 (Linux routes all of 127/8 to lo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.2", 0))


def test_twisted_still_has_what_the_channel_overrides() -> None:
    """The channel relies on these twisted.web internals; a Twisted upgrade that renames
    them must fail here rather than silently drop a limit."""
    channel = http.HTTPChannel()
    for name in ("_handlingRequest", "_receivedHeaderSize", "_receivedHeaderCount",
                 "_abortingCall", "allHeadersReceived", "allContentReceived",
                 "headerReceived", "lineLengthExceeded", "forceAbortClient"):
        assert hasattr(channel, name), name
    assert hasattr(http, "_GenericHTTPChannelProtocol")
