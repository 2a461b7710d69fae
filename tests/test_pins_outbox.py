"""The dispatcher's arithmetic and bookkeeping, pinned where the rule tests leave it free.

tests/test_outbox.py and tests/test_retry_after.py pin the dispatcher's rules (order, pop-ups
first, Retry-After bounded, dead letters); these pin the numbers and records behind them: the
backoff's exponent, jitter and cap, a pause's lower bound and when a 429 pauses a host, what a
retry writes to the attempt log and the counters, and the dispatch lag.  Found by ``make mutate``.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock

from gateway.errors import Retryable
from gateway.model import DEAD, DONE, DROPPED, PENDING, POPUP, RECORD, SETUP, Action, Attempt
from gateway.outbox import Dispatcher, Policy, TokenBucket, backoff, bounded_pause
from tests.test_outbox import CRM, MemoryStore

_ids = iter(range(1, 10**9))


class Ends:
    """An rng whose ``uniform`` gives the low or the high end: the jitter's bounds."""

    def __init__(self, high: bool) -> None:
        self.high = high

    def uniform(self, low: float, high: float) -> float:
        return high if self.high else low


class Recording(MemoryStore):
    """A MemoryStore that also remembers which action each attempt was for, and every pause
    written."""

    def __init__(self) -> None:
        super().__init__()
        self.for_action: list[tuple[int, str]] = []
        self.pause_writes: list[tuple[str, float]] = []

    def record_attempt(self, action: Action, attempt: Attempt) -> Deferred:
        self.for_action.append((action.id, attempt.outcome))
        return super().record_attempt(action, attempt)

    def put_pause(self, bucket: str, until: float) -> Deferred:
        self.pause_writes.append((bucket, until))
        return super().put_pause(bucket, until)


def action(kind: str = RECORD, call: str = "c1", tenant: int = 1, created: float = 0.0) -> Action:
    n = next(_ids)
    return Action(tenant=tenant, call=call, kind=kind, key=f"{kind}:{n}", leg=f"L{n}",
                  payload={}, created=created, id=n)


def make(policy: Policy = Policy(), now: float = 0.0, limits: Any = None
         ) -> tuple[Dispatcher, CRM, Clock, Recording]:
    clock, crm, store = Clock(), CRM(), Recording()
    clock.advance(now)
    dispatcher = Dispatcher(store, clock, crm.perform,
                            limits or (lambda a: [("host", 1000.0, 1000)]), policy,
                            random.Random(7))
    ensureDeferred(dispatcher.start())
    return dispatcher, crm, clock, store


# Backoff


def test_backoff_doubles_from_the_base_and_jitters_between_half_and_all_of_it() -> None:
    policy = Policy(backoff_base=1.0, backoff_cap=1000.0)
    assert [backoff(policy, n, Ends(high=False)) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert [backoff(policy, n, Ends(high=True)) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]


def test_the_backoff_exponent_stops_at_sixty() -> None:
    policy = Policy(backoff_base=2.0 ** -60, backoff_cap=1e30)
    assert backoff(policy, 10_000, Ends(high=True)) == 1.0


def test_a_policy_refuses_a_non_positive_bound_by_name() -> None:
    with pytest.raises(ValueError, match="backoff_base must be a finite number above 0, not 0"):
        Policy(backoff_base=0)


def test_a_pause_under_a_second_is_kept_as_asked() -> None:
    assert bounded_pause(0.25, 300) == 0.25
    assert bounded_pause(-3, 300) == 0.0


# Retries: what is counted and written


def test_a_retry_is_counted_and_written_with_the_crms_status_and_a_bounded_answer() -> None:
    d, crm, clock, store = make()
    a = action()
    d.add([a])
    crm.answer(outcome=Retryable("HTTP 503", 503, answer="x" * 600))
    assert d.counts == {"retry": 1}
    assert a.attempts == 1 and a.last_error == "HTTP 503"
    attempt = store.attempts[-1]
    assert (attempt.outcome, attempt.status, attempt.request) == ("retry", 503, "HTTP 503")
    assert attempt.answer == "x" * 500
    assert store.for_action == [(a.id, "retry")]


def test_every_retry_adds_one_attempt() -> None:
    d, crm, clock, store = make()
    a = action()
    d.add([a])
    for _ in range(3):
        crm.answer(outcome=Retryable("HTTP 503", 503))
        clock.advance(10_000)
    assert a.attempts == 3


def test_an_action_is_dead_at_exactly_its_max_age() -> None:
    d, crm, clock, store = make(Policy(max_age=100.0))
    a = action(created=0.0)
    d.add([a])
    clock.advance(100.0)
    crm.answer(outcome=Retryable("HTTP 503", 503))
    assert a.state == DEAD and a.attempts == 1


def test_a_stale_popup_that_fails_is_dropped_with_the_crms_answer_on_record() -> None:
    d, crm, clock, store = make()
    pop = action(kind=POPUP)
    d.add([pop])
    d.drop([pop.id])
    crm.answer(outcome=Retryable("HTTP 503", 503))
    attempt = store.attempts[-1]
    assert (attempt.outcome, attempt.status, attempt.request, attempt.answer) == (
        DROPPED, 503, "HTTP 503", "leg ended before delivery")
    assert pop.last_error == "leg ended before delivery"


# Host pauses


def test_a_429_asking_under_a_second_pauses_the_host_that_long() -> None:
    d, crm, clock, store = make()
    d.add([action()])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=0.5))
    assert d.paused() == {"host": pytest.approx(0.5)}
    assert store.pause_writes == [("host", 0.5)]


