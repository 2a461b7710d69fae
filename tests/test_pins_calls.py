"""The call model's effects, field by field: what ``Leg`` and ``Call`` hand the engine.

The scenario tables (tests/test_scenarios.py, tests/test_rules_calls.py) check the Altegio bodies,
which carry only part of each effect; these pin the CRM-neutral effects themselves (every payload
field another CRM module may use), the leg machine's signals and stored state, and the corners the
tables leave out.  Found by ``make mutate``: each test fails on a change that the tables let pass.
"""

from __future__ import annotations

from typing import Any

import pytest

from gateway.model import ATTACH, POPUP_UPDATE
from gateway.calls import IVR, PHONE, QUEUE, Call, Leg, Policy
from gateway.model import CLOSE_POPUP, POPUP, RECORD, Event

S = 1_000_000  # microseconds
T0 = 1_715_677_267 * S
CLIENT = "+79161234567"
DID = "74951234567"
POLICY = Policy(queues=frozenset({"600"}), ivrs=frozenset({"500"}))


def ev(kind: str, leg: str, at: float, flow: str = "in", **fields: Any) -> Event:
    """An event of call C at ``at`` seconds; incoming legs default to CLIENT calling DID."""
    if flow == "in":
        fields.setdefault("peer", CLIENT)
        fields.setdefault("did", DID)
    fields.setdefault("extension", leg.split("/")[0])
    return Event(tenant=7, call="C", leg=leg, kind=kind, flow=flow, at=T0 + int(at * S),
                 received=1_800_000_000 + at, **fields)


def feed(events: list[Event], policy: Policy = POLICY) -> tuple[Call, list]:
    """Fold the events into a call, then let it expire: the call and every effect."""
    call = Call(7, "C")
    effects = [effect for event in events for effect in call.event(event, policy)]
    return call, effects + call.expire(policy)


# The leg machine


def test_a_leg_starts_empty_and_new() -> None:
    assert Leg("L", 3).to_state() == {
        "key": "L", "order": 3, "kind": PHONE, "flow": "", "extension": "", "sip": "",
        "peer": "", "did": "", "ring_at": 0, "answer_at": 0, "end_at": 0, "outcome": "",
        "duration": 0, "recording": "", "bridged": None, "transferred": False,
        "answered": False, "state": "new", "callback": ""}


def test_each_input_gives_its_signal() -> None:
    leg = Leg("101", 0)
    assert leg.ring(ev("ring", "101", 0), POLICY) == ["rang"]
    assert leg.answer(ev("answer", "101", 5), POLICY) == ["answered"]
    assert leg.answered and leg.state == "talking"
    assert leg.hangup(ev("hangup", "101", 9, outcome="answered", duration=4 * S), POLICY) == ["talked"]


def test_a_hangup_seen_first_tells_a_talk_from_a_miss_by_its_status() -> None:
    talk, miss = Leg("a", 0), Leg("b", 1)
    assert talk.hangup(ev("hangup", "a", 9, outcome="answered", duration=4 * S), POLICY) == ["talked"]
    assert talk.answered
    assert miss.hangup(ev("hangup", "b", 9, outcome="busy"), POLICY) == ["unseen"]
    assert not miss.answered and miss.outcome == "busy"


def test_a_leg_on_a_configured_ivr_or_queue_extension_is_that_kind() -> None:
    ivr, queue = Leg("500", 0), Leg("600", 1)
    ivr.ring(ev("ring", "500", 0), POLICY)
    queue.ring(ev("ring", "600", 0), POLICY)
    assert (ivr.kind, queue.kind) == (IVR, QUEUE)


def test_a_stored_leg_with_an_unknown_state_is_refused_by_name() -> None:
    state = {**Leg("L", 0).to_state(), "state": "flying"}
    with pytest.raises(ValueError, match="unknown leg state 'flying'"):
        Leg.from_state(state)


# Extensions


@pytest.mark.parametrize("number, own", [
    ("7", True),  # one digit is still a short extension
    ("12345", True),
    ("123456", False),
    (" +12345", False),  # a '+' number after blanks is still an outside number
    ("7001*101", True),
    ("", False),
])
def test_which_numbers_are_own_extensions(number: str, own: bool) -> None:
    assert Policy().is_extension(number) is own


