"""Validation at the edge (issue 8, cases 1-3 and 9): every value a Telphin webhook carries
is bounded before the event is stored, and an Altegio request that cannot be built fails
for good, at once.

Each refused webhook goes through the real public site of a real gateway (SQLite store,
engine): the answer is a 400 naming the field, short (the value is never echoed back whole),
and nothing is stored.  Each bound is also shown to accept the value just inside it.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted

from gateway.crm import altegio
from gateway.errors import BadRequest, Permanent
from gateway.model import CLOSE_POPUP, POPUP, RECORD, SETUP
from gateway.protocols import telphin
from gateway.protocols.telphin import (MAX_DURATION, MAX_EVENT_AGE, MAX_EVENT_LEAD, MAX_ID,
                                       MAX_NUMBER, MAX_STATUS)
from tests.test_clients import RECORD_PAYLOAD, TENANT as ALTEGIO_TENANT, act
from tests.test_public import DIAL_IN, HANGUP, Harness, gateway  # noqa: F401 (a fixture)
from tests.test_scenarios import (CLIENT, TENANT, answer, dial_in, fold, forms, hangup,
                                  popup)

US = 1_000_000


def test_the_bounds_are_the_documented_ones() -> None:
    """The README's bounds table, as values: change one there when changing it here."""
    assert MAX_EVENT_AGE == 3653 * 86400  # ten years, leap days included
    assert MAX_EVENT_LEAD == 86400
    assert MAX_DURATION == 2 * 86400 * US
    assert (MAX_ID, MAX_NUMBER, MAX_STATUS) == (128, 64, 32)


def now_us(offset: float = 0.0) -> str:
    """An EventTime ``offset`` seconds from the gateway's (real) clock."""
    return str(int((time.time() + offset) * US))


IDS = ["CallID", "SubCallID", "RecID", "CallBackID"]
NUMBERS = ["CallerIDNum", "CalledDID", "CalledNumber", "CalledExtension", "CallerExtension",
           "RemoteNumber"]

# (why, field named in the answer, fields of a hangup that Telphin's example otherwise is)
REFUSED = [
    ("an EventTime of 5,000 digits", "EventTime", {"EventTime": "7" * 5000}),
    ("a Duration of 5,000 digits", "Duration", {"Duration": "7" * 5000}),
    # Case 1: this used to be stored, then stopped the fold for every tenant (OverflowError).
    ("a Duration of 400 digits", "Duration", {"Duration": "9" * 400}),
    ("EventTime=0, the epoch", "EventTime", {"EventTime": "0"}),
    ("EventTime=9999999999999999999", "EventTime", {"EventTime": "9999999999999999999"}),
    ("an EventTime in 2001", "EventTime", {"EventTime": "1000000000000000"}),
    ("a Duration a microsecond over two days", "Duration",
     {"Duration": str(MAX_DURATION + 1)}),
    ("a Duration of 20 digits", "Duration", {"Duration": "1" * 20}),
    *[(f"a {name} of {MAX_ID + 1} characters", name, {name: "a" * (MAX_ID + 1)})
      for name in IDS],
    *[(f"a {name} of {MAX_NUMBER + 1} characters", name, {name: "7" * (MAX_NUMBER + 1)})
      for name in NUMBERS],
    # Case 9: ~70 KB per open call for hours, stored and forwarded to Altegio.
    ("a CallerIDNum of 63 KB", "CallerIDNum", {"CallerIDNum": "7" * (63 * 1024)}),
    ("a CallerIDNum of 65 characters padded with spaces", "CallerIDNum",
     {"CallerIDNum": "+79161234567".center(MAX_NUMBER + 1)}),
    (f"a CallStatus of {MAX_STATUS + 1} characters", "CallStatus",
     {"CallStatus": "A" * (MAX_STATUS + 1)}),
    ("a NUL in the CallID", "CallID", {"CallID": HANGUP["CallID"] + "\x00"}),
    ("a newline in the SubCallID", "SubCallID", {"SubCallID": HANGUP["SubCallID"] + "\n"}),
    ("an escape in the RecID", "RecID", {"RecID": "\x1b[31m" + HANGUP["RecID"]}),
    ("a C1 control in the CallBackID", "CallBackID", {"CallBackID": "cb-\x85-1"}),
    ("a NUL inside the CallerIDNum", "CallerIDNum", {"CallerIDNum": "+7916\x001234567"}),
    ("a DEL in the CalledDID", "CalledDID", {"CalledDID": "7495\x7f1234567"}),
    ("a tab inside the CalledExtension", "CalledExtension",
     {"CalledExtension": "7001*101\t@sipproxy.telphin.ru"}),
    ("a CR LF after the CallStatus", "CallStatus", {"CallStatus": "ANSWER\r\n"}),
]


