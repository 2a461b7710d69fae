"""The call model's rules, one table row each: the rules README "What reaches the CRM" and the
``[I]`` choices promise, written so that breaking any one of them fails its row (issue 14).

Same format and machinery as ``tests/test_scenarios.py`` (whose helpers these rows use):
Telphin event sequences, parsed by the real parser, folded by the real engine on a real
SQLite store with an injected clock, turned into the exact Altegio bodies.  A row's name
is the rule; its events are the smallest call that tells the rule from its breakage.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest
import pytest_twisted

from tests.test_scenarios import (CALL, LINKS, TENANT, answer, dial_in, dial_out, fold,
                                  forms, hangup, history, leg, out_answer, out_hangup, popup)

TWO_QUEUES = {"pbx": attrs.evolve(TENANT.pbx, queues=("600", "601"))}
INTERNAL_ON = {"options": {**TENANT.options, "internal_calls": True}}
# 101 dials 102; 102 answers; ten seconds of talk.
INTERNAL_CALL = [dial_out("101", 0, "102"), dial_in("102", 0, caller="7001*101", did=""),
                 answer("102", 2), out_answer("101", 2, "102"),
                 hangup("102", 12, "ANSWER", 10), out_hangup("101", 12, "102", "ANSWER", 10)]


def outgoing(number: str, talk: float = 45) -> list[tuple]:
    """Extension 101 dials ``number``, which answers after 7 s and talks ``talk`` s."""
    return [dial_out("101", 0, number), out_answer("101", 7, number),
            out_hangup("101", 7 + talk, number, "ANSWER", talk)]


def answered(seconds: float) -> list[tuple]:
    """An incoming call straight to 101, answered after 5 s, talking ``seconds``."""
    return [dial_in("101", 0), answer("101", 5), hangup("101", 5 + seconds, "ANSWER", seconds)]


def from_caller(number: str) -> list[tuple]:
    """An incoming call to 101 from ``number``, answered, 30 s of talk."""
    return [dial_in("101", 0, caller=number), answer("101", 5, CallerIDNum=number),
            hangup("101", 35, "ANSWER", 30, CallerIDNum=number)]


# name (the rule) → (events, the Altegio bodies in order, tenant changes)
RULES: dict[str, tuple[list[tuple], list[dict], dict]] = {
    # Missed calls: which queue / IVR hangup names the missed record.
    "the queue hangs up, then the IVR: the missed record names the queue (a queue beats "
    "the IVR even when the IVR's hangup is the last)": (
        [dial_in("500", 0), dial_in("600", 5), dial_in("101", 5),
         hangup("101", 25, "NOANSWER"), hangup("600", 30, "ANSWER", 25, Bridged="no"),
         hangup("500", 31, "ANSWER", 31, Bridged="no")],
        [popup("101"), history("600", "missed", 0, 0, "missed")],
        {}),
    "the IVR hangs up, then the queue: the missed record names the queue": (
        [dial_in("500", 0), dial_in("600", 5), dial_in("101", 5),
         hangup("101", 25, "NOANSWER"), hangup("500", 30, "ANSWER", 30, Bridged="no"),
         hangup("600", 30.4, "ANSWER", 25, Bridged="no")],
        [popup("101"), history("600", "missed", 0, 0, "missed")],
        {}),
    "a call overflows from one queue to another: the missed record names the last queue": (
        [dial_in("600", 0), dial_in("101", 1), hangup("101", 21, "NOANSWER"),
         hangup("600", 30, "ANSWER", 30, Bridged="no"),
         dial_in("601", 30), dial_in("102", 31), hangup("102", 51, "NOANSWER"),
         hangup("601", 60, "ANSWER", 30, Bridged="no")],
        [popup("101"), popup("102"), history("601", "missed", 0, 0, "missed")],
        TWO_QUEUES),
    "an extension with Bridged that pbx.queues does not list is a queue: it beats the "
    "IVR and is never a phone": (
        [dial_in("500", 0), dial_in("101", 5), hangup("101", 25, "NOANSWER"),
         hangup("601", 30, "ANSWER", 25, Bridged="no"),
         hangup("500", 31, "ANSWER", 31, Bridged="no")],
        [popup("101"), history("601", "missed", 0, 0, "missed")],
        {}),
    "a caller without a number leaves no missed record": (
        [dial_in("500", 0, caller=""),
         hangup("500", 10, "ANSWER", 10, Bridged="no", CallerIDNum="")],
        [],
        {}),
    "a missed record carries no recording link, even when its hangup names a recording": (
        [dial_in("500", 0), hangup("500", 10, "ANSWER", 10, "R1", Bridged="no")],
        [history("500", "missed", 0, 0, "missed")],
        {}),
    "a missed call straight to an extension carries no recording link either": (
        [dial_in("101", 0), hangup("101", 20, "NOANSWER", 0, "R1")],
        [popup("101"), history("101", "missed", 0, 0, "missed")],
        {}),
    # Missed calls straight to extensions: all of them must have ended.
    "two extensions ring and one never hangs up: no missed record (one ended phone is not "
    "all of them)": (
        [dial_in("101", 0), dial_in("102", 0), hangup("101", 20, "NOANSWER")],
        [popup("101"), popup("102")],
        {}),
    "two extensions ring and both end unanswered: one missed record": (
        [dial_in("101", 0), dial_in("102", 0), hangup("101", 20, "NOANSWER"),
         hangup("102", 20, "NOANSWER")],
        [popup("101"), popup("102"), history("101", "missed", 0, 0, "missed")],
        {}),
    # After the call is final.
    "a leg that rings after the call is final gets no pop-up, but its talk is recorded": (
        [dial_in("101", 0), hangup("101", 20, "NOANSWER"),
         dial_in("102", 60), answer("102", 62), hangup("102", 92, "ANSWER", 30, "R2")],
        [popup("101"), history("101", "missed", 0, 0, "missed"),
         history("102", "success", 30, 60, leg("102"), link=LINKS["R2"])],
        {}),
    # Durations: whole seconds, rounded to nearest; answered comes from CallStatus.
    "83.5 s of talk is sent as 84 s": (
        answered(83.5), [popup("101"), history("101", "success", 84, 0, leg("101"))], {}),
    "83.7 s of talk is sent as 84 s": (
        answered(83.7), [popup("101"), history("101", "success", 84, 0, leg("101"))], {}),
    "83.4 s of talk is sent as 83 s": (
        answered(83.4), [popup("101"), history("101", "success", 83, 0, leg("101"))], {}),
    "an answered call of 0.4 s is a success of 0 s, not a missed call": (
        answered(0.4), [popup("101"), history("101", "success", 0, 0, leg("101"))], {}),
    # The virtual-number filter.
    "an outgoing call (no DID) passes a virtual-number filter it has nothing to match": (
        outgoing("89161234567"),
        [history("101", "success", 45, 0, leg("101"), type="outgoing")],
        {"numbers": ("74950000000",)}),
    # Internal calls.
    "an internal call is dropped by default": (INTERNAL_CALL, [], {}),
    # Where own extensions end and outside numbers begin.
    "a 5-digit number is an own extension: calling it is internal": (
        outgoing("12345"), [], {}),
    "a 6-digit number is an outside number: calling it is an outgoing call": (
        outgoing("123456"),
        [history("101", "success", 45, 0, leg("101"), type="outgoing", phone="123456")],
        {}),
    "a number with '*' is an own extension, however many digits": (
        outgoing("7001*102"), [], {}),
    "a '+' number is an outside number": (
        outgoing("+79161234567"),
        [history("101", "success", 45, 0, leg("101"), type="outgoing")],
        {}),
    "a call from a 6-digit number is an incoming call, with a pop-up": (
        from_caller("123456"),
        [popup("101", phone="123456"),
         history("101", "success", 30, 0, leg("101"), phone="123456")],
        {}),
    "a call from a 5-digit number is internal: nothing by default": (
        from_caller("12345"), [], {}),
    # Altegio is sent +E.164 from 7 digits on; shorter numbers go as they are.
    "a 7-digit outside number is sent with '+'": (
        outgoing("1234567"),
        [history("101", "success", 45, 0, leg("101"), type="outgoing", phone="+1234567")],
        {}),
    "a short '+' number is an outside number, not an own extension": (
        outgoing("+12345"),
        [history("101", "success", 45, 0, leg("101"), type="outgoing", phone="+12345")],
        {}),
}

PARAMS = [pytest.param(name, *row, id=name) for name, row in RULES.items()]


@pytest.mark.parametrize("name, events, expected, changes", PARAMS)
@pytest_twisted.ensureDeferred
async def test_rule(tmp_path: Any, name: str, events: list[tuple], expected: list[dict],
                    changes: dict) -> None:
    tenant = attrs.evolve(TENANT, **changes)
    assert await fold(tmp_path, forms(events), tenant) == expected


@pytest_twisted.ensureDeferred
async def test_internal_calls_are_recorded_when_the_tenant_asks(tmp_path: Any) -> None:
    """options.internal_calls on: each leg of a call between own extensions is a record
    (its caller's number is not pinned: an extension is not a number Altegio knows)."""
    tenant = attrs.evolve(TENANT, **INTERNAL_ON)
    bodies = await fold(tmp_path, forms(INTERNAL_CALL), tenant)
    assert [(b["command"], b["type"], b["user"], b["status"], b["duration"], b["call_id"])
            for b in bodies] == [
        ("history", "internal", "102", "success", 10, f"807-{CALL}-{leg('102')}"),
        ("history", "internal", "101", "success", 10, f"807-{CALL}-{leg('101')}")]


# CLOSING: a PBX's own record of the call (it is over), which may overtake the call's last
# leg events.  The pure call model on neutral events (Telphin sends no CLOSING: its rows
# above are what pins its behaviour unchanged).
def _ev(kind: str, leg_key: str, at: float, **fields: Any) -> Any:
    from gateway.model import Event
    return Event(tenant=807, call="C", leg=leg_key, kind=kind, flow="in",
                 at=int(at * 1_000_000), received=1_800_000_000 + at,
                 extension=leg_key, peer=CLIENT_NUMBER, did="74951234567", **fields)


CLIENT_NUMBER = "+79161234567"


def _run(events: list[Any], policy: Any = None) -> tuple[Any, list[tuple[str, str]]]:
    from gateway.calls import Call, Policy
    policy = policy or Policy()
    call, out = Call(807, "C"), []
    for ev in events:
        out += [(e.kind, e.key) for e in call.event(ev, policy)]
    return call, out


def test_closing_waits_the_grace_for_a_late_last_event() -> None:
    """Group call, the record overtakes the last cancel: not decided at the record, but a
    grace after it; the late cancel lands before that and one missed record follows."""
    from gateway.model import CLOSING
    call, out = _run([_ev("ring", "101", 0), _ev("ring", "102", 0),
                      _ev("hangup", "101", 20, outcome="cancelled"),
                      _ev(CLOSING, "", 21)])
    assert call.due == 1_800_000_000 + 21 + 3.0 and not call.is_final
    call2, more = _run([_ev("ring", "101", 0), _ev("ring", "102", 0),
                        _ev("hangup", "101", 20, outcome="cancelled"),
                        _ev(CLOSING, "", 21), _ev("hangup", "102", 22, outcome="cancelled")])
    assert call2.due == 1_800_000_000 + 22 + 3.0
    from gateway.calls import Policy
    assert [e.key for e in call2.expire(Policy())] == ["record:missed"]


def test_closing_is_once_a_second_one_moves_nothing() -> None:
    from gateway.model import CLOSING
    call, _ = _run([_ev("ring", "101", 0), _ev(CLOSING, "", 10), _ev(CLOSING, "", 500)])
    assert call.due == 1_800_000_000 + 10 + 3.0


def test_after_closing_a_leg_that_never_ends_does_not_hold_the_call_for_hours() -> None:
    """Without CLOSING a ringing phone holds the call open for max_open and then no missed
    record is made (not every phone ended); after CLOSING the grace decides it, and the
    phone whose end was never reported counts as ended."""
    from gateway.calls import Policy
    from gateway.model import CLOSING
    policy = Policy()
    open_call, _ = _run([_ev("ring", "101", 0), _ev("ring", "102", 0),
                         _ev("hangup", "101", 20, outcome="cancelled")], policy)
    assert open_call.due == 1_800_000_000 + 20 + policy.max_open
    assert open_call.expire(policy) == []
    closed, _ = _run([_ev("ring", "101", 0), _ev("ring", "102", 0),
                      _ev("hangup", "101", 20, outcome="cancelled"), _ev(CLOSING, "", 21),
                      _ev("answer", "999", 22)], policy)
    assert closed.due == 1_800_000_000 + 22 + policy.grace  # a late event: grace, not hours
    assert closed.legs["999"].answered  # an answered phone: no missed record
    closed2, _ = _run([_ev("ring", "101", 0), _ev("ring", "102", 0),
                       _ev("hangup", "101", 20, outcome="cancelled"), _ev(CLOSING, "", 21)],
                      policy)
    [missed] = closed2.expire(policy)
    assert (missed.key, missed.payload["status"], missed.payload["extension"]) == (
        "record:missed", "missed", "101")


def test_closing_survives_a_stored_state_and_old_states_read_as_not_closing() -> None:
    from gateway.calls import Call
    from gateway.model import CLOSING
    call, _ = _run([_ev("ring", "101", 0), _ev(CLOSING, "", 5)])
    again = Call.from_state(call.to_state())
    assert again.closing and again.due == call.due
    old = call.to_state()
    del old["closing"]
    assert Call.from_state(old).closing is False


def test_closing_after_the_call_is_final_changes_nothing() -> None:
    from gateway.calls import Policy
    from gateway.model import CLOSING
    call, _ = _run([_ev("ring", "101", 0), _ev("hangup", "101", 20, outcome="no-answer")])
    call.expire(Policy())
    assert call.is_final
    assert call.event(_ev(CLOSING, "", 30), Policy()) == [] and call.due == 0.0


def test_a_rating_learned_by_a_leg_goes_with_its_record_and_only_then() -> None:
    """A score given before the leg's record (on any of its events) is in the record's
    payload; a record without one has no ``rating`` key at all (Telphin's are unchanged)."""
    _, plain = _run([_ev("ring", "101", 0), _ev("answer", "101", 2)])
    from gateway.calls import Call, Policy
    call = Call(807, "C")
    effects = []
    for ev in [_ev("ring", "101", 0), _ev("answer", "101", 2), _ev("answer", "101", 30, rating=4),
               _ev("hangup", "101", 31, outcome="answered", duration=29_000_000)]:
        effects += call.event(ev, Policy())
    [record] = [e for e in effects if e.kind == "record"]
    assert record.payload["rating"] == 4
    call2 = Call(807, "C")
    effects2 = []
    for ev in [_ev("ring", "101", 0), _ev("answer", "101", 2),
               _ev("hangup", "101", 31, outcome="answered", duration=29_000_000)]:
        effects2 += call2.event(ev, Policy())
    [record2] = [e for e in effects2 if e.kind == "record"]
    assert "rating" not in record2.payload
    assert Call.from_state(call.to_state()).legs["101"].rating == 4
