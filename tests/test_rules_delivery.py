"""Rules of the webhook, the dispatcher, the clients and the store, one test each, written so
that breaking the rule fails its test (issue 14).

The call model's rules are in ``tests/test_rules_calls.py``.  These reuse the harnesses of
the suites they extend: the public site on loopback (``tests/test_public.py``), the
dispatcher's scripted CRM (``tests/test_outbox.py``), the strict fakes
(``tests/test_clients.py``) and the engine on a test clock (``tests/test_scenarios.py``).
"""

from __future__ import annotations

import random
import sqlite3
from typing import Any
from urllib.parse import urlencode

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock, deferLater

from gateway.crm import altegio
from gateway.errors import Retryable
from gateway.httpclient import HttpClient
from gateway.model import DONE, POPUP, RECORD, Attempt
from gateway.outbox import Dispatcher, Policy
from gateway.protocols.telphin import TelphinClient
from gateway.store.sqlite import SQLiteStore
from tests.fakes.altegio import FakeAltegio
from tests.fakes.telphin import FakeTelphin
from tests.test_clients import RECORD_PAYLOAD, TENANT as CLIENT_TENANT, act, altegio_client
from tests.test_outbox import CRM, MemoryStore, action, make
from tests.test_public import DIAL_IN, KEY, LOGIN, Harness
from tests.test_scenarios import (CALL, LINKS, TENANT, Folding, altegio_supports, dial_in,
                                  hangup)


# The webhook's promise: "200" means stored.

@pytest_twisted.ensureDeferred
async def test_a_webhook_whose_append_fails_is_answered_503_never_200(tmp_path: Any) -> None:
    """The store cannot take the event: the PBX is told so (503) and may send it again."""
    harness = Harness(tmp_path)
    await harness.start()
    tried: list[list] = []

    def append(events: list) -> Deferred:
        tried.append(events)
        return deferLater(reactor, 0, _raise, sqlite3.OperationalError("database is locked"))

    harness.store.append = append
    try:
        reply = await harness.request("POST", f"/events/807/dial-in/{LOGIN}?key={KEY}",
                                      urlencode(DIAL_IN).encode(), server_error=True)
        assert len(tried) == 1, "the webhook did try to store the event"
        assert reply.status == 503, reply.body
        assert harness.gw.engine.cursor == 0 and harness.gw.engine.calls == {}
    finally:
        del harness.store.append
        await harness.stop()


def _raise(error: Exception) -> None:
    raise error


OTHER = "+70000000000"  # a second CallerIDNum in the same request
REPEATED = [
    # (where the field is repeated, fields in the URL's query string, form body or None: GET)
    ("in the query string", urlencode(DIAL_IN) + "&" + urlencode({"CallerIDNum": OTHER}), None),
    ("in the body", "", urlencode(DIAL_IN) + "&" + urlencode({"CallerIDNum": OTHER})),
    ("in the query string, then in the body", urlencode({"CallerIDNum": DIAL_IN["CallerIDNum"]}),
     urlencode({**DIAL_IN, "CallerIDNum": OTHER})),
]


@pytest.mark.parametrize("where, path_fields, body", REPEATED, ids=[r[0] for r in REPEATED])
@pytest_twisted.ensureDeferred
async def test_a_repeated_form_field_keeps_its_first_value(
        tmp_path: Any, where: str, path_fields: str, body: str | None) -> None:
    """A field sent twice: the first value counts (the query string comes before the body)."""
    harness = Harness(tmp_path)
    await harness.start()
    try:
        path = f"/events/807/dial-in/{LOGIN}?key={KEY}" + (f"&{path_fields}" if path_fields
                                                           else "")
        reply = await harness.request("POST" if body else "GET", path,
                                      body.encode() if body else None,
                                      "application/x-www-form-urlencoded" if body else None)
        assert reply.status == 200, reply.body
        [ev] = await harness.events()
        assert ev.peer == DIAL_IN["CallerIDNum"]
    finally:
        await harness.stop()


# The dispatcher.