@pytest.mark.parametrize("why, field, change", REFUSED, ids=[r[0] for r in REFUSED])
@pytest_twisted.ensureDeferred
async def test_a_value_out_of_bounds_is_400_naming_the_field_and_not_stored(
        gateway: Harness, why: str, field: str, change: dict[str, str]) -> None:
    body = urlencode(dict(HANGUP, **change)).encode()
    assert len(body) <= gateway.gw.max_body  # refused for its value, not for its size
    reply = await gateway.post(body, event="hangup")
    assert reply.status == 400, reply.body
    assert reply.body.startswith(f"{field}:".encode()), reply.body
    assert len(reply.body) < 400, "the answer does not echo the value"
    assert await gateway.events() == []
    assert gateway.gw.engine.cursor == 0


@pytest.mark.parametrize("why, offset, accepted", [
    ("10 years back, less a minute", -MAX_EVENT_AGE + 60, True),
    ("10 years and a minute back", -MAX_EVENT_AGE - 60, False),
    ("a day ahead, less a minute", MAX_EVENT_LEAD - 60, True),
    ("a day and a minute ahead", MAX_EVENT_LEAD + 60, False),
])
@pytest_twisted.ensureDeferred
async def test_event_time_is_within_ten_years_before_and_a_day_after_the_gateways_clock(
        gateway: Harness, why: str, offset: float, accepted: bool) -> None:
    reply = await gateway.post(dict(DIAL_IN, EventTime=now_us(offset)))
    if accepted:
        assert reply.status == 200, reply.body
        assert len(await gateway.events()) == 1
    else:
        assert reply.status == 400
        assert reply.body.startswith(b"EventTime: out of range"), reply.body
        assert b"days before" in reply.body  # the bounds are in the answer
        assert await gateway.events() == []


# (why, fields changed in Telphin's hangup example, the stored event's attribute and value)
ACCEPTED = [
    ("a Duration of exactly two days", {"Duration": str(MAX_DURATION)},
     "duration", MAX_DURATION),
    ("a Duration of 0", {"Duration": "0"}, "duration", 0),
    ("no Duration", {"Duration": ""}, "duration", 0),
    ("a zero-padded Duration", {"Duration": "0" * 30 + "83479977"}, "duration", 83479977),
    (f"a CallID of {MAX_ID} characters", {"CallID": "A" * MAX_ID}, "call", "a" * MAX_ID),
    (f"a SubCallID of {MAX_ID} characters", {"SubCallID": "2" * MAX_ID}, "leg", "2" * MAX_ID),
    (f"a RecID of {MAX_ID} characters", {"RecID": "R" * MAX_ID}, "recording", "R" * MAX_ID),
    (f"a CallBackID of {MAX_ID} characters", {"CallBackID": "c" * MAX_ID},
     "callback", "c" * MAX_ID),
    (f"a CallerIDNum of {MAX_NUMBER} characters", {"CallerIDNum": "7" * MAX_NUMBER},
     "peer", "7" * MAX_NUMBER),
    (f"a CalledDID of {MAX_NUMBER} characters", {"CalledDID": "7" * MAX_NUMBER},
     "did", "7" * MAX_NUMBER),
    (f"a RemoteNumber of {MAX_NUMBER} characters", {"RemoteNumber": "7" * MAX_NUMBER},
     "peer", "7" * MAX_NUMBER),
    (f"a CalledExtension of {MAX_NUMBER} characters",
     {"CalledExtension": "7001*101@" + "s" * (MAX_NUMBER - 9)}, "sip", "7001*101"),
    (f"a CalledNumber of {MAX_NUMBER} characters",
     {"CalledExtension": "", "CalledNumber": "7001*" + "1" * (MAX_NUMBER - 5)},
     "extension", "1" * (MAX_NUMBER - 5)),
    (f"a CallerExtension of {MAX_NUMBER} characters",
     {"CallFlow": "out", "CallerExtension": "7001*102@" + "s" * (MAX_NUMBER - 9)},
     "sip", "7001*102"),
    (f"a CallStatus of {MAX_STATUS} characters", {"CallStatus": "a" * MAX_STATUS},
     "outcome", "failed"),
    ("a CallerIDNum with spaces around it", {"CallerIDNum": "  +79161234567 \r\n"},
     "peer", "+79161234567"),
    ("a CallerIDNum of 64 characters that is 12 with spaces",
     {"CallerIDNum": "+79161234567".center(MAX_NUMBER)}, "peer", "+79161234567"),
    ("a CallerIDName with control characters (not used)",
     {"CallerIDName": "Ivan\x00\x1b" + "x" * 500}, "peer", "+79161234567"),
]


