"""Logs without secrets (issue 8, case 4): ``gateway.web.mask`` and everything that logs a
request through it — the access log, a request's ``repr`` in twisted.web's own lines, and
the refusals of the channel.  ``tests/integration/test_daemon_edges.py`` sends the same
cases to the real ``twistd gateway`` and greps its whole log.
"""

from __future__ import annotations

import io
from typing import Any, Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource

from gateway.web import loggable_uri, mask, site
from tests.test_transport import Conn

S = "S3CR3T-value"


@pytest.mark.parametrize("uri", [
    f"/e?key={S}",
    f"/e?%6bey={S}",                      # what public.py reads as the key
    f"/e?%6B%65%79={S}",
    f"/e?%256bey={S}",                    # encoded twice
    f"/e?KEY={S}",
    f"/e?Key={S}&x=1",
    f"/e?x=1&key={S}",
    f"/e?token={S}",
    f"/e?access_token={S}",
    f"/e?crm_token={S}",
    f"/e?partner_token={S}",
    f"/e?client_secret={S}",
    f"/e?password={S}",
    f"/e?Pass%77ord={S}",
    f"/e?api_key={S}",
    f"/e?x=1;key={S}",                    # a parser that splits on ";" would see it
    f"/e?x=1?key={S}",
    f"/e?key={S}%26more",                 # the value runs to the next raw "&"
    f"/e?key={S}\\xa9",                   # non-ASCII (as bytes below)
    f"/e?key=a;b={S}",
    f"/e?ke+y=1&key={S}",
])
def test_mask_hides_every_secret_parameter(uri: str) -> None:
    raw = uri.replace("\\xa9", "\xa9").encode("latin-1")
    masked = mask(raw)
    assert S.encode() not in masked
    assert b"=***" in masked
    assert S not in mask(raw.decode("latin-1"))
    assert S not in loggable_uri(type("R", (), {"uri": raw})())


@pytest.mark.parametrize("uri", [
    b"/events/807/dial-in/TLP55522",
    b"/events/807/dial-in/TLP55522?CallID=abc&CallerIDNum=%2B79161234567&EventTime=1",
    b"/healthz?",
    b"/x?novalue&other",
])
def test_mask_leaves_everything_else_alone(uri: bytes) -> None:
    assert mask(uri) == uri


def test_loggable_uri_is_printable_and_bounded() -> None:
    request = type("R", (), {"uri": b"/a\xa9?key=" + S.encode() + b"&x=" + b"y" * 1000})()
    text = loggable_uri(request)
    assert text.isascii() and text.isprintable()
    assert "\\xa9" in text and S not in text
    assert len(text) <= 303


class Body(Resource):
    """Answers with a body, even to HEAD (as twisted.web warns about)."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"a body"


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """Every twisted.logger event while the test runs, formatted as a log file shows it."""
    lines: list[str] = []

    def observe(event: dict) -> None:
        lines.append(formatEvent(event) + repr(event.get("log_failure", "")))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


def make() -> Any:
    the_site = site(Body(), reactor=Clock(), max_body=100)
    the_site.logFile = io.StringIO()
    the_site._logDateTime = "[-]"
    return the_site


@pytest.mark.parametrize("request_bytes", [
    b"HEAD /e?key=" + S.encode() + b" HTTP/1.1\r\nHost: g\r\n\r\n",
    # Twisted lets bytes 0x7f-0xb0 through (its "c > 176" check): the repr of such a request
    # used to raise, and the log kept the URI in a "MESSAGE LOST" line instead.
    b"HEAD /e?key=" + S.encode() + b"&x=\xa9 HTTP/1.1\r\nHost: g\r\n\r\n",
    b"HEAD /e?access_token=" + S.encode() + b"&x=\x80 HTTP/1.1\r\nHost: g\r\n\r\n",
    b"GET /e?%6bey=" + S.encode() + b" HTTP/1.1\r\nHost: g\r\n\r\n",
    b"GET /e?token=" + S.encode() + b" HTTP/1.1\r\nHost: g\r\n\r\n",
    b"GET /e?x=1 HTTP/1.1\r\nHost: g\r\nReferer: https://pbx/?key=" + S.encode() + b"\r\n\r\n",
    b"POST /e?key=" + S.encode() + b" HTTP/1.1\r\nHost: g\r\nContent-Length: 101\r\n\r\n",
    b"GET /e?key=" + S.encode() + b" HTTP/1.1\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
    b"GET /e?key=" + S.encode() + b" HTTP/1.1\r\nContent-Length: x\r\n\r\n",
])
def test_nothing_logged_about_a_request_holds_its_secret(logged: list[str],
                                                         request_bytes: bytes) -> None:
    the_site = make()
    conn = Conn(the_site).send(request_bytes)
    assert conn.status() is not None
    everything = "\n".join(logged) + the_site.logFile.getvalue() + repr(
        conn.channel.requests)
    assert S not in everything
    assert "MESSAGE LOST" not in everything
    # ...and what was logged still says which request it was.
    if b"\r\n\r\n" in request_bytes and b"Content-Length: x" not in request_bytes:
        assert the_site.logFile.getvalue().count("\n") == 1


def test_the_head_warning_names_the_request_masked(logged: list[str]) -> None:
    the_site = make()
    Conn(the_site).send(b"HEAD /e?key=" + S.encode() + b"&x=\xa9 HTTP/1.1\r\nHost: g\r\n\r\n")
    warnings = [line for line in logged if "HEAD request" in line]
    assert len(warnings) == 1
    assert "uri=/e?key=***&x=\\xa9" in warnings[0]
