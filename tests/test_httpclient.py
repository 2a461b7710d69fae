"""Issue 9, item 7: the one HTTP client, against a scripted server on loopback.

The network is real (twisted's reactor, 127.0.0.1); the client's deadline and its
``Response.received`` run on an injected Clock, so no assertion depends on how fast the
machine is: a stalled server stays stalled until the test advances the Clock.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredQueue, ensureDeferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from gateway.errors import Permanent, Retryable
from gateway.httpclient import (DONE, MAX_ANSWER, PERMANENT, RETRY, HttpClient, Response,
                                _Body, classify, raise_for, retry_after)

NOW = 1_715_677_267.0  # 2024-05-14 09:01:07 UTC
IN_90_S = "Tue, 14 May 2024 09:02:37 GMT"
CAP = 1000


# The classification, one table for every module

TABLE = [
    (200, DONE), (201, DONE), (202, DONE), (204, DONE), (206, DONE), (299, DONE),
    (408, RETRY),  # Telphin's client had it permanent, Altegio's retryable: retryable
    (425, RETRY), (429, RETRY),
    (500, RETRY), (501, RETRY), (502, RETRY), (503, RETRY), (504, RETRY), (599, RETRY),
    (100, PERMANENT), (199, PERMANENT),
    (300, PERMANENT), (301, PERMANENT), (302, PERMANENT), (304, PERMANENT),
    (307, PERMANENT), (308, PERMANENT),  # redirects are not followed: a URL to fix
    (400, PERMANENT), (401, PERMANENT), (403, PERMANENT), (404, PERMANENT),
    (405, PERMANENT), (409, PERMANENT), (410, PERMANENT), (413, PERMANENT),
    (415, PERMANENT), (422, PERMANENT), (424, PERMANENT), (426, PERMANENT),
    (428, PERMANENT), (431, PERMANENT), (499, PERMANENT),
    (600, PERMANENT), (999, PERMANENT),
]


@pytest.mark.parametrize("status, verdict", TABLE)
def test_classify(status: int, verdict: str) -> None:
    assert classify(status) == verdict


@pytest.mark.parametrize("status, verdict", TABLE)
def test_raise_for_acts_on_the_classification(status: int, verdict: str) -> None:
    resp = Response(status, {"retry-after": "7"}, b"why" * 200, received=NOW)
    if verdict == DONE:
        assert raise_for(resp, "POST http://crm.test/x call") is resp
        return
    expected = Retryable if verdict == RETRY else Permanent
    with pytest.raises(expected) as raised:
        raise_for(resp, "POST http://crm.test/x call")
    error = raised.value
    assert type(error) is expected
    assert error.message == f"POST http://crm.test/x call: HTTP {status}"
    assert error.status == status and error.answer == resp.excerpt()
    assert len(error.answer) == 300
    if verdict == RETRY:
        assert error.retry_after == 7.0


def test_a_retryable_answer_without_retry_after_has_none() -> None:
    with pytest.raises(Retryable) as raised:
        raise_for(Response(503, {}, b"", received=NOW), "GET x")
    assert raised.value.retry_after is None


# A scripted server on loopback


class Conn(Protocol):
    """One server-side connection: waits for a request's head, then lets the test's
    ``answer`` write whatever it likes (or nothing)."""

    factory: Server

    def connectionMade(self) -> None:
        self.head = b""
        self.lost: Deferred[None] = Deferred()
        self.factory.conns.append(self)

    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in self.head:
            return  # a request body, if any, is not needed
        self.head += data
        if b"\r\n\r\n" in self.head:
            self.factory.answer(self)
            self.factory.requests.put(self)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)

    def write(self, data: bytes) -> None:
        self.transport.write(data)


class Server(Factory):
    protocol = Conn

    def __init__(self) -> None:
        self.answer: Callable[[Conn], None] = lambda conn: None  # stall before the headers
        self.requests: DeferredQueue[Conn] = DeferredQueue()
        self.conns: list[Conn] = []
        self.port: Any = None

    def url(self, path: str = "/api") -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}{path}"


@pytest_twisted.async_yield_fixture
async def server() -> Any:
    the_server = Server()
    the_server.port = reactor.listenTCP(0, the_server, interface="127.0.0.1")
    try:
        yield the_server
    finally:
        for conn in the_server.conns:
            conn.transport.abortConnection()
        await the_server.port.stopListening()


class Watch:
    """Wraps the treq client to tell the test when the answer's headers and the first bytes
    of its body reached the client."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.headers: Deferred[None] = Deferred()
        self.body: Deferred[None] = Deferred()

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.request(*args, **kwargs).addCallback(self._answered)

    def _answered(self, resp: Any) -> Any:
        self.headers.callback(None)
        deliver = resp.deliverBody
        watch = self

        class Tee(Protocol):
            def __init__(self, inner: Protocol) -> None:
                self.inner = inner

            def makeConnection(self, transport: Any) -> None:
                self.inner.makeConnection(transport)

            def dataReceived(self, data: bytes) -> None:
                if not watch.body.called:
                    watch.body.callback(None)
                self.inner.dataReceived(data)

            def connectionLost(self, reason: Any) -> None:
                self.inner.connectionLost(reason)

        resp.deliverBody = lambda protocol: deliver(Tee(protocol))
        return resp