@pytest.mark.parametrize("why, change, attribute, value", ACCEPTED,
                         ids=[r[0] for r in ACCEPTED])
@pytest_twisted.ensureDeferred
async def test_a_value_just_inside_its_bound_is_stored(
        gateway: Harness, why: str, change: dict[str, str], attribute: str,
        value: Any) -> None:
    reply = await gateway.post(dict(HANGUP, **change), event="hangup")
    assert (reply.status, reply.body) == (200, b"OK")
    [ev] = await gateway.events()
    assert getattr(ev, attribute) == value


@pytest_twisted.ensureDeferred
async def test_a_blank_caller_number_is_stored_as_no_number(gateway: Harness) -> None:
    """Case 9: a whitespace-only CallerIDNum is absent (it used to reach Altegio, 422)."""
    reply = await gateway.post(dict(DIAL_IN, CallerIDNum=" \t "))
    assert reply.status == 200
    [ev] = await gateway.events()
    assert ev.peer == ""


@pytest_twisted.ensureDeferred
async def test_a_blank_remote_number_falls_back_to_the_caller(gateway: Harness) -> None:
    reply = await gateway.post(dict(DIAL_IN, RemoteNumber="   "))
    assert reply.status == 200
    [ev] = await gateway.events()
    assert ev.peer == "+79161234567"


@pytest_twisted.ensureDeferred
async def test_after_a_refused_poison_event_the_gateway_still_folds(gateway: Harness) -> None:
    """Case 1: the 400-digit Duration is refused, so it never reaches the fold."""
    poison = await gateway.post(dict(HANGUP, Duration="9" * 400), event="hangup")
    assert poison.status == 400
    for event, fields in (("dial-in", DIAL_IN), ("hangup", HANGUP)):
        assert (await gateway.post(fields, event=event)).status == 200
    await gateway.gw.engine.idle()
    assert gateway.gw.engine.cursor == 2
    assert [ev.duration for ev in await gateway.events()] == [0, 83479977]


# Altegio: nothing a call without a client number produces is sent

@pytest.mark.parametrize("caller", ["", "   ", "anonymous"], ids=["empty", "blank", "anonymous"])
@pytest_twisted.ensureDeferred
async def test_a_call_without_a_client_number_sends_altegio_nothing(
        tmp_path: Any, caller: str) -> None:
    """Altegio requires ``phone`` in ``event`` and ``history``: a pop-up or a record of an
    anonymous caller would be refused (422), and could be attached to no client."""
    events = [dial_in("101", 0, caller=caller), answer("101", 5, CallerIDNum=caller),
              hangup("101", 65, "ANSWER", 60, CallerIDNum=caller)]
    assert await fold(tmp_path, forms(events), TENANT) == []


@pytest_twisted.ensureDeferred
async def test_the_same_call_with_a_client_number_gives_its_popup_and_record(
        tmp_path: Any) -> None:
    events = [dial_in("101", 0), answer("101", 5), hangup("101", 65, "ANSWER", 60)]
    bodies = await fold(tmp_path, forms(events), TENANT)
    assert bodies[0] == popup("101")
    assert [(b["command"], b["phone"]) for b in bodies] == [("event", CLIENT),
                                                             ("history", CLIENT)]