def test_retry_after_on_a_503_is_honoured() -> None:
    """A 503 with Retry-After: 7 is not tried again before 7 s, though backoff says ~1 s."""
    d, crm, clock, _ = make()
    a = action()
    d.add([a])
    crm.answer(0, Retryable("HTTP 503", 503, retry_after=7))
    clock.advance(6.9)
    assert crm.sent == [], "retried before the CRM's Retry-After"
    clock.advance(30 - 6.9)
    assert crm.sent == [a.id], "retried once the Retry-After has passed"


def test_altegio_has_no_burst_two_actions_due_at_once_go_a_fifth_of_a_second_apart() -> None:
    """Altegio's own bucket (one per host, 5/s): never two requests within 1/rate."""
    clock, crm = Clock(), CRM()
    d = Dispatcher(MemoryStore(), clock, crm.perform, lambda a: altegio.limits(TENANT),
                   Policy(), random.Random(7))
    ensureDeferred(d.start())
    interval = 1 / (altegio.RATE * Policy().headroom)
    for idle in (0.0, 10.0):  # a fresh bucket, then one that has been idle for a while
        clock.advance(idle)
        first, second = action(call="c1"), action(call="c2")
        d.add([first, second])
        assert crm.sent == [first.id], "only one request goes at once"
        crm.answer(0)
        clock.advance(1 / altegio.RATE - 0.001)
        assert crm.sent == [], "the second went within 1/rate of the first"
        clock.advance(interval - 1 / altegio.RATE + 0.002)
        assert crm.sent == [second.id]
        crm.answer(0)


def test_when_a_slot_frees_a_popup_goes_first_whatever_lane_it_is_in() -> None:
    """In-flight cap full; a record waits in one CRM host's lane, then a pop-up arrives in
    another's: the freed slot goes to the pop-up."""
    clock, crm = Clock(), CRM()
    d = Dispatcher(MemoryStore(), clock, crm.perform,
                   lambda a: [(f"host{a.tenant}", 1000.0, 1000)], Policy(max_in_flight=1),
                   random.Random(7))
    ensureDeferred(d.start())
    blocker = action(call="c0", tenant=1)
    d.add([blocker])
    record = action(kind=RECORD, call="c1", tenant=1)
    pop = action(kind=POPUP, call="c2", tenant=2)
    d.add([record])
    d.add([pop])
    assert crm.sent == [blocker.id]
    crm.answer(0)
    assert crm.sent == [pop.id]
    crm.answer(0)
    assert crm.sent == [record.id]


# The clients.

@pytest_twisted.ensureDeferred
async def test_altegio_408_is_retryable_not_permanent() -> None:
    """408 Request Timeout: Altegio gave up on the request, not on the action."""
    fake = FakeAltegio(partner_token="partner", rate_limit=None)
    fake.faults.update({"fail_status": 408})
    with pytest.raises(Retryable) as raised:
        await altegio.perform(altegio_client(fake), CLIENT_TENANT, act(RECORD, RECORD_PAYLOAD))
    assert raised.value.status == 408


@pytest_twisted.ensureDeferred
async def test_two_concurrent_recording_lookups_make_one_token_request() -> None:
    clock = Clock()
    fake = FakeTelphin(clients={"app1": "s3cret"}, clock=clock,
                       records={"R1": "https://storage.telphin.test/R1.mp3",
                                "R2": "https://storage.telphin.test/R2.mp3"})
    stub = StubTreq(fake.resource())
    client = TelphinClient(HttpClient(reactor, client=stub), clock)
    fake.faults.update({"hang": True})  # the token request waits until released
    lookups = [ensureDeferred(client.recording_url(CLIENT_TENANT, rec)) for rec in ("R1", "R2")]
    assert fake.faults.requests_seen == 1, "the second lookup waits for the first's token"
    fake.faults.update({"hang": False})
    for _ in range(20):
        stub.flush()
        if all(d.called for d in lookups):
            break
    assert [await d for d in lookups] == ["https://storage.telphin.test/R1.mp3",
                                          "https://storage.telphin.test/R2.mp3"]
    assert fake.tokens_issued == 1