# Effects of incoming legs


def test_the_popup_effect_carries_the_caller_the_number_the_extension_and_the_ring_time() -> None:
    _, effects = feed([ev("ring", "101", 2, sip="7001*101")])
    assert effects[0].kind == POPUP and effects[0].key == "popup:101" and effects[0].leg == "101"
    assert effects[0].payload == {"direction": "incoming", "client": CLIENT, "did": DID,
                                  "extension": "101", "sip": "7001*101", "at": T0 + 2 * S,
                                  "call_id": "7-C-101"}


def test_an_unanswered_leg_closes_its_popup_with_the_same_payload_and_its_outcome() -> None:
    _, effects = feed([ev("ring", "101", 0), ev("hangup", "101", 20, outcome="no-answer")])
    popup, close = effects[0], effects[1]
    assert (close.kind, close.key, close.leg) == (CLOSE_POPUP, "close:101", "101")
    assert close.payload == {**popup.payload, "outcome": "no-answer"}


def test_an_answered_record_carries_every_field() -> None:
    _, effects = feed([ev("ring", "101", 0, sip="7001*101"), ev("answer", "101", 5),
                       ev("hangup", "101", 65, outcome="answered", duration=60 * S, recording="R1")])
    record = effects[-1]
    assert (record.kind, record.key, record.leg) == (RECORD, "record:101", "101")
    assert record.payload == {
        "direction": "incoming", "status": "success", "outcome": "answered", "duration": 60,
        "client": CLIENT, "did": DID, "extension": "101", "sip": "7001*101",
        "started": T0, "recording": "R1", "record_id": "7-C-101"}


def test_a_leg_first_seen_by_its_answer_starts_at_the_answer() -> None:
    _, effects = feed([ev("answer", "101", 5),
                       ev("hangup", "101", 65, outcome="answered", duration=50 * S)])
    assert effects[-1].payload["started"] == T0 + 5 * S


def test_each_incoming_leg_names_its_own_caller() -> None:
    _, effects = feed([ev("ring", "101", 0, peer="+79160000001"),
                       ev("ring", "102", 1, peer="+79160000002"), ev("answer", "102", 2),
                       ev("hangup", "102", 12, outcome="answered", duration=10 * S),
                       ev("hangup", "101", 12, outcome="cancelled")])
    records = [e for e in effects if e.kind == RECORD]
    assert [r.payload["client"] for r in records] == ["+79160000002"]


def test_a_forward_names_the_first_incoming_leg_that_has_a_caller() -> None:
    forward = dict(flow="out", peer="89031112233", transferred=True, extension="101")
    _, effects = feed([ev("ring", "600", 0, peer=""), ev("ring", "101", 1),
                       ev("ring", "101/fwd", 21, **forward), ev("answer", "101/fwd", 25, **forward),
                       ev("hangup", "101/fwd", 85, outcome="answered", duration=60 * S, **forward)])
    assert effects[-1].payload["client"] == CLIENT


def test_a_forward_with_no_incoming_leg_seen_names_the_number_it_dialled() -> None:
    forward = dict(flow="out", peer="89031112233", transferred=True, extension="101")
    _, effects = feed([ev("ring", "101/fwd", 21, **forward), ev("answer", "101/fwd", 25, **forward),
                       ev("hangup", "101/fwd", 85, outcome="answered", duration=60 * S, **forward)])
    assert effects[-1].payload["client"] == "89031112233"


def test_a_record_without_a_number_of_its_own_takes_the_calls_number() -> None:
    forward = dict(flow="out", peer="89031112233", transferred=True, extension="101")
    _, effects = feed([ev("ring", "101", 1, did="74957654321"),
                       ev("ring", "101/fwd", 21, **forward), ev("answer", "101/fwd", 25, **forward),
                       ev("hangup", "101/fwd", 85, outcome="answered", duration=60 * S, **forward)])
    assert effects[-1].payload["did"] == "74957654321"


def test_a_record_in_a_call_without_any_number_has_an_empty_number() -> None:
    _, effects = feed([ev("ring", "101", 0, flow="out", peer="89161234567"),
                       ev("hangup", "101", 3, flow="out", peer="89161234567", outcome="busy")])
    assert effects[-1].payload["did"] == ""


