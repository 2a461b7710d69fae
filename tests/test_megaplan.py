"""The Megaplan CRM module: its config, the exact requests each action makes, and the whole
contract against the strict fake Megaplan (tests/fakes/megaplan.py), through the real HTTP
stack (StubTreq, and once over loopback TCP)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from gateway.crm import LOOPBACK_ENV, Command, ICrm, crm_type
from gateway.crm.megaplan import (COMMUNICATIONS, Megaplan, MegaplanConfig, short_extension,
                                  token_key)
from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient
from gateway.model import (ATTACH, CLOSE_POPUP, POPUP, POPUP_UPDATE, RECORD, SETUP, Action,
                           Inbound, Tenant, parse_tenant)
from tests.fakes.megaplan import FakeMegaplan

DOMAIN = "acme.megaplan.ru"
USER, PASSWORD = "robot@acme.ru", "S3cret"
API = "/api/v3"
TOKEN_PATH = f"{API}/auth/access_token"
CLIENT, DID, NEW = "+79161234567", "74951234567", "+7 903 111-22-33"
BOSS, SECRETARY = "1000009", "1000008"  # default responsible, fallback user

SETUP_FAKE = {
    "employees": [
        {"id": "1000005", "name": "Иван Петров", "internalNumber": "101"},
        {"id": "1000006", "name": "Мария Сидорова", "internalNumber": "sip:102@pbx.example.net"},
        {"id": "1000007", "name": "Без телефонии"},
        {"id": SECRETARY, "name": "Секретарь", "internalNumber": "7001*100"},
        {"id": BOSS, "name": "Старший менеджер"},
    ],
    "routes": {
        CLIENT: ["1000005"],
        "74950000001": ["1000007"],
        "74950000002": {"employees": ["1000007", "1000006"], "type": "all"},
    },
    "contractors": [{
        "contentType": "ContractorHuman", "id": "4001", "firstName": "Олег",
        "contactInfo": [{"contentType": "ContactInfo", "type": "phone", "value": "+7 916 123-45-67"}],
    }],
}

# 2026-05-14 10:22:05 in Moscow (+03:00)
AT = int(datetime(2026, 5, 14, 7, 22, 5, tzinfo=timezone.utc).timestamp()) * 1_000_000
ENDED = AT / 1_000_000 + 20.0  # gateway seconds the unanswered leg's end was folded


def when(value: str) -> dict[str, str]:
    return {"contentType": "DateTime", "value": f"2026-05-14T{value}+03:00"}


def employee(ident: str) -> dict[str, str]:
    return {"contentType": "Employee", "id": ident}


def popup(leg: str = "S1", direction: str = "incoming", client: str = CLIENT,
          extension: str = "101", call: str = "c1") -> dict[str, Any]:
    return {"direction": direction, "client": client, "did": DID if direction == "incoming" else "",
            "extension": extension, "sip": f"7001*{extension}", "at": AT,
            "call_id": f"807-{call}-{leg}"}


def record(leg: str = "S1", direction: str = "incoming", status: str = "success",
           client: str = CLIENT, extension: str = "101", duration: int = 93,
           call: str = "c1") -> dict[str, Any]:
    return {"direction": direction, "status": status,
            "outcome": "answered" if status == "success" else "no-answer",
            "duration": duration if status == "success" else 0, "client": client,
            "did": DID if direction == "incoming" else "", "extension": extension,
            "sip": f"7001*{extension}" if extension else "", "started": AT,
            "recording": "R1" if status == "success" else "",
            "record_id": f"807-{call}-{leg}"}


def missed(extension: str = "500", client: str = CLIENT) -> dict[str, Any]:
    """The one missed record of an incoming call no phone answered (a queue's hangup)."""
    return {**record("missed", status="missed", extension=extension, client=client),
            "sip": ""}


def tenant(employees: dict[str, str] | None = None, **crm: Any) -> Tenant:
    return parse_tenant({
        "id": 807, "name": "ACME", "key": "k" * 24,
        "pbx": {"kind": "telphin", "login": "TLP55522"},
        "crm": {"kind": "megaplan", "domain": DOMAIN, "login": USER, "password": PASSWORD,
                **crm},
        "employees": employees or {}, "options": {"timezone": "Europe/Moscow"},
    }, credentials={3: {"kind": "megaplan", "name": "ACME Megaplan", "fields": {}}})


MAPPED = {"101": "1000005", "102": "1000006"}


class MemoryStore:
    """The two store methods the module uses, in memory."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        self.reads = 0

    async def token(self, key: str) -> dict[str, Any] | None:
        self.reads += 1
        return json.loads(json.dumps(self.tokens[key])) if key in self.tokens else None

    async def put_token(self, key: str, data: dict[str, Any]) -> None:
        self.tokens[key] = json.loads(json.dumps(data))


class World:
    """A strict fake Megaplan on a Clock, the module talking to it, and a tenant."""

    def __init__(self, who: Tenant | None = None, token_lifetime: int = 172800,
                 store: Any = None, fake: FakeMegaplan | None = None) -> None:
        self.clock = Clock() if fake is None else fake.clock
        if fake is None:
            fake = FakeMegaplan(USER, PASSWORD, clock=self.clock, token_lifetime=token_lifetime)
            fake.setup(SETUP_FAKE)
        self.fake = fake
        self.stub = StubTreq(fake.resource())
        self.store = MemoryStore() if store is None else store
        self.crm = Megaplan(HttpClient(reactor, client=self.stub), self.clock, self.store)
        self.tenant = who or tenant(MAPPED)
        self.seen = 0

    def perform(self, kind: str, payload: dict[str, Any], link: str | None = None,
                attempts: int = 0, created: float = ENDED) -> Deferred:
        action = Action(tenant=807, call="c1", kind=kind, key=kind, payload=payload,
                        created=created, id=1, attempts=attempts)
        return self.crm.perform(self.tenant, action, link)

    async def do(self, kind: str, payload: dict[str, Any], link: str | None = None,
                 **kwargs: Any) -> str:
        summary, _ = await self.perform(kind, payload, link, **kwargs)
        return summary

    async def together(self, *started: Deferred, step: float = 1.0) -> list[Any]:
        """Let concurrent performs run through the fake's delays (on the Clock)."""
        for _ in range(100):
            if all(d.called for d in started):
                break
            self.clock.advance(step)
            self.stub.flush()
        return [await d for d in started]

    def sent(self, with_tokens: bool = False) -> list[tuple[Any, ...]]:
        """(method, path, query as JSON, body) of the requests since the last call."""
        out = []
        for r in self.fake.requests[self.seen:]:
            if r["path"] == TOKEN_PATH and not with_tokens:
                continue
            query = json.loads(r["query"]) if r["query"] else None
            out.append((r["method"], r["path"], query, r["body"]))
        self.seen = len(self.fake.requests)
        return out

    def statuses(self) -> list[tuple[str, int]]:
        return [(r["path"], r["status"]) for r in self.fake.requests]

    def call(self, provider: str) -> dict[str, Any]:
        found = self.fake.call(provider)
        assert found is not None, provider
        return found


# --- the interface and the config ----------------------------------------------------------


def test_megaplan_provides_icrm_and_is_registered() -> None:
    # verifyObject, not verifyClass: the config-level methods are static.
    assert ICrm.implementedBy(Megaplan)
    assert verifyObject(ICrm, Megaplan(HttpClient(reactor), Clock(), MemoryStore()))
    assert crm_type("megaplan") is Megaplan
    assert Megaplan.secrets == ("password",)
    assert Megaplan.credential_fields == ("domain", "login", "password")
    assert Megaplan.has_responsible


def test_a_full_config_and_its_json_names() -> None:
    t = tenant(MAPPED, create_client=True, create_contact=True,
               communications=["outgoing_answered", "incoming_missed"],
               default_responsible=BOSS, fallback_user=int(SECRETARY), credential=3)
    assert t.crm == MegaplanConfig(
        kind="megaplan", credential=3, domain=DOMAIN, login=USER, password=PASSWORD,
        create_client=True, create_contact=True,
        communications=("incoming_missed", "outgoing_answered"),
        default_responsible=BOSS, fallback_user=SECRETARY)
    shown = t.to_json()
    assert "password" not in shown["crm"] and shown["secrets_set"]["crm.password"] is True
    assert sorted(shown["crm"]) == [
        "communications", "create_client", "create_contact", "credential",
        "default_responsible", "domain", "fallback_user", "kind", "login"]
    # Stored and loaded again (lists become the tuple the class says).
    assert Tenant.from_json(json.loads(json.dumps(t.to_json(secrets=True)))) == t


def test_defaults_are_all_communications_and_no_contacts() -> None:
    config = tenant().crm
    assert config.communications == COMMUNICATIONS
    assert (config.create_client, config.create_contact) == (False, False)
    assert (config.default_responsible, config.fallback_user) == ("", "")
    assert tenant(domain=" ACME.Megaplan.RU ").crm.domain == DOMAIN


@pytest.mark.parametrize("domain", [
    "", "acme", "megaplan.ru", "acme.megaplan.com", "acme.megaplan.ru.evil.test",
    "https://acme.megaplan.ru", "acme.megaplan.ru/", "acme.megaplan.ru:443",
    "a.b.megaplan.ru", "-acme.megaplan.ru", "acme-.megaplan.ru", "ac_me.megaplan.ru",
    "acme .megaplan.ru", "evil.test#.megaplan.ru", "user@acme.megaplan.ru",
    "127.0.0.1:8080", "localhost:8080", "127.0.0.1", "10.0.0.1:80",
])
def test_a_domain_other_than_name_dot_megaplan_ru_is_refused(domain: str,
                                                             monkeypatch: Any) -> None:
    monkeypatch.delenv(LOOPBACK_ENV, raising=False)
    with pytest.raises(BadRequest) as raised:
        tenant(domain=domain)
    assert raised.value.field == "crm.domain"


@pytest.mark.parametrize("domain", ["127.0.0.1:0", "127.0.0.1:65536", "10.0.0.1:80",
                                    "127.0.0.2:80", "localhost", "acme.test:80"])
def test_the_test_setting_allows_loopback_with_a_port_only(domain: str,
                                                           monkeypatch: Any) -> None:
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    assert tenant(domain="127.0.0.1:8080").crm.domain == "127.0.0.1:8080"
    assert tenant(domain="localhost:80").crm.domain == "localhost:80"
    with pytest.raises(BadRequest) as raised:
        tenant(domain=domain)
    assert raised.value.field == "crm.domain"


def test_loopback_needs_the_setting_to_be_exactly_1(monkeypatch: Any) -> None:
    monkeypatch.setenv(LOOPBACK_ENV, "yes")
    with pytest.raises(BadRequest, match="tests only"):
        tenant(domain="127.0.0.1:8080")


@pytest.mark.parametrize("crm, field", [
    ({"login": ""}, "crm.login"),
    ({"password": ""}, "crm.password"),
    ({"password": 5}, "crm.password"),
    ({"token": "x"}, "crm.token"),
    ({"create_client": "yes"}, "crm.create_client"),
    ({"create_contact": 1}, "crm.create_contact"),
    ({"communications": ["incoming"]}, "crm.communications"),
    ({"communications": "incoming_missed"}, "crm.communications"),
    ({"default_responsible": "ivan"}, "crm.default_responsible"),
    ({"fallback_user": 1.5}, "crm.fallback_user"),
    ({"fallback_user": True}, "crm.fallback_user"),
])
def test_bad_options_are_refused_naming_the_field(crm: dict[str, Any], field: str) -> None:
    with pytest.raises(BadRequest) as raised:
        tenant(**crm)
    assert raised.value.field == field


def test_employees_must_name_megaplan_employee_ids() -> None:
    with pytest.raises(BadRequest) as raised:
        tenant({"101": "Иван"})
    assert raised.value.field == "employees.101"


def test_account_limits_and_supports() -> None:
    t = tenant(communications=["incoming_answered", "outgoing_answered"])
    assert Megaplan.account(t) == DOMAIN and token_key(t.crm) == f"megaplan:{DOMAIN}:{USER}"
    assert Megaplan.limits(t) == [(f"megaplan:{DOMAIN}", 5.0, 5)]
    internal = {**record(), "direction": "internal"}
    table = [
        (POPUP, popup(), True),
        (POPUP, popup(direction="outgoing"), True),
        (POPUP_UPDATE, {**popup(), "state": "talking"}, True),
        (CLOSE_POPUP, {**popup(), "outcome": "no-answer"}, True),
        (RECORD, record(), True),
        # a record of an unwanted type may still have to finish its pop-up's CallInfo
        (RECORD, record(direction="outgoing", status="missed"), True),
        (RECORD, missed(), False),  # incoming_missed not picked, and it never had a pop-up
        (ATTACH, record(), True),
        (ATTACH, record(direction="outgoing", status="missed"), False),
        (RECORD, internal, False),
        (POPUP, {**popup(), "direction": "internal"}, False),
        (SETUP, {"type": "enable"}, True),
    ]
    for kind, payload, expected in table:
        assert Megaplan.supports(t, kind, payload) is expected, (kind, payload)
    assert Megaplan.supports(tenant(), RECORD, missed())


def test_short_extensions() -> None:
    assert [short_extension(n) for n in ("101", "sip:102@pbx.example.net", "7001*103",
                                         "SIP:7001*104@host", " 105 ")] == [
        "101", "102", "103", "104", "105"]


def test_click_to_call_is_the_plain_form() -> None:
    t = tenant()
    request = Inbound(method="POST", name="TLP55522", query=b"key=" + b"k" * 24,
                      body=b'{"employee": "1000005", "number": "+7 916 123-45-67"}',
                      content_type="application/json")
    assert Megaplan.command(request, t, "makecall") == Command(
        action="makecall", employee="1000005", number="+7 916 123-45-67")
    with pytest.raises(BadRequest):
        Megaplan.command(attrs.evolve(request, query=b"key=wrong"), t, "makecall")


# --- the body table: actions → the exact requests Megaplan receives --------------------------

CALLING = {
    "contentType": "CallInfo", "type": "in", "state": "calling", "fromPhone": "79161234567",
    "toPhone": DID, "toUser": employee("1000005"), "providerId": "807-c1-S1",
    "timeFrom": when("10:22:05")}
PROVIDER = f"{API}/callInfo/provider"
LINK = "https://rec.example.net/R1.mp3"

BODIES = [
    pytest.param(
        {}, [], (POPUP, popup(), None),
        [("POST", f"{API}/callInfo", None, CALLING)],
        id="an incoming leg rings: a calling CallInfo for its employee"),
    pytest.param(
        {}, [], (POPUP, popup(direction="outgoing", client="8 (903) 111-22-33"), None),
        [("POST", f"{API}/callInfo", None, {
            "contentType": "CallInfo", "type": "out", "state": "calling",
            "fromPhone": "101", "toPhone": "79031112233", "fromUser": employee("1000005"),
            "providerId": "807-c1-S1", "timeFrom": when("10:22:05")})],
        id="an outgoing leg dials: the employee is fromUser"),
    pytest.param(
        {}, [(POPUP, popup())], (POPUP_UPDATE, {**popup(), "state": "talking"}, None),
        [("POST", PROVIDER, None,
          {"contentType": "CallInfo", "providerId": "807-c1-S1", "state": "talking"})],
        id="answered: talking, by providerId"),
    pytest.param(
        {}, [(POPUP, popup())], (CLOSE_POPUP, {**popup(), "outcome": "cancelled"}, None),
        [("POST", PROVIDER, None, {
            "contentType": "CallInfo", "providerId": "807-c1-S1", "state": "finished",
            "type": "miss", "timeTo": when("10:22:25")})],
        id="a leg stops ringing unanswered: finished, miss"),
    pytest.param(
        {}, [(POPUP, popup())], (RECORD, record(), LINK),
        [("POST", PROVIDER, None, {
            "contentType": "CallInfo", "providerId": "807-c1-S1", "state": "finished",
            "type": "in", "timeTo": when("10:23:38"), "recordLinks": [LINK]})],
        id="the record of a leg with a pop-up finishes its CallInfo"),
    pytest.param(
        {}, [(POPUP, popup(direction="outgoing"))],
        (RECORD, record(direction="outgoing", status="missed"), None),
        [("POST", PROVIDER, None, {
            "contentType": "CallInfo", "providerId": "807-c1-S1", "state": "finished",
            "type": "fail", "timeTo": when("10:22:05")})],
        id="an outgoing call that did not connect: fail"),
    pytest.param(
        {}, [], (RECORD, record(direction="outgoing"), LINK),
        [("POST", PROVIDER, None, {
            "contentType": "CallInfo", "providerId": "807-c1-S1", "state": "finished",
            "type": "out", "timeTo": when("10:23:38"), "recordLinks": [LINK]}),
         ("POST", f"{API}/callInfo/history", None, [{
             "contentType": "CallInfo", "type": "out", "state": "finished",
             "fromPhone": "101", "toPhone": "79161234567", "fromUser": employee("1000005"),
             "providerId": "807-c1-S1", "timeFrom": when("10:22:05"),
             "timeTo": when("10:23:38"), "recordLinks": [LINK]}])],
        id="a record whose pop-up was never made: update 404, then history"),
    pytest.param(
        {"default_responsible": BOSS}, [], (RECORD, missed(), None),
        [("POST", f"{API}/callInfo/history", None, [{
            "contentType": "CallInfo", "type": "miss", "state": "finished",
            "fromPhone": "79161234567", "toPhone": DID, "toUser": employee(BOSS),
            "providerId": "807-c1-missed", "timeFrom": when("10:22:05"),
            "timeTo": when("10:22:05")}])],
        id="a missed call: history at once, for the default responsible"),
    pytest.param(
        {}, [(POPUP, popup()), (RECORD, record())], (ATTACH, record(), LINK),
        [("POST", PROVIDER, None,
          {"contentType": "CallInfo", "providerId": "807-c1-S1", "recordLinks": [LINK]})],
        id="a late recording: recordLinks by providerId"),
    pytest.param(
        {"create_client": True}, [], (POPUP, popup(client=NEW), None),
        [("POST", f"{API}/callInfo", None, {**CALLING, "fromPhone": "79031112233"}),
         ("GET", f"{API}/contractor", {"q": "79031112233"}, None),
         ("POST", f"{API}/contractor", None, {
             "contentType": "ContractorHuman", "firstName": "Клиент 79031112233",
             "contactInfo": [{"contentType": "ContactInfo", "type": "phone",
                              "value": "79031112233", "isMain": True}],
             "responsibles": [employee("1000005")]}),
         ("POST", f"{API}/callInfo/2201/setContractor", None,
          {"contentType": "ContractorHuman", "id": "3001"})],
        id="an unknown caller with create_client: searched, created, attached"),
    pytest.param(
        {"create_client": True}, [], (POPUP, popup(), None),
        [("POST", f"{API}/callInfo", None, CALLING),
         ("GET", f"{API}/contractor", {"q": "79161234567"}, None),
         ("POST", f"{API}/callInfo/2201/setContractor", None,
          {"contentType": "ContractorHuman", "id": "4001"})],
        id="a known caller with create_client: found and attached"),
    pytest.param(
        {}, [], (SETUP, {"type": "enable"}, None),
        [("GET", f"{API}/callUserConfig", {"limit": 100}, None)],
        id="setup enable: a password login, then the telephony settings"),
    pytest.param({}, [], (SETUP, {"type": "disable"}, None), [],
                 id="setup disable: nothing to send"),
]


@pytest.mark.parametrize("options, before, action, expected", BODIES)
@pytest_twisted.ensureDeferred
async def test_what_each_action_sends(options: dict[str, Any], before: list[tuple[str, Any]],
                                      action: tuple[str, Any, Any],
                                      expected: list[tuple[Any, ...]]) -> None:
    world = World(tenant(MAPPED, **options))
    for kind, payload in before:
        await world.do(kind, payload)
    world.sent()
    kind, payload, link = action
    await world.do(kind, payload, link)
    if kind == POPUP:
        # Every pop-up first looks for the CallInfo an earlier try may have made: a try cut
        # by a kill is never recorded, so its attempt count cannot tell.
        expected = [("GET", f"{API}/callInfo/provider", {"providerId": payload["call_id"]},
                     None), *expected]
    assert world.sent() == expected
    # The strict fake took every one of them (the one 404 is the "no pop-up" probe).
    assert all(status == 200 or (path, status) == (PROVIDER, 404)
               for path, status in world.statuses()), world.statuses()


# --- the call lifecycle in Megaplan --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_incoming_call_goes_calling_talking_finished_in_the_widget() -> None:
    world = World()
    summary = await world.do(POPUP, popup())
    assert "→ CallInfo 2201" in summary
    await world.do(POPUP_UPDATE, {**popup(), "state": "talking"})
    await world.do(RECORD, record(), LINK)
    call = world.call("807-c1-S1")
    assert call["states"] == ["calling", "talking", "finished"]
    assert call["widget_events"] == 3 and not call["via_history"]
    entity = call["entity"]
    assert (entity["type"], entity["toUser"], entity["recordLinks"]) == (
        "in", employee("1000005"), [LINK])
    assert (entity["timeFrom"], entity["timeTo"]) == (when("10:22:05"), when("10:23:38"))


@pytest_twisted.ensureDeferred
async def test_every_ringing_employee_gets_a_call_info_and_the_others_see_it_finish() -> None:
    world = World()
    await world.do(POPUP, popup("S1", extension="101"))
    await world.do(POPUP, popup("S2", extension="102"))
    await world.do(POPUP_UPDATE, {**popup("S1"), "state": "talking"})
    await world.do(CLOSE_POPUP, {**popup("S2", extension="102"), "outcome": "cancelled"})
    await world.do(RECORD, record("S1"), LINK)
    first, second = world.call("807-c1-S1"), world.call("807-c1-S2")
    assert first["entity"]["toUser"] == employee("1000005")
    assert second["entity"]["toUser"] == employee("1000006")
    assert first["states"] == ["calling", "talking", "finished"]
    assert second["states"] == ["calling", "finished"] and second["entity"]["type"] == "miss"
    assert first["widget"] and second["widget"]


@pytest_twisted.ensureDeferred
async def test_a_late_recording_updates_the_record_links() -> None:
    world = World()
    await world.do(POPUP, popup())
    await world.do(RECORD, record())
    assert world.call("807-c1-S1")["entity"]["recordLinks"] == []
    await world.do(ATTACH, record(), LINK)
    call = world.call("807-c1-S1")
    assert call["entity"]["recordLinks"] == [LINK]
    assert call["states"] == ["calling", "finished"]


@pytest_twisted.ensureDeferred
async def test_a_late_recording_of_a_history_call_and_of_no_call() -> None:
    world = World()
    await world.do(RECORD, record(direction="outgoing"))  # no pop-up: history
    await world.do(ATTACH, record(direction="outgoing"), LINK)
    call = world.call("807-c1-S1")
    assert call["via_history"] and call["entity"]["recordLinks"] == [LINK]
    with pytest.raises(Permanent, match="no CallInfo 807-c1-S9"):
        await world.do(ATTACH, record("S9"), LINK)
    with pytest.raises(Permanent, match="no http"):
        await world.do(ATTACH, record(), None)


@pytest_twisted.ensureDeferred
async def test_a_missed_call_goes_in_as_history_for_the_default_responsible() -> None:
    world = World(tenant(MAPPED, default_responsible=BOSS))
    await world.do(POPUP, popup("S1"))
    await world.do(CLOSE_POPUP, {**popup("S1"), "outcome": "no-answer"})
    await world.do(RECORD, missed())
    call = world.call("807-c1-missed")
    assert call["via_history"] and not call["widget"] and call["states"] == ["finished"]
    assert (call["entity"]["type"], call["entity"]["toUser"]) == ("miss", employee(BOSS))
    assert world.call("807-c1-S1")["states"] == ["calling", "finished"]


@pytest_twisted.ensureDeferred
async def test_a_missed_call_without_a_default_responsible() -> None:
    # Straight to an extension: its employee; through a queue Megaplan does not know and
    # with no fallback: saved with no employee rather than lost.
    world = World()
    await world.do(RECORD, missed(extension="101"))
    assert world.call("807-c1-missed")["entity"]["toUser"] == employee("1000005")
    await world.do(RECORD, {**missed(), "record_id": "807-c2-missed"})
    assert world.call("807-c2-missed")["entity"]["toUser"] is None


@pytest_twisted.ensureDeferred
async def test_an_unwanted_call_type_is_not_saved_but_its_pop_up_still_closes() -> None:
    world = World(tenant(MAPPED, communications=["incoming_missed"]))
    await world.do(POPUP, popup("S1"))
    await world.do(POPUP_UPDATE, {**popup("S1"), "state": "talking"})
    summary = await world.do(RECORD, record("S1"), LINK)
    assert "incoming_answered is not in crm.communications" in summary
    call = world.call("807-c1-S1")
    assert call["states"] == ["calling", "talking", "finished"]
    assert call["entity"]["recordLinks"] == []  # no recording for an unwanted type
    world.sent()
    # No pop-up and unwanted: nothing is created.
    await world.do(RECORD, record("S2", direction="outgoing"))
    assert [m for m, p, _, _ in world.sent() if p == f"{API}/callInfo/history"] == []
    assert world.fake.call("807-c1-S2") is None
    # A late recording of an unwanted type is not sent either.
    summary = await world.do(ATTACH, record("S1"), LINK)
    assert "not sent" in summary and world.sent() == []


@pytest_twisted.ensureDeferred
async def test_an_unwanted_missed_call_is_not_sent() -> None:
    world = World(tenant(MAPPED, communications=["incoming_answered"]))
    assert not Megaplan.supports(world.tenant, RECORD, missed())
    summary, resp = await world.perform(RECORD, missed())
    assert "not sent: incoming_missed" in summary and resp.status is None
    assert world.fake.requests == []


@pytest_twisted.ensureDeferred
async def test_an_extension_megaplan_does_not_know() -> None:
    # Without a fallback user: not sent, and the reason says what to do.
    world = World()
    with pytest.raises(Permanent, match="extension '105' has no Megaplan employee"):
        await world.do(POPUP, popup(extension="105"))
    with pytest.raises(Permanent, match="crm.fallback_user"):
        await world.do(RECORD, record(extension="105"))
    assert world.fake.calls == []
    # With one: saved on the fallback user's behalf.
    world = World(tenant(MAPPED, fallback_user=SECRETARY))
    await world.do(POPUP, popup(extension="105"))
    await world.do(RECORD, record("S2", direction="outgoing", extension="106"))
    assert world.call("807-c1-S1")["entity"]["toUser"] == employee(SECRETARY)
    assert world.call("807-c1-S2")["entity"]["fromUser"] == employee(SECRETARY)


@pytest_twisted.ensureDeferred
async def test_extensions_map_through_megaplans_telephony_settings() -> None:
    world = World(tenant())  # no employees of its own
    await world.do(POPUP, popup("S1", extension="102"))  # sip:102@pbx.example.net
    await world.do(POPUP, popup("S2", extension="101"))
    await world.do(POPUP, popup("S3", extension="100"))  # 7001*100
    assert [world.call(f"807-c1-S{n}")["entity"]["toUser"]["id"] for n in (1, 2, 3)] == [
        "1000006", "1000005", SECRETARY]
    reads = [r for r in world.sent() if r[1] == f"{API}/callUserConfig"]
    assert reads == [("GET", f"{API}/callUserConfig", {"limit": 100}, None)]  # read once
    # An unknown extension reads it again, but not more often than every 30 s.
    with pytest.raises(Permanent):
        await world.do(POPUP, popup("S4", extension="107"))
    world.clock.advance(30)
    world.fake.setup({"employees": [{"id": "1000010", "name": "Новый", "internalNumber": "107"}]})
    await world.do(POPUP, popup("S4", extension="107"))
    with pytest.raises(Permanent):
        await world.do(POPUP, popup("S5", extension="108"))
    assert [r[1] for r in world.sent()].count(f"{API}/callUserConfig") == 1
    assert world.call("807-c1-S4")["entity"]["toUser"] == employee("1000010")


@pytest_twisted.ensureDeferred
async def test_a_retried_pop_up_does_not_make_a_second_call_info() -> None:
    world = World()
    await world.do(POPUP, popup())
    summary = await world.do(POPUP, popup(), attempts=1)
    assert len(world.fake.calls) == 1 and "CallInfo 2201" in summary
    # A retry of one that was never created creates it.
    await world.do(POPUP, popup("S2", extension="102"), attempts=1)
    assert len(world.fake.calls) == 2


# --- contacts --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_two_calls_at_once_from_one_new_number_create_one_client() -> None:
    world = World(tenant(MAPPED, create_client=True))
    world.fake.setup({"delays": {f"{API}/contractor": 1}})
    first = world.perform(POPUP, popup("S1", client=NEW, extension="101"))
    second = world.perform(POPUP, popup("S2", client=NEW, extension="102", call="c2"))
    summaries = [s for s, _ in await world.together(first, second)]
    assert world.fake.contractors_created_by_phone == {"79031112233": 1}
    [created] = world.fake.state()["contractors_created"]
    ref = {"contentType": "ContractorHuman", "id": created["id"]}
    assert world.call("807-c1-S1")["entity"]["fromUser"] == ref
    assert world.call("807-c2-S2")["entity"]["fromUser"] == ref
    assert all("ContractorHuman 3001" in s for s in summaries)
    # Later calls, and a restarted gateway (a fresh module), find it instead.
    world.fake.setup({"delays": {f"{API}/contractor": 0}})
    await world.do(RECORD, missed(client=NEW))
    again = World(world.tenant, fake=world.fake)
    await again.do(POPUP, popup("S3", client=NEW, call="c3"))
    assert world.fake.contractors_created_by_phone == {"79031112233": 1}
    assert world.call("807-c3-S3")["entity"]["fromUser"] == ref
    assert world.call("807-c1-missed")["entity"]["fromUser"] == ref


@pytest_twisted.ensureDeferred
async def test_contacts_follow_the_options_by_direction() -> None:
    outgoing = popup(direction="outgoing", client=NEW)
    world = World(tenant(MAPPED, create_client=True))  # not create_contact
    await world.do(POPUP, outgoing)
    assert world.fake.contractors_created == []
    assert all(p != f"{API}/contractor" for _, p, _, _ in world.sent())
    world = World(tenant(MAPPED, create_contact=True))
    await world.do(POPUP, popup(client=NEW))  # incoming: not create_client
    assert world.fake.contractors_created == []
    await world.do(POPUP, {**outgoing, "call_id": "807-c2-S1"})
    [created] = world.fake.state()["contractors_created"]
    assert created["firstName"] == "Контакт 79031112233"
    assert world.call("807-c2-S1")["entity"]["toUser"] == {
        "contentType": "ContractorHuman", "id": created["id"]}
    # A hidden or short number is never a contact.
    await world.do(POPUP, {**outgoing, "client": "112", "call_id": "807-c3-S1"})
    await world.do(POPUP, {**outgoing, "client": "", "call_id": "807-c4-S1"})
    assert len(world.fake.contractors_created) == 1


@pytest_twisted.ensureDeferred
async def test_a_search_hit_with_another_number_is_not_the_client() -> None:
    # Megaplan's q matches any phone that contains the digits: a longer number that
    # contains the caller's is someone else.
    world = World(tenant(MAPPED, create_client=True))
    world.fake.setup({"contractors": [{
        "contentType": "ContractorHuman", "id": "4100", "firstName": "Другой",
        "contactInfo": [{"contentType": "ContactInfo", "type": "phone", "value": "1790311122334"}]}]})
    await world.do(POPUP, popup(client=NEW))
    assert world.fake.contractors_created_by_phone == {"79031112233": 1}


# --- tokens ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_one_token_request_for_many_concurrent_requests() -> None:
    world = World()
    world.fake.setup({"delays": {TOKEN_PATH: 1}})
    started = [world.perform(POPUP, popup(f"S{n}")) for n in range(5)]
    await world.together(*started)
    assert world.fake.token_requests == 1 and len(world.fake.calls) == 5
    # And one refresh when all of them find the token refused.
    world.fake.expire_all_tokens()
    started = [world.perform(POPUP_UPDATE, {**popup(f"S{n}"), "state": "talking"})
               for n in range(5)]
    await world.together(*started)
    assert world.fake.tokens_issued == {"password": 1, "refresh_token": 1}


@pytest_twisted.ensureDeferred
async def test_a_401_refreshes_once_and_sends_the_request_again() -> None:
    world = World()
    await world.do(POPUP, popup())
    world.fake.expire_all_tokens()
    world.sent(with_tokens=True)
    await world.do(POPUP_UPDATE, {**popup(), "state": "talking"})
    assert [(r["path"], r["status"], r["body"].get("grant_type") if r["path"] == TOKEN_PATH
             else None) for r in world.fake.requests[-3:]] == [
        (PROVIDER, 401, None), (TOKEN_PATH, 200, "refresh_token"), (PROVIDER, 200, None)]
    # Refresh token revoked too: the password again.
    world.fake.setup({"expire_tokens": "all"})
    await world.do(CLOSE_POPUP, {**popup(), "outcome": "no-answer"})
    assert world.fake.tokens_issued == {"password": 2, "refresh_token": 1}
    assert world.call("807-c1-S1")["states"] == ["calling", "talking", "finished"]


class Refusing(Resource):
    """The fake, but every request to ``path`` answers 401."""

    isLeaf = True

    def __init__(self, fake: FakeMegaplan, path: str) -> None:
        super().__init__()
        self.inner, self.path, self.refused = fake.resource(), path.encode(), 0

    def render(self, request: Any) -> Any:
        if request.path != self.path:
            return self.inner.render(request)
        self.refused += 1
        request.setResponseCode(401)
        return envelope(401)


@pytest_twisted.ensureDeferred
async def test_a_second_401_is_an_error_not_a_loop() -> None:
    world = World()
    await world.do(POPUP, popup())
    refusing = Refusing(world.fake, PROVIDER)
    world.crm.http = HttpClient(reactor, client=StubTreq(refusing))
    with pytest.raises(Permanent) as raised:
        await world.do(POPUP_UPDATE, {**popup(), "state": "talking"})
    assert raised.value.status == 401 and refusing.refused == 2
    assert world.fake.tokens_issued == {"password": 1, "refresh_token": 1}


@pytest_twisted.ensureDeferred
async def test_the_token_is_refreshed_before_it_expires() -> None:
    world = World(token_lifetime=600)
    await world.do(POPUP, popup())
    world.clock.advance(301)  # within the 300 s margin (half of 600)
    await world.do(POPUP_UPDATE, {**popup(), "state": "talking"})
    assert world.fake.tokens_issued == {"password": 1, "refresh_token": 1}
    assert all(status != 401 for _, status in world.statuses())


@pytest_twisted.ensureDeferred
async def test_the_token_is_kept_in_the_store_so_a_restart_does_not_log_in() -> None:
    world = World()
    await world.do(POPUP, popup())
    stored = world.store.tokens[f"megaplan:{DOMAIN}:{USER}"]
    assert sorted(stored) == ["access_token", "expires_at", "refresh_at", "refresh_token"]
    assert stored["expires_at"] == 172800 and stored["refresh_at"] == 172500
    restarted = World(world.tenant, store=world.store, fake=world.fake)
    await restarted.do(POPUP_UPDATE, {**popup(), "state": "talking"})
    assert world.fake.token_requests == 1
    # A tenant on another domain or login has its own token.
    other = World(tenant(MAPPED, login="other@acme.ru"), store=world.store, fake=world.fake)
    world.fake.setup({"credentials": {"username": "other@acme.ru"}})
    await other.do(POPUP, popup("S2"))
    assert sorted(world.store.tokens) == [f"megaplan:{DOMAIN}:other@acme.ru",
                                          f"megaplan:{DOMAIN}:{USER}"]


@pytest_twisted.ensureDeferred
async def test_the_real_store_keeps_the_token(tmp_path: Any) -> None:
    from gateway.store import open_store
    store = open_store(f"sqlite:{tmp_path / 's.sqlite'}", reactor)
    if not hasattr(store, "put_token"):
        pytest.skip("the store has no tokens yet")
    await store.start()
    try:
        world = World(store=store)
        await world.do(POPUP, popup())
        restarted = World(world.tenant, store=store, fake=world.fake)
        await restarted.do(POPUP_UPDATE, {**popup(), "state": "talking"})
        assert world.fake.token_requests == 1
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_setup_enable_logs_in_with_the_password_and_reports_a_wrong_one() -> None:
    world = World()
    await world.do(POPUP, popup())
    summary = await world.do(SETUP, {"type": "enable"})
    assert "logged in" in summary and "3 internal numbers" in summary
    assert world.fake.tokens_issued["password"] == 2  # not the cached token
    world.fake.setup({"credentials": {"password": "changed"}})
    with pytest.raises(Permanent, match="check crm.login and crm.password") as raised:
        await world.do(SETUP, {"type": "enable"})
    assert raised.value.status == 401
    summary, resp = await world.perform(SETUP, {"type": "disable"})
    assert "no request sent" in summary and resp.status is None


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
@pytest_twisted.ensureDeferred
async def test_server_errors_and_429_are_retryable(status: int) -> None:
    world = World()
    await world.do(POPUP, popup())
    world.fake.faults.update({"fail_status": status, "retry_after": 7})
    with pytest.raises(Retryable) as raised:
        await world.do(RECORD, record(), LINK)
    assert raised.value.status == status and raised.value.retry_after == 7


@pytest.mark.parametrize("status", [400, 403, 405, 422])
@pytest_twisted.ensureDeferred
async def test_client_errors_are_permanent(status: int) -> None:
    world = World()
    await world.do(POPUP, popup())
    world.fake.faults.update({"fail_status": status})
    with pytest.raises(Permanent) as raised:
        await world.do(RECORD, record(), LINK)
    assert raised.value.status == status


class Answer(Resource):
    """Answers every request with HTTP 200 and this body."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.body


def answering(body: bytes) -> tuple[Megaplan, Tenant]:
    store = MemoryStore()
    store.tokens[f"megaplan:{DOMAIN}:{USER}"] = {
        "access_token": "a", "refresh_token": "r", "expires_at": 1e9, "refresh_at": 1e9}
    crm = Megaplan(HttpClient(reactor, client=StubTreq(Answer(body))), Clock(), store)
    return crm, tenant(MAPPED)


def envelope(status: int) -> bytes:
    return json.dumps({"meta": {"status": status, "errors": [{"message": "nope"}]},
                       "data": None}).encode()


@pytest.mark.parametrize("body, error, status", [
    (envelope(400), Permanent, 400),
    (envelope(404), Permanent, 404),
    (envelope(500), Retryable, 500),
    (envelope(429), Retryable, 429),
    (b"<html>Megaplan</html>", Permanent, 200),
    (b'{"data": {"id": "1"}}', Permanent, 200),
])
@pytest_twisted.ensureDeferred
async def test_an_http_200_is_an_error_when_the_envelope_says_so(body: bytes, error: type,
                                                                 status: int) -> None:
    crm, t = answering(body)
    action = Action(tenant=807, call="c1", kind=POPUP, key="p", payload=popup(), created=0.0)
    with pytest.raises(error) as raised:
        await crm.perform(t, action, None)
    assert raised.value.status == status


@pytest_twisted.ensureDeferred
async def test_a_loopback_fake_over_tcp_with_the_test_setting(monkeypatch: Any) -> None:
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    fake = FakeMegaplan(USER, PASSWORD, clock=Clock())
    fake.setup(SETUP_FAKE)
    port = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    http = HttpClient(reactor, timeout=5)
    try:
        t = tenant(MAPPED, domain=f"127.0.0.1:{port.getHost().port}")
        crm = Megaplan(http, Clock(), MemoryStore())
        action = Action(tenant=807, call="c1", kind=POPUP, key="p", payload=popup(),
                        created=0.0)
        summary, resp = await crm.perform(t, action, None)
        assert resp.status == 200 and summary.startswith(
            f"POST http://127.0.0.1:{port.getHost().port}/api/v3/callInfo")
        assert await crm.responsible(t, CLIENT) == "101"
        # A stored loopback config is refused once the setting is gone.
        monkeypatch.delenv(LOOPBACK_ENV)
        with pytest.raises(Permanent, match="not NAME.megaplan.ru"):
            await crm.perform(t, action, None)
    finally:
        await http.close()
        await port.stopListening()
    assert fake.call("807-c1-S1") is not None


# --- responsible routing ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_responsible_managers_extension() -> None:
    world = World(tenant())
    assert await world.crm.responsible(world.tenant, "8 (916) 123-45-67") == "101"
    assert world.sent() == [
        ("GET", f"{API}/callRoute", {"phone": "79161234567"}, None),
        ("GET", f"{API}/callUserConfig", {"limit": 100}, None)]
    # The tenant's own map comes first (its spelling of the extension is kept).
    world.tenant = tenant({"7001*201": "1000005"})
    assert await world.crm.responsible(world.tenant, CLIENT) == "7001*201"


@pytest_twisted.ensureDeferred
async def test_no_responsible_manager() -> None:
    world = World(tenant())
    assert await world.crm.responsible(world.tenant, "+7 999 000-00-00") is None  # no route
    assert await world.crm.responsible(world.tenant, "74950000001") is None  # no extension
    # The first employee of the route that has an extension.
    assert await world.crm.responsible(world.tenant, "74950000002") == "102"
    assert await world.crm.responsible(world.tenant, "anonymous") is None


@pytest_twisted.ensureDeferred
async def test_a_failing_route_lookup_is_an_error_for_the_gateways_lookup() -> None:
    world = World(tenant())
    world.fake.faults.update({"fail_status": 503})
    with pytest.raises(Retryable):
        await world.crm.responsible(world.tenant, CLIENT)
