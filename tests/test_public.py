"""Telphin event webhooks as the PBX sends them, and the health check.

A real gateway (SQLite store, engine, dispatcher) serves its public site on loopback; what
matters is the answer the PBX gets, and that only a 200 means "stored" — every rejected
request leaves the event log as it was, and nothing ever answers 500.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlencode

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool

from gateway.model import Tenant
from gateway.service import Gateway
from gateway.store.sqlite import SQLiteStore
from gateway.web import site as site_for
from gateway.web.public import PublicSite

KEY = "tenant-key-0123456789abcdef"
LOGIN = "TLP55522"
CALL = "5f0c1e2a9b3d4c6e8f10a2b3c4d5e6f7"
LEG = "200501-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
FORM = "application/x-www-form-urlencoded"

# Telphin's own example (protocols/telphin.md §3.3): extension 101 rings.
DIAL_IN = {
    "EventType": "dial-in", "CallID": CALL, "SubCallID": LEG, "CallFlow": "in",
    "CallStatus": "CALLING", "CallerIDNum": "+79161234567", "CallerIDName": "+79161234567",
    "CalledDID": "74951234567", "CalledNumber": "7001*101",
    "CalledExtension": "7001*101@sipproxy.telphin.ru", "CalledExtensionID": "200501",
    "CallAPIID": "3584700000-5f0c1e2a-9b3d-4c6e-8f10-a2b3c4d5e6f7",
    "EventTime": "1715677267123456",
}
HANGUP = {
    "EventType": "hangup", "CallID": CALL, "SubCallID": LEG, "CallFlow": "in",
    "CallStatus": "ANSWER", "Duration": "83479977",
    "RecID": "200501-9F2C4A1B0D3E4F5A6B7C8D9E0F1A2B3C", "CallerIDNum": "+79161234567",
    "CalledDID": "74951234567", "CalledExtension": "7001*101@sipproxy.telphin.ru",
    "CalledExtensionID": "200501", "EventTime": "1715677352600000",
}


def tenant(tenant_id: int = 807, enabled: bool = True) -> Tenant:
    # Only calls to another DID reach the CRM, so these tests make no CRM requests.
    return Tenant.from_json({
        "id": tenant_id, "name": "ACME", "enabled": enabled, "key": KEY,
        "pbx": {"kind": "telphin", "login": LOGIN}, "numbers": ["70000000000"],
        "crm": {"kind": "altegio", "api_url": "http://127.0.0.1:9", "partner_token": "p",
                "crm_token": "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"},
    })


def without(fields: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k != name}


@attrs.frozen
class Reply:
    status: int
    headers: Any
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None


class Harness:
    """A running gateway with its public site on loopback and tenant 807 (plus a disabled
    808) in its directory."""

    def __init__(self, tmp_path: Any, **gateway_options: Any) -> None:
        self.store = SQLiteStore(str(tmp_path / "g.sqlite"), reactor)
        self.gw = Gateway(self.store, reactor, **gateway_options)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.port: Any = None

    async def start(self) -> None:
        await self.gw.start()
        # Saving an enabled tenant would queue a setup request to its CRM; these tests are
        # about the webhooks, so 807 is saved disabled and enabled in the directory only.
        for t in (tenant(807, enabled=False), tenant(808, enabled=False)):
            await self.gw.save_tenant(t, None)
        self.gw.tenants[807] = tenant(807)
        site = site_for(PublicSite(self.gw).resource())
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def stop(self) -> None:
        await self.port.stopListening()
        await self.pool.closeCachedConnections()
        await self.gw._stop()

    async def request(self, method: str, path: str, data: bytes | None = None,
                      content_type: str | None = FORM, server_error: bool = False) -> Reply:
        headers = {"Content-Type": content_type} if content_type else {}
        url = f"http://127.0.0.1:{self.port.getHost().port}{path}"
        resp = await self.client.request(method, url, data=data, headers=headers)
        body = await resp.content()
        assert server_error or resp.code < 500, (method, path, resp.code, body)
        return Reply(resp.code, resp.headers, body)

    async def post(self, fields: dict[str, str] | bytes, event: str = "dial-in",
                   tenant: Any = 807, login: str = LOGIN, key: str | None = KEY,
                   content_type: str | None = FORM) -> Reply:
        """One Telphin webhook: ``fields`` form-encoded in the body, the key in the URL."""
        query = f"?key={quote(key)}" if key is not None else ""
        body = fields if isinstance(fields, bytes) else urlencode(fields).encode()
        return await self.request("POST", f"/events/{tenant}/{event}/{login}{query}", body,
                                  content_type)

    async def events(self) -> list[Any]:
        return [ev for _, ev in await self.store.events_after(0, 100)]


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


# Accepted events

@pytest_twisted.ensureDeferred
async def test_a_posted_event_is_stored_then_answered_ok(gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN)
    assert (reply.status, reply.body) == (200, b"OK")
    [ev] = await gateway.events()
    assert (ev.tenant, ev.call, ev.leg, ev.kind, ev.flow, ev.at) == (
        807, CALL, LEG, "ring", "in", 1715677267123456)
    assert (ev.extension, ev.sip, ev.peer, ev.did) == ("101", "7001*101", "+79161234567",
                                                       "74951234567")


@pytest_twisted.ensureDeferred
async def test_a_get_with_the_fields_in_the_query_string_is_stored(gateway: Harness) -> None:
    path = f"/events/807/hangup/{LOGIN}?key={KEY}&{urlencode(HANGUP)}"
    reply = await gateway.request("GET", path, content_type=None)
    assert (reply.status, reply.body) == (200, b"OK")
    [ev] = await gateway.events()
    assert (ev.kind, ev.leg, ev.outcome, ev.duration, ev.recording) == (
        "hangup", LEG, "answered", 83479977, "200501-9F2C4A1B0D3E4F5A6B7C8D9E0F1A2B3C")


@pytest_twisted.ensureDeferred
async def test_a_form_body_with_a_charset_is_accepted(gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN, content_type=f"{FORM}; charset=UTF-8")
    assert reply.status == 200
    assert len(await gateway.events()) == 1


@pytest_twisted.ensureDeferred
async def test_a_body_of_exactly_max_body_bytes_is_accepted(tmp_path: Any) -> None:
    harness = Harness(tmp_path, max_body=1024)
    await harness.start()
    try:
        body = urlencode(DIAL_IN).encode() + b"&Pad="
        body += b"x" * (1024 - len(body))
        assert len(body) == 1024
        assert (await harness.post(body)).status == 200
        assert len(await harness.events()) == 1
    finally:
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_a_duplicate_delivery_is_answered_ok_and_stored_once(gateway: Harness) -> None:
    for _ in range(2):
        reply = await gateway.post(DIAL_IN)
        assert (reply.status, reply.body) == (200, b"OK")
    # The same event as a GET is still the same event.
    path = f"/events/807/dial-in/{LOGIN}?key={KEY}&{urlencode(DIAL_IN)}"
    assert (await gateway.request("GET", path, content_type=None)).status == 200
    assert len(await gateway.events()) == 1
    # Another leg's event at the same time is not a duplicate.
    other = dict(DIAL_IN, SubCallID="200502-0a1b2c3d4e5f60718293a4b5c6d7e8f9")
    assert (await gateway.post(other)).status == 200
    assert len(await gateway.events()) == 2


@pytest_twisted.ensureDeferred
async def test_concurrent_duplicates_are_stored_once(gateway: Harness) -> None:
    results = await DeferredList([ensureDeferred(gateway.post(DIAL_IN)) for _ in range(5)],
                                 fireOnOneErrback=True, consumeErrors=True)
    assert [r.status for _, r in results] == [200] * 5
    assert len(await gateway.events()) == 1


# Rejected requests: the right status, the field named, nothing stored

REJECTED = [
    # (why, status, field named first in the answer, request)
    ("an unknown tenant", 404, "tenant", {"tenant": 999}),
    ("a tenant id that is not a number", 404, "tenant", {"tenant": "acme"}),
    ("a tenant id in non-ASCII digits", 404, "tenant", {"tenant": "%C2%B2"}),
    ("a PBX login that is not the tenant's", 404, "tenant", {"login": "TLP00000"}),
    ("an unknown event in the URL", 404, "event", {"event": "dial-up"}),
    ("a wrong key", 403, "key", {"key": "tenant-key-0123456789abcdeX"}),
    ("a key that is a prefix of the right one", 403, "key", {"key": KEY[:-1]}),
    ("no key", 403, "key", {"key": None}),
    ("an empty key", 403, "key", {"key": ""}),
    ("a disabled tenant", 403, "tenant", {"tenant": 808}),
    ("no CallID", 400, "CallID", {"fields": without(DIAL_IN, "CallID")}),
    ("an empty CallID", 400, "CallID", {"fields": dict(DIAL_IN, CallID="")}),
    ("no SubCallID", 400, "SubCallID", {"fields": without(DIAL_IN, "SubCallID")}),
    ("no EventTime", 400, "EventTime", {"fields": without(DIAL_IN, "EventTime")}),
    ("an EventTime that is not a number", 400, "EventTime",
     {"fields": dict(DIAL_IN, EventTime="abc")}),
    ("an EventTime in exponent notation", 400, "EventTime",
     {"fields": dict(DIAL_IN, EventTime="1.5e15")}),
    ("a negative EventTime", 400, "EventTime", {"fields": dict(DIAL_IN, EventTime="-1")}),
    ("a Duration that is not a number", 400, "Duration",
     {"event": "hangup", "fields": dict(HANGUP, Duration="83.4s")}),
    ("an unknown EventType in the body", 400, "EventType",
     {"fields": dict(DIAL_IN, EventType="message-in")}),
    ("an EventType that is not the URL's", 400, "EventType",
     {"fields": dict(DIAL_IN, EventType="answer")}),
    ("an answer without CallFlow", 400, "CallFlow",
     {"event": "answer", "fields": without(dict(DIAL_IN, EventType="answer"), "CallFlow")}),
    ("a Bridged that is neither yes nor no", 400, "Bridged",
     {"fields": dict(DIAL_IN, Bridged="maybe")}),
    ("a JSON body", 415, "Content-Type",
     {"body": json.dumps(DIAL_IN).encode(), "content_type": "application/json"}),
    ("a multipart body", 415, "Content-Type",
     {"body": b"--b\r\nContent-Disposition: form-data; name=\"CallID\"\r\n\r\nx\r\n--b--\r\n",
      "content_type": "multipart/form-data; boundary=b"}),
    ("a body that is not UTF-8", 400, "body",
     {"body": urlencode(DIAL_IN).encode() + b"&CallerIDName=\xcf\xf0\xe8\xe2\xe5\xf2"}),
    ("a body with percent-encoded bytes that are not UTF-8", 400, "body",
     {"body": urlencode(DIAL_IN).encode() + b"&CallerIDName=%CF%F0%E8%E2%E5%F2"}),
]


@pytest.mark.parametrize("why, status, field, request_", REJECTED, ids=[r[0] for r in REJECTED])
@pytest_twisted.ensureDeferred
async def test_a_bad_webhook_is_refused_and_nothing_is_stored(
        gateway: Harness, why: str, status: int, field: str, request_: dict) -> None:
    options = dict(request_)
    body = options.pop("body", None)
    fields = options.pop("fields", DIAL_IN)
    reply = await gateway.post(body if body is not None else fields, **options)
    assert reply.status == status, reply.body
    assert reply.body.startswith(f"{field}:".encode()), reply.body
    assert reply.header("Content-Type").startswith("text/plain")
    assert await gateway.events() == []
    assert gateway.gw.engine.cursor == 0


@pytest_twisted.ensureDeferred
async def test_a_query_string_that_is_not_utf8_is_400_naming_query(gateway: Harness) -> None:
    path = f"/events/807/dial-in/{LOGIN}?key={KEY}&{urlencode(DIAL_IN)}&CallerIDName=%CF%F0"
    reply = await gateway.request("GET", path, content_type=None)
    assert reply.status == 400
    assert reply.body.startswith(b"query:")
    assert await gateway.events() == []


@pytest_twisted.ensureDeferred
async def test_a_key_in_the_body_does_not_stand_in_for_the_url_key(gateway: Harness) -> None:
    reply = await gateway.post({**DIAL_IN, "key": KEY}, key="wrong-key-0123456789")
    assert reply.status == 403
    reply = await gateway.post({**DIAL_IN, "key": KEY}, key=None)
    assert reply.status == 403
    assert await gateway.events() == []


@pytest_twisted.ensureDeferred
async def test_a_disabled_tenant_is_told_so(gateway: Harness) -> None:
    reply = await gateway.post(DIAL_IN, tenant=808)
    assert reply.status == 403
    assert b"disabled" in reply.body


@pytest_twisted.ensureDeferred
async def test_a_body_over_max_body_is_413(tmp_path: Any) -> None:
    harness = Harness(tmp_path, max_body=1024)
    await harness.start()
    try:
        body = urlencode(DIAL_IN).encode() + b"&Pad="
        body += b"x" * (1025 - len(body))
        reply = await harness.post(body)
        assert reply.status == 413
        assert reply.body.startswith(b"body:") and b"1024" in reply.body
        assert await harness.events() == []
    finally:
        await harness.stop()


@pytest.mark.parametrize("why, path", [
    ("non-ASCII digits in EventTime", "EventTime=%C2%B2"),
    ("full-width digits in Duration", "Duration=%EF%BC%91"),
])
@pytest_twisted.ensureDeferred
async def test_only_ascii_digits_are_numbers(gateway: Harness, why: str, path: str) -> None:
    name, value = path.split("=")
    fields = dict(HANGUP)
    fields.pop(name)
    body = urlencode(fields).encode() + f"&{name}={value}".encode()
    reply = await gateway.post(body, event="hangup")
    assert reply.status == 400
    assert reply.body.startswith(f"{name}:".encode())
    assert await gateway.events() == []


@pytest_twisted.ensureDeferred
async def test_odd_requests_never_get_a_500(gateway: Harness) -> None:
    base = f"/events/807/dial-in/{LOGIN}"
    for method, path, body, ctype in [
        ("GET", f"{base}?key={KEY}", None, None),  # no fields at all
        ("GET", f"{base}?key=%FF%FE&{urlencode(DIAL_IN)}", None, None),
        ("GET", f"{base}?key={KEY}&CallID=%FF&{urlencode(DIAL_IN)}", None, None),
        ("POST", f"{base}?key={KEY}", b"&&&==&", FORM),
        ("POST", f"{base}?key={KEY}", b"\x00\x01\x02", FORM),
        ("POST", f"{base}?key={KEY}", b"CallID", "text/plain"),
        ("PUT", f"{base}?key={KEY}", urlencode(DIAL_IN).encode(), FORM),
        ("POST", f"/events/{'9' * 40}/dial-in/{LOGIN}?key={KEY}", b"", FORM),
        ("POST", f"/events/{'9' * 5000}/dial-in/{LOGIN}?key={KEY}", b"", FORM),
        ("POST", f"/events/807/dial-in/{'L' * 5000}?key={KEY}", b"", FORM),
        ("POST", f"/events/807/dial-in/{LOGIN}/extra?key={KEY}", b"", FORM),
        ("POST", "/events/807/dial-in", b"", FORM),
    ]:
        reply = await gateway.request(method, path, body, ctype)
        assert reply.status in (400, 403, 404, 405, 413, 415), (method, path, reply.status)
    assert await gateway.events() == []


# Health

@pytest_twisted.ensureDeferred
async def test_healthz_reports_ok_and_the_fold_lag(gateway: Harness) -> None:
    reply = await gateway.request("GET", "/healthz", content_type=None)
    assert reply.status == 200
    assert reply.header("Content-Type") == "application/json"
    health = json.loads(reply.body)
    assert health["ok"] is True
    assert health["fold_lag_events"] == 0
    assert health["outbox_depth"] == 0

    assert (await gateway.post(DIAL_IN)).status == 200
    for _ in range(500):  # the engine folds the event soon after the 200
        health = json.loads((await gateway.request("GET", "/healthz", content_type=None)).body)
        if health["fold_lag_events"] == 0 and health["open_calls"] == 1:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert health["fold_lag_events"] == 0 and health["open_calls"] == 1


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_while_the_gateway_starts(gateway: Harness) -> None:
    gateway.gw.ready = False
    reply = await gateway.request("GET", "/healthz", content_type=None, server_error=True)
    assert reply.status == 503
    assert json.loads(reply.body)["ok"] is False