def test_with_a_number_filter_an_incoming_leg_without_a_number_gives_nothing() -> None:
    policy = Policy(numbers=frozenset({DID}))
    _, effects = feed([ev("ring", "101", 0, did=""), ev("answer", "101", 1, did=""),
                       ev("hangup", "101", 9, outcome="answered", duration=8 * S, did="")], policy)
    assert effects == []


# Internal calls (internal_calls on)


def test_an_unanswered_internal_call_is_one_missed_record_for_the_caller() -> None:
    policy = Policy(internal_calls=True)
    _, effects = feed([ev("ring", "101", 0, flow="out", peer="102"),
                       ev("ring", "102", 0, peer="7001*101", did=""),
                       ev("hangup", "102", 20, outcome="no-answer", peer="7001*101", did=""),
                       ev("hangup", "101", 20, flow="out", peer="102", outcome="no-answer")],
                      policy)
    assert [(e.kind, e.leg, e.payload["direction"], e.payload["status"]) for e in effects] == [
        (RECORD, "101", "internal", "missed")]


# Outgoing legs


def test_an_outgoing_leg_seen_only_by_its_failed_hangup_is_a_missed_outgoing_record() -> None:
    _, effects = feed([ev("hangup", "101", 3, flow="out", peer="89161234567", outcome="busy",
                          recording="R9")])
    assert [(e.kind, e.key) for e in effects] == [(RECORD, "record:101")]
    payload = effects[0].payload
    assert (payload["direction"], payload["status"], payload["outcome"]) == ("outgoing", "missed", "busy")
    assert payload["recording"] == ""  # a missed record never links a recording


def test_an_unanswered_outgoing_leg_is_a_missed_outgoing_record() -> None:
    _, effects = feed([ev("ring", "101", 0, flow="out", peer="89161234567"),
                       ev("hangup", "101", 3, flow="out", peer="89161234567", outcome="busy")])
    assert [(e.kind, e.payload["direction"], e.payload.get("status")) for e in effects] == [
        (POPUP, "outgoing", None), (RECORD, "outgoing", "missed")]


# The missed record of an incoming call


def test_the_missed_record_belongs_to_no_leg_and_has_no_recording() -> None:
    _, effects = feed([ev("ring", "101", 0), ev("hangup", "101", 20, outcome="no-answer",
                                                 recording="R1")])
    missed = effects[-1]
    assert (missed.kind, missed.key, missed.leg) == (RECORD, "record:missed", "")
    assert missed.payload["record_id"] == "7-C-missed"
    assert missed.payload["recording"] == ""
    assert missed.payload["started"] == T0


def test_a_call_answered_but_never_hung_up_is_not_missed_when_it_times_out() -> None:
    call, effects = feed([ev("ring", "101", 0), ev("answer", "101", 5)])
    assert [e.kind for e in effects] == [POPUP, POPUP_UPDATE]
    assert call.is_final


def test_an_ivr_that_never_reports_its_end_leaves_the_miss_to_the_extension() -> None:
    _, effects = feed([ev("ring", "500", 0), ev("ring", "101", 5),
                       ev("hangup", "101", 25, outcome="no-answer")])
    assert effects[-1].payload["extension"] == "101"


def test_a_missed_call_through_a_filtered_number_is_recorded() -> None:
    policy = Policy(numbers=frozenset({DID}), queues=POLICY.queues, ivrs=POLICY.ivrs)
    _, effects = feed([ev("ring", "101", 0), ev("hangup", "101", 20, outcome="no-answer")], policy)
    assert [e.key for e in effects] == ["popup:101", "close:101", "record:missed"]


def test_the_missed_filter_uses_the_calls_number_when_the_deciding_leg_has_none() -> None:
    policy = Policy(numbers=frozenset({DID}), queues=POLICY.queues, ivrs=POLICY.ivrs)
    _, effects = feed([ev("ring", "101", 0), ev("hangup", "101", 10, outcome="no-answer"),
                       ev("hangup", "600", 20, outcome="answered", did="", bridged=False)], policy)
    assert effects[-1].key == "record:missed" and effects[-1].payload["did"] == DID


