"""CallGear: notifications → neutral events, the JSON-RPC client (sessions, mnemonics, limits,
click-to-call, release), interactive processing and the employee cache (callgear.md)."""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from gateway.calls import Call, Policy
from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient
from gateway.model import Event, Inbound, Tenant, parse_tenant
from gateway.web import site as site_for
from gateway.web.public import PublicSite
from gateway.protocols.callgear import (NOTIFICATIONS, CallGear, rpc_error, setup_guide,
                                        template)
from tests.fakes.callgear import FakeCallGear, answered_call, lost_call, render, send
from tests.test_public import KEY, Harness

CALL_API, DATA_API = "http://callapi.test/v4.0", "http://dataapi.test/v2.0"
LOGIN = "user42"
T0 = 1715688000.0  # 2024-05-14 12:00:00 UTC


def tenant(**pbx: Any) -> Tenant:
    return Tenant.from_json({
        "id": 807, "name": "ACME", "enabled": True, "key": KEY,
        "pbx": {"kind": "callgear", "login": LOGIN, "call_api_url": CALL_API,
                "data_api_url": DATA_API, "virtual_number": "74951234567",
                "extensions": {"8841": "101"}, **pbx},
        "numbers": ["70000000000"],
        "crm": {"kind": "altegio", "api_url": "http://127.0.0.1:9", "partner_token": "p",
                "crm_token": "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"},
    })


def parse(event: str, body: Any, t: Tenant | None = None, received: float = T0,
          pbx: CallGear | None = None) -> list[Event]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (pbx or CallGear(None, Clock())).parse(
        Inbound("POST", event, b"key=" + KEY.encode(), raw, "application/json"),
        t or tenant(), received)


def ev(kind: str, leg: str = "e8841", at: str = "12:01:07.532", name: str = "", **kw: Any
       ) -> Event:
    h, m, s = at.split(":")
    micros = int((T0 + int(h) * 3600 - 12 * 3600 + int(m) * 60) * 1_000_000
                 + round(float(s) * 1_000_000))
    fields = dict(tenant=807, call="3190224311", leg=leg, kind=kind, flow="in", at=micros,
                  received=T0, peer="79161234567", did="74951234567",
                  dedup=f"{kw.get('call', '3190224311')}:{name}@{micros}")
    if leg.startswith("e"):
        fields.update(extension="101" if leg == "e8841" else leg[1:], sip=leg[1:])
    fields.update(kw)
    return Event(**fields)


BASE = {"call_session_id": 3190224311, "direction": "in",
        "virtual_phone_number": "74951234567", "contact_phone_number": "79161234567",
        "employee_id": 8841, "employee_full_name": "Иванов Иван", "external_id": None}