def test_a_429_asking_for_no_pause_pauses_nothing() -> None:
    d, crm, clock, store = make(now=100.0)
    d.add([action()])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=0))
    assert d.paused() == {} and store.pause_writes == []


def test_a_pause_no_longer_than_the_running_one_is_not_written_again() -> None:
    d, crm, clock, store = make()
    d.add([action(call="c1"), action(call="c2")])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=10))
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=10))
    assert store.pause_writes == [("host", 10.0)]


def test_a_429_pauses_the_buckets_of_the_action_that_got_it() -> None:
    d, crm, clock, store = make(limits=lambda a: [(f"host-{a.tenant}", 1000.0, 1000)])
    d.add([action(tenant=2)])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=10))
    assert set(d.paused()) == {"host-2"}


# Dispatch lag


def test_the_dispatch_lag_is_the_age_of_the_oldest_undelivered_action() -> None:
    d, crm, clock, store = make(now=1000.0)
    assert d.oldest_age() == 0.0
    d.add([action(created=990.0, call="c1"), action(created=995.0, call="c2")])
    assert d.oldest_age() == 10.0
    d.add([action(created=2000.0, call="c3")])
    assert d.oldest_age() == 10.0


def test_an_action_from_the_future_has_no_negative_lag() -> None:
    d, crm, clock, store = make(now=1000.0)
    d.add([action(created=1500.0)])
    assert d.oldest_age() == 0.0



# Failures that are not a CRM's answer


def test_an_unbuildable_action_records_a_bounded_reason_and_no_answer() -> None:
    clock, store = Clock(), Recording()

    def perform(a: Action) -> Deferred:
        raise ValueError("x" * 1000)

    d = Dispatcher(store, clock, perform, lambda a: [("host", 1000.0, 1000)], Policy(),
                   random.Random(7))
    ensureDeferred(d.start())
    a = action()
    d.add([a])
    attempt = store.attempts[-1]
    assert attempt.request == ("cannot perform: ValueError: " + "x" * 1000)[:500]
    assert attempt.answer == "" and a.last_error == attempt.request


# Counters, dropped pop-ups and re-drives


def test_the_counters_count_every_outcome() -> None:
    d, crm, clock, store = make()
    a, b = action(call="c1"), action(call="c2")
    d.add([a, b])
    crm.answer(0, Retryable("HTTP 503", 503))
    crm.answer(0, Retryable("HTTP 503", 503))
    clock.advance(10_000)
    crm.answer(0)
    crm.answer(0)
    assert d.counts == {"retry": 2, DONE: 2}


def test_a_popup_dropped_before_it_was_sent_has_no_attempt() -> None:
    d, crm, clock, store = make(Policy(max_in_flight=1))
    d.add([action(call="c0")])
    pop = action(kind=POPUP, call="c1")
    d.add([pop])
    d.drop([pop.id])
    assert pop.state == DROPPED and pop.attempts == 0


def test_a_redriven_popup_that_was_stale_once_is_retried_not_dropped() -> None:
    d, crm, clock, store = make()
    pop = action(kind=POPUP)
    d.add([pop])
    d.drop([pop.id])  # stale while in flight...
    crm.answer(0)  # ...and delivered all the same
    assert pop.state == DONE
    pop.state = PENDING  # an operator re-drives it
    d.add([pop])
    crm.answer(0, Retryable("HTTP 503", 503))
    assert pop.state == PENDING and store.attempts[-1].outcome == "retry"


def test_a_tenant_setup_with_nothing_parked_behind_it_frees_its_slot() -> None:
    d, crm, clock, store = make(Policy(max_in_flight=1))
    setup = action(kind=SETUP, call="")
    other = action(tenant=2, call="c1")  # another tenant's: waits only for the slot
    d.add([setup, other])
    assert crm.sent == [setup.id]
    crm.answer(0)
    assert setup.state == DONE and crm.sent == [other.id]


# Lanes and buckets


def test_a_host_out_of_tokens_does_not_hold_up_another_host() -> None:
    d, crm, clock, store = make(limits=lambda a: [(f"host-{a.tenant}", 1.0, 1)])
    first, second, other = action(tenant=1, call="c1"), action(tenant=1, call="c2"), \
        action(tenant=2, call="c3")
    d.add([first, second, other])
    assert crm.sent == [first.id, other.id]  # host-1 has no token left for the second


def test_a_bucket_says_how_long_until_its_next_token() -> None:
    assert TokenBucket(rate=2.0, burst=5, tokens=1.5, stamp=0.0).wait(0.0) == 0.0
    assert TokenBucket(rate=2.0, burst=5, tokens=0.5, stamp=0.0).wait(0.0) == 0.25
    refilled = TokenBucket(rate=2.0, burst=5, tokens=0.0, stamp=0.0)
    assert refilled.wait(10.0) == 0.0 and refilled.tokens == 5