@pytest_twisted.async_yield_fixture
async def client() -> Any:
    clock = Clock()
    clock.advance(NOW)
    http = HttpClient(reactor, timeout=10, clock=clock, max_answer=CAP)
    http._client = Watch(http._client)
    try:
        yield http
    finally:
        await http.close()


def head(status: str = "200 OK", *lines: str) -> bytes:
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{line}\r\n" for line in lines)
            + "\r\n").encode()


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


def call(http: HttpClient, **kwargs: Any) -> Deferred[Response]:
    url = kwargs.pop("url")
    return ensureDeferred(http.request("GET", url, **kwargs))


async def failure(d: Deferred[Any]) -> BaseException:
    try:
        await d
    except Exception as e:
        return e
    raise AssertionError("the request succeeded")


# One deadline for the whole exchange


@pytest_twisted.ensureDeferred
async def test_a_server_that_stalls_mid_body_gets_no_more_than_the_deadline(
        server: Server, client: HttpClient) -> None:
    server.answer = lambda conn: conn.write(head("200 OK", "Content-Length: 100") + b"x" * 50)
    d = call(client, url=server.url())
    conn = await server.requests.get()
    await client._client.body  # the headers and half the body have arrived
    client.clock.advance(9.99)
    assert not d.called  # still within the deadline: waiting for the rest
    client.clock.advance(0.01)
    assert d.called  # at the deadline, not a turn of the reactor later
    error = await failure(d)
    assert isinstance(error, Retryable)
    assert str(error) == f"GET {server.url()}: no answer in 10 s"
    await conn.lost  # the connection is dropped, not left to the stalled server
    assert client.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_server_that_stalls_before_the_headers_gets_no_more_than_the_deadline(
        server: Server, client: HttpClient) -> None:
    d = call(client, url=server.url("/api?key=SECRET"))
    conn = await server.requests.get()
    client.clock.advance(9.99)
    assert not d.called
    client.clock.advance(0.01)
    assert d.called  # at the deadline, not a turn of the reactor later
    error = await failure(d)
    assert isinstance(error, Retryable) and error.status is None
    assert str(error) == f"GET {server.url()}: no answer in 10 s"  # the query is not logged
    await conn.lost
    assert not client._client.headers.called


@pytest.mark.parametrize("timeout", [1, 30])
@pytest_twisted.ensureDeferred
async def test_the_deadline_can_be_set_per_call(
        server: Server, client: HttpClient, timeout: float) -> None:
    d = call(client, url=server.url(), timeout=timeout)
    conn = await server.requests.get()
    client.clock.advance(timeout - 0.01)
    assert not d.called
    client.clock.advance(0.01)
    assert d.called  # at the deadline, not a turn of the reactor later
    error = await failure(d)
    assert isinstance(error, Retryable) and f"no answer in {timeout} s" in str(error)
    await conn.lost
    assert client.timeout == 10  # the client's own deadline is unchanged


@pytest_twisted.ensureDeferred
async def test_an_answer_in_time_leaves_no_timer_and_carries_the_clocks_time(
        server: Server, client: HttpClient) -> None:
    server.answer = lambda conn: conn.write(
        head("201 Created", "Content-Length: 2", "X-Thing: A") + b"{}")
    client.clock.advance(5)
    resp = await call(client, url=server.url(), params={"q": "1"})
    assert (resp.status, resp.body, resp.json()) == (201, b"{}", {})
    assert resp.headers["x-thing"] == "A"
    assert resp.received == NOW + 5
    assert client.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_the_callers_cancellation_is_not_a_remote_failure(
        server: Server, client: HttpClient) -> None:
    d = call(client, url=server.url())
    conn = await server.requests.get()
    d.cancel()
    assert d.called
    assert isinstance(await failure(d), CancelledError)
    await conn.lost
    assert client.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_is_retryable(server: Server, client: HttpClient) -> None:
    def answer(conn: Conn) -> None:
        conn.write(head("200 OK", "Content-Length: 100") + b"x" * 50)
        conn.transport.loseConnection()

    server.answer = answer
    error = await failure(call(client, url=server.url()))
    assert isinstance(error, Retryable) and "cut short" in str(error)
    assert error.status == 200


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_is_retryable(client: HttpClient) -> None:
    error = await failure(call(client, url="http://127.0.0.1:9/api"))
    assert isinstance(error, Retryable) and "ConnectionRefusedError" in str(error)


# The cap on the answer


FRAMINGS = {
    "length": lambda status, body, *extra: head(status, f"Content-Length: {len(body)}",
                                                *extra) + body,
    "chunked": lambda status, body, *extra: head(status, "Transfer-Encoding: chunked",
                                                 *extra) + chunked(body),
    "close": lambda status, body, *extra: head(status, "Connection: close", *extra) + body,
}