# callgear.md §4.4's deliveries and the rest of §4.2, each → its exact events.
PARSED = [
    pytest.param("call_started", {**BASE, "employee_id": None,
                                  "notification_time": "2024-05-14 12:01:00"},
                 [ev("ring", "call", "12:01:00", "call_started", bridged=False)],
                 id="inbound call: the session's own leg rings, not yet bridged"),
    pytest.param("waiting", {**BASE, "leg_id": 5560023, "call_source": "va",
                             "notification_time": "2024-05-14 12:01:01.004"},
                 [ev("ring", at="12:01:01.004", name="waiting")],
                 id="waiting: the employee's leg rings with the short number of extensions"),
    pytest.param("talk_started", {**BASE, "leg_ids": [5560021, 5560023],
                                  "notification_time": "2024-05-14 12:01:07.532"},
                 [ev("answer", name="talk_started")],
                 id="talk started: one answer for the employee, not one per leg_ids entry"),
    pytest.param("talk_finished", {**BASE, "leg_ids": [5560021, 5560023],
                                   "talk_time_duration": 83,
                                   "notification_time": "2024-05-14 12:02:30"},
                 [ev("hangup", at="12:02:30", name="talk_finished", outcome="answered",
                     duration=83_000_000)],
                 id="talk finished: answered, seconds become microseconds"),
    pytest.param("call_finished", {**BASE, "talk_time_duration": 83,
                                   "total_time_duration": 90, "wait_time_duration": 7,
                                   "notification_time": "2024-05-14 12:02:31"},
                 [ev("hangup", at="12:02:31", name="call_finished", outcome="answered",
                     duration=83_000_000),
                  ev("hangup", "call", "12:02:31", "call_finished", outcome="answered",
                     bridged=True),
                  ev("finished", "call", "12:02:31", "call_finished")],
                 id="call finished with talk: employee answered, session bridged, finished"),
    pytest.param("call_finished", {**BASE, "direction": "out", "talk_time_duration": 0,
                                   "notification_time": "2024-05-14 12:02:31"},
                 [ev("hangup", at="12:02:31", name="call_finished", outcome="no-answer",
                     flow="out"),
                  ev("finished", "call", "12:02:31", "call_finished", flow="out")],
                 id="outgoing call finished unanswered: no session leg for an outgoing call"),
    pytest.param("lost", {"call_session_id": 3190224311, "virtual_phone_number": "74951234567",
                          "contact_phone_number": "79161234567", "employee_ids": [8841, 8842],
                          "wait_time_duration": 31, "scenario_name": "Main",
                          "notification_time": "2024-05-14 12:10:40"},
                 [ev("hangup", at="12:10:40", name="lost", outcome="no-answer"),
                  ev("hangup", "e8842", "12:10:40", "lost", outcome="no-answer"),
                  ev("hangup", "call", "12:10:40", "lost", outcome="no-answer",
                     bridged=False),
                  ev("finished", "call", "12:10:40", "lost")],
                 id="lost call: every rung employee ends unanswered, the session unbridged"),
    pytest.param("outbound", {**BASE, "direction": None, "employee_phone_number": "101",
                              "notification_time": "2024-05-14 12:01:00"},
                 [ev("ring", at="12:01:00", name="outbound", flow="out")],
                 id="outbound call: the employee's leg rings outwards"),
    pytest.param("recording", {**BASE, "file_link": "https://media.callgear.com/1/2",
                               "file_duration": 83, "tag_ids": None, "tag_names": None,
                               "notification_time": "2024-05-14 12:02:40"},
                 [ev("recording", at="12:02:40", name="recording",
                     recording="https://media.callgear.com/1/2")],
                 id="recording completed: the link itself, on the employee's leg"),
    pytest.param("waiting", {**BASE, "leg_id": 5560023, "external_id": "gw-807-a1b2c3",
                             "direction": "out", "call_source": "callapi",
                             "notification_time": "2024-05-14 12:01:01"},
                 [ev("ring", at="12:01:01", name="waiting", flow="out",
                     callback="gw-807-a1b2c3")],
                 id="the gateway's own click-to-call is recognised by its external_id"),
    pytest.param("waiting", {**BASE, "leg_id": 5560023, "external_id": "planfix-77",
                             "notification_time": "2024-05-14 12:01:01"},
                 [ev("ring", at="12:01:01", name="waiting")],
                 id="another integration's external_id is not a callback of the gateway"),
    pytest.param("talk_started", {**BASE, "employee_id": None, "leg_ids": [1, 2],
                                  "notification_time": "2024-05-14 12:01:07"},
                 [], id="a talk with no employee (a forward outside) tells no one"),
]


@pytest.mark.parametrize("event, body, events", PARSED)
def test_each_notification_gives_exactly_its_events(event: str, body: dict, events: list
                                                     ) -> None:
    assert parse(event, body) == events


def test_numbers_as_strings_and_doubled_quotes_parse_as_the_plain_body() -> None:
    values = {**BASE, "leg_ids": [5560021, 5560023], "talk_time_duration": 83,
              "notification_time": "2024-05-14 12:02:30"}
    plain = render(template("talk_finished"), values)
    doubled = render(template("talk_finished"), values, doubled=True)
    assert b'""79161234567""' in doubled and b'"83"' in doubled
    assert parse("talk_finished", doubled) == parse("talk_finished", plain) != []


def test_notification_time_is_read_in_the_accounts_time_zone() -> None:
    body = {**BASE, "leg_id": 1, "notification_time": "2024-05-14 15:01:01"}
    [moscow] = parse("waiting", body, tenant(timezone="Europe/Moscow"))
    [utc] = parse("waiting", {**body, "notification_time": "2024-05-14 12:01:01"})
    assert moscow.at == utc.at


