"""The dispatcher's rules: order, priority, rate limits, retries, dead letters, stale pop-ups."""

from __future__ import annotations

import random
from typing import Any

import pytest

from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock

from gateway.errors import Permanent, Retryable
from gateway.model import (CLOSE_POPUP, DEAD, DONE, DROPPED, FAILED, POPUP, POPUP_UPDATE,
                           RECORD, SETUP, Action, Attempt)
from gateway.outbox import Dispatcher, Policy, TokenBucket, backoff


class MemoryStore:
    """Just enough of IStore for the dispatcher: it remembers every attempt and pause."""

    def __init__(self, pending: list[Action] = (),
                 pauses: dict[str, float] | None = None) -> None:
        self.pending = list(pending)
        self.attempts: list[Attempt] = []
        self.stored_pauses = dict(pauses or {})

    def pending_actions(self) -> Deferred:
        return succeed(self.pending)

    def record_attempt(self, action: Action, attempt: Attempt) -> Deferred:
        self.attempts.append(attempt)
        return succeed(None)

    def put_pause(self, bucket: str, until: float) -> Deferred:
        self.stored_pauses[bucket] = max(until, self.stored_pauses.get(bucket, 0.0))
        return succeed(None)

    def pauses(self, now: float) -> Deferred:
        return succeed({k: u for k, u in self.stored_pauses.items() if u > now})


class CRM:
    """A CRM whose answers the test decides, one Deferred per request."""

    def __init__(self) -> None:
        self.calls: list[tuple[Action, Deferred]] = []

    def perform(self, action: Action) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((action, d))
        return d

    def answer(self, index: int = 0, outcome: Any = None) -> None:
        action, d = self.calls.pop(index)
        if isinstance(outcome, Exception):
            d.errback(outcome)
        else:
            d.callback(("POST /x", 202, "ok"))

    @property
    def sent(self) -> list[int]:
        return [a.id for a, _ in self.calls]


_ids = iter(range(1, 10**9))


def action(kind: str = RECORD, call: str = "c1", tenant: int = 1, created: float = 0.0,
           leg: str = "") -> Action:
    return Action(tenant=tenant, call=call, kind=kind, key=f"{kind}:{next(_ids)}", leg=leg,
                  payload={"direction": "incoming"}, created=created, id=next(_ids))


def make(policy: Policy = Policy(), rate: float = 1000.0, burst: int = 1000,
         pending: list[Action] = ()) -> tuple[Dispatcher, CRM, Clock, MemoryStore]:
    clock, crm, store = Clock(), CRM(), MemoryStore(pending)
    dispatcher = Dispatcher(store, clock, crm.perform, lambda a: [("host", rate, burst)],
                            policy, random.Random(7))
    ensureDeferred(dispatcher.start())
    return dispatcher, crm, clock, store


def test_actions_of_one_call_go_in_order_one_at_a_time() -> None:
    d, crm, clock, _ = make()
    first, second = action(), action()
    other = action(call="c2")
    d.add([first, second, other])
    assert crm.sent == [first.id, other.id]
    crm.answer(0)
    assert crm.sent == [other.id, second.id]


def test_popups_go_before_records_of_other_calls() -> None:
    d, crm, clock, _ = make(Policy(max_in_flight=1))
    record, pop = action(call="c1"), action(kind=POPUP, call="c2")
    d.add([record])
    d.add([action(call="c3"), pop])
    crm.answer(0)  # the first record; of the two waiting, the pop-up goes next
    assert crm.sent == [pop.id]


def test_stale_popup_is_dropped_not_sent() -> None:
    d, crm, clock, store = make(Policy(popup_ttl=60, max_in_flight=1))
    blocker = action(call="c0")
    d.add([blocker])
    pop = action(kind=POPUP, call="c1", created=0.0)
    d.add([pop])
    clock.advance(61)
    crm.answer(0)
    assert crm.sent == []
    assert [a.outcome for a in store.attempts] == [DONE, DROPPED]