SUPPORTS = [
    ("an incoming pop-up with a number", POPUP,
     {"direction": "incoming", "client": "+79161234567"}, True),
    ("an incoming pop-up with an empty number", POPUP,
     {"direction": "incoming", "client": ""}, False),
    ("an incoming pop-up with a blank number", POPUP,
     {"direction": "incoming", "client": "  "}, False),
    ("an incoming pop-up from 'anonymous'", POPUP,
     {"direction": "incoming", "client": "anonymous"}, False),
    ("an incoming pop-up with no client", POPUP, {"direction": "incoming"}, False),
    ("an outgoing pop-up", POPUP, {"direction": "outgoing", "client": "+79161234567"}, False),
    ("closing a pop-up", CLOSE_POPUP, {"direction": "incoming", "client": "+79161234567"},
     False),
    ("an incoming record", RECORD, {"direction": "incoming", "client": "+79161234567"}, True),
    ("an outgoing record", RECORD, {"direction": "outgoing", "client": "89161234567"}, True),
    ("an internal record", RECORD, {"direction": "internal", "client": "102"}, True),
    ("an incoming record with an empty number", RECORD,
     {"direction": "incoming", "client": ""}, False),
    ("an outgoing record with a blank number", RECORD,
     {"direction": "outgoing", "client": " "}, False),
    ("setup", SETUP, {"type": "enable"}, True),
]


@pytest.mark.parametrize("why, kind, payload, supported", SUPPORTS,
                         ids=[r[0] for r in SUPPORTS])
def test_altegio_supports_only_what_it_can_be_sent(why: str, kind: str, payload: dict,
                                                   supported: bool) -> None:
    assert altegio.supports(kind, payload) is supported


# Altegio: a request that cannot be built fails for good, without a request

class NoHttp:
    """An HTTP client that must not be used."""

    def __init__(self) -> None:
        self.requests: list[tuple] = []

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        self.requests.append((args, kwargs))
        raise AssertionError("no request may be made for an action that cannot be built")


UNBUILDABLE = [
    # Case 3: a record dated by EventTime=9999999999999999999, stored before the bound.
    ("a date past year 9999", RECORD, dict(RECORD_PAYLOAD, started=9999999999999999999)),
    ("a date of 400 digits", RECORD, dict(RECORD_PAYLOAD, started=int("9" * 400))),
    ("a negative date", RECORD, dict(RECORD_PAYLOAD, started=-(10 ** 20))),
    ("a payload without its record id", RECORD,
     {k: v for k, v in RECORD_PAYLOAD.items() if k != "record_id"}),
    ("a record queued without a client number", RECORD, dict(RECORD_PAYLOAD, client="")),
    ("a pop-up queued without a client number", POPUP,
     {"direction": "incoming", "client": " ", "did": "74951234567", "extension": "101",
      "sip": "7001*101", "at": 1}),
    ("a setup without its type", SETUP, {}),
]


@pytest.mark.parametrize("why, kind, payload", UNBUILDABLE,
                         ids=[r[0] for r in UNBUILDABLE])
@pytest_twisted.ensureDeferred
async def test_an_action_that_cannot_be_built_is_permanent_at_once(
        why: str, kind: str, payload: dict) -> None:
    http = NoHttp()
    with pytest.raises(Permanent) as raised:
        await altegio.perform(http, ALTEGIO_TENANT, act(kind, payload))
    assert raised.value.message.startswith("cannot build the request: ")
    assert len(raised.value.message) < 300
    assert raised.value.status is None
    assert http.requests == []


@pytest_twisted.ensureDeferred
async def test_an_unknown_timezone_is_permanent_too() -> None:
    tenant = attrs.evolve(ALTEGIO_TENANT, options={"timezone": "Mars/Olympus_Mons"})
    http = NoHttp()
    with pytest.raises(Permanent, match="cannot build the request"):
        await altegio.perform(http, tenant, act(RECORD, RECORD_PAYLOAD))
    assert http.requests == []


def test_parse_refuses_before_converting_whatever_the_clock() -> None:
    """The bounds hold for the parser alone (the engine's tests call it with test clocks)."""
    received = 1_800_000_000.0
    for fields, field in [({"EventTime": "1" * 5000}, "EventTime"),
                          ({"EventTime": "0"}, "EventTime"),
                          ({"Duration": "1" * 5000}, "Duration")]:
        form = {**HANGUP, "EventTime": str(int(received * US)), **fields}
        with pytest.raises(BadRequest) as raised:
            telphin.parse_event(form, "hangup", 807, received)
        assert raised.value.field == field