# Expiry


def test_expiry_decides_once_and_clears_the_due_time() -> None:
    call = Call(7, "C")
    call.event(ev("ring", "101", 0), POLICY)
    call.event(ev("hangup", "101", 20, outcome="no-answer"), POLICY)
    assert call.due == 1_800_000_020 + POLICY.grace
    assert [e.key for e in call.expire(POLICY)] == ["record:missed"]
    assert call.due == 0.0 and call.is_final
    assert call.expire(POLICY) == []


def test_expiry_of_an_answered_call_gives_nothing() -> None:
    call = Call(7, "C")
    for event in [ev("ring", "101", 0), ev("answer", "101", 1),
                  ev("hangup", "101", 5, outcome="answered", duration=4 * S)]:
        call.event(event, POLICY)
    assert call.expire(POLICY) == []


# Click-to-call: the PBX rings the employee first (an incoming leg showing the number it then
# dials), and the call is the employee's outgoing call to that number.


def test_a_click_to_call_is_an_outgoing_call_to_the_dialled_number() -> None:
    _, effects = feed([ev("ring", "101", 0, callback="cb1"),
                       ev("answer", "101", 4, callback="cb1"),
                       ev("hangup", "101", 64, callback="cb1", outcome="answered",
                          duration=60 * S)])
    assert [(e.kind, e.payload["direction"]) for e in effects] == [
        (POPUP, "outgoing"), (POPUP_UPDATE, "outgoing"), (RECORD, "outgoing")]
    assert effects[-1].payload["client"] == CLIENT and effects[-1].payload["duration"] == 60


def test_an_unanswered_click_to_call_is_a_missed_outgoing_record_not_a_missed_call() -> None:
    _, effects = feed([ev("ring", "101", 0, callback="cb1"),
                       ev("hangup", "101", 20, callback="cb1", outcome="no-answer")])
    assert [(e.kind, e.payload["direction"], e.payload.get("status")) for e in effects] == [
        (POPUP, "outgoing", None), (RECORD, "outgoing", "missed")]


# Call-level facts


def test_a_recording_ready_after_the_record_is_attached_to_it() -> None:
    call = Call(7, "C")
    for e in (ev("ring", "101", 0), ev("answer", "101", 5),
              ev("hangup", "101", 65, outcome="answered", duration=60 * S)):
        call.event(e, POLICY)
    [attach] = call.event(ev("recording", "101", 70, recording="R9"), POLICY)
    assert (attach.kind, attach.key, attach.leg) == (ATTACH, "attach:101:R9", "101")
    assert attach.payload["recording"] == "R9" and attach.payload["record_id"] == "7-C-101"
    assert call.event(ev("recording", "101", 71, recording="R9"), POLICY) == []  # once


def test_a_recording_before_the_hangup_goes_with_the_record() -> None:
    _, effects = feed([ev("ring", "101", 0), ev("answer", "101", 5),
                       ev("recording", "101", 6, recording="R9"),
                       ev("hangup", "101", 65, outcome="answered", duration=60 * S)])
    assert [e.kind for e in effects] == [POPUP, POPUP_UPDATE, RECORD]
    assert effects[-1].payload["recording"] == "R9"


def test_a_recording_of_an_unanswered_or_unknown_leg_gives_nothing() -> None:
    call = Call(7, "C")
    call.event(ev("ring", "101", 0), POLICY)
    call.event(ev("hangup", "101", 20, outcome="no-answer"), POLICY)
    assert call.event(ev("recording", "101", 30, recording="R9"), POLICY) == []
    assert call.event(ev("recording", "102", 30, recording="R8"), POLICY) == []
    assert "102" not in call.legs


def test_the_pbx_saying_the_call_finished_decides_it_without_the_grace() -> None:
    call = Call(7, "C")
    call.event(ev("ring", "101", 0), POLICY)
    call.event(ev("hangup", "101", 20, outcome="no-answer"), POLICY)
    assert call.due == 1_800_000_000 + 20 + POLICY.grace
    call.event(ev("finished", "", 21), POLICY)
    assert call.due == 1_800_000_000 + 21
