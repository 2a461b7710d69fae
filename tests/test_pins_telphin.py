"""Telphin's module, pinned where the public-site tests and the fake leave it loose: the REST
client's token lifetime and renewal, how each answer of the token and storage endpoints is
classed (retry or refusal, with its status, answer and Retry-After), and the parser's
outgoing legs and out-of-range message.

The REST client talks to a scripted HTTP client here (each answer given in order, every
request kept), so the exact status, body and clock of every answer are the test's.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import Clock

from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import Response
from gateway.protocols import telphin
from gateway.protocols.telphin import TelphinClient
from tests.test_clients import TENANT
from tests.test_public import DIAL_IN

BASE = "http://telphin.test"
TOKEN_URL = f"{BASE}/oauth/token"
STORAGE_PATH = "/client/@me/record/R1/storage_url/"
STORAGE_URL = f"{BASE}/api/ver1.0{STORAGE_PATH}"
LINK = "https://storage.telphin.test/R1.mp3"


def answer(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Response(status, headers or {}, raw, received=0.0)


def token(name: str = "t1", **extra: Any) -> Response:
    return answer(200, {"access_token": name, "token_type": "Bearer", **extra})


def link(url: Any = LINK) -> Response:
    return answer(200, {"record_url": url})


class Scripted:
    """An HTTP client answering each request with the next scripted answer (a Response, or a
    Deferred that fires with one later)."""

    def __init__(self, *answers: Response | Deferred) -> None:
        self.answers = list(answers)
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    async def request(self, method: str, url: str, **kwargs: Any) -> Response:
        self.requests.append((method.upper(), url, kwargs))
        if not self.answers:
            raise AssertionError(f"unexpected request {method} {url}")
        return await _resolved(self.answers.pop(0))

    def urls(self) -> list[str]:
        return [url for _, url, _ in self.requests]


async def _resolved(value: Response | Deferred) -> Response:
    if isinstance(value, Deferred):
        return await value
    return value


def bearer(request: tuple[str, str, dict[str, Any]]) -> str | None:
    """The request's Authorization header, its name in any case (RFC 9110 §5.1)."""
    headers = {name.lower(): value for name, value in request[2]["headers"].items()}
    return headers.get("authorization")


def told(error: Retryable | Permanent) -> tuple:
    """What an error tells the dispatcher: message, status, the answer kept, Retry-After."""
    return attrs.astuple(error, recurse=False)


def client(*answers: Response | Deferred) -> tuple[TelphinClient, Scripted, Clock]:
    clock = Clock()
    http = Scripted(*answers)
    return TelphinClient(http, clock), http, clock  # type: ignore[arg-type]


# The token's lifetime

@pytest_twisted.ensureDeferred
async def test_a_token_without_expires_in_lives_an_hour_less_the_margin() -> None:
    telphin_client, http, clock = client(token("t1"), link(), link(), token("t2"), link())
    assert await telphin_client.recording_url(TENANT, "R1") == LINK
    clock.advance(3600 - 60 - 1)
    await telphin_client.recording_url(TENANT, "R1")
    assert http.urls().count(TOKEN_URL) == 1
    clock.advance(1)  # exactly the renewal time: not used any more
    await telphin_client.recording_url(TENANT, "R1")
    assert http.urls() == [TOKEN_URL, STORAGE_URL, STORAGE_URL, TOKEN_URL, STORAGE_URL]
    assert bearer(http.requests[-1]) == "Bearer t2"


@pytest_twisted.ensureDeferred
async def test_a_tokens_expires_in_is_obeyed() -> None:
    telphin_client, http, clock = client(token("t1", expires_in=120), link(), link(),
                                         token("t2", expires_in=120), link())
    await telphin_client.recording_url(TENANT, "R1")
    clock.advance(120 - 60 - 1)
    await telphin_client.recording_url(TENANT, "R1")
    assert http.urls().count(TOKEN_URL) == 1
    clock.advance(1)
    await telphin_client.recording_url(TENANT, "R1")
    assert http.urls().count(TOKEN_URL) == 2


