"""Issue 8, case 6: a pause a CRM asks for is bounded, finite and stored; an action whose
request cannot be built fails at once instead of being retried for a day."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from gateway.crm import altegio
from gateway.errors import Retryable
from gateway.httpclient import (RETRY_AFTER_DEFAULT, RETRY_AFTER_LIMIT, HttpClient, Response,
                                retry_after)
from gateway.model import DONE, FAILED, PENDING, RECORD, Action
from gateway.outbox import Dispatcher, Policy
from gateway.store.sqlite import SQLiteStore
from tests.test_clients import RECORD_PAYLOAD, TENANT
from tests.test_outbox import CRM, MemoryStore

NOW = 1_715_677_267.0  # 2024-05-14 09:01:07 UTC
BOUND = Policy().max_retry_after
HOST = "altegio:altegio.test"


# Reading the header


def answer(value: str | None, received: float | None = NOW) -> Response:
    headers = {} if value is None else {"retry-after": value}
    return Response(status=429, headers=headers, body=b"", received=received)


def test_the_default_bound_is_five_minutes() -> None:
    assert BOUND == 300.0


@pytest.mark.parametrize("value, seconds", [
    ("120", 120.0),
    ("0", 0.0),
    (" 7 ", 7.0),
    ("2.5", 2.5),
    ("3600", 3600.0),  # within the client's limit; the dispatcher applies its own bound
    ("9" * 400, RETRY_AFTER_LIMIT),  # a number of seconds, only an absurd one
    ("Tue, 14 May 2024 09:02:37 GMT", 90.0),  # IMF-fixdate, 90 s after NOW
    ("Tuesday, 14-May-24 09:02:37 GMT", 90.0),  # obsolete RFC 850 form
    ("Tue May 14 09:02:37 2024", 90.0),  # obsolete asctime form, GMT by definition
    ("Tue, 14 May 2024 08:00:00 GMT", 0.0),  # already past: now
    ("Sun, 14 May 2034 09:01:07 GMT", RETRY_AFTER_LIMIT),  # ten years away
    ("1e400", RETRY_AFTER_DEFAULT),  # float() reads inf
    ("inf", RETRY_AFTER_DEFAULT),
    ("Infinity", RETRY_AFTER_DEFAULT),
    ("nan", RETRY_AFTER_DEFAULT),
    ("-5", RETRY_AFTER_DEFAULT),
    ("+5", RETRY_AFTER_DEFAULT),
    ("", RETRY_AFTER_DEFAULT),
    ("soon", RETRY_AFTER_DEFAULT),
    ("Tue, 14 May 99999 09:02:37 GMT", RETRY_AFTER_DEFAULT),  # no such date
    ("Tue, 32 May 2024 09:02:37 GMT", RETRY_AFTER_DEFAULT),
])
def test_retry_after_reads_both_forms_and_is_always_finite_and_bounded(
        value: str, seconds: float) -> None:
    got = retry_after(answer(value))
    assert got == pytest.approx(seconds)
    assert math.isfinite(got) and 0 <= got <= RETRY_AFTER_LIMIT


def test_retry_after_absent_is_none_and_a_date_is_read_against_the_given_clock() -> None:
    assert retry_after(answer(None)) is None
    date = "Tue, 14 May 2024 09:02:37 GMT"
    assert retry_after(answer(date, received=None), now=NOW + 30) == pytest.approx(60.0)
    assert retry_after(answer(date), limit=10) == 10.0
    assert retry_after(answer("soon"), limit=10) == 10.0


class Answers429(Resource):
    isLeaf = True

    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value

    def render_POST(self, request: Any) -> bytes:
        request.setResponseCode(429)
        request.setHeader(b"Retry-After", self.value.encode())
        return b'{"success": false}'


@pytest.mark.parametrize("value", ["3600", "1e400", "inf", "nan", "-5", "garbage"])
@pytest_twisted.ensureDeferred
async def test_a_crm_answer_carries_a_finite_retry_after(value: str) -> None:
    http = HttpClient(reactor, client=StubTreq(Answers429(value)))
    action = Action(tenant=807, call="c1", kind=RECORD, key="r", payload=RECORD_PAYLOAD,
                    created=0.0, id=1)
    with pytest.raises(Retryable) as raised:
        await altegio.perform(http, TENANT, action)
    assert raised.value.status == 429
    assert 0 <= raised.value.retry_after <= RETRY_AFTER_LIMIT


# The dispatcher's bound


_ids = iter(range(1, 10**9))


def action(call: str = "c1", created: float = NOW) -> Action:
    n = next(_ids)
    return Action(tenant=807, call=call, kind=RECORD, key=f"record:{n}", payload={},
                  created=created, id=n)


def make(store: Any = None, policy: Policy = Policy(), now: float = NOW,
         perform: Any = None, start: bool = True) -> tuple[Dispatcher, CRM, Clock, Any]:
    clock, crm = Clock(), CRM()
    clock.advance(now)
    store = store if store is not None else MemoryStore()
    dispatcher = Dispatcher(store, clock, perform or crm.perform,
                            lambda a: [(HOST, 1000.0, 1000)], policy, random.Random(7))
    if start:  # at once with the MemoryStore; a test on SQLite awaits it
        ensureDeferred(dispatcher.start())
    return dispatcher, crm, clock, store


def test_a_429_pauses_the_host_for_at_most_the_bound() -> None:
    d, crm, clock, store = make()
    a, b = action("c1"), action("c2")
    d.add([a])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=3600))
    assert 0 < d.paused()[HOST] <= BOUND
    d.add([b])
    clock.advance(BOUND - 1)
    assert crm.calls == []  # every tenant on the host waits: the CRM asked for quiet
    clock.advance(1.01)
    assert sorted(crm.sent) == sorted([a.id, b.id])
    assert d.paused() == {}


def test_the_bound_is_the_policys() -> None:
    d, crm, clock, store = make(policy=Policy(max_retry_after=30))
    a = action()
    d.add([a])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=3600))
    assert d.paused() == {HOST: pytest.approx(30)}
    assert a.next_at - clock.seconds() == pytest.approx(30)
    clock.advance(30.01)
    assert crm.sent == [a.id]


def test_a_503_delays_that_action_at_most_the_bound_and_pauses_no_host() -> None:
    d, crm, clock, store = make()
    a, b = action("c1"), action("c2")
    d.add([a])
    crm.answer(outcome=Retryable("HTTP 503", 503, retry_after=3600))
    assert d.paused() == {}
    assert a.next_at - clock.seconds() <= BOUND
    d.add([b])
    assert crm.sent == [b.id]  # another call goes at once
    clock.advance(BOUND + 0.01)
    assert crm.sent == [b.id, a.id]


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize("asked", [float("inf"), float("nan"), -5.0, 1e308])
def test_next_at_is_finite_whatever_a_crm_module_reports(status: int, asked: float) -> None:
    d, crm, clock, store = make()
    a = action()
    d.add([a])
    crm.answer(outcome=Retryable(f"HTTP {status}", status, retry_after=asked))
    assert math.isfinite(a.next_at) and a.next_at - clock.seconds() <= BOUND
    assert all(math.isfinite(s) and s <= BOUND for s in d.paused().values())
    json.dumps(a.summary(), allow_nan=False)
    clock.advance(BOUND + 0.01)
    assert crm.sent == [a.id]  # retried, not parked forever


def test_backoff_stays_finite_after_any_number_of_attempts() -> None:
    d, crm, clock, store = make()
    a = action()
    a.attempts = 5000  # re-driven many times: attempts keep counting
    d.add([a])
    crm.answer(outcome=Retryable("refused"))
    assert a.next_at - clock.seconds() <= Policy().backoff_cap
    clock.advance(Policy().backoff_cap + 0.01)
    assert crm.sent == [a.id]


def test_a_stored_infinite_next_at_does_not_park_the_action_forever() -> None:
    d, crm, clock, store = make()
    a, b = action("c1"), action("c1")
    a.next_at = float("inf")  # written by an earlier version for Retry-After: 1e400
    d.add([a, b])
    assert math.isfinite(a.next_at)
    clock.advance(0.01)
    assert crm.sent == [a.id]


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
def test_the_bound_itself_must_be_finite_and_positive(value: float) -> None:
    with pytest.raises(ValueError):
        Policy(max_retry_after=value)


def test_paused_shows_only_running_pauses() -> None:
    d, crm, clock, store = make()
    assert d.paused() == {}
    d.add([action()])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=20))
    assert d.paused() == {HOST: pytest.approx(20)}
    clock.advance(15)
    assert d.paused() == {HOST: pytest.approx(5)}
    clock.advance(5.01)
    assert d.paused() == {}
    assert store.stored_pauses == {HOST: pytest.approx(NOW + 20)}


def test_a_restored_pause_is_held_to_the_current_bound() -> None:
    store = MemoryStore(pauses={HOST: NOW + 3600, "other": NOW - 1})
    d, crm, clock, _ = make(store, Policy(max_retry_after=60))
    assert d.paused() == {HOST: pytest.approx(60)}


# The pause survives a restart


async def sqlite(path: str) -> SQLiteStore:
    store = SQLiteStore(path, reactor)
    await store.start()
    return store


@pytest_twisted.ensureDeferred
async def test_a_host_pause_survives_a_restart_and_an_expired_one_does_not(
        tmp_path: Any) -> None:
    path = str(tmp_path / "s.sqlite")
    store = await sqlite(path)
    d, crm, clock, _ = make(store, start=False)
    await d.start()
    d.add([action()])
    crm.answer(outcome=Retryable("HTTP 429", 429, retry_after=120))
    d.stop()
    await store.stop()

    # Restarted 60 s later: the host is still paused for the remaining minute.
    store = await sqlite(path)
    try:
        d2, crm2, clock2, _ = make(store, now=NOW + 60, start=False)
        await d2.start()
        assert d2.paused() == {HOST: pytest.approx(60)}
        b = action(created=NOW + 60)
        d2.add([b])
        clock2.advance(59)
        assert crm2.calls == []
        clock2.advance(1.01)
        assert crm2.sent == [b.id]
        d2.stop()

        # Restarted after the pause ran out: not honoured, and the row is gone.
        d3, crm3, clock3, _ = make(store, now=NOW + 121, start=False)
        await d3.start()
        assert d3.paused() == {}
        c = action(created=NOW + 121)
        d3.add([c])
        assert crm3.sent == [c.id]
        assert await store.pauses(NOW + 121) == {}
        count = await store._run(lambda: store._db.execute(  # type: ignore[union-attr]
            "SELECT COUNT(*) FROM pauses").fetchone()[0])
        assert count == 0
        d3.stop()
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_longer_stored_pause_is_kept(tmp_path: Any) -> None:
    store = await sqlite(str(tmp_path / "s.sqlite"))
    try:
        await store.put_pause(HOST, NOW + 100)
        await store.put_pause(HOST, NOW + 50)
        await store.put_pause("other", NOW + 10)
        assert await store.pauses(NOW + 20) == {HOST: NOW + 100}
    finally:
        await store.stop()


# A request that cannot be built


def test_an_action_whose_request_cannot_be_built_fails_after_one_attempt() -> None:
    def perform(a: Action) -> Deferred:
        if a.id == broken.id:
            raise ValueError("year 318857 is out of range")  # Altegio's date conversion
        return crm.perform(a)

    crm = CRM()
    d, _, clock, store = make(perform=lambda a: perform(a))
    broken, later = action("c1"), action("c1")
    d.add([broken, later])
    assert broken.state == FAILED and broken.attempts == 1
    assert "ValueError" in broken.last_error and "318857" in broken.last_error
    assert [(x.action, x.outcome) for x in store.attempts] == [(broken.id, FAILED)]
    assert "318857" in store.attempts[0].request
    assert crm.sent == [later.id]  # the call's next action does not wait behind it
    crm.answer()
    clock.advance(86400)
    assert [x.outcome for x in store.attempts] == [FAILED, DONE] and crm.calls == []


def test_an_unexpected_error_after_io_also_fails_the_action_once() -> None:
    d, crm, clock, store = make()
    a = action()
    d.add([a])
    crm.answer(outcome=KeyError("answer without 'success'"))
    assert a.state == FAILED and "KeyError" in a.last_error
    clock.advance(3600)
    assert crm.calls == [] and len(store.attempts) == 1 and d.depth == 0


@pytest_twisted.ensureDeferred
async def test_a_failed_unbuildable_action_can_be_re_driven_and_listed_as_json(
        tmp_path: Any) -> None:
    path = str(tmp_path / "s.sqlite")
    store = await sqlite(path)
    broken = Action(tenant=807, call="c1", kind=RECORD, key="record:S1", payload={},
                    created=NOW)
    stuck = Action(tenant=807, call="c2", kind=RECORD, key="record:S2", payload={},
                   created=NOW)
    await store.commit_fold(0, [], [broken, stuck], [], NOW)
    fixed = False

    def perform(a: Action) -> Any:
        if a.id == broken.id and not fixed:
            raise OverflowError("int too large to convert to float")
        if a.id == stuck.id:
            raise Retryable("HTTP 503", 503, retry_after=float("inf"))
        return succeed(("POST /x", 202, "ok"))

    d, crm, clock, _ = make(store, perform=perform, start=False)
    await d.start()
    d.stop()
    await store.stop()  # lets the attempts commit
    store = await sqlite(path)
    try:
        listed = await store.actions(None, None, 10)
        json.dumps(listed, allow_nan=False)  # what GET /api/v1/actions answers
        by_id = {a["id"]: a for a in listed}
        assert by_id[broken.id]["state"] == FAILED
        assert "OverflowError" in by_id[broken.id]["last_error"]
        assert [x["outcome"] for x in by_id[broken.id]["attempt_log"]] == [FAILED]
        assert by_id[stuck.id]["state"] == PENDING
        assert by_id[stuck.id]["next_at"] <= NOW + BOUND

        # POST /api/v1/actions/{id}/retry after the fix
        fixed = True
        d2, crm2, clock2, _ = make(store, perform=perform, now=NOW + 10, start=False)
        await d2.start()
        assert broken.id not in d2.actions  # failed: not loaded, not retried by itself
        d2.add([await store.retry(broken.id, NOW + 10)])
        assert broken.id not in d2.actions and d2.counts.get(DONE) == 1
        d2.stop()
    finally:
        await store.stop()
    store = await sqlite(path)
    try:
        again = await store.action(broken.id)
        assert again["state"] == DONE
    finally:
        await store.stop()


# The flag


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "soon"])
def test_max_retry_after_flag_refuses_what_is_not_a_positive_finite_number(value: str) -> None:
    from twisted.python import usage

    from gateway.tap import Options

    with pytest.raises((usage.UsageError, ValueError)):
        Options().parseOptions(["--max-retry-after", value])


def test_max_retry_after_flag_reaches_the_dispatcher(tmp_path: Any, monkeypatch: Any) -> None:
    from gateway import tap
    from gateway.tap import Options, makeService

    monkeypatch.setattr(tap, "tune_gc", lambda: None)  # not for the test process
    options = Options()
    options.parseOptions(["--max-retry-after", "42", "--database",
                          f"sqlite:{tmp_path}/g.sqlite", "--admin-token-file",
                          f"{tmp_path}/token"])
    assert makeService(options).dispatcher.policy.max_retry_after == 42.0
