"""The Planfix CRM module: its config, the exact form each action posts, the ring-group rules
against the strict fake Planfix (tests/fakes/planfix.py) through the real HTTP stack
(StubTreq), the responsible lookup, and Planfix's makeCall / setup through the real public
site, with the fake acting as Planfix."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.vhost import NameVirtualHost
from zope.interface.verify import verifyObject

from gateway.calls import Call, Policy
from gateway.crm import LOOPBACK_ENV, Command, ICrm, crm_type
from gateway.crm.planfix import Planfix, PlanfixConfig
from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient
from gateway.model import (ATTACH, CLOSE_POPUP, POPUP, POPUP_UPDATE, RECORD, SETUP, Action, Event,
                           Inbound, Tenant, parse_tenant)
from tests.fakes.planfix import FakePlanfix
from tests.fakes.telphin import FakeTelphin
from tests.test_public import LOGIN, Harness
from tests.test_public import tenant as telphin_tenant

URL = "https://test.planfix.ru/tel/api"
PF_TOKEN = "303cb962ac59075b964b07152d234b70"  # Planfix's, sent by the gateway
PBX_TOKEN = "202cb962ac59075b964b07152d234b70"  # the PBX token, sent by Planfix
CLIENT, DID = "+7 910 123-45-67", "74951234567"
CALLID = "807-c1"
LINK = "https://rec.example.net/f.mp3"
AT = 1_778_743_325_000_000


def tenant(enabled: bool = True, **crm: Any) -> Tenant:
    return parse_tenant({
        "id": 807, "name": "ACME", "key": "k" * 24, "enabled": enabled,
        "pbx": {"kind": "telphin", "login": LOGIN},
        "crm": {"kind": "planfix", "planfix_url": URL, "planfix_token": PF_TOKEN,
                "token": PBX_TOKEN, **crm},
        "numbers": [DID],
    })


def popup(leg: str = "S1", extension: str = "101", direction: str = "incoming") -> dict:
    return {"direction": direction, "client": CLIENT,
            "did": DID if direction == "incoming" else "", "extension": extension,
            "sip": f"7001*{extension}", "at": AT, "call_id": f"807-c1-{leg}"}


def record(leg: str = "S1", extension: str = "101", direction: str = "incoming",
           status: str = "success", outcome: str = "answered", duration: int = 124,
           recording: str = "R1") -> dict:
    return {"direction": direction, "status": status, "outcome": outcome,
            "duration": duration if status == "success" else 0, "client": CLIENT,
            "did": DID if direction == "incoming" else "", "extension": extension,
            "sip": f"7001*{extension}" if extension else "", "started": AT,
            "recording": recording if status == "success" else "",
            "record_id": f"807-c1-{leg}"}


class World:
    """The strict fake Planfix, the module talking to it over StubTreq, and a tenant."""

    def __init__(self, who: Tenant | None = None, **fake_setup: Any) -> None:
        self.fake = FakePlanfix(PF_TOKEN, clock=Clock())
        self.fake.setup({"pbx_token": PBX_TOKEN, "pbx_url": "https://gw.example.net/crm/807/"
                         f"pbx/{LOGIN}", **fake_setup})
        self.clock = Clock()
        self.stub = StubTreq(self.fake.resource())
        self.crm = Planfix(HttpClient(reactor, client=self.stub, clock=self.clock), self.clock)
        self.tenant = who or tenant()
        self.seen = 0

    def perform(self, kind: str, payload: dict, link: str | None = None,
                call: str = "c1") -> Deferred:
        action = Action(tenant=807, call=call, kind=kind, key=kind, payload=payload,
                        created=AT / 1e6, id=1)
        return self.crm.perform(self.tenant, action, link)

    async def do(self, kind: str, payload: dict, link: str | None = None) -> str:
        summary, resp = await self.perform(kind, payload, link)
        return summary

    def sent(self) -> list[list[tuple[str, str]]]:
        """The form pairs (in order) of the requests since the last call."""
        out = [parse_qsl(r["raw"], keep_blank_values=True) for r in self.fake.requests[self.seen:]]
        self.seen = len(self.fake.requests)
        return out


# --- the interface and the config ----------------------------------------------------------


def test_planfix_provides_icrm_and_is_registered() -> None:
    assert verifyObject(ICrm, Planfix(HttpClient(reactor), Clock(), None))
    assert crm_type("planfix") is Planfix
    assert Planfix.secrets == ("planfix_token", "token")
    assert Planfix.has_responsible and Planfix.credential_fields == ()


def test_a_full_config_its_secrets_and_its_json() -> None:
    t = tenant(default_ext="500")
    assert t.crm == PlanfixConfig(kind="planfix", planfix_url=URL, planfix_token=PF_TOKEN,
                                  token=PBX_TOKEN, default_ext="500")
    shown = t.to_json()
    assert sorted(shown["crm"]) == ["credential", "default_ext", "kind", "planfix_url"]
    assert shown["secrets_set"]["crm.planfix_token"] and shown["secrets_set"]["crm.token"]
    assert PF_TOKEN not in repr(shown) + repr(t) and PBX_TOKEN not in repr(shown) + repr(t)
    assert Tenant.from_json(json.loads(json.dumps(t.to_json(secrets=True)))) == t
    assert Planfix.account(t) == "test.planfix.ru"
    assert Planfix.limits(t) == [("planfix:test.planfix.ru", 10.0, 20)]


def test_a_tenant_created_without_planfixs_url_and_token_waits_disabled_for_setup() -> None:
    waiting = tenant(enabled=False, planfix_url="", planfix_token="")
    assert (waiting.crm.planfix_url, waiting.crm.planfix_token) == ("", "")
    for missing in ("planfix_url", "planfix_token"):
        with pytest.raises(BadRequest) as raised:
            tenant(**{missing: ""})
        assert raised.value.field == f"crm.{missing}" and "setup" in raised.value.message


@pytest.mark.parametrize("url", [
    "http://test.planfix.ru/tel/api", "https://planfix.ru/tel/api",
    "https://test.planfix.ru.evil.test/tel/api", "https://test.planfix.org/tel/api",
    "https://user@test.planfix.ru/tel/api", "https://test.planfix.ru:8443/tel/api",
    "https://test.planfix.ru/tel/api?x=1", "https://test.planfix.ru/tel/api#f",
    "https://a.b.planfix.ru/tel/api", "ftp://test.planfix.ru/tel/api", "test.planfix.ru",
    "http://127.0.0.1:8080/tel/api", "http://localhost:8080/tel/api", "https://10.0.0.1/tel/api",
])
def test_a_url_other_than_an_https_planfix_host_is_refused(url: str, monkeypatch: Any) -> None:
    monkeypatch.delenv(LOOPBACK_ENV, raising=False)
    with pytest.raises(BadRequest) as raised:
        tenant(planfix_url=url)
    assert raised.value.field == "crm.planfix_url"


def test_accepted_urls_and_the_loopback_switch(monkeypatch: Any) -> None:
    monkeypatch.delenv(LOOPBACK_ENV, raising=False)
    assert tenant(planfix_url="https://acme.planfix.com/tel/api").crm.planfix_url.endswith("com/tel/api")
    assert tenant(planfix_url="https://Test.Planfix.ru/tel/api").crm.planfix_url
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    assert tenant(planfix_url="http://127.0.0.1:8080/tel/api").crm.planfix_url
    for url in ("http://127.0.0.1/tel/api", "https://127.0.0.1:8080/tel/api",
                "http://10.0.0.1:80/tel/api"):
        with pytest.raises(BadRequest):
            tenant(planfix_url=url)
    monkeypatch.setenv(LOOPBACK_ENV, "yes")
    with pytest.raises(BadRequest, match="tests only"):
        tenant(planfix_url="http://127.0.0.1:8080/tel/api")


@pytest.mark.parametrize("crm, field", [
    ({"token": ""}, "crm.token"),
    ({"token": "short"}, "crm.token"),
    ({"token": "has a space in it, sixteen+"}, "crm.token"),
    ({"token": 5}, "crm.token"),
    ({"planfix_token": "two words"}, "crm.planfix_token"),
    ({"planfix_token": 7}, "crm.planfix_token"),
    ({"default_ext": "1 0 1"}, "crm.default_ext"),
    ({"domain": "test.planfix.ru"}, "crm.domain"),
])
def test_bad_config_is_refused_naming_the_field(crm: dict, field: str) -> None:
    with pytest.raises(BadRequest) as raised:
        tenant(**crm)
    assert raised.value.field == field


def test_what_is_supported() -> None:
    t = tenant()
    table = [
        (POPUP, popup(), True), (POPUP, popup(direction="outgoing"), True),
        (POPUP_UPDATE, {**popup(), "state": "talking"}, True),
        (CLOSE_POPUP, {**popup(), "outcome": "cancelled"}, True),
        (RECORD, record(), True), (ATTACH, record(), True),
        (RECORD, {**record(), "direction": "internal"}, False),
        (POPUP, {**popup(), "direction": "internal"}, False),
        (SETUP, {"type": "enable"}, True),
    ]
    for kind, payload, expected in table:
        assert Planfix.supports(t, kind, payload) is expected, (kind, payload)


# --- the body table: actions → the exact forms Planfix receives ------------------------------

EV = [("cmd", "event"), ("type", "in")]
IN_101 = [("phone", "79101234567"), ("diversion", DID), ("ext", "101"), ("callid", CALLID)]
TOKEN = [("planfix_token", PF_TOKEN)]

BODIES = [
    pytest.param([], (POPUP, popup(), None),
                 [*EV, ("event", "INCOMING"), *IN_101, *TOKEN],
                 id="an incoming leg rings: INCOMING for its ext"),
    pytest.param([], (POPUP, popup(direction="outgoing"), None),
                 [("cmd", "event"), ("type", "out"), ("event", "OUTGOING"),
                  ("phone", "79101234567"), ("diversion", DID), ("ext", "101"),
                  ("callid", CALLID), *TOKEN],
                 id="an outgoing call: OUTGOING, the company number as diversion"),
    pytest.param([(POPUP, popup())], (POPUP_UPDATE, {**popup(), "state": "talking"}, None),
                 [*EV, ("event", "ACCEPTED"), *IN_101, *TOKEN],
                 id="answered: ACCEPTED"),
    pytest.param([(POPUP, popup())], (CLOSE_POPUP, {**popup(), "outcome": "cancelled"}, None),
                 [*EV, ("event", "COMPLETED"), *IN_101, ("duration", "0"),
                  ("is_recorded", "0"), ("status", "Cancelled"), *TOKEN],
                 id="stopped ringing unanswered: COMPLETED Cancelled"),
    pytest.param([(POPUP, popup()), (POPUP_UPDATE, popup())], (RECORD, record(), LINK),
                 [*EV, ("event", "COMPLETED"), *IN_101, ("duration", "124"),
                  ("is_recorded", "1"), ("status", "Success"), ("record_link", LINK), *TOKEN],
                 id="the talk ended: COMPLETED Success, duration, recording and its link"),
    pytest.param([(POPUP, popup())], (RECORD, record(), None),
                 [*EV, ("event", "COMPLETED"), *IN_101, ("duration", "124"),
                  ("is_recorded", "1"), ("status", "Success"), *TOKEN],
                 id="a recording whose link is not known yet: is_recorded, no record_link"),
    pytest.param([(POPUP, popup())], (RECORD, record(recording=""), LINK),
                 [*EV, ("event", "COMPLETED"), *IN_101, ("duration", "124"),
                  ("is_recorded", "0"), ("status", "Success"), *TOKEN],
                 id="no recording: is_recorded 0"),
    pytest.param([], (RECORD, {**record("missed", "500", status="missed",
                                        outcome="no-answer"), "sip": ""}, None),
                 [*EV, ("event", "COMPLETED"), ("phone", "79101234567"), ("diversion", DID),
                  ("ext", "500"), ("callid", CALLID), ("duration", "0"), ("is_recorded", "0"),
                  ("status", "Missed"), *TOKEN],
                 id="nobody answered: one COMPLETED Missed with the queue's ext"),
    pytest.param([(POPUP, popup(direction="outgoing"))],
                 (RECORD, record(direction="outgoing", status="missed", outcome="busy"), None),
                 [("cmd", "event"), ("type", "out"), ("event", "COMPLETED"),
                  ("phone", "79101234567"), ("diversion", DID), ("ext", "101"),
                  ("callid", CALLID), ("duration", "0"), ("is_recorded", "0"),
                  ("status", "Busy"), *TOKEN],
                 id="an outgoing call to a busy number: Busy"),
    pytest.param([(POPUP, popup()), (RECORD, record())], (ATTACH, record(), LINK),
                 [("cmd", "record"), ("callid", CALLID), ("record_link", LINK),
                  ("is_temp", "1"), *TOKEN],
                 id="a late recording: cmd=record"),
    pytest.param([], (SETUP, {"type": "enable"}, None), [[("cmd", "ping"), *TOKEN]],
                 id="setup enable: ping"),
    pytest.param([], (SETUP, {"type": "disable"}, None), None,
                 id="setup disable: nothing sent"),
]


@pytest.mark.parametrize("before, action, expected", BODIES)
@pytest_twisted.ensureDeferred
async def test_what_each_action_sends(before: list, action: tuple, expected: Any) -> None:
    world = World()
    for kind, payload in before:
        await world.do(kind, payload, LINK if kind == RECORD else None)
    world.sent()
    kind, payload, link = action
    await world.do(kind, payload, link)
    sent = world.sent()
    if expected is None:
        assert sent == []
    else:
        assert sent == (expected if isinstance(expected[0], list) else [expected])
    assert [r["content_type"] for r in world.fake.requests] == [
        "application/x-www-form-urlencoded"] * len(world.fake.requests)
    assert world.fake.violations == [] and all(r["status"] == 200 for r in world.fake.requests)


@pytest.mark.parametrize("outcome, status", [
    ("no-answer", "NoAnswer"), ("busy", "Busy"), ("failed", "NotAvailable"),
    ("cancelled", "NoAnswer"), ("", "NoAnswer")])
@pytest_twisted.ensureDeferred
async def test_outgoing_statuses_by_outcome(outcome: str, status: str) -> None:
    world = World()
    await world.do(RECORD, record(direction="outgoing", status="missed", outcome=outcome))
    [form] = world.sent()
    assert dict(form)["status"] == status


# --- the ring group, folded by the real call model ------------------------------------------


def fold(events: list[tuple[str, str, str, str, int]]) -> list[Action]:
    """(kind, leg, extension, outcome, seconds talked) → the actions the call model makes."""
    call, policy, out = Call(807, "c1"), Policy(), []
    for i, (kind, leg, extension, outcome, talked) in enumerate(events):
        ev = Event(tenant=807, call="c1", leg=leg, kind=kind, flow="in", at=AT + i * 1_000_000,
                   received=AT / 1e6 + i, extension=extension, sip=f"7001*{extension}",
                   peer=CLIENT, did=DID, outcome=outcome, duration=talked * 1_000_000,
                   recording="R1" if talked else "")
        out += call.event(ev, policy)
    out += call.expire(policy)
    return [Action(tenant=807, call="c1", kind=e.kind, key=e.key, payload=e.payload,
                   created=AT / 1e6, leg=e.leg) for e in out]


@pytest_twisted.ensureDeferred
async def test_a_ring_group_three_ring_one_answers() -> None:
    world = World()
    actions = fold([
        ("ring", "L1", "101", "", 0), ("ring", "L2", "102", "", 0), ("ring", "L3", "103", "", 0),
        ("answer", "L2", "102", "", 0),
        ("hangup", "L1", "101", "cancelled", 0), ("hangup", "L3", "103", "cancelled", 0),
        ("hangup", "L2", "102", "answered", 124)])
    for action in actions:
        await world.crm.perform(world.tenant, action, LINK if action.kind == RECORD else None)
    events = [(e["event"], e["ext"], e.get("status")) for e in world.fake.events]
    assert events == [
        ("INCOMING", "101", None), ("INCOMING", "102", None), ("INCOMING", "103", None),
        ("ACCEPTED", "102", None),
        ("COMPLETED", "101", "Cancelled"), ("COMPLETED", "103", "Cancelled"),
        ("COMPLETED", "102", "Success")]
    assert {e["callid"] for e in world.fake.events} == {CALLID}
    [final] = world.fake.completed[CALLID]
    assert (final["ext"], final["duration"], final["is_recorded"], final["record_link"]) == (
        "102", "124", "1", LINK)
    assert world.fake.popups[CALLID] == {"101": ["ringing", "closed"],
                                         "102": ["ringing", "talking", "final"],
                                         "103": ["ringing", "closed"]}
    assert world.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_ring_group_nobody_answers_one_missed_call() -> None:
    world = World()
    actions = fold([("ring", "L1", "101", "", 0), ("ring", "L2", "102", "", 0),
                    ("hangup", "L1", "101", "no-answer", 0),
                    ("hangup", "L2", "102", "no-answer", 0)])
    for action in actions:
        await world.crm.perform(world.tenant, action, None)
    assert [(e["event"], e["ext"], e.get("status")) for e in world.fake.events] == [
        ("INCOMING", "101", None), ("INCOMING", "102", None),
        ("COMPLETED", "101", "Cancelled"), ("COMPLETED", "102", "Cancelled"),
        ("COMPLETED", "101", "Missed")]  # straight to extensions: the first one rang
    assert world.fake.violations == []


@pytest_twisted.ensureDeferred
async def test_a_late_recording_goes_as_cmd_record_after_completed() -> None:
    world = World()
    await world.do(POPUP, popup())
    await world.do(RECORD, record(), None)
    summary = await world.do(ATTACH, record(), LINK)
    assert "record callid=807-c1" in summary
    assert world.fake.records == [{"cmd": "record", "callid": CALLID, "record_link": LINK,
                                   "is_temp": "1"}]
    with pytest.raises(Permanent, match="no URL"):
        await world.do(ATTACH, record(), None)


@pytest_twisted.ensureDeferred
async def test_the_token_is_never_in_a_summary() -> None:
    world = World()
    summary = await world.do(POPUP, popup())
    assert summary == f"POST {URL} event in/INCOMING ext=101 callid={CALLID}"
    assert PF_TOKEN not in summary


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
@pytest_twisted.ensureDeferred
async def test_server_errors_are_retryable(status: int) -> None:
    world = World()
    world.fake.faults.update({"fail_status": status})
    with pytest.raises(Retryable) as raised:
        await world.do(POPUP, popup())
    assert raised.value.status == status


@pytest_twisted.ensureDeferred
async def test_no_answer_in_time_is_retryable() -> None:
    world = World()
    world.fake.faults.update({"hang": True})
    d = world.perform(POPUP, popup())
    world.clock.advance(11)
    with pytest.raises(Retryable, match="no answer"):
        await d
    world.fake.faults.update({"hang": False})


@pytest_twisted.ensureDeferred
async def test_planfixs_400_and_401_are_permanent() -> None:
    world = World(tenant(planfix_token="not-the-token"))
    with pytest.raises(Permanent) as raised:
        await world.do(POPUP, popup())
    assert raised.value.status == 401 and "Invalid token" in str(raised.value)
    world = World()
    with pytest.raises(Permanent) as raised:  # ACCEPTED with no INCOMING: refused 400
        await world.do(POPUP_UPDATE, popup())
    assert raised.value.status == 400 and "Invalid parameters" in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_a_tenant_not_set_up_sends_nothing() -> None:
    world = World(tenant(enabled=False, planfix_url="", planfix_token=""))
    with pytest.raises(Permanent, match="setup"):
        await world.do(POPUP, popup())
    assert world.fake.requests == []


@pytest_twisted.ensureDeferred
async def test_a_stored_loopback_url_is_refused_without_the_switch(monkeypatch: Any) -> None:
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    t = tenant(planfix_url="http://127.0.0.1:8080/tel/api")
    monkeypatch.delenv(LOOPBACK_ENV)
    world = World(t)
    with pytest.raises(Permanent, match="tests only"):
        await world.do(POPUP, popup())


@pytest_twisted.ensureDeferred
async def test_setup_checks_that_planfix_holds_our_pbx_token() -> None:
    world = World()
    summary = await world.do(SETUP, {"type": "enable"})
    assert "Planfix posts to https://gw.example.net/crm/807/pbx/" in summary
    world.fake.setup({"pbx_token": "another-token-0123456789"})
    with pytest.raises(Permanent, match="another PBX token"):
        await world.do(SETUP, {"type": "enable"})


# --- the responsible lookup ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_responsible_employees_short_number() -> None:
    world = World(contacts={"79101234567": {"contact_name": "Иванов Иван", "responsible": 103},
                            "79160000000": {"contact_name": "Без ответственного"},
                            "79260000000": {"responsible": "104"}})
    assert await world.crm.responsible(world.tenant, CLIENT) == "103"
    assert dict(world.sent()[0]) == {"cmd": "contact", "phone": "79101234567",
                                     "planfix_token": PF_TOKEN}
    assert await world.crm.responsible(world.tenant, "+79260000000") == "104"
    assert await world.crm.responsible(world.tenant, "79160000000") is None
    assert await world.crm.responsible(world.tenant, "79990000000") is None  # unknown: {}
    assert await world.crm.responsible(world.tenant, "anonymous") is None
    assert len(world.sent()) == 3  # no request for a number without digits


class Answer(Resource):
    isLeaf = True

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self.status, self.body = status, body

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.status)
        return self.body


@pytest.mark.parametrize("status, body, expected", [
    (200, b'{ contact_name: "A", responsible: 105 }', "105"),  # the document's notation
    (200, b"", None),
    (200, b'{"responsible": null}', None),
    (200, b'{"responsible": true}', None),
    (200, b"<html>oops</html>", Permanent),
    (200, b'{"error": "Invalid token"}', Permanent),
    (401, b'{"error": "Invalid token"}', Permanent),
    (400, b'{"error": "Invalid parameters"}', Permanent),
    (503, b"", Retryable),
])
@pytest_twisted.ensureDeferred
async def test_contact_answers(status: int, body: bytes, expected: Any) -> None:
    crm = Planfix(HttpClient(reactor, client=StubTreq(Answer(status, body))), Clock())
    if isinstance(expected, type):
        with pytest.raises(expected):
            await crm.responsible(tenant(), CLIENT)
    else:
        assert await crm.responsible(tenant(), CLIENT) == expected


# --- Planfix → gateway: the module's parsing -------------------------------------------------


def inbound(fields: dict[str, str], content_type: str = "application/x-www-form-urlencoded",
            body: bytes | None = None) -> Inbound:
    return Inbound(method="POST", name=LOGIN, query=b"", content_type=content_type,
                   body=urlencode(fields).encode() if body is None else body)


def test_make_call_and_setup_are_commands() -> None:
    t = tenant()
    assert Planfix.command(inbound({"cmd": "makeCall", "from": "101", "to": "79101234567",
                                    "token": PBX_TOKEN}), t, "pbx") == Command(
        action="makecall", employee="101", number="79101234567")
    assert Planfix.command(inbound({"cmd": "setup", "token": PBX_TOKEN,
                                    "planfix_token": "new", "planfix_url": URL}),
                           t, "planfix") == Command(
        action="setup", settings={"planfix_token": "new", "planfix_url": URL})


@pytest.mark.parametrize("fields, status, message", [
    ({"cmd": "makeCall", "from": "101", "to": "79101234567", "token": "wrong"}, 401,
     "Invalid token"),
    ({"cmd": "makeCall", "from": "101", "to": "79101234567"}, 401, "Invalid token"),
    ({"cmd": "makeCall", "from": "101", "token": PBX_TOKEN}, 400, "Invalid parameters"),
    ({"cmd": "makeCall", "to": "79101234567", "token": PBX_TOKEN}, 400, "Invalid parameters"),
    ({"cmd": "makeCall", "from": "101", "to": "call me", "token": PBX_TOKEN}, 400,
     "Invalid parameters"),
    ({"cmd": "setup", "planfix_url": URL, "token": PBX_TOKEN}, 400, "Invalid parameters"),
    ({"cmd": "setup", "planfix_token": "t", "token": PBX_TOKEN}, 400, "Invalid parameters"),
    ({"cmd": "hangup", "token": PBX_TOKEN}, 400, "Invalid parameters"),
    ({"token": PBX_TOKEN}, 400, "Invalid parameters"),
])
def test_planfixs_refusals(fields: dict, status: int, message: str) -> None:
    with pytest.raises(BadRequest) as raised:
        Planfix.command(inbound(fields), tenant(), "pbx")
    assert (raised.value.status, str(raised.value), raised.value.field) == (status, message, "")


def test_not_a_form_and_an_unknown_action() -> None:
    with pytest.raises(BadRequest) as raised:
        Planfix.command(inbound({}, "application/json", b'{"cmd": "makeCall"}'), tenant(), "pbx")
    assert str(raised.value) == "Invalid parameters"
    with pytest.raises(BadRequest) as raised:
        Planfix.command(inbound({"token": PBX_TOKEN}), tenant(), "makecall")
    assert (raised.value.field, raised.value.status) == ("action", 404)


# --- Planfix → gateway through the real public site --------------------------------------------

TELPHIN, APP, SECRET = "http://apiproxy.telphin.ru", "app1", "s3cret-of-the-app"


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Any) -> Any:
    """A gateway whose HTTP client reaches a fake Telphin and the fake Planfix (by host),
    with a Planfix tenant created as a customer following the README would: disabled, with
    its PBX token, waiting for Planfix's setup."""
    planfix = FakePlanfix(PF_TOKEN, clock=reactor)
    telphin = FakeTelphin({APP: SECRET}, clock=reactor)
    telphin.setup({"extensions": {"200501": "7001*101"}})
    hosts = NameVirtualHost()
    hosts.default = telphin.resource()
    hosts.addHost(b"test.planfix.ru", planfix.resource())
    harness = Harness(tmp_path, http=HttpClient(reactor, client=StubTreq(hosts)))
    await harness.start()
    data = telphin_tenant(807).to_json(secrets=True)
    data["pbx"].update(api_url=TELPHIN, client_id=APP, client_secret=SECRET,
                       extension_ids={"101": "200501"})
    data["crm"] = {"kind": "planfix", "token": PBX_TOKEN}
    data["enabled"] = False
    waiting = Tenant.from_json(data)
    await harness.gw.save_tenant(waiting, harness.gw.tenants[807])
    base = f"http://127.0.0.1:{harness.port.getHost().port}"
    planfix.setup({"pbx_url": f"{base}/crm/807/pbx/{LOGIN}", "pbx_token": PBX_TOKEN,
                   "own_url": URL})
    harness.planfix, harness.telphin, harness.base = planfix, telphin, base
    yield harness
    await harness.stop()