def test_popup_of_an_ended_leg_is_dropped_and_recorded() -> None:
    d, crm, clock, store = make(Policy(max_in_flight=1))
    d.add([action(call="c0")])
    pop = action(kind=POPUP, call="c1", leg="S1")
    d.add([pop])
    d.drop([pop.id])
    crm.answer(0)
    assert crm.sent == [] and d.depth == 0
    assert pop.state == DROPPED and store.attempts[0].outcome == DROPPED


def test_popup_in_flight_when_its_leg_ends_is_dropped_if_it_fails() -> None:
    d, crm, clock, store = make()
    pop = action(kind=POPUP, call="c1", leg="S1")
    d.add([pop])
    assert crm.sent == [pop.id]
    d.drop([pop.id])  # the hangup was folded while the request was out
    crm.answer(0, Retryable("503", status=503))
    clock.advance(3600)
    assert crm.sent == [] and pop.state == DROPPED
    assert [a.outcome for a in store.attempts] == [DROPPED]


@pytest.mark.parametrize(("fate", "shown"), [
    ("dropped", False),  # its leg ended before it went out
    ("in flight, then done", True),  # its leg ended while its request was out: shown
    ("in flight, then failed", False),
    ("refused", False),  # a permanent failure
    ("done", True),
])
def test_a_pop_ups_close_and_update_go_only_if_it_was_shown(fate: str, shown: bool) -> None:
    d, crm, clock, store = make(Policy(max_in_flight=1))
    blocker = action(call="c0")
    d.add([blocker])
    pop = action(kind=POPUP, call="c1", leg="S1")
    d.add([pop])
    if fate == "dropped":
        d.drop([pop.id])
        crm.answer(0)  # the blocker
    else:
        crm.answer(0)
        assert crm.sent == [pop.id]
        if fate.startswith("in flight"):
            d.drop([pop.id])
        crm.answer(0, None if fate.endswith("done") else
                   Retryable("503", status=503) if fate.startswith("in flight") else
                   Permanent("400", status=400))
    update = action(kind=POPUP_UPDATE, call="c1", leg="S1")
    close = action(kind=CLOSE_POPUP, call="c1", leg="S1")
    other = action(kind=CLOSE_POPUP, call="c1", leg="S2")  # another leg's: not this one's
    d.add([update, close, other])
    sent = []
    while crm.calls:
        sent.append(crm.calls[0][0].id)
        crm.answer(0)
    assert sent == ([update.id, close.id, other.id] if shown else [other.id])
    if not shown:
        assert update.state == close.state == DROPPED
        assert {a.request for a in store.attempts if a.action == close.id} == {""}


def test_token_bucket_limits_the_rate_per_host() -> None:
    d, crm, clock, _ = make(rate=5, burst=5)
    d.add([action(call=f"c{i}") for i in range(12)])
    assert len(crm.calls) == 5
    for _ in range(5):
        crm.answer(0)
    interval = 1 / (5 * Policy().headroom)  # a little under the CRM's 5/s
    clock.advance(0.2)
    assert len(crm.calls) == 0
    clock.advance(interval - 0.2)
    assert len(crm.calls) == 1
    clock.advance(5 * interval)
    assert len(crm.calls) == 6


def test_retryable_failures_back_off_then_succeed() -> None:
    d, crm, clock, store = make()
    a = action()
    d.add([a])
    crm.answer(0, Retryable("HTTP 503", 503))
    assert crm.calls == []
    clock.advance(backoff(Policy(), 1, random.Random(7)) + 0.01)
    assert crm.sent == [a.id]
    crm.answer(0)
    assert [x.outcome for x in store.attempts] == ["retry", DONE]
    assert a.attempts == 2


def test_retry_after_is_obeyed_for_the_whole_host() -> None:
    d, crm, clock, _ = make()
    a, b = action(call="c1"), action(call="c2")
    d.add([a])
    crm.answer(0, Retryable("HTTP 429", 429, retry_after=30))
    d.add([b])
    assert crm.calls == []  # the host asked for 30 s of quiet
    clock.advance(30.01)
    assert sorted(crm.sent) == sorted([a.id, b.id])