# The store.

@pytest_twisted.ensureDeferred
async def test_a_hangup_after_the_popup_was_delivered_leaves_it_done(tmp_path: Any) -> None:
    """Only a pending pop-up is dropped when its leg ends; a delivered one stays delivered."""
    f = await Folding(tmp_path / "done.sqlite", altegio_supports).start()
    try:
        await f.append(dial_in("101", 0))
        [pop] = f.produced
        pop.state, pop.attempts = DONE, 1
        await f.store.record_attempt(pop, Attempt(action=pop.id, at=f.clock.seconds(),
                                                  outcome=DONE, status=202, request="POST",
                                                  answer="{}"))
        await f.append(hangup("101", 10, "NOANSWER"))
        stored = await f.store.action(pop.id)
        assert (stored["state"], stored["attempts"]) == (DONE, 1)
        assert [a["outcome"] for a in stored["attempt_log"]] == [DONE]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_pruning_never_deletes_an_open_call_however_old(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "prune.sqlite"), reactor)
    await store.start()
    try:
        # An open call (a leg never hung up) and a final one, both last written at 10 s.
        call = {"tenant": 807, "key": "c1", "state": "open", "legs": [], "started": 1,
                "due": 14410.0}
        done = {**call, "key": "c2", "state": "final", "due": 0}
        await store.commit_fold(0, [call, done], [], [], 10.0)
        counts = await store.prune(10_000_000.0, 10_000_000.0, cursor=0)
        assert counts["calls"] == 1
        assert [c["key"] for c in await store.open_calls()] == ["c1"]
        assert list(await store.load_calls([(807, "c1"), (807, "c2")])) == [(807, "c1")]
    finally:
        await store.stop()


# A 101 call missed (final 3 s after its hangup), then, long after: a second leg rings and
# a queue hangs up with Bridged=no.  The late events must not reopen the decision.
LATE_BACKLOG = [dial_in("101", 0), hangup("101", 20, "NOANSWER"), dial_in("102", 60),
                hangup("600", 61, "ANSWER", 61, Bridged="no"), hangup("102", 70, "NOANSWER")]


async def _fold_backlog(path: Any, one_batch: bool) -> tuple[list[dict], dict, int]:
    """Append LATE_BACKLOG at its times, folding as it arrives or all at once at the end;
    the Altegio bodies, the stored call and the number of fold commits for the events."""
    f = await Folding(path, altegio_supports).start()
    commits = []
    commit_fold = f.store.commit_fold
    f.store.commit_fold = lambda *a, **kw: commits.append(a) or commit_fold(*a, **kw)
    try:
        elapsed = 0.0
        for row in LATE_BACKLOG:
            at = row[2]
            f.clock.advance(at - elapsed)
            elapsed = at
            await f.append(row, fold=not one_batch)
        if one_batch:
            await f.settle()
        folds = len(commits)
        for _ in range(2):
            await f.settle(5 * 3600)
        [state] = (await f.store.load_calls([(807, CALL)])).values()
    finally:
        await f.stop()
    bodies = [altegio.build(TENANT, a, LINKS.get(a.payload.get("recording", "")))
              for a in f.produced]
    return bodies, state, folds


@pytest_twisted.ensureDeferred
async def test_a_backlog_with_a_late_event_folds_as_it_would_one_event_at_a_time(
        tmp_path: Any) -> None:
    """Folded in one batch (after a restart, or behind a slow store), a call still becomes
    final where its grace ran out, before the late events: same records, same call."""
    one_by_one, state_one, _ = await _fold_backlog(tmp_path / "one.sqlite", one_batch=False)
    batched, state_batch, folds = await _fold_backlog(tmp_path / "batch.sqlite",
                                                      one_batch=True)
    assert folds == 1, "the backlog was folded in one batch"
    assert [(b["command"], b.get("user"), b.get("status")) for b in one_by_one] == [
        ("event", "101", None), ("history", "101", "missed")]
    assert batched == one_by_one
    assert state_batch == state_one