@pytest_twisted.ensureDeferred
async def test_a_token_that_lives_no_longer_than_the_margin_is_never_reused() -> None:
    telphin_client, http, clock = client(token("t1", expires_in=30), link(),
                                         token("t2", expires_in=30), link())
    await telphin_client.recording_url(TENANT, "R1")
    await telphin_client.recording_url(TENANT, "R1")  # same instant
    assert http.urls() == [TOKEN_URL, STORAGE_URL, TOKEN_URL, STORAGE_URL]


# The requests

@pytest_twisted.ensureDeferred
async def test_the_token_request_posts_the_client_credentials() -> None:
    telphin_client, http, _ = client(token(), link())
    await telphin_client.recording_url(TENANT, "R1")
    method, url, kwargs = http.requests[0]
    assert (method, url) == ("POST", TOKEN_URL)
    assert kwargs["data"] == {"grant_type": "client_credentials", "client_id": "app1",
                              "client_secret": "s3cret"}


@pytest_twisted.ensureDeferred
async def test_the_storage_request_asks_for_json_with_the_bearer_token() -> None:
    telphin_client, http, _ = client(token("t1"), link())
    await telphin_client.recording_url(TENANT, "R1")
    method, url, kwargs = http.requests[1]
    assert (method, url) == ("GET", STORAGE_URL)
    # Header names and media types are case-insensitive (RFC 9110 §5.1, §8.3.1).
    headers = {name.lower(): value for name, value in kwargs["headers"].items()}
    assert headers["authorization"] == "Bearer t1"
    assert headers["accept"].lower() == "application/json"
    assert set(headers) == {"authorization", "accept"}


@pytest.mark.parametrize("missing", ["api_url", "client_id"])
@pytest_twisted.ensureDeferred
async def test_without_the_rest_base_or_the_client_id_nothing_is_requested(
        missing: str) -> None:
    tenant = attrs.evolve(TENANT, pbx=attrs.evolve(TENANT.pbx, **{missing: ""}))
    telphin_client, http, _ = client()
    with pytest.raises(Permanent) as raised:
        await telphin_client.recording_url(tenant, "R1")
    assert raised.value.message == "pbx.api_url and pbx.client_id are not set"
    assert http.requests == []


# How each answer is classed

@pytest.mark.parametrize("status", [429, 500, 501, 503, 599])
@pytest_twisted.ensureDeferred
async def test_a_token_answer_of_429_or_5xx_is_retried_with_its_retry_after(
        status: int) -> None:
    telphin_client, _, _ = client(answer(status, {"message": "busy"}, {"retry-after": "7"}))
    with pytest.raises(Retryable) as raised:
        await telphin_client.recording_url(TENANT, "R1")
    assert told(raised.value) == (f"token: HTTP {status}", status, '{"message": "busy"}', 7.0)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 428, 430, 499])
@pytest_twisted.ensureDeferred
async def test_a_token_answer_of_another_4xx_is_refused_for_good(status: int) -> None:
    telphin_client, _, _ = client(answer(status, {"error": "invalid_client"},
                                         {"retry-after": "7"}))
    with pytest.raises(Permanent) as raised:
        await telphin_client.recording_url(TENANT, "R1")
    assert told(raised.value) == (f"token: HTTP {status}", status,
                                  '{"error": "invalid_client"}')


@pytest_twisted.ensureDeferred
async def test_a_storage_answer_of_404_is_refused_naming_the_path() -> None:
    telphin_client, _, _ = client(token(), answer(404, {"message": "Record not found"}))
    with pytest.raises(Permanent) as raised:
        await telphin_client.recording_url(TENANT, "R1")
    assert told(raised.value) == (f"{STORAGE_PATH}: HTTP 404", 404,
                                  '{"message": "Record not found"}')