BAD = [
    pytest.param("waiting", b"", "body", 400, id="no body"),
    pytest.param("waiting", b"[1]", "body", 400, id="not an object"),
    pytest.param("waiting", b"{nope", "body", 400, id="not JSON"),
    pytest.param("ringing", {**BASE}, "event", 404, id="unknown notification name"),
    pytest.param("waiting", {**BASE, "event": "lost"}, "event", 400,
                 id="literal event key disagrees with the URL"),
    pytest.param("waiting", {**BASE, "call_session_id": None}, "call_session_id", 400,
                 id="no call_session_id"),
    pytest.param("waiting", {**BASE, "call_session_id": "31x"}, "call_session_id", 400,
                 id="call_session_id not a number"),
    pytest.param("waiting", {**BASE, "call_session_id": True}, "call_session_id", 400,
                 id="call_session_id a boolean"),
    pytest.param("waiting", {**BASE, "call_session_id": 2**63}, "call_session_id", 400,
                 id="call_session_id beyond 64 bits"),
    pytest.param("waiting", {**BASE, "employee_id": [1]}, "employee_id", 400,
                 id="employee_id a list"),
    pytest.param("waiting", {**BASE, "direction": "sideways"}, "direction", 400,
                 id="direction neither in nor out"),
    pytest.param("waiting", {**BASE, "contact_phone_number": "+7 916 abc"},
                 "contact_phone_number", 400, id="contact not a number"),
    pytest.param("waiting", {**BASE, "contact_phone_number": {"n": 1}},
                 "contact_phone_number", 400, id="contact an object"),
    pytest.param("waiting", {**BASE, "external_id": "x" * 129}, "external_id", 400,
                 id="external_id too long"),
    pytest.param("waiting", {**BASE, "employee_full_name": "a\x00b", "external_id": "a\x01"},
                 "external_id", 400, id="control character"),
    pytest.param("waiting", {**BASE, "notification_time": "14.05.2024 12:00"},
                 "notification_time", 400, id="time in another format"),
    pytest.param("waiting", {**BASE, "notification_time": "2024-02-30 12:00:00"},
                 "notification_time", 400, id="no such date"),
    pytest.param("waiting", {**BASE, "notification_time": "1970-01-01 00:00:00"},
                 "notification_time", 400, id="time from a broken clock"),
    pytest.param("talk_finished", {**BASE, "talk_time_duration": -1}, "talk_time_duration",
                 400, id="negative duration"),
    pytest.param("talk_finished", {**BASE, "talk_time_duration": 10**9},
                 "talk_time_duration", 400, id="duration beyond two days"),
    pytest.param("talk_finished", {**BASE, "leg_ids": ["a"]}, "leg_ids", 400,
                 id="leg_ids not ids"),
    pytest.param("lost", {**BASE, "employee_ids": list(range(101))}, "employee_ids", 400,
                 id="too many employee_ids"),
    pytest.param("recording", {**BASE, "file_link": None}, "file_link", 400,
                 id="recording without its link"),
    pytest.param("recording", {**BASE, "file_link": "javascript:alert(1)"}, "file_link",
                 400, id="recording link not http"),
]


@pytest.mark.parametrize("event, body, field, status", BAD)
def test_a_malformed_notification_is_refused_naming_the_field(event: str, body: Any,
                                                              field: str, status: int) -> None:
    with pytest.raises(BadRequest) as raised:
        parse(event, body)
    assert (raised.value.field, raised.value.status) == (field, status)


def test_without_a_time_repeats_share_a_natural_key_and_different_ones_do_not() -> None:
    body = {**BASE, "leg_id": 5560023}
    [one] = parse("waiting", body, received=T0)
    [again] = parse("waiting", body, received=T0 + 30)
    [other] = parse("waiting", {**body, "leg_id": 5560025}, received=T0)
    assert one.at != again.at and one.natural_key == again.natural_key
    assert other.natural_key != one.natural_key


def test_talk_finished_and_call_finished_in_one_second_are_two_events() -> None:
    at = "2024-05-14 12:02:30"
    [talk] = parse("talk_finished", {**BASE, "talk_time_duration": 5, "notification_time": at})
    first = parse("call_finished", {**BASE, "talk_time_duration": 5, "notification_time": at})
    assert talk.leg == first[0].leg and talk.natural_key != first[0].natural_key


def test_two_calls_reaching_one_employee_in_one_second_are_two_events() -> None:
    # Stored keys are unique per tenant: a leg named by its employee must not make two
    # sessions' notifications one.
    at = "2024-05-14 12:02:30"
    [one] = parse("waiting", {**BASE, "leg_id": 5560023, "notification_time": at})
    [two] = parse("waiting", {**BASE, "leg_id": 5560025, "notification_time": at,
                              "call_session_id": BASE["call_session_id"] + 1})
    assert one.leg == two.leg and one.at == two.at
    assert one.natural_key != two.natural_key


