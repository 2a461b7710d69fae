"""The SQLite store: migrations, de-duplicated group-committed appends, the fold commit, pruning."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from gateway.model import PENDING, POPUP, RECORD, Action, Event
from gateway.store.schema import MIGRATIONS
from gateway.store.sqlite import SQLiteStore


def event(n: int, kind: str = "ring", received: float = 100.0) -> Event:
    return Event(tenant=807, call=f"c{n}", leg=f"S{n}", kind=kind, flow="in",
                 at=1_715_677_267_000_000 + n, received=received)


@pytest_twisted.ensureDeferred
async def test_schema_is_migrated_once(tmp_path: Any) -> None:
    path = str(tmp_path / "s.sqlite")
    for _ in range(2):
        store = SQLiteStore(path, reactor)
        await store.start()
        await store.stop()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_share_transactions_and_duplicates_are_stored_once(
        tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "s.sqlite"), reactor)
    await store.start()
    transactions = []
    write = store._appends._write
    store._appends._write = lambda items: transactions.append(len(items)) or write(items)
    try:
        results = await gatherResults([store.append([event(n % 150)]) for n in range(300)])
        seqs = [r[0] for r in results]
        assert len([s for s in seqs if s is not None]) == 150
        assert len(transactions) < 300 / 10, "appends are batched, not one per request"
        assert len(await store.events_after(0, 1000)) == 150
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_fold_commit_is_idempotent_and_drops_stale_popups(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "s.sqlite"), reactor)
    await store.start()
    try:
        pop = Action(tenant=807, call="c1", leg="S1", kind=POPUP, key="popup:S1",
                     payload={}, created=1.0)
        rec = Action(tenant=807, call="c1", leg="S1", kind=RECORD, key="record:S1",
                     payload={}, created=1.0)
        call = {"tenant": 807, "key": "c1", "state": "open", "legs": [], "started": 1, "due": 5}
        inserted, dropped = await store.commit_fold(1, [call], [pop], [], 1.0)
        assert [a.kind for a in inserted] == [POPUP] and dropped == []
        # Re-folding after a crash produces the same actions: they are not inserted twice.
        again = Action(tenant=807, call="c1", leg="S1", kind=POPUP, key="popup:S1",
                       payload={}, created=2.0)
        inserted, dropped = await store.commit_fold(2, [call], [again, rec],
                                                    [(807, "c1", "S1")], 2.0)
        assert [a.kind for a in inserted] == [RECORD] and dropped == [pop.id]
        assert await store.fold_cursor() == 2
        pending = await store.pending_actions()
        assert [(a.kind, a.state) for a in pending] == [(RECORD, PENDING)]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_prune_keeps_recent_and_pending_rows(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "s.sqlite"), reactor)
    await store.start()
    try:
        await store.append([event(1, received=10.0), event(2, received=1000.0)])
        old = Action(tenant=807, call="c1", kind=RECORD, key="a", payload={}, created=10.0,
                     state="done")
        waiting = Action(tenant=807, call="c1", kind=RECORD, key="b", payload={},
                         created=10.0)
        final = {"tenant": 807, "key": "c1", "state": "final", "legs": [], "started": 1,
                 "due": 0}
        await store.commit_fold(2, [final], [old, waiting], [], 10.0)
        counts = await store.prune(500.0, 500.0, cursor=2)
        assert counts == {"events": 1, "calls": 1, "actions": 1}
        assert [s for s, _ in await store.events_after(0, 10)] == [2]
        assert [a.key for a in await store.pending_actions()] == ["b"]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_stats_count_only_the_actions_an_operator_must_act_on(tmp_path: Any) -> None:
    store = SQLiteStore(str(tmp_path / "s.sqlite"), reactor)
    await store.start()
    try:
        actions = [Action(tenant=807, call=f"c{n}", kind=RECORD, key=f"record:{n}",
                          payload={}, created=1.0, state=state)
                   for n, state in enumerate(["pending", "done", "dead", "dead", "failed",
                                              "dropped"])]
        await store.commit_fold(0, [], actions, [], 1.0)
        stats = await store.stats()
        assert stats["actions"] == {"dead": 2, "failed": 1}
    finally:
        await store.stop()
