"""The store's reads for operators and its round trips, field by field, on every backend.

tests/test_store.py pins the fold commit, appends and pruning; these pin what the admin API
reads back (the keys of each row, the filters, more attempts than one query chunk), an action
and a tenant surviving the store whole, a re-drive's answer, and the ``--database`` URL.
Found by ``make mutate``.  Each test takes the ``store`` fixture (tests/conftest.py) and runs
once per backend; the SQLite-only one is last.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from gateway.model import DONE, FAILED, PENDING, RECORD, Action, Attempt, Event
from gateway.store import open_store
from gateway.store.sqlite import SQLiteStore
from tests.test_scenarios import TENANT


def record(n: int, call: str = "c1", tenant: int = 807) -> Action:
    return Action(tenant=tenant, call=call, kind=RECORD, key=f"record:{n}", leg=f"S{n}",
                  payload={"n": n}, created=100.0 + n)


def event(call: str, n: int = 1) -> Event:
    return Event(tenant=807, call=call, leg=f"S{n}", kind="ring", flow="in",
                 at=1_715_677_267_000_000 + n, received=100.0)


def call_state(key: str, state: str = "open") -> dict:
    return {"tenant": 807, "key": key, "started": 5, "due": 0.0, "state": state,
            "legs": [{"key": "S1", "kind": "phone", "extension": "101", "peer": "+7916",
                      "did": "7495", "state": "ended", "status": "ANSWER"}]}


@pytest_twisted.ensureDeferred
async def test_a_pending_action_comes_back_whole(store: Any) -> None:
    [a], _ = await store.commit_fold(1, [], [record(1)], [], 100.0)
    a.attempts, a.next_at, a.last_error = 2, 150.5, "HTTP 503"
    await store.record_attempt(a, Attempt(action=a.id, at=120.0, outcome="retry",
                                          status=503, request="HTTP 503", answer=""))
    [back] = await store.pending_actions()
    assert back == Action(tenant=807, call="c1", kind=RECORD, key="record:1", leg="S1",
                          payload={"n": 1}, created=101.0, id=a.id, state=PENDING,
                          attempts=2, next_at=150.5, last_error="HTTP 503")


@pytest_twisted.ensureDeferred
async def test_every_action_lists_exactly_its_own_attempts_past_one_query_chunk(
        store: Any) -> None:
    actions, _ = await store.commit_fold(1, [], [record(n, call=f"c{n}") for n in range(502)],
                                         [], 100.0)
    for a in actions:
        a.state, a.attempts = DONE, 1
    await gatherResults([  # one group commit
        store.record_attempt(a, Attempt(action=a.id, at=200.0, outcome=DONE, status=202,
                                        request="POST", answer="ok")) for a in actions])
    listed = await store.actions(None, None, 1000)
    assert len(listed) == 502
    assert all(len(a["attempt_log"]) == 1 for a in listed)
    assert listed[0]["attempt_log"] == [{"at": 200.0, "outcome": DONE, "status": 202,
                                         "request": "POST", "answer": "ok"}]


@pytest_twisted.ensureDeferred
async def test_actions_filter_by_state_and_tenant_newest_first(store: Any) -> None:
    inserted, _ = await store.commit_fold(
        1, [], [record(1), record(2, tenant=808), record(3)], [], 100.0)
    inserted[2].state = FAILED
    await store.record_attempt(inserted[2], Attempt(action=inserted[2].id, at=1.0,
                                                    outcome=FAILED, status=400,
                                                    request="r", answer="a"))
    ids = [a.id for a in inserted]
    assert [a["id"] for a in await store.actions(None, None, 10)] == ids[::-1]
    assert [a["id"] for a in await store.actions(None, 807, 10)] == [ids[2], ids[0]]
    assert [a["id"] for a in await store.actions(PENDING, None, 10)] == [ids[1], ids[0]]
    assert [a["id"] for a in await store.actions(FAILED, 807, 10)] == [ids[2]]
    assert (await store.action(ids[1]))["tenant"] == 808
    assert await store.action(999) is None


@pytest_twisted.ensureDeferred
async def test_a_tenant_is_stored_with_its_secrets_and_replaced_whole(store: Any) -> None:
    await store.put_tenant(TENANT, 1.0)
    assert await store.tenants() == [TENANT]
    renamed = TENANT.from_json({**TENANT.to_json(secrets=True), "name": "Other"})
    await store.put_tenant(renamed, 2.0)
    assert await store.tenants() == [renamed]


@pytest_twisted.ensureDeferred
async def test_a_re_driven_action_is_due_at_once_and_an_unknown_one_is_none(store: Any) -> None:
    [a], _ = await store.commit_fold(1, [], [record(1)], [], 100.0)
    a.state, a.next_at = FAILED, 500.0
    await store.record_attempt(a, Attempt(action=a.id, at=1.0, outcome=FAILED, status=400,
                                          request="r", answer=""))
    back = await store.retry(a.id, 300.0)
    assert (back.state, back.next_at, back.created) == (PENDING, 0.0, 300.0)
    assert await store.retry(12345, 300.0) is None


@pytest_twisted.ensureDeferred
async def test_recent_calls_say_whether_final_and_when_updated(store: Any) -> None:
    await store.commit_fold(1, [call_state("c1", "final")], [], [], 100.0)
    await store.commit_fold(2, [call_state("c2")], [], [], 200.0)
    calls = await store.recent_calls(807, 10)
    assert [(c["call"], c["final"], c["updated"]) for c in calls] == [
        ("c2", False, 200.0), ("c1", True, 100.0)]
    assert calls[0]["started"] == 5
    assert calls[0]["legs"] == [{"key": "S1", "kind": "phone", "extension": "101",
                                 "peer": "+7916", "did": "7495", "state": "ended",
                                 "outcome": "answered"}]  # a leg stored with its PBX status


@pytest_twisted.ensureDeferred
async def test_the_quarantine_lists_each_call_with_its_time_and_numbered_events(
        store: Any) -> None:
    await store.commit_fold(1, [], [], [], 50.0,
                            held=[(807, "c1", "boom", [(7, event("c1").to_row())])])
    await store.commit_fold(1, [], [], [], 60.0,
                            held=[(808, "c2", "bang", [(8, event("c2").to_row())])])
    listed = await store.quarantine(807, 10)
    assert [(q["tenant"], q["call"], q["at"], q["error"]) for q in listed] == [
        (807, "c1", 50.0, "boom")]
    assert listed[0]["events"][0]["seq"] == 7
    assert [q["call"] for q in await store.quarantine(None, 10)] == ["c2", "c1"]
    assert await store.quarantined_events(807, "c1") == [(7, event("c1"))]


@pytest_twisted.ensureDeferred
async def test_stats_carry_the_log_head_and_the_fold_cursor(store: Any) -> None:
    await store.append([event("c1", 1), event("c1", 2), event("c1", 3)])
    await store.commit_fold(2, [], [], [], 100.0)
    stats = await store.stats()
    assert stats == {"log_head": 3, "fold_cursor": 2, "actions": {}, "quarantined": 0}


# SQLite only: how a URL names the SQLite store (a second backend adds its own URL case here).

@pytest.mark.backends("sqlite")
def test_a_database_url_names_its_store() -> None:
    store = open_store("sqlite:var/x.sqlite", reactor)
    assert isinstance(store, SQLiteStore)
    assert (store.path, store.reactor) == ("var/x.sqlite", reactor)
    with pytest.raises(ValueError, match="unsupported database URL 'postgres://x': use sqlite:PATH"):
        open_store("postgres://x", reactor)