# --- the events fold into the calls the customer expects --------------------------------


def fold(script: list[tuple[str, dict]], t: Tenant | None = None) -> list[tuple[str, dict]]:
    t = t or tenant()
    call: Call | None = None
    effects = []
    policy = Policy()
    for event, values in script:
        for e in parse(event, render(template(event), values), t):
            call = call or Call(807, e.call)
            effects += call.event(e, policy)
    assert call is not None
    effects += call.expire(policy)
    return [(e.kind, e.payload) for e in effects]


def test_an_answered_call_gives_one_pop_up_and_one_record_of_the_employee() -> None:
    effects = fold(answered_call(3190224311, "79161234567", "74951234567", 8841, talk=83))
    assert [kind for kind, _ in effects] == ["popup", "popup_update", "record"]
    record = effects[-1][1]
    assert (record["direction"], record["status"], record["duration"], record["extension"],
            record["client"], record["did"]) == (
        "incoming", "success", 83, "101", "79161234567", "74951234567")


def test_a_colleagues_pop_up_is_closed_when_the_call_is_over() -> None:
    # 8842 rang too, but CallGear reports nothing for a phone that stopped ringing because
    # 8841 answered: its pop-up is closed when the call is decided, not left open.
    script = answered_call(3190224311, "79161234567", "74951234567", 8841, talk=83)
    colleague = ("waiting", {**script[1][1], "employee_id": 8842, "leg_id": 31902243119})
    effects = fold([script[0], colleague, *script[1:]])
    assert [kind for kind, _ in effects] == ["popup", "popup", "popup_update", "record",
                                             "close_popup"]
    assert effects[0][1]["call_id"] == effects[-1][1]["call_id"] \
        == "807-3190224311-e8842"
    assert effects[-1][1]["outcome"] == "cancelled"


def test_a_lost_call_gives_one_missed_record_and_closes_the_pop_ups() -> None:
    effects = fold(lost_call(3190225000, "79161112233", "74951234567", [8841, 8842]))
    kinds = [kind for kind, _ in effects]
    assert kinds == ["popup", "popup", "close_popup", "close_popup", "record"]
    assert effects[-1][1]["status"] == "missed"
    assert effects[-1][1]["client"] == "79161112233"
    # The session leg has no extension: the missed call is the last rung employee's (a
    # CRM such as Planfix files every call under an extension).
    assert effects[-1][1]["extension"] == effects[1][1]["extension"] != ""


def test_the_gateways_click_to_call_is_one_outgoing_record() -> None:
    script = answered_call(3190224311, "79161234567", "74951234567", 8841, talk=12,
                           external_id="gw-807-abc", direction="out")
    effects = fold(script)
    assert [kind for kind, _ in effects] == ["popup", "popup_update", "record"]
    assert effects[-1][1]["direction"] == "outgoing" and effects[-1][1]["duration"] == 12


# --- through the public site -------------------------------------------------------------


class CallGearHarness(Harness):
    """The real gateway with tenant 807 as a CallGear tenant."""

    async def start(self) -> None:
        await self.gw.start()
        # Saved disabled (an enabled one would queue a CRM setup), enabled in the directory.
        await self.gw.save_tenant(attrs.evolve(tenant(), enabled=False), None)
        self.gw.tenants[807] = tenant()
        self.port = reactor.listenTCP(0, site_for(PublicSite(self.gw).resource()),
                                interface="127.0.0.1")

    def url(self, event: str, key: str = KEY, route: str = "notify") -> str:
        return f"/{route}/807/{event}/{LOGIN}?key={key}"