def test_permanent_failure_is_recorded_and_the_call_moves_on() -> None:
    d, crm, clock, store = make()
    a, b = action(), action()
    d.add([a, b])
    crm.answer(0, Permanent("HTTP 422", 422, '{"errors": []}'))
    assert a.state == FAILED and store.attempts[0].answer == '{"errors": []}'
    assert crm.sent == [b.id]


def test_dead_letter_after_max_age() -> None:
    d, crm, clock, store = make(Policy(max_age=100, backoff_cap=30))
    a = action(created=0.0)
    d.add([a])
    for _ in range(50):
        if not crm.calls:
            break
        crm.answer(0, Retryable("refused"))
        clock.advance(31)
    assert a.state == DEAD and d.depth == 0
    assert store.attempts[-1].outcome == DEAD


def test_in_flight_cap() -> None:
    d, crm, clock, _ = make(Policy(max_in_flight=3))
    d.add([action(call=f"c{i}") for i in range(10)])
    assert len(crm.calls) == 3
    crm.answer(0)
    assert len(crm.calls) == 3


def test_tenant_setup_goes_before_the_tenants_calls() -> None:
    d, crm, clock, _ = make()
    setup = action(kind=SETUP, call="")
    pop = action(kind=POPUP, call="c1")
    d.add([setup, pop])
    assert crm.sent == [setup.id]
    crm.answer(0)
    assert crm.sent == [pop.id]


def test_restart_loads_pending_actions() -> None:
    a = action()
    d, crm, clock, _ = make(pending=[a])
    assert crm.sent == [a.id]


def test_backoff_grows_and_is_capped() -> None:
    rng = random.Random(1)
    policy = Policy(backoff_base=1, backoff_cap=60)
    delays = [backoff(policy, n, rng) for n in range(1, 12)]
    assert delays[0] < 1.01 and delays[3] >= 4 and max(delays) <= 60


def test_bucket_refills_over_time() -> None:
    bucket = TokenBucket(rate=2, burst=2, tokens=0, stamp=0)
    assert bucket.wait(0) == 0.5
    assert bucket.wait(0.5) == 0


def test_an_action_settled_before_it_is_added_is_not_sent() -> None:
    d, crm, clock, _ = make()
    pop = action(kind=POPUP, call="c1", leg="S1")
    pop.state = DROPPED  # stored and dropped in the fold that created it
    d.add([pop])
    assert crm.sent == [] and d.depth == 0


def test_at_a_restart_a_calls_stored_actions_go_before_its_newer_ones() -> None:
    # The fold's first new actions may reach the dispatcher while it is still loading the
    # pending ones from the store: a call's update must not overtake its stored pop-up.
    pop = action(kind=POPUP, call="c1", leg="S1")
    update = action(kind=POPUP_UPDATE, call="c1", leg="S1")
    clock, crm, store = Clock(), CRM(), MemoryStore([pop])
    loading: Deferred = Deferred()
    store.pending_actions = lambda: loading  # type: ignore[method-assign]
    d = Dispatcher(store, clock, crm.perform, lambda a: [("host", 1000.0, 1000)], Policy(),
                   random.Random(7))
    ensureDeferred(d.start())
    d.add([update])  # from the fold, while the store is read
    assert crm.sent == []
    loading.callback([pop])
    assert crm.sent == [pop.id]  # the update waits for its pop-up's answer
    sent = []
    while crm.calls:
        sent.append(crm.calls[0][0].id)
        crm.answer(0)
    assert sent == [pop.id, update.id]


def test_an_action_readied_twice_by_an_older_one_arriving_is_sent_once() -> None:
    d, crm, clock, store = make()
    pop = action(kind=POPUP, call="c1", leg="S1")
    update = action(kind=POPUP_UPDATE, call="c1", leg="S1")
    update.next_at = 5.0  # waiting for its retry when the older pop-up turns up
    d.add([update])
    d.add([pop])
    assert crm.sent == [pop.id]
    crm.answer(0)  # the pop-up settles: its call's next action is readied (again)
    clock.advance(6)
    assert crm.sent == [update.id]
    crm.answer(0)
    clock.advance(60)
    assert crm.sent == []