@pytest_twisted.ensureDeferred
async def test_planfixs_setup_fills_the_tenant_and_enables_it(site: Any) -> None:
    assert not site.gw.tenants[807].enabled
    status, _ = await site.planfix.send_setup(site.client)
    assert status == 200
    live = site.gw.tenants[807]
    assert live.enabled and (live.crm.planfix_url, live.crm.planfix_token) == (URL, PF_TOKEN)
    stored = {t.id: t for t in await site.store.tenants()}[807]
    assert stored == live


@pytest_twisted.ensureDeferred
async def test_a_setup_the_schema_refuses_is_shown_in_planfix(site: Any) -> None:
    site.planfix.setup({"own_url": "https://evil.example.net/tel/api"})
    status, text = await site.planfix.send_setup(site.client)
    assert status == 400 and "crm.planfix_url" in json.loads(text)["error"]
    assert site.planfix.sent[-1]["shown"] == text
    assert not site.gw.tenants[807].enabled


@pytest_twisted.ensureDeferred
async def test_a_wrong_token_is_401_in_planfixs_words(site: Any) -> None:
    site.planfix.setup({"pbx_token": "not-the-pbx-token-at-all"})
    status, text = await site.planfix.send_setup(site.client)
    assert (status, json.loads(text)) == (401, {"error": "Invalid token", "field": ""})
    status, text = await site.planfix.make_call(site.client, "101", "79101234567")
    assert (status, json.loads(text)["error"]) == (401, "Invalid token")
    assert not site.gw.tenants[807].enabled and site.telphin.state()["callbacks"] == []


