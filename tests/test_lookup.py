"""The synchronous lookup (issue 9, item 4): an answer before the deadline from a fresh cache,
else the CRM, else a stale cache, else nothing; one CRM request per key at a time; a slow
answer still fills the cache.  Time is a ``Clock``: nothing here sleeps.
"""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger

import gateway.lookup
from gateway.lookup import FRESH, LOOKUP, NONE, STALE, Answer, Lookup

NUMBER = "+79161234567"
OTHER = "+79169876543"


class CRM:
    """A CRM whose answers the test decides: one Deferred per request, in order."""

    def __init__(self) -> None:
        self.requests: list[Deferred] = []
        self.cancelled = 0

    def fetch(self) -> Deferred:
        d: Deferred = Deferred(self._cancel)
        self.requests.append(d)
        return d

    def _cancel(self, d: Deferred) -> None:
        self.cancelled += 1

    def answer(self, value: Any, index: int = -1) -> None:
        self.requests[index].callback(value)

    def fail(self, error: Exception, index: int = -1) -> None:
        self.requests[index].errback(error)


class Result:
    """What a Deferred fired with, or nothing yet."""

    def __init__(self, d: Deferred) -> None:
        self.fired = False
        self.value: Any = None
        d.addBoth(self._set)

    def _set(self, value: Any) -> None:
        self.fired = True
        self.value = value


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def logged(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    events: list[dict] = []
    monkeypatch.setattr(gateway.lookup, "log", Logger(observer=events.append))
    return events


def lookup(clock: Clock, fresh: float = 60.0, keep: float = 3600.0, max_entries: int = 100,
           max_fetch: float = 30.0) -> Lookup:
    return Lookup(clock, fresh=fresh, keep=keep, max_entries=max_entries, max_fetch=max_fetch)


def warm(lk: Lookup, key: Any = NUMBER, value: Any = "101") -> None:
    """Put ``value`` in the cache as the CRM's answer now."""
    result = Result(lk.get(key, lambda: succeed(value), 1.5))
    assert result.value == Answer(value, LOOKUP, 0.0)


def never() -> Deferred:
    raise AssertionError("the CRM must not be asked")


# The order of preference


def test_a_warm_cache_answers_at_once_without_asking_the_crm(clock: Clock) -> None:
    lk = lookup(clock)
    warm(lk)
    clock.advance(59)
    result = Result(lk.get(NUMBER, never, 1.5))
    assert result.value == Answer("101", FRESH, 59.0)
    assert lk.counts[FRESH] == 1
    assert clock.getDelayedCalls() == []


def test_a_cold_cache_answers_from_the_crm_and_keeps_the_answer(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    result = Result(lk.get(NUMBER, crm.fetch, 1.5))
    assert not result.fired
    clock.advance(1.4)
    crm.answer("101")
    assert result.value == Answer("101", LOOKUP, 0.0)
    assert clock.getDelayedCalls() == []  # neither the deadline nor max_fetch is left armed
    assert (lk.size, lk.in_flight) == (1, 0)
    clock.advance(10)
    assert Result(lk.get(NUMBER, never, 1.5)).value == Answer("101", FRESH, 10.0)
    assert lk.counts == {"fetch": 1, LOOKUP: 1, FRESH: 1}


def test_a_coroutine_fetch_is_awaited(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()

    async def fetch() -> Any:
        return "ext " + await crm.fetch()

    result = Result(lk.get(NUMBER, fetch, 1.5))
    crm.answer("101")
    assert result.value == Answer("ext 101", LOOKUP, 0.0)


def test_an_answer_becomes_stale_after_fresh_seconds(clock: Clock) -> None:
    lk, crm = lookup(clock, fresh=60), CRM()
    warm(lk)
    clock.advance(60)
    result = Result(lk.get(NUMBER, crm.fetch, 1.5))
    assert len(crm.requests) == 1
    crm.answer("102")
    assert result.value == Answer("102", LOOKUP, 0.0)


def test_a_fetch_slower_than_the_deadline_gives_none_exactly_at_the_deadline(
        clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    result = Result(lk.get(NUMBER, crm.fetch, 1.5))
    clock.advance(1.4999)
    assert not result.fired
    clock.advance(0.0001)
    assert result.value == Answer(None, NONE)
    assert lk.in_flight == 1  # the fetch goes on
    clock.advance(5)
    crm.answer("101")  # late: for the next call
    assert (lk.size, lk.in_flight) == (1, 0)
    assert lk.counts == {"fetch": 1, NONE: 1, "late": 1}
    assert Result(lk.get(NUMBER, never, 1.5)).value == Answer("101", FRESH, 0.0)


def test_a_stale_answer_is_served_when_the_crm_is_slow(clock: Clock) -> None:
    lk, crm = lookup(clock, fresh=60, keep=3600), CRM()
    warm(lk)
    clock.advance(3000)
    result = Result(lk.get(NUMBER, crm.fetch, 1.5))
    clock.advance(1.5)
    assert result.value == Answer("101", STALE, 3001.5)
    crm.answer("102")  # the late answer replaces the stale one
    assert Result(lk.get(NUMBER, never, 1.5)).value == Answer("102", FRESH, 0.0)


def test_an_answer_older_than_keep_is_not_served(clock: Clock) -> None:
    lk, crm = lookup(clock, fresh=60, keep=3600), CRM()
    warm(lk)
    clock.advance(3599)
    result = Result(lk.get(NUMBER, crm.fetch, 1))
    clock.advance(1)  # 3600 s old at the deadline
    assert result.value == Answer(None, NONE)


def test_answers_older_than_keep_are_forgotten(clock: Clock) -> None:
    lk = lookup(clock, fresh=60, keep=3600)
    warm(lk, NUMBER)
    clock.advance(1000)
    warm(lk, OTHER)
    clock.advance(2600)
    Result(lk.get("+70000000000", lambda: succeed(None), 1))
    assert lk.size == 2  # NUMBER went; OTHER and the new one stay
    crm = CRM()
    stale, gone = Result(lk.get(OTHER, crm.fetch, 1)), Result(lk.get(NUMBER, crm.fetch, 1))
    clock.advance(1)
    assert stale.value == Answer("101", STALE, 2601.0)
    assert gone.value == Answer(None, NONE)


def test_keep_equal_to_fresh_serves_nothing_stale(clock: Clock) -> None:
    lk, crm = lookup(clock, fresh=60, keep=60), CRM()
    warm(lk)
    clock.advance(60)
    result = Result(lk.get(NUMBER, crm.fetch, 1))
    assert lk.size == 0
    clock.advance(1)
    assert result.value == Answer(None, NONE)


def test_the_crm_saying_no_manager_is_cached_too(clock: Clock) -> None:
    lk = lookup(clock, fresh=60)
    assert Result(lk.get(NUMBER, lambda: succeed(None), 1.5)).value == Answer(None, LOOKUP, 0.0)
    clock.advance(30)
    assert Result(lk.get(NUMBER, never, 1.5)).value == Answer(None, FRESH, 30.0)


def test_a_cached_no_manager_is_served_stale_as_such(clock: Clock) -> None:
    lk, crm = lookup(clock, fresh=60), CRM()
    Result(lk.get(NUMBER, lambda: succeed(None), 1.5))
    clock.advance(100)
    result = Result(lk.get(NUMBER, crm.fetch, 1.5))
    clock.advance(1.5)
    assert result.value == Answer(None, STALE, 101.5)


def test_an_answer_from_the_future_is_not_fresh(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    clock.advance(1000)
    warm(lk)
    clock.rightNow = 900.0  # the wall clock went back
    result = Result(lk.get(NUMBER, crm.fetch, 1.5))
    assert len(crm.requests) == 1
    clock.advance(1.5)
    assert result.value.source == STALE


def test_a_zero_deadline_answers_at_the_next_turn(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    result = Result(lk.get(NUMBER, crm.fetch, 0))
    assert not result.fired
    clock.advance(0)
    assert result.value == Answer(None, NONE)


# One fetch per key


def test_callers_asking_for_one_number_meanwhile_share_one_fetch(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    first = Result(lk.get(NUMBER, crm.fetch, 1.5))
    clock.advance(0.5)
    second = Result(lk.get(NUMBER, crm.fetch, 1.5))
    assert len(crm.requests) == 1
    assert lk.in_flight == 1
    crm.answer("101")
    assert first.value == second.value == Answer("101", LOOKUP, 0.0)
    assert lk.counts == {"fetch": 1, "join": 1, LOOKUP: 2}


def test_each_caller_keeps_its_own_deadline(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    first = Result(lk.get(NUMBER, crm.fetch, 1.5))
    clock.advance(1)
    second = Result(lk.get(NUMBER, crm.fetch, 1.5))
    clock.advance(0.5)
    assert first.value == Answer(None, NONE)
    assert not second.fired
    clock.advance(0.9)
    crm.answer("101")
    assert second.value == Answer("101", LOOKUP, 0.0)
    assert "late" not in lk.counts  # someone was still waiting for it


def test_different_numbers_do_not_share_a_fetch(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    first = Result(lk.get(NUMBER, crm.fetch, 1.5))
    second = Result(lk.get(OTHER, crm.fetch, 1.5))
    assert len(crm.requests) == 2
    assert lk.in_flight == 2
    crm.answer("102", index=1)
    crm.answer("101", index=0)
    assert (first.value.value, second.value.value) == ("101", "102")


def test_a_fetch_that_answers_at_once_answers_the_caller_at_once(clock: Clock) -> None:
    lk = lookup(clock)
    result = Result(lk.get(NUMBER, lambda: "101", 1.5))  # a plain value will do too
    assert result.value == Answer("101", LOOKUP, 0.0)
    assert (clock.getDelayedCalls(), lk.in_flight) == ([], 0)


def test_a_fetch_asking_for_its_own_number_joins_itself(clock: Clock) -> None:
    lk = lookup(clock)
    inner: list[Result] = []

    def fetch() -> Deferred:
        inner.append(Result(lk.get(NUMBER, never, 1.5)))
        return succeed("101")

    outer = Result(lk.get(NUMBER, fetch, 1.5))
    assert outer.value == inner[0].value == Answer("101", LOOKUP, 0.0)


# A CRM that fails or never answers


def test_a_failing_fetch_answers_stale_at_once_and_keeps_the_cache(
        clock: Clock, logged: list[dict]) -> None:
    lk, crm = lookup(clock, fresh=60), CRM()
    warm(lk)
    clock.advance(100)
    first = Result(lk.get(NUMBER, crm.fetch, 1.5))
    second = Result(lk.get(NUMBER, crm.fetch, 1.5))
    clock.advance(0.2)
    crm.fail(ConnectionRefusedError("crm down"))
    assert first.value == second.value == Answer("101", STALE, 100.2)
    assert (lk.size, lk.in_flight, clock.getDelayedCalls()) == (1, 0, [])
    assert [e["key"] for e in logged] == [NUMBER]  # once, not once per caller
    assert logged[0]["log_failure"].check(ConnectionRefusedError)
    assert lk.counts["failed"] == 1
    # The next call asks again.
    third = Result(lk.get(NUMBER, crm.fetch, 1.5))
    assert len(crm.requests) == 2
    crm.answer("102")
    assert third.value == Answer("102", LOOKUP, 0.0)


def test_a_failing_fetch_with_nothing_cached_answers_none(
        clock: Clock, logged: list[dict]) -> None:
    lk = lookup(clock)
    result = Result(lk.get(NUMBER, lambda: fail(ValueError("bad answer")), 1.5))
    assert result.value == Answer(None, NONE)
    assert lk.size == 0
    assert len(logged) == 1


def test_a_fetch_that_raises_answers_none(clock: Clock, logged: list[dict]) -> None:
    lk = lookup(clock)

    def fetch() -> Deferred:
        raise KeyError("no such tenant")

    assert Result(lk.get(NUMBER, fetch, 1.5)).value == Answer(None, NONE)
    assert lk.in_flight == 0
    assert logged[0]["log_failure"].check(KeyError)


def test_a_fetch_that_never_ends_is_cancelled_after_max_fetch(
        clock: Clock, logged: list[dict]) -> None:
    lk, crm = lookup(clock, max_fetch=30), CRM()
    warm(lk)
    clock.advance(61)
    patient = Result(lk.get(NUMBER, crm.fetch, 100))  # a deadline beyond max_fetch
    clock.advance(29.999)
    assert (crm.cancelled, lk.in_flight, patient.fired) == (0, 1, False)
    clock.advance(0.001)
    assert crm.cancelled == 1
    assert patient.value == Answer("101", STALE, 91.0)
    assert lk.in_flight == 0
    assert lk.counts["abandoned"] == 1
    assert logged[0]["max_fetch"] == 30.0
    assert "failed" not in lk.counts  # its CancelledError is not a second report
    assert clock.getDelayedCalls() == []
    # The slot is free: the next call asks again.
    Result(lk.get(NUMBER, crm.fetch, 1.5))
    assert len(crm.requests) == 2


def test_an_answer_after_max_fetch_is_ignored(clock: Clock, logged: list[dict]) -> None:
    lk = lookup(clock, max_fetch=30)
    answered: list[Deferred] = []

    def fetch() -> Deferred:
        # A fetch that, cancelled, answers with what it has: too late to trust or wait for.
        d: Deferred = Deferred(lambda d: d.callback("101"))
        answered.append(d)
        return d

    result = Result(lk.get(NUMBER, fetch, 100))
    clock.advance(30)
    assert answered[0].called
    assert result.value == Answer(None, NONE)
    assert lk.size == 0
    assert lk.counts == {"fetch": 1, "abandoned": 1, NONE: 1}


# Callers that hang up


def test_a_caller_hanging_up_does_not_cancel_the_others_fetch(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    staying = Result(lk.get(NUMBER, crm.fetch, 1.5))
    gone = lk.get(NUMBER, crm.fetch, 1.5)
    gone_result = Result(gone)
    gone.cancel()
    clock.advance(1.5)  # its deadline is disarmed: it is not answered twice
    assert isinstance(gone_result.value.value, CancelledError)
    assert crm.cancelled == 0
    crm.answer("101")
    assert staying.value == Answer(None, NONE)
    assert lk.counts == {"fetch": 1, "join": 1, "cancelled": 1, NONE: 1, "late": 1}


def test_when_every_caller_hangs_up_the_fetch_still_fills_the_cache(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    gone = lk.get(NUMBER, crm.fetch, 1.5)
    gone.addErrback(lambda f: f.trap(CancelledError))
    gone.cancel()
    assert clock.getDelayedCalls()[0].getTime() == 30.0  # only max_fetch is armed
    clock.advance(2)
    crm.answer("101")
    assert crm.cancelled == 0
    assert lk.counts["late"] == 1
    assert Result(lk.get(NUMBER, never, 1.5)).value == Answer("101", FRESH, 0.0)


def test_a_caller_hanging_up_inside_another_callers_answer(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    first = lk.get(NUMBER, crm.fetch, 1.5)
    second = lk.get(NUMBER, crm.fetch, 1.5)
    second_result = Result(second)
    first.addCallback(lambda answer: second.cancel())
    crm.answer("101")
    assert isinstance(second_result.value.value, CancelledError)
    assert clock.getDelayedCalls() == []


def test_an_answered_caller_asking_again_gets_the_fresh_answer(clock: Clock) -> None:
    lk, crm = lookup(clock), CRM()
    again: list[Result] = []
    lk.get(NUMBER, crm.fetch, 1.5).addCallback(
        lambda answer: again.append(Result(lk.get(NUMBER, never, 1.5))))
    crm.answer("101")
    assert again[0].value == Answer("101", FRESH, 0.0)


# Bounds


def test_the_cache_holds_at_most_max_entries_and_drops_the_oldest_answer(
        clock: Clock) -> None:
    lk = lookup(clock, max_entries=2)
    warm(lk, "a", "1")
    clock.advance(1)
    warm(lk, "b", "2")
    clock.advance(1)
    warm(lk, "c", "3")
    assert lk.size == 2
    assert lk.counts["evicted"] == 1
    assert Result(lk.get("b", never, 1)).value.value == "2"
    assert Result(lk.get("c", never, 1)).value.value == "3"
    crm = CRM()
    Result(lk.get("a", crm.fetch, 1))
    assert len(crm.requests) == 1  # "a" was forgotten


def test_a_refilled_answer_counts_as_new(clock: Clock) -> None:
    lk = lookup(clock, fresh=1, max_entries=2)
    warm(lk, "a", "1")
    warm(lk, "b", "2")
    clock.advance(1)
    warm(lk, "a", "1+")  # "a" is now newer than "b"
    warm(lk, "c", "3")
    crm = CRM()
    Result(lk.get("b", crm.fetch, 1))
    assert len(crm.requests) == 1
    assert Result(lk.get("a", never, 1)).value == Answer("1+", FRESH, 0.0)


@pytest.mark.parametrize("kwargs, message", [
    ({"fresh": -1}, "fresh must be a finite number of seconds, at least 0.0, not -1"),
    ({"fresh": float("nan")}, "fresh must be"),
    ({"fresh": float("inf")}, "fresh must be"),
    ({"fresh": "60"}, "fresh must be"),
    ({"fresh": True}, "fresh must be"),
    ({"keep": 59}, "keep must be a finite number of seconds, at least 60.0, not 59"),
    ({"keep": float("inf")}, "keep must be"),
    ({"max_entries": 0}, "max_entries must be a whole number above 0, not 0"),
    ({"max_entries": 1.5}, "max_entries must be"),
    ({"max_entries": True}, "max_entries must be"),
    ({"max_fetch": 0.0009}, "max_fetch must be a finite number of seconds, at least 0.001"),
    ({"max_fetch": float("nan")}, "max_fetch must be"),
])
def test_settings_out_of_bounds_are_refused(clock: Clock, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        lookup(clock, **{"fresh": 60, **kwargs})
    assert str(refused.value).startswith(message)


def test_a_fetch_may_take_30_seconds_unless_told_otherwise(clock: Clock) -> None:
    assert Lookup(clock, fresh=60, keep=3600, max_entries=10).max_fetch == 30.0


def test_the_smallest_settings_are_accepted(clock: Clock) -> None:
    lk = lookup(clock, fresh=0, keep=0, max_entries=1, max_fetch=0.001)
    assert (lk.fresh, lk.keep, lk.max_entries, lk.max_fetch) == (0.0, 0.0, 1, 0.001)
    crm = CRM()
    Result(lk.get(NUMBER, lambda: succeed("1"), 1))
    Result(lk.get(NUMBER, crm.fetch, 1))
    assert len(crm.requests) == 1  # fresh=0: never fresh


@pytest.mark.parametrize("deadline", [-0.1, float("nan"), float("inf"), None])
def test_a_deadline_out_of_bounds_is_refused(clock: Clock, deadline: Any) -> None:
    lk = lookup(clock)
    with pytest.raises(ValueError, match="^deadline must be a finite number of seconds"):
        lk.get(NUMBER, never, deadline)
    assert lk.in_flight == 0