@pytest.mark.parametrize("framing", sorted(FRAMINGS))
@pytest_twisted.ensureDeferred
async def test_an_answer_of_exactly_the_cap_is_read(
        server: Server, client: HttpClient, framing: str) -> None:
    def answer(conn: Conn) -> None:
        conn.write(FRAMINGS[framing]("200 OK", b"y" * CAP))
        if framing == "close":
            conn.transport.loseConnection()

    server.answer = answer
    resp = await call(client, url=server.url())
    assert resp.status == 200 and resp.body == b"y" * CAP


@pytest.mark.parametrize("framing", ["chunked", "close"])
@pytest_twisted.ensureDeferred
async def test_an_answer_over_the_cap_stops_the_read(
        server: Server, client: HttpClient, framing: str) -> None:
    # One byte over, and the server then holds the connection open: only the client's
    # stopping the read ends it; the Clock never moves, so it is not the deadline.
    body = FRAMINGS[framing]("503 Service Unavailable", b"z" * (CAP + 1), "Retry-After: 30")
    server.answer = lambda conn: conn.write(body[:-5] if framing == "chunked" else body)
    error = await failure(call(client, url=server.url()))
    assert isinstance(error, Retryable)
    assert "over the 1000-byte limit" in str(error)
    assert error.status == 503 and error.retry_after == 30.0 and error.answer == ""
    conn = await server.requests.get()
    await conn.lost
    assert client.clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_a_content_length_over_the_cap_fails_before_the_body_is_read(
        server: Server, client: HttpClient) -> None:
    server.answer = lambda conn: conn.write(head("200 OK", f"Content-Length: {CAP + 1}"))
    error = await failure(call(client, url=server.url()))  # no byte of the body was sent
    assert isinstance(error, Retryable)
    assert f"an answer of {CAP + 1} bytes" in str(error) and "1000-byte limit" in str(error)
    await (await server.requests.get()).lost


def test_the_reader_keeps_nothing_past_the_cap_and_stops_the_transport() -> None:
    reader = _Body(CAP, UNKNOWN_LENGTH)
    transport = StringTransport()
    reader.makeConnection(transport)
    reader.dataReceived(b"a" * 600)
    assert reader.parts == [b"a" * 600] and not reader.done.called
    reader.dataReceived(b"b" * 401)
    assert transport.producerState == "stopped"
    assert reader.parts == [] and reader.done.called
    reader.dataReceived(b"c" * 10**6)  # whatever is still in flight is dropped
    reader.connectionLost(Failure(ResponseDone()))
    assert reader.parts == []
    errors: list[Failure] = []
    reader.done.addErrback(errors.append)
    assert "1001" in str(errors[0].value.args)


def test_the_reader_refuses_a_long_content_length_at_once() -> None:
    reader = _Body(CAP, CAP + 1)
    transport = StringTransport()
    reader.makeConnection(transport)
    assert transport.producerState == "stopped" and reader.done.called
    reader.done.addErrback(lambda f: None)


def test_the_default_cap_is_a_mebibyte() -> None:
    assert MAX_ANSWER == 1 << 20
    assert HttpClient(reactor, client=object()).max_answer == MAX_ANSWER


# Retry-After through a real request


@pytest_twisted.ensureDeferred
async def test_retry_after_as_an_http_date_is_read_against_the_clients_clock(
        server: Server, client: HttpClient) -> None:
    server.answer = lambda conn: conn.write(FRAMINGS["length"](
        "503 Service Unavailable", b"later", f"Retry-After: {IN_90_S}"))
    resp = await call(client, url=server.url())
    assert resp.received == NOW
    assert retry_after(resp) == pytest.approx(90.0)
    with pytest.raises(Retryable) as raised:
        raise_for(resp, "GET /api")
    assert raised.value.retry_after == pytest.approx(90.0)
    assert (raised.value.status, raised.value.answer) == (503, "later")


@pytest_twisted.ensureDeferred
async def test_retry_after_in_seconds_through_a_real_request(
        server: Server, client: HttpClient) -> None:
    server.answer = lambda conn: conn.write(FRAMINGS["chunked"](
        "429 Too Many Requests", b"{}", "Retry-After: 120"))
    with pytest.raises(Retryable) as raised:
        raise_for(await call(client, url=server.url()), "GET /api")
    assert raised.value.status == 429 and raised.value.retry_after == 120.0


@pytest_twisted.ensureDeferred
async def test_a_redirect_is_the_answer_not_followed(server: Server,
                                                     client: HttpClient) -> None:
    # A wrong host name (MegaFon's ATS) answers 301: that is what the module must see.
    def answer(conn: Conn) -> None:
        conn.write(head("301 Moved Permanently", f"Location: {server.url('/elsewhere')}",
                        "Content-Length: 0"))

    server.answer = answer
    resp = await call(client, url=server.url())
    assert resp.status == 301
    assert len(server.conns) == 1 and b"/elsewhere" not in server.conns[0].head
