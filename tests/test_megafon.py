"""MegaFon "API for CRM" (megafon.md): the parser table (form bodies → exact neutral events),
the call model on MegaFon's scenarios (folded by the real engine on a real store), the
refusals and the ``cmd=contact`` lookup through the real public site, and click-to-call
against the strict fake MegaFon (legacy and REST v1, 301)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from gateway.crm.megaplan import LOOPBACK_ENV
from gateway.engine import Engine
from gateway.errors import BadRequest, Permanent
from gateway.httpclient import HttpClient
from gateway.model import Event, Tenant, parse_tenant
from gateway.protocols import IPbx
from gateway.protocols.megafon import MegaFon, call_id_of, parse_command
from gateway.store.sqlite import SQLiteStore
from tests.fakes.megafon import FakeMegaFon, reordered, script
from tests.fakes.megaplan import FakeMegaplan
from tests.test_public import KEY, Harness

LOGIN = "myats"
CRM_TOKEN = "c8f1e2-crm-token"
TOKEN, API_KEY = "p8x2k-legacy", "rest-key-1"
T0 = 1_715_677_300.0  # gateway time, shortly after the scripts' start (2024-05-14 09:01:07Z)
CALL = "7f2c9b10a4"


def megafon_tenant(api_url: str = "http://127.0.0.1:9", api: str = "legacy",
                   crm: dict | None = None, **options: Any) -> Tenant:
    return parse_tenant({
        "id": 807, "name": "ACME", "key": KEY,
        "pbx": {"kind": "megafon", "login": LOGIN, "crm_token": CRM_TOKEN,
                "api_url": api_url, "token": TOKEN, "api_key": API_KEY, "api": api},
        "crm": crm or {"kind": "altegio", "api_url": "http://127.0.0.1:9",
                       "partner_token": "p", "crm_token": "x" * 36},
        "options": {"default_number": "74951234567", **options},
    })


TENANT = megafon_tenant()


def ev(kind: str, leg: str, **fields: Any) -> Event:
    base = {"tenant": 807, "call": CALL, "leg": leg, "kind": kind, "flow": "in",
            "at": int(T0 * 1_000_000), "received": T0, "peer": "79161234567",
            "did": "74951234567"}
    if leg:
        base.update(extension={"ivanov": "101", "petrov": "102"}.get(leg, leg), sip=leg)
    return Event(**{**base, **fields})


# --- the parser table ---------------------------------------------------------------------

START_US = 1_715_677_267 * 1_000_000  # 20240514T090107Z
PARSED = {
    "INCOMING rings the user's leg": (
        script("group")[0], [ev("ring", "ivanov", dedup=f"{CALL}:event:INCOMING")]),
    "ACCEPTED answers it": (
        script("group")[2], [ev("answer", "ivanov", dedup=f"{CALL}:event:ACCEPTED")]),
    "CANCELLED ends it unanswered": (
        script("group")[3],
        [ev("hangup", "petrov", outcome="cancelled", dedup=f"{CALL}:event:CANCELLED")]),
    "COMPLETED is a talk, not yet the end (history has its time)": (
        script("group")[4], [ev("answer", "ivanov", dedup=f"{CALL}:event:COMPLETED")]),
    "OUTGOING rings an outgoing leg": (
        script("outgoing")[0],
        [ev("ring", "ivanov", flow="out", dedup=f"{CALL}:event:OUTGOING")]),
    "an event without direction takes it from its type; lower case type is taken": (
        {**script("outgoing")[0], "type": "outgoing", "direction": ""},
        [ev("ring", "ivanov", flow="out", dedup=f"{CALL}:event:OUTGOING")]),
    "TRANSFERRED says the leg talked": (
        script("transfer")[2], [ev("answer", "ivanov", dedup=f"{CALL}:event:TRANSFERRED")]),
    "history Success ends the leg with talk = duration - wait, its link, then closes": (
        script("group")[5],
        [ev("hangup", "ivanov", at=START_US + 89_000_000, outcome="answered",
            duration=83_000_000, recording=f"https://myats.megapbx.ru/rec/{CALL}.mp3",
            dedup=f"{CALL}:history"),
         ev("closing", "", at=START_US, dedup=f"{CALL}:history")]),
    "history status is compared case-insensitively (MISSED), a missed leg has no talk": (
        {**script("missed")[4], "status": "MISSED"},
        [ev("hangup", "ivanov", at=START_US + 25_000_000, outcome="no-answer",
            dedup=f"{CALL}:history"),
         ev("closing", "", at=START_US, dedup=f"{CALL}:history")]),
    "history Busy of an outgoing call": (
        script("outgoing")[1],
        [ev("hangup", "ivanov", flow="out", at=START_US + 4_000_000, outcome="busy",
            dedup=f"{CALL}:history"),
         ev("closing", "", flow="out", at=START_US, dedup=f"{CALL}:history")]),
    "history with a rating carries it": (
        {**script("group")[5], "rating": "4"},
        [ev("hangup", "ivanov", at=START_US + 89_000_000, outcome="answered",
            duration=83_000_000, recording=f"https://myats.megapbx.ru/rec/{CALL}.mp3",
            rating=4, dedup=f"{CALL}:history"),
         ev("closing", "", at=START_US, dedup=f"{CALL}:history")]),
    "history naming no user only closes the call": (
        {**script("missed")[4], "user": ""},
        [ev("closing", "", at=START_US, dedup=f"{CALL}:history")]),
    "rating scores the leg": (
        script("rating")[0], [ev("answer", "ivanov", rating=5, did="",
                                   dedup=f"{CALL}:rating")]),
}


@pytest.mark.parametrize("fields, expected", [pytest.param(*row, id=name)
                                              for name, row in PARSED.items()])
def test_parse(fields: dict[str, str], expected: list[Event]) -> None:
    assert parse_command(fields, 807, T0) == expected


REFUSED = {
    "no cmd": ({"callid": CALL}, "cmd"),
    "an unknown cmd": ({"cmd": "hangup", "callid": CALL}, "cmd"),
    "no callid": ({**script("group")[0], "callid": ""}, "callid"),
    "an unknown event type": ({**script("group")[0], "type": "RINGING"}, "type"),
    "an event without user": ({**script("group")[0], "user": ""}, "user"),
    "a phone that is not digits": ({**script("group")[0], "phone": "7916abc"}, "phone"),
    "a history type other than in/out": ({**script("group")[5], "type": "IN?"}, "type"),
    "an unknown history status": ({**script("group")[5], "status": "Answered"}, "status"),
    "a 12-hour start (no such hour as 25)": ({**script("group")[5],
                                              "start": "20240514T250107Z"}, "start"),
    "a start not in the format": ({**script("group")[5], "start": "2024-05-14 09:01"},
                                  "start"),
    "a duration that is not a number": ({**script("group")[5], "duration": "8s"},
                                        "duration"),
    "a link that is not a URL": ({**script("group")[5], "link": "javascript:x"}, "link"),
    "a rating without its score": ({**script("rating")[0], "rating": ""}, "rating"),
    "a control character": ({**script("group")[0], "user": "iv\x00"}, "user"),
    # history's required fields (megafon.md §2.3), each left out
    **{f"a history without {name}": (
        {k: v for k, v in script("group")[5].items() if k != name}, name)
       for name in ("phone", "type", "status", "start", "duration")},
    "an event without phone": ({k: v for k, v in script("group")[0].items() if k != "phone"},
                               "phone"),
}


@pytest.mark.parametrize("fields, field", [pytest.param(*row, id=name)
                                           for name, row in REFUSED.items()])
def test_refused(fields: dict[str, str], field: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_command(fields, 807, T0)
    assert (caught.value.field, caught.value.status) == (field, 400)


def test_the_setup_guide_is_the_one_crm_url() -> None:
    pbx = MegaFon(HttpClient(reactor), Clock())
    [guide] = pbx.setup_guide(TENANT, "https://gw.example.net")
    assert guide["url"] == f"https://gw.example.net/vats/807/crm/{TENANT.pbx.login}"
    assert guide["method"] == "POST" and "pbx.crm_token" in guide["what"]


def test_refusals_are_json_with_the_error_text() -> None:
    ctype, body = MegaFon.refusal(BadRequest("", "Invalid token", status=401))
    assert ctype.startswith(b"application/json")
    assert json.loads(body) == {"error": "Invalid token"}


def test_it_is_a_pbx() -> None:
    assert verifyObject(IPbx, MegaFon(HttpClient(reactor), Clock()))


@pytest.mark.parametrize("body, call", [
    (b"3f9d2c7a1b", "3f9d2c7a1b"), (b" 3f9d2c7a1b\n", "3f9d2c7a1b"),
    (b'{"callid": "3f9d"}', "3f9d"), (b'{"callId": 42}', "42"), (b'{"status": "ok"}', ""),
    (b"<html>portal</html>", ""), (b"", "")])
def test_make_call_answers_are_read_defensively(body: bytes, call: str) -> None:
    assert call_id_of(body) == call


def test_config_needs_the_crm_token_and_knows_its_apis() -> None:
    with pytest.raises(BadRequest) as caught:
        MegaFon.parse_config({"kind": "megafon", "login": LOGIN})
    assert caught.value.field == "pbx.crm_token"
    with pytest.raises(BadRequest) as caught:
        megafon_tenant(api="soap")
    assert caught.value.field == "pbx.api"
    hidden = TENANT.to_json()
    assert "crm_token" not in hidden["pbx"] and "token" not in hidden["pbx"]
    assert hidden["secrets_set"]["pbx.api_key"] is True


# --- the call model on MegaFon's scenarios ------------------------------------------------

async def fold(tmp_path: Any, commands: list[dict[str, str]], gap: float = 1.0) -> list[Any]:
    """Post-parse ``commands`` into a real store and engine, ``gap`` seconds apart, then
    let every timer run out; the actions produced, in order."""
    store = SQLiteStore(str(tmp_path / "megafon.sqlite"), reactor)
    await store.start()
    clock = Clock()
    clock.advance(T0)
    produced: list = []
    engine = Engine(store, clock, {807: TENANT}.get, lambda *a: True,
                    lambda inserted, dropped: produced.extend(inserted))
    try:
        await engine.start()
        for fields in commands:
            clock.advance(gap)
            await store.append(parse_command(fields, 807, clock.seconds()))
            engine.poke()
            await engine.idle()
        for _ in range(2):
            clock.advance(5 * 3600)
            await engine.idle()
        assert not engine.calls
    finally:
        engine.stop()
        await store.stop()
    return produced


def summary(actions: list[Any]) -> list[tuple]:
    out = []
    for a in actions:
        p = a.payload
        if a.kind == "record":
            out.append((a.call, a.kind, p["extension"], p["status"], p["duration"],
                        p["recording"], p.get("rating")))
        else:
            out.append((a.call, a.kind, p["extension"]))
    return out


LINK = f"https://myats.megapbx.ru/rec/{CALL}.mp3"
GROUP = [(CALL, "popup", "101"), (CALL, "popup", "102"), (CALL, "popup_update", "101"),
         (CALL, "close_popup", "102"), (CALL, "record", "101", "success", 83, LINK, None)]
MISSED = [(CALL, "popup", "101"), (CALL, "popup", "102"), (CALL, "close_popup", "101"),
          (CALL, "close_popup", "102"), (CALL, "record", "101", "missed", 0, "", None)]
SCENARIOS = {
    "group call, simultaneous ring: one record for who answered, the other pop-up closed": (
        script("group"), GROUP),
    "sequential hunt: each pop-up in turn, one record for the third": (
        script("hunt"),
        [(CALL, "popup", "101"), (CALL, "close_popup", "101"), (CALL, "popup", "102"),
         (CALL, "close_popup", "102"), (CALL, "popup", "103"), (CALL, "popup_update", "103"),
         (CALL, "record", "103", "success", 40, LINK, None)]),
    "transfer: two calls, two records (before and after the transfer)": (
        script("transfer"),
        [(CALL, "popup", "101"), (CALL, "popup_update", "101"),
         (f"{CALL}-2", "popup", "102"), (f"{CALL}-2", "popup_update", "102"),
         (CALL, "record", "101", "success", 35, LINK, None),
         (f"{CALL}-2", "record", "102", "success", 60,
          f"https://myats.megapbx.ru/rec/{CALL}-2.mp3", None)]),
    "missed group call: one missed record": (script("missed"), MISSED),
    "an outgoing busy call: one missed outgoing record": (
        script("outgoing"), [(CALL, "popup", "101"), (CALL, "record", "101", "missed", 0, "",
                                                       None)]),
    "every command delivered twice: stored once, the same actions": (
        [c for c in script("group") for _ in range(2)], GROUP),
    "history before the last event (COMPLETED): one record": (
        reordered(script("group")), GROUP),
    "missed: history before the last CANCELLED: one missed record, decided after it": (
        reordered(script("missed")), MISSED),
    "missed: history naming no one: the legs decide, one missed record": (
        [*script("missed")[:4], {**script("missed")[4], "user": ""}], MISSED),
    "a rating before the history goes with the record": (
        [*script("group")[:5], *script("rating"), script("group")[5]],
        [*GROUP[:4], (CALL, "record", "101", "success", 83, LINK, 5)]),
    "a history whose last CANCELLED never comes: decided a grace later, missed, and the "
    "pop-up still ringing closed": (
        [*script("missed")[:3], script("missed")[4]],
        [(CALL, "popup", "101"), (CALL, "popup", "102"), (CALL, "close_popup", "101"),
         (CALL, "close_popup", "102"), (CALL, "record", "101", "missed", 0, "", None)]),
}


@pytest.mark.parametrize("commands, expected", [pytest.param(*row, id=name)
                                                for name, row in SCENARIOS.items()])
@pytest_twisted.ensureDeferred
async def test_scenario(tmp_path: Any, commands: list[dict[str, str]],
                        expected: list[tuple]) -> None:
    assert summary(await fold(tmp_path, commands)) == expected


@pytest_twisted.ensureDeferred
async def test_history_waits_the_grace_before_the_call_is_decided(tmp_path: Any) -> None:
    """The last CANCELLED comes 2 s after the history (grace 3 s): still one missed record;
    if history decided the call at once it would find a phone still ringing and make none."""
    commands = reordered(script("missed"))
    assert summary(await fold(tmp_path, commands, gap=2.0)) == MISSED


# --- through the real public site ---------------------------------------------------------

class Site_:
    def __init__(self, harness: Harness) -> None:
        self.harness = harness

    async def post(self, fields: dict[str, str], crm_token: str | None = CRM_TOKEN,
                   method: str = "POST") -> Any:
        body = dict(fields)
        if crm_token is not None:
            body["crm_token"] = crm_token
        path = f"/vats/807/crm/{LOGIN}"
        if method == "GET":
            return await self.harness.request("GET", f"{path}?{urlencode(body)}",
                                              content_type=None)
        return await self.harness.request(method, path, urlencode(body).encode())


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    await harness.start()
    harness.gw.tenants[807] = megafon_tenant()
    try:
        yield Site_(harness)
    finally:
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_an_event_is_stored_once_and_answered_ok(site: Site_) -> None:
    for _ in range(2):
        reply = await site.post(script("group")[0])
        assert (reply.status, reply.body) == (200, b"OK")
    events = await site.harness.events()
    assert [(e.call, e.leg, e.kind) for e in events] == [(CALL, "ivanov", "ring")]


@pytest.mark.parametrize("fields, token, method, status, body", [
    pytest.param(script("group")[0], "wrong", "POST", 401, {"error": "Invalid token"},
                 id="a wrong crm_token"),
    pytest.param(script("group")[0], None, "POST", 401, {"error": "Invalid token"},
                 id="no crm_token"),
    pytest.param({**script("group")[0], "type": "RINGING"}, CRM_TOKEN, "POST", 400,
                 {"error": "Invalid parameters"}, id="a malformed field"),
    pytest.param({"cmd": "event"}, CRM_TOKEN, "POST", 400, {"error": "Invalid parameters"},
                 id="missing fields"),
    pytest.param(script("group")[0], CRM_TOKEN, "GET", 400, {"error": "Invalid request"},
                 id="a GET"),
])
@pytest_twisted.ensureDeferred
async def test_refusals_are_the_json_megafon_expects(site: Site_, fields: dict, token: Any,
                                                     method: str, status: int,
                                                     body: dict) -> None:
    reply = await site.post(fields, token, method)
    assert (reply.status, json.loads(reply.body)) == (status, body)
    assert reply.header("Content-Type").startswith("application/json")
    assert await site.harness.events() == []


@pytest_twisted.ensureDeferred
async def test_contact_with_a_crm_without_lookup_is_the_empty_answer(site: Site_) -> None:
    reply = await site.post(script("contact")[0])
    assert (reply.status, reply.body) == (200, b"{}")
    assert reply.header("Content-Type") == "application/json"
    assert await site.harness.events() == []


MP_USER, MP_PASSWORD = "robot@acme.ru", "S3cret"


@pytest_twisted.ensureDeferred
async def test_contact_is_answered_with_the_responsible_from_megaplan(
        tmp_path: Any, monkeypatch: Any) -> None:
    """Seed 003's pair: MegaFon asks, Megaplan's callRoute names the employee, the answer
    is the extension as JSON (within the deadline: cached the second time)."""
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    fake = FakeMegaplan(MP_USER, MP_PASSWORD, clock=reactor)
    fake.setup({"employees": [{"id": "1000005", "name": "Иван", "internalNumber": "101"}],
                "routes": {"+79161234567": ["1000005"]}})
    listening = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    http = HttpClient(reactor, timeout=5)
    harness = Harness(tmp_path, http=http)
    await harness.start()
    try:
        tenant = megafon_tenant(crm={
            "kind": "megaplan", "domain": f"127.0.0.1:{listening.getHost().port}",
            "login": MP_USER, "password": MP_PASSWORD}, interactive_deadline=5.0)
        harness.gw.tenants[807] = Tenant.from_json({**tenant.to_json(secrets=True),
                                                    "enabled": True})
        site = Site_(harness)
        for _ in range(2):
            reply = await site.post(script("contact")[0])
            assert (reply.status, json.loads(reply.body)) == (200, {"responsible": "101"})
        unknown = await site.post({**script("contact")[0], "phone": "79990000000"})
        assert (unknown.status, unknown.body) == (200, b"{}")
        routes = [r for r in fake.requests if r["path"].endswith("/callRoute")]
        assert len(routes) == 2  # the known caller once (cached), the stranger once
    finally:
        await harness.stop()
        await http.close()
        await listening.stopListening()


# --- click-to-call against the fake -------------------------------------------------------

def pbx_with(fake: FakeMegaFon) -> MegaFon:
    return MegaFon(HttpClient(reactor, client=StubTreq(fake.resource())), Clock())


def fake_pbx() -> FakeMegaFon:
    return FakeMegaFon(TOKEN, API_KEY, CRM_TOKEN, clock=Clock())


@pytest.mark.parametrize("answer", ["bare", "json"])
@pytest_twisted.ensureDeferred
async def test_legacy_make_call_sends_digits_and_the_login(answer: str) -> None:
    fake = fake_pbx()
    fake.make_call_answer = answer
    pbx = pbx_with(fake)
    tenant = megafon_tenant("http://myats.megapbx.test")
    call = await pbx.call(tenant, "101", "+79161234567")
    assert fake.calls == [{"callid": call, "user": "ivanov", "phone": "79161234567",
                           "via": "legacy"}]
    [accounts, make] = fake.requests
    assert accounts["args"] == {"cmd": "accounts", "token": TOKEN}
    assert make["args"] == {"cmd": "makeCall", "token": TOKEN, "user": "ivanov",
                            "phone": "79161234567"}
    # The employee list is cached: the next call asks only makeCall.
    await pbx.call(tenant, "102", "79161234567")
    assert [r["args"]["cmd"] for r in fake.requests] == ["accounts", "makeCall", "makeCall"]
    assert fake.calls[-1]["user"] == "petrov"


@pytest_twisted.ensureDeferred
async def test_rest_make_call_uses_the_api_key_and_users() -> None:
    fake = fake_pbx()
    pbx = pbx_with(fake)
    call = await pbx.call(megafon_tenant("http://myats.megapbx.test", api="rest"), "103",
                          "+79161234567")
    assert fake.calls == [{"callid": call, "user": "sidorov", "phone": "79161234567",
                           "via": "rest"}]
    assert [r["path"] for r in fake.requests] == ["/crmapi/v1/users", "/crmapi/v1/makecall"]


@pytest_twisted.ensureDeferred
async def test_an_extension_not_in_the_directory_is_called_as_it_is() -> None:
    fake = fake_pbx()
    fake.setup({"accounts": [{"name": "kuznetsov", "ext": "104"}]})
    pbx = pbx_with(fake)
    await pbx.call(megafon_tenant("http://myats.megapbx.test"), "104", "79161234567")
    assert fake.calls[0]["user"] == "kuznetsov"


@pytest.mark.parametrize("api", ["legacy", "rest"])
@pytest_twisted.ensureDeferred
async def test_301_is_reported_as_a_wrong_ats_name(api: str) -> None:
    fake = fake_pbx()
    fake.setup({"wrong_ats": True})
    pbx = pbx_with(fake)
    with pytest.raises(Permanent) as caught:
        await pbx.call(megafon_tenant("http://myatz.megapbx.test", api=api), "101",
                       "79161234567")
    assert caught.value.status == 301
    assert "PBX name in pbx.api_url" in str(caught.value) and "is wrong" in str(caught.value)
    assert fake.calls == []


@pytest.mark.parametrize("api, key", [("legacy", "pbx.token"), ("rest", "pbx.api_key")])
@pytest_twisted.ensureDeferred
async def test_a_refused_key_is_permanent_and_named(api: str, key: str) -> None:
    fake = FakeMegaFon("other", "other", CRM_TOKEN, clock=Clock())
    pbx = pbx_with(fake)
    with pytest.raises(Permanent) as caught:
        await pbx.call(megafon_tenant("http://myats.megapbx.test", api=api), "101",
                       "79161234567")
    assert caught.value.status == 401 and key in str(caught.value)


def test_hangup_is_not_in_the_api() -> None:
    with pytest.raises(NotImplementedError):
        pbx_with(fake_pbx()).hangup(TENANT, "x")


def test_click_to_call_needs_the_keys_of_the_chosen_api() -> None:
    pbx = pbx_with(fake_pbx())
    import attrs
    bare = attrs.evolve(TENANT, pbx=MegaFon.parse_config({
        "kind": "megafon", "login": LOGIN, "crm_token": CRM_TOKEN,
        "api_url": "http://x.test", "api": "rest"}))
    with pytest.raises(Permanent, match="pbx.api_key"):
        pbx.call(bare, "101", "79161234567")