@pytest_twisted.ensureDeferred
async def test_make_call_rings_the_extension_then_dials_the_client(site: Any) -> None:
    # Before setup the tenant is disabled: click-to-call is refused.
    status, _ = await site.planfix.make_call(site.client, "101", "79101234567")
    assert status == 403
    assert (await site.planfix.send_setup(site.client))[0] == 200
    status, text = await site.planfix.make_call(site.client, "101", "79101234567")
    assert status == 200, text
    [callback] = site.telphin.state()["callbacks"]
    assert (callback["extension_id"], callback["src_num"], callback["dst_num"]) == (
        200501, ["101"], "79101234567")  # as Planfix wrote it; the PBX module dials it
    status, text = await site.planfix.make_call(site.client, "101", "")
    assert (status, json.loads(text)["error"]) == (400, "Invalid parameters")


@pytest_twisted.ensureDeferred
async def test_the_planfix_segment_of_the_documents_example_url_works_too(site: Any) -> None:
    status, _ = await site.planfix.send(
        site.client, {"cmd": "setup", "planfix_token": PF_TOKEN, "planfix_url": URL},
        url=f"{site.base}/crm/807/planfix/{LOGIN}")
    assert status == 200 and site.gw.tenants[807].enabled
    reply = await site.request("POST", f"/crm/807/makecall/{LOGIN}",
                               urlencode({"cmd": "makeCall", "token": PBX_TOKEN}).encode())
    assert reply.status == 404


def test_the_setup_guide_names_the_pbx_url_and_token() -> None:
    assert Planfix.setup_guide(tenant(), "https://gw.example.net") == [
        {"what": "Planfix → Integrations → Virtual PBX → Planfix API for telephony: PBX URL",
         "method": "POST", "url": f"https://gw.example.net/crm/807/pbx/{LOGIN}",
         "content_type": "application/x-www-form-urlencoded"},
        {"what": "the same dialog: PBX token", "value": PBX_TOKEN}]