@pytest_twisted.async_yield_fixture
async def site(tmp_path: Any) -> Any:
    harness = CallGearHarness(tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


@pytest_twisted.ensureDeferred
async def test_a_repeated_notification_is_answered_ok_and_stored_once(site: Any) -> None:
    values = {**BASE, "leg_ids": [1, 2], "talk_time_duration": 83,
              "notification_time": "2024-05-14 12:02:30"}
    body = render(template("talk_finished"), values)
    untimed = render(template("waiting"), {**BASE, "leg_id": 5560023})
    for data, event in ((body, "talk_finished"), (body, "talk_finished"),
                        (untimed, "waiting"), (untimed, "waiting")):
        reply = await site.request("POST", site.url(event), data, "application/json")
        assert (reply.status, reply.body) == (200, b"OK")
    stored = await site.events()
    assert [(e.kind, e.leg) for e in stored] == [("hangup", "e8841"), ("ring", "e8841")]


@pytest_twisted.ensureDeferred
async def test_the_customers_templates_from_the_setup_guide_are_all_stored(site: Any) -> None:
    port = site.port.getHost().port
    guide = {g["event"]: g for g in setup_guide(tenant(), f"http://127.0.0.1:{port}")}
    script = (answered_call(3190224311, "79161234567", "74951234567", 8841, talk=83)
              + lost_call(3190225000, "79161112233", "74951234567", [8841]))
    script.append(("recording", {**BASE, "file_link": "https://media.callgear.com/1/2",
                                 "notification_time": "2024-05-14 12:03:00"}))
    script.append(("outbound", {**BASE, "call_session_id": 3190226000,
                                "notification_time": "2024-05-14 12:04:00"}))
    assert {event for event, _ in script} == set(NOTIFICATIONS)
    statuses = await send(site.client.post, lambda e: guide[e]["url"],
                          {e: g["body"] for e, g in guide.items()}, script, doubled=True)
    assert statuses == [200] * len(script)
    assert len(await site.events()) == 16  # 7 per call, one recording, one outbound ring


@pytest_twisted.ensureDeferred
async def test_a_wrong_key_is_403_and_a_bad_body_400_and_nothing_is_stored(site: Any) -> None:
    body = render(template("waiting"), {**BASE, "leg_id": 1})
    reply = await site.request("POST", site.url("waiting", key="x" * 26), body,
                               "application/json")
    assert reply.status == 403
    reply = await site.request("POST", site.url("waiting"), b'{"call_session_id": "x"}',
                               "application/json")
    assert (reply.status, reply.body) == (400, b"call_session_id: must be a whole number, "
                                               b"got 'x'\n")
    assert await site.events() == []


@pytest_twisted.ensureDeferred
async def test_interactive_processing_with_no_manager_goes_down_the_other_branch(
        site: Any) -> None:
    body = json.dumps({"cdr_id": 3190224311, "start_time": "2024-05-14 12:01:00",
                       "input_result": "None", "numa": "79161234567",
                       "numb": "74951234567"}).encode()
    reply = await site.request("POST", site.url("getmanager", route="cid"), body,
                               "application/json")
    assert reply.status == 200 and reply.header("Content-Type").startswith(
        "application/json")
    assert json.loads(reply.body) == {"returned_code": 1}
    reply = await site.request("GET", site.url("getmanager", route="cid") + "&numa=7916",
                               None, None)
    assert json.loads(reply.body) == {"returned_code": 1}


# --- interactive processing ----------------------------------------------------------------


@pytest.mark.parametrize("query, body, ctype, number", [
    (b"key=k&numa=79161234567&numb=74951234567", b"", "", "79161234567"),
    (b"key=k", b"numa=79161234567&cdr_id=1", "application/x-www-form-urlencoded",
     "79161234567"),
    (b"key=k", b'{"numa": 79161234567, "input_result": "None"}', "application/json",
     "79161234567"),
])
def test_the_callers_number_is_numa_however_it_is_sent(query: bytes, body: bytes, ctype: str,
                                                       number: str) -> None:
    pbx = CallGear(None, Clock())
    assert pbx.interactive_number(Inbound("POST", "getmanager", query, body, ctype)) == number


def test_an_interactive_request_without_numa_is_400() -> None:
    with pytest.raises(BadRequest) as raised:
        CallGear(None, Clock()).interactive_number(
            Inbound("GET", "getmanager", b"key=k&numb=7495", b"", ""))
    assert raised.value.field == "numa"


def test_the_interactive_answer_names_the_phone_or_the_fallback_branch() -> None:
    pbx = CallGear(None, Clock())
    assert pbx.interactive_answer(tenant(), "101") == (
        b"application/json; charset=utf-8", b'{"phones": ["101"]}')
    assert json.loads(pbx.interactive_answer(tenant(fallback_code=3), None)[1]) == {
        "returned_code": 3}


# --- the JSON-RPC client against the fake --------------------------------------------------


def gear(**setup: Any) -> tuple[FakeCallGear, CallGear, Clock]:
    fake, pbx, clock, _ = gear_stub(**setup)
    return fake, pbx, clock


def gear_stub(**setup: Any) -> tuple[FakeCallGear, CallGear, Clock, StubTreq]:
    clock = Clock()
    clock.advance(10)
    fake = FakeCallGear(clock=clock)
    fake.setup({"api_keys": ["k3y"], "users": {"cab@acme.ru": "pw"},
                "virtual_numbers": ["74951234567"],
                "employees": [{"id": 8841, "full_name": "Иванов Иван",
                               "extension": {"extension_phone_number": "101"}},
                              {"id": 8842, "extension": {"extension_phone_number": "102"}}],
                **setup})
    stub = StubTreq(fake.resource())
    return fake, CallGear(HttpClient(reactor, client=stub), clock), clock, stub


SESSION = {"access_token": "", "api_login": "cab@acme.ru", "password": "pw"}


@pytest_twisted.ensureDeferred
async def test_click_to_call_rings_the_employee_first_from_the_virtual_number() -> None:
    fake, pbx, _ = gear()
    call = await pbx.call(tenant(access_token="k3y"), "101", "+79161234567")
    [started] = fake.calls
    assert call == str(started["call_session_id"])
    external = started["params"].pop("external_id")
    assert re.fullmatch(r"gw-807-[0-9a-f]{12}", external)
    assert started["params"] == {"first_call": "employee", "virtual_phone_number": "74951234567",
                                 "contact": "79161234567", "employee": {"id": 8841}}
    envelope = fake.requests[-1]["body"]
    assert envelope["jsonrpc"] == "2.0" and envelope["id"] and envelope["params"][
        "access_token"] == "k3y"
    [ring] = parse("waiting", {**BASE, "call_session_id": int(call), "leg_id": 1,
                               "external_id": external, "direction": "out",
                               "notification_time": "2024-05-14 12:01:01"})
    assert ring.callback == external and ring.call == call


@pytest_twisted.ensureDeferred
async def test_hangup_releases_the_session() -> None:
    fake, pbx, _ = gear()
    t = tenant(access_token="k3y")
    call = await pbx.call(t, "101", "79161234567")
    assert await pbx.hangup(t, call) == call
    assert fake.released == [int(call)]
    assert fake.requests[-1]["body"]["method"] == "release.call"
    assert fake.requests[-1]["body"]["params"] == {"call_session_id": int(call),
                                                   "access_token": "k3y"}
    with pytest.raises(Permanent, match="call_session_not_found"):
        await pbx.hangup(t, call)


@pytest_twisted.ensureDeferred
async def test_click_to_call_says_what_to_configure() -> None:
    _, pbx, _ = gear()
    with pytest.raises(Permanent, match="pbx.access_token"):
        pbx.call(tenant(), "101", "79161234567")
    with pytest.raises(Permanent, match="pbx.virtual_number"):
        pbx.call(tenant(access_token="k3y", virtual_number=""), "101", "79161234567")
    with pytest.raises(Permanent, match="virtual_phone_number_not_found"):
        await pbx.call(tenant(access_token="k3y", virtual_number="74950000000"), "101", "7916123")
    with pytest.raises(Permanent, match="pbx.extensions"):
        await pbx.call(tenant(access_token="k3y"), "109", "79161234567")


@pytest_twisted.ensureDeferred
async def test_concurrent_requests_share_one_login() -> None:
    fake, pbx, _, stub = gear_stub()
    t = tenant(**SESSION)
    fake.faults.hang = True
    first = ensureDeferred(pbx.client.rpc(t, CALL_API, "release.call",
                                          {"call_session_id": 1}))
    second = ensureDeferred(pbx.client.rpc(t, CALL_API, "release.call",
                                           {"call_session_id": 2}))
    assert fake.faults.requests_seen == 1  # the second waits for the first's login
    fake.faults.hang = False
    stub.flush()
    for d in (first, second):
        with pytest.raises(Permanent, match="call_session_not_found"):
            await d
    assert fake.logins == 1
    assert [r["body"]["method"] for r in fake.requests] == [
        "login.user", "release.call", "release.call"]


@pytest_twisted.ensureDeferred
async def test_a_session_is_renewed_before_its_hour_runs_out() -> None:
    fake, pbx, clock = gear()
    t = tenant(**SESSION)
    await pbx.client.rpc(t, DATA_API, "get.employees", {})
    clock.advance(3000)
    await pbx.client.rpc(t, DATA_API, "get.employees", {})
    assert fake.logins == 1
    clock.advance(400)  # 3400 s: inside the last five minutes
    await pbx.client.rpc(t, DATA_API, "get.employees", {})
    assert fake.logins == 2
    assert [r["error"] for r in fake.requests] == [None] * 5


@pytest.mark.parametrize("mnemonic", ["access_token_invalid", "access_token_expired"])
@pytest_twisted.ensureDeferred
async def test_a_session_the_platform_dropped_is_renewed_once(mnemonic: str) -> None:
    fake, pbx, _ = gear(expired_mnemonic=mnemonic)
    t = tenant(**SESSION)
    await pbx.client.rpc(t, DATA_API, "get.employees", {})
    fake._sessions = {token: 0 for token in fake._sessions}  # expired on the platform's side
    assert await pbx.client.rpc(t, DATA_API, "get.employees", {}) != []
    assert fake.logins == 2
    assert [r["error"] for r in fake.requests] == [None, None, mnemonic, None, None]


@pytest_twisted.ensureDeferred
async def test_a_refused_api_key_is_permanent_and_never_logs_in() -> None:
    fake, pbx, _ = gear()
    with pytest.raises(Permanent, match="access_token_invalid"):
        await pbx.client.rpc(tenant(access_token="wrong"), DATA_API, "get.employees", {})
    assert fake.logins == 0 and len(fake.requests) == 1


@pytest_twisted.ensureDeferred
async def test_wrong_cabinet_password_is_permanent() -> None:
    _, pbx, _ = gear()
    with pytest.raises(Permanent, match="auth_error"):
        await pbx.client.rpc(tenant(api_login="cab@acme.ru", password="nope"), DATA_API,
                             "get.employees", {})


@pytest_twisted.ensureDeferred
async def test_limit_exceeded_is_retryable_after_the_minutes_reset() -> None:
    fake, pbx, _ = gear(minute_limit=1)  # the clock is at 10 s: the minute resets in 50
    t = tenant(access_token="k3y")
    await pbx.client.rpc(t, DATA_API, "get.employees", {})
    with pytest.raises(Retryable) as raised:
        await pbx.client.rpc(t, DATA_API, "get.employees", {})
    assert raised.value.retry_after == 50 and "limit_exceeded" in str(raised.value)


@pytest_twisted.ensureDeferred
async def test_an_ip_not_allowed_says_where_to_allow_it() -> None:
    _, pbx, _ = gear(ip_allowed=False)
    with pytest.raises(Permanent, match="Security rules"):
        await pbx.client.rpc(tenant(access_token="k3y"), DATA_API, "get.employees", {})


@pytest.mark.parametrize("code, mnemonic, kind", [
    (-32602, "data_type_error", Permanent),
    (-32602, "call_session_not_found", Permanent),
    (-32603, "internal_error", Retryable),
    (-32001, "internal_error", Retryable),  # the code says auth: the mnemonic decides
    (-32029, "contact_in_blacklist", Permanent),  # the code says limits: still permanent
    (-32602, "limit_exceeded", Retryable),
])
def test_errors_are_classified_by_mnemonic_never_by_code(code: int, mnemonic: str,
                                                         kind: type) -> None:
    error = {"code": code, "message": "m", "data": {"mnemonic": mnemonic}}
    assert type(rpc_error(error, {}, "x", 200, "")) in (kind, *kind.__subclasses__())


def test_limit_exceeded_waits_for_the_exhausted_limit() -> None:
    limits = {"minute_remaining": 5, "minute_reset": 20, "day_remaining": 0,
              "day_reset": 7200}
    error = {"code": -32029, "data": {"mnemonic": "limit_exceeded"}}
    assert rpc_error(error, {"metadata": {"limits": limits}}, "x", 200, "").retry_after == 7200
    assert rpc_error(error, {}, "x", 200, "").retry_after == 60


# --- the employee cache ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_unknown_employee_refreshes_the_cache_and_falls_back_to_the_id() -> None:
    fake, pbx, clock = gear()
    t = tenant(access_token="k3y", extensions={})
    body = {**BASE, "employee_id": 8842, "leg_id": 1,
            "notification_time": "2024-05-14 12:01:01"}
    [first] = parse("waiting", body, t, pbx=pbx)
    assert first.extension == "8842"  # not known yet: the employee id, documented
    await pbx.client.refresh(t)
    [second] = parse("waiting", body, t, pbx=pbx)
    assert second.extension == "102"
    [unknown] = parse("waiting", {**body, "employee_id": 9999}, t, pbx=pbx)
    assert unknown.extension == "9999"
    fetches = [r for r in fake.requests if r["body"]["method"] == "get.employees"]
    assert len(fetches) == 1  # within REFRESH_GAP an unknown id asks no more
    clock.advance(61)
    parse("waiting", {**body, "employee_id": 9999}, t, pbx=pbx)
    assert len([r for r in fake.requests if r["body"]["method"] == "get.employees"]) == 2


@pytest_twisted.ensureDeferred
async def test_the_tenants_table_wins_and_click_to_call_uses_the_cache() -> None:
    fake, pbx, _ = gear()
    t = tenant(access_token="k3y", extensions={"8842": "555"})
    [ring] = parse("waiting", {**BASE, "employee_id": 8842, "leg_id": 1}, t, pbx=pbx)
    assert ring.extension == "555"
    await pbx.call(t, "101", "79161234567")  # 101 is 8841 in get.employees only
    assert fake.calls[-1]["params"]["employee"] == {"id": 8841}


# --- config and the set-up guide -----------------------------------------------------------


def test_config_defaults_to_the_real_callgear_hosts() -> None:
    t = parse_tenant({"id": 807, "name": "A", "key": KEY,
                      "pbx": {"kind": "callgear", "login": LOGIN, "access_token": "k"},
                      "crm": {"kind": "altegio", "api_url": "http://a.test",
                              "partner_token": "p", "crm_token": "c"},
                      "numbers": ["74951234567"]})
    assert (t.pbx.call_api_url, t.pbx.data_api_url) == (
        "https://callapi.callgear.com/v4.0", "https://dataapi.callgear.com/v2.0")
    out = t.to_json()
    assert "access_token" not in out["pbx"] and out["secrets_set"]["pbx.access_token"]


@pytest.mark.parametrize("patch, field", [
    ({"access_token": "k", "api_login": "a", "password": "p"}, "pbx.api_login"),
    ({"api_login": "a"}, "pbx.password"),
    ({"password": "p"}, "pbx.api_login"),
    ({"extensions": {"abc": "101"}}, "pbx.extensions"),
    ({"extensions": {"8841": "1234567"}}, "pbx.extensions"),
    ({"virtual_number": "call me"}, "pbx.virtual_number"),
    ({"timezone": "Mars/Olympus"}, "pbx.timezone"),
    ({"fallback_code": "1"}, "pbx.fallback_code"),
    ({"call_api_url": "ftp://x"}, "pbx.call_api_url"),
    ({"client_id": "x"}, "pbx.client_id"),
])
def test_a_bad_pbx_section_is_refused_naming_the_field(patch: dict, field: str) -> None:
    with pytest.raises(BadRequest) as raised:
        CallGear.parse_config({"kind": "callgear", "login": LOGIN, **patch})
    assert raised.value.field == field


def test_the_setup_guide_lists_the_eight_notifications_with_url_and_template() -> None:
    guide = setup_guide(tenant(), "https://gw.example.net/")
    assert [g["event"] for g in guide] == list(NOTIFICATIONS) and len(guide) == 8
    talk = guide[2]
    assert talk["event"] == "talk_started" and talk["what"] == "Talk started"
    assert talk["method"] == "POST"
    assert talk["url"] == f"https://gw.example.net/notify/807/talk_started/{LOGIN}?key={KEY}"
    assert '"leg_ids": {{leg_ids}}' in talk["body"] and '"event": "talk_started"' in talk["body"]
    assert CallGear.setup_guide(tenant(), "https://gw.example.net") == guide
    for g in guide:  # every template, rendered by the platform, is a JSON object
        assert isinstance(json.loads(render(g["body"], {})), dict)


def test_a_recording_is_its_own_link() -> None:
    pbx = CallGear(None, Clock())
    assert pbx.recording_url(tenant(), "ftp://x") is None
    results: list = []
    pbx.recording_url(tenant(), "https://media.callgear.com/1/2").addCallback(results.append)
    assert results == ["https://media.callgear.com/1/2"]