@pytest_twisted.ensureDeferred
async def test_a_storage_answer_of_503_is_retried_naming_the_path() -> None:
    telphin_client, _, _ = client(token(), answer(503, b"down", {"retry-after": "12"}))
    with pytest.raises(Retryable) as raised:
        await telphin_client.recording_url(TENANT, "R1")
    assert told(raised.value) == (f"{STORAGE_PATH}: HTTP 503", 503, "down", 12.0)


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"token_type": "Bearer"}',
                                  b'{"access_token": "t", "expires_in": "soon"}', b"[1, 2]"],
                         ids=["not JSON", "no access_token", "a word for expires_in",
                              "a list"])
@pytest_twisted.ensureDeferred
async def test_an_unreadable_token_answer_is_retried_with_the_answer_kept(body: bytes) -> None:
    telphin_client, _, _ = client(answer(200, body))
    with pytest.raises(Retryable) as raised:
        await telphin_client.recording_url(TENANT, "R1")
    assert told(raised.value) == ("token: unreadable answer", 200, body.decode(), None)


@pytest.mark.parametrize("body", [[LINK], {"record_url": ""}, {"record_url": 5},
                                  {"record_url": None}, {"url": LINK}],
                         ids=["a list", "an empty link", "a number", "null", "no record_url"])
@pytest_twisted.ensureDeferred
async def test_a_storage_answer_without_a_link_is_retried(body: Any) -> None:
    telphin_client, _, _ = client(token(), answer(200, body))
    with pytest.raises(Retryable) as raised:
        await telphin_client.recording_url(TENANT, "R1")
    assert raised.value.message == "storage_url: no record_url in the answer"


@pytest_twisted.ensureDeferred
async def test_lookups_waiting_for_a_token_that_fails_all_fail_with_its_error() -> None:
    pending: Deferred = Deferred()
    telphin_client, http, _ = client(pending)
    lookups = [ensureDeferred(telphin_client.recording_url(TENANT, "R1")) for _ in range(3)]
    assert http.urls() == [TOKEN_URL]  # one token request for all three
    pending.callback(answer(401, {"error": "invalid_client"}))
    results = await DeferredList(lookups, consumeErrors=True)
    errors = [result.value for ok, result in results]
    assert all(isinstance(e, Permanent) and e.message == "token: HTTP 401" for e in errors)


# The parser

def test_an_outgoing_leg_without_caller_extension_is_named_by_its_caller_id() -> None:
    fields = dict(DIAL_IN, EventType="dial-out", CallFlow="out", CallerIDNum="7001*102",
                  CalledNumber="+79161234567")
    for name in ("CalledExtension", "CallerExtension"):
        fields.pop(name, None)
    received = int(DIAL_IN["EventTime"]) / 1_000_000
    ev = telphin.parse_event(fields, "dial-out", 807, received)
    assert (ev.flow, ev.extension, ev.sip, ev.peer) == ("out", "102", "7001*102",
                                                        "+79161234567")


@pytest.fixture
def tokyo() -> Any:
    """The gateway's local time zone is not UTC."""
    saved = time.tzname
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TZ", "Asia/Tokyo")
        time.tzset()
        yield
    time.tzset()
    assert time.tzname == saved


def test_an_event_time_out_of_range_is_answered_with_the_range_in_utc(tokyo: Any) -> None:
    received = 1_800_000_000.5  # 2027-01-15T08:00:00.5Z
    with pytest.raises(BadRequest) as raised:
        telphin.parse_event(dict(DIAL_IN, EventTime="1"), "dial-in", 807, received)
    assert str(raised.value) == (
        "EventTime: out of range (1): microseconds since the epoch from 2017-01-14T08:00:00Z"
        " to 2027-01-16T08:00:00Z (3653 days before to 24 hours after the gateway's clock)")
