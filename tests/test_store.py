"""The store contract, on every backend: IStore itself, restarts, de-duplicated appends, the fold
commit, pruning, credentials and tokens.

Each test takes the ``store`` fixture (and ``store_backend`` to restart on the same database,
tests/conftest.py) and runs once per backend, seeing only IStore.  The tests that look at SQLite
itself (the file's PRAGMAs, the group commit's batches, an upgrade of an older file) are last,
marked ``backends("sqlite")``.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from zope.interface.verify import verifyClass, verifyObject

from gateway.model import (CLOSE_POPUP, PENDING, POPUP, POPUP_UPDATE, RECORD, Action,
                           Event)
from gateway.store import Conflict, IStore
from gateway.store.schema import MIGRATIONS


def event(n: int, kind: str = "ring", received: float = 100.0) -> Event:
    return Event(tenant=807, call=f"c{n}", leg=f"S{n}", kind=kind, flow="in",
                 at=1_715_677_267_000_000 + n, received=received)


def test_the_store_provides_every_method_the_gateway_calls(store: Any) -> None:
    assert verifyClass(IStore, type(store))
    assert verifyObject(IStore, store)


@pytest_twisted.ensureDeferred
async def test_a_restart_migrates_nothing_twice_and_keeps_the_log(store: Any,
                                                                  store_backend: Any) -> None:
    assert await store.append([event(1)]) != [None]
    for _ in range(2):
        store = await store_backend.reopen(store)
    assert [e for _, e in await store.events_after(0, 10)] == [event(1)]
    again, new = await store.append([event(1), event(2)])
    assert again is None, "an event stored before the restart is still a duplicate"
    assert new is not None


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_store_duplicates_once(store: Any) -> None:
    results = await gatherResults([store.append([event(n % 150)]) for n in range(300)])
    seqs = [r[0] for r in results]
    assert len([s for s in seqs if s is not None]) == 150
    assert len(set(seqs) - {None}) == 150
    assert len(await store.events_after(0, 1000)) == 150


@pytest_twisted.ensureDeferred
async def test_fold_commit_is_idempotent_and_drops_stale_popups(store: Any) -> None:
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


@pytest_twisted.ensureDeferred
async def test_an_ended_legs_pending_pop_up_update_is_dropped_with_its_pop_up(
        store: Any) -> None:
    call = {"tenant": 807, "key": "c1", "state": "open", "legs": [], "started": 1, "due": 5}
    live = [Action(tenant=807, call="c1", leg="S1", kind=kind, key=f"{kind}:S1", payload={},
                   created=1.0) for kind in (POPUP, POPUP_UPDATE)]
    pop, update = (await store.commit_fold(1, [call], live, [], 1.0))[0]
    close = Action(tenant=807, call="c1", leg="S1", kind=CLOSE_POPUP, key="close:S1",
                   payload={}, created=2.0)
    [close], dropped = await store.commit_fold(2, [call], [close], [(807, "c1", "S1")], 2.0)
    assert sorted(dropped) == sorted([pop.id, update.id])
    # The close is the dispatcher's to decide: it knows whether the pop-up was shown.
    assert [a.id for a in await store.pending_actions()] == [close.id]


@pytest_twisted.ensureDeferred
async def test_prune_tokens_forgets_old_rows_under_a_prefix_only(store: Any) -> None:
    for key in ("mp:reg:old", "mp:reg:new", "mp:chain:old", "mp:reg_x", "mp:reg%"):
        await store.put_token(key, {"k": key})
    # Written at the store's clock (now): "before" far ahead takes them all, far behind none.
    assert await store.prune_tokens("mp:reg:", 0.0) == 0
    assert await store.prune_tokens("mp:reg:", 1e12) == 2
    assert await store.token("mp:reg:old") is None and await store.token("mp:reg:new") is None
    for kept in ("mp:chain:old", "mp:reg_x", "mp:reg%"):
        assert await store.token(kept) == {"k": kept}


@pytest_twisted.ensureDeferred
async def test_prune_keeps_recent_and_pending_rows(store: Any) -> None:
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


@pytest_twisted.ensureDeferred
async def test_stats_count_only_the_actions_an_operator_must_act_on(store: Any) -> None:
    actions = [Action(tenant=807, call=f"c{n}", kind=RECORD, key=f"record:{n}",
                      payload={}, created=1.0, state=state)
               for n, state in enumerate(["pending", "done", "dead", "dead", "failed",
                                          "dropped"])]
    await store.commit_fold(0, [], actions, [], 1.0)
    stats = await store.stats()
    assert stats["actions"] == {"dead": 2, "failed": 1}


# Credentials

MEGAPLAN = {"kind": "megaplan", "name": "Main office",
            "fields": {"domain": "acme.megaplan.ru", "login": "robot", "password": "s3cret"}}


@pytest_twisted.ensureDeferred
async def test_a_credential_comes_back_whole_with_its_secrets(store: Any) -> None:
    assert await store.credential(1) is None
    id_ = await store.put_credential({**MEGAPLAN, "created": 0, "extra": "ignored"}, 50.0)
    assert await store.credential(id_) == {
        "id": id_, "kind": "megaplan", "name": "Main office",
        "fields": {"domain": "acme.megaplan.ru", "login": "robot", "password": "s3cret"},
        "created": 50.0, "updated": 50.0}
    assert await store.credential(id_ + 1) is None


@pytest_twisted.ensureDeferred
async def test_a_credential_without_a_time_is_stamped_with_the_clock(store: Any) -> None:
    before = reactor.seconds()
    id_ = await store.put_credential(MEGAPLAN)
    stored = await store.credential(id_)
    assert before <= stored["created"] == stored["updated"] <= reactor.seconds()
    await store.put_credential({**MEGAPLAN, "id": id_})
    again = await store.credential(id_)
    assert again["created"] == stored["created"] <= again["updated"] <= reactor.seconds()


@pytest_twisted.ensureDeferred
async def test_a_credential_is_replaced_whole_and_keeps_its_id_and_creation(store: Any) -> None:
    id_ = await store.put_credential(MEGAPLAN, 50.0)
    changed = {"id": id_, "kind": "planfix", "name": "Renamed", "fields": {"token": "t"}}
    assert await store.put_credential(changed, 60.0) == id_
    assert await store.credential(id_) == {"id": id_, "kind": "planfix", "name": "Renamed",
                                           "fields": {"token": "t"}, "created": 50.0,
                                           "updated": 60.0}
    assert [c["id"] for c in await store.credentials()] == [id_]


@pytest_twisted.ensureDeferred
async def test_a_second_credential_of_the_same_kind_and_name_is_a_conflict(store: Any) -> None:
    first = await store.put_credential(MEGAPLAN, 50.0)
    with pytest.raises(Conflict, match=f"credential {first} is already named 'Main office' "
                                       "for 'megaplan'"):
        await store.put_credential({**MEGAPLAN, "fields": {"login": "other"}}, 60.0)
    # The same name for another kind, or another name for the same kind, is no conflict.
    other_kind = await store.put_credential({**MEGAPLAN, "kind": "planfix"}, 70.0)
    other_name = await store.put_credential({**MEGAPLAN, "name": "Branch"}, 80.0)
    # Renaming onto a taken name is one too, and writes nothing.
    with pytest.raises(Conflict):
        await store.put_credential({**MEGAPLAN, "id": other_name}, 90.0)
    assert (await store.credential(other_name))["name"] == "Branch"
    assert [(c["id"], c["kind"], c["name"], c["updated"]) for c in await store.credentials()] == [
        (first, "megaplan", "Main office", 50.0), (other_kind, "planfix", "Main office", 70.0),
        (other_name, "megaplan", "Branch", 80.0)]
    # Keeping its own name is no conflict with itself.
    assert await store.put_credential({**MEGAPLAN, "id": first}, 95.0) == first
    # A refused write is the caller's mistake, not a database failing to commit.
    assert (await store.health(3600.0))["commit_error"] is None


@pytest_twisted.ensureDeferred
async def test_replacing_an_unknown_credential_fails_and_creates_none(store: Any) -> None:
    with pytest.raises(KeyError, match="no credential 7"):
        await store.put_credential({**MEGAPLAN, "id": 7}, 50.0)
    assert await store.credentials() == []
    assert await store.credential(7) is None


NAMELESS = r"^a credential needs a kind and a name$"
FIELDLESS = r"^a credential's fields must be an object$"


@pytest.mark.parametrize("bad, error", [
    ({"kind": ""}, NAMELESS), ({"name": ""}, NAMELESS), ({"kind": None}, NAMELESS),
    ({"name": 3}, NAMELESS), ({"fields": ["a"]}, FIELDLESS), ({"fields": "{}"}, FIELDLESS),
    ({"fields": None}, FIELDLESS)])
@pytest_twisted.ensureDeferred
async def test_a_credential_needs_a_kind_a_name_and_an_object_of_fields(
        store: Any, bad: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        await store.put_credential({**MEGAPLAN, **bad}, 50.0)
    assert await store.credentials() == []


@pytest.mark.parametrize("missing, error", [("kind", NAMELESS), ("name", NAMELESS),
                                            ("fields", FIELDLESS)])
@pytest_twisted.ensureDeferred
async def test_a_credential_missing_a_field_is_refused_as_bad_not_unknown(
        store: Any, missing: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        await store.put_credential({k: v for k, v in MEGAPLAN.items() if k != missing}, 50.0)
    assert await store.credentials() == []


@pytest_twisted.ensureDeferred
async def test_credentials_are_listed_by_id_all_or_of_one_kind(store: Any) -> None:
    a = await store.put_credential({**MEGAPLAN, "name": "B"}, 1.0)
    b = await store.put_credential({**MEGAPLAN, "kind": "planfix", "name": "A"}, 2.0)
    c = await store.put_credential({**MEGAPLAN, "name": "A"}, 3.0)
    assert [x["id"] for x in await store.credentials()] == [a, b, c]
    assert [x["id"] for x in await store.credentials(None)] == [a, b, c]
    assert await store.credentials("megaplan") == [await store.credential(a),
                                                   await store.credential(c)]
    assert [x["id"] for x in await store.credentials("planfix")] == [b]
    assert await store.credentials("callgear") == []


@pytest_twisted.ensureDeferred
async def test_a_deleted_credential_is_gone_and_its_id_never_comes_back(store: Any) -> None:
    keep = await store.put_credential({**MEGAPLAN, "name": "Keep"}, 1.0)
    gone = await store.put_credential(MEGAPLAN, 2.0)
    assert await store.delete_credential(gone) is True
    assert await store.delete_credential(gone) is False
    assert await store.credential(gone) is None
    assert [c["id"] for c in await store.credentials()] == [keep]
    # Its (kind, name) is free again, under a new id: a tenant still naming the deleted
    # one must not get this login.
    again = await store.put_credential(MEGAPLAN, 3.0)
    assert again not in (keep, gone)


# Tokens

TOKEN_KEY = "megaplan:acme.megaplan.ru:robot"


@pytest_twisted.ensureDeferred
async def test_a_token_round_trips_is_replaced_and_deleted(store: Any) -> None:
    assert await store.token(TOKEN_KEY) is None
    first = {"access_token": "a1", "refresh_token": "r1", "expires_at": 1_700_000_000.5}
    assert await store.put_token(TOKEN_KEY, first) is None
    assert await store.token(TOKEN_KEY) == first
    assert await store.token("megaplan:other.megaplan.ru:robot") is None
    await store.put_token(TOKEN_KEY, {"access_token": "a2"})
    assert await store.token(TOKEN_KEY) == {"access_token": "a2"}, "replaced whole"
    assert await store.delete_token(TOKEN_KEY) is True
    assert await store.token(TOKEN_KEY) is None
    assert await store.delete_token(TOKEN_KEY) is False


@pytest_twisted.ensureDeferred
async def test_a_token_must_be_an_object(store: Any) -> None:
    with pytest.raises(ValueError, match=r"^a token's data must be an object$"):
        await store.put_token(TOKEN_KEY, ["a1"])
    assert await store.token(TOKEN_KEY) is None


@pytest_twisted.ensureDeferred
async def test_token_writes_interleave_with_appends(store: Any) -> None:
    writes = []
    for n in range(50):
        writes.append(store.append([event(n)]))
        writes.append(store.put_token(f"k{n % 5}", {"n": n}))
    await gatherResults(writes)
    assert len(await store.events_after(0, 100)) == 50
    assert [await store.token(f"k{n}") for n in range(5)] == [{"n": 45 + n} for n in range(5)]


@pytest_twisted.ensureDeferred
async def test_credentials_and_tokens_survive_a_restart(store: Any, store_backend: Any) -> None:
    kept = await store.put_credential(MEGAPLAN, 50.0)
    dropped = await store.put_credential({**MEGAPLAN, "name": "Old"}, 51.0)
    await store.delete_credential(dropped)
    await store.put_token(TOKEN_KEY, {"access_token": "a1"})
    await store.put_token("gone", {"access_token": "x"})
    await store.delete_token("gone")
    store = await store_backend.reopen(store)
    assert await store.credentials() == [{"id": kept, **MEGAPLAN, "created": 50.0,
                                          "updated": 50.0}]
    assert await store.token(TOKEN_KEY) == {"access_token": "a1"}
    assert await store.token("gone") is None
    assert await store.put_credential({**MEGAPLAN, "name": "New"}, 52.0) not in (kept, dropped)


# SQLite only: these look at the file and at the group commit, which another backend has not.

@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_the_sqlite_file_is_migrated_once_and_in_wal_mode(store: Any,
                                                                 store_backend: Any) -> None:
    path = store.path
    await store_backend.reopen(store)
    await store_backend.close_all()
    assert not os.path.exists(f"{path}-wal"), \
        "stop closed the file (the last connection checkpoints and removes the WAL)"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_a_sqlite_file_of_an_older_schema_is_upgraded_in_place(
        store_backend: Any) -> None:
    path = store_backend.url[len("sqlite:"):]
    db = sqlite3.connect(path)
    for number, script in enumerate(MIGRATIONS[:3], start=1):
        db.executescript(script)
        db.execute(f"PRAGMA user_version={number}")
    db.execute("INSERT INTO pauses (bucket, until) VALUES ('api.example', 9e9)")
    db.commit()
    db.close()
    store = await store_backend.open()
    assert await store.pauses(0.0) == {"api.example": 9e9}
    id_ = await store.put_credential(MEGAPLAN, 50.0)
    assert (await store.credential(id_))["fields"] == MEGAPLAN["fields"]


@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_concurrent_sqlite_appends_share_transactions(store: Any) -> None:
    transactions = []
    write = store._appends._write
    store._appends._write = lambda items: transactions.append(len(items)) or write(items)
    results = await gatherResults([store.append([event(n % 150)]) for n in range(300)])
    assert len([r[0] for r in results if r[0] is not None]) == 150
    assert len(transactions) < 300 / 10, "appends are batched, not one per request"
    assert sum(transactions) == 300


@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_a_sqlite_group_commit_writes_at_most_its_batch_at_once(
        store_backend: Any) -> None:
    from gateway.store.sqlite import SQLiteStore

    store = SQLiteStore(store_backend.url[len("sqlite:"):], reactor, batch=10)
    await store.start()
    try:
        transactions = []
        write = store._appends._write
        store._appends._write = lambda items: transactions.append(len(items)) or write(items)
        # All queued before the first flush: batches of 10 requests, then the last 5 and
        # the big one, which goes in whole (a request is never split across transactions).
        results = await gatherResults([store.append([event(n)]) for n in range(25)]
                                      + [store.append([event(100 + n) for n in range(15)])])
        assert transactions == [10, 10, 20]
        assert [len(r) for r in results] == [1] * 25 + [15]
    finally:
        await store.stop()


@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_an_infinite_next_at_of_an_older_version_is_read_as_due(store: Any) -> None:
    [a], _ = await store.commit_fold(1, [], [Action(tenant=807, call="c1", kind=RECORD,
                                                   key="r", payload={}, created=1.0)], [], 1.0)
    # Written before Retry-After was bounded (Retry-After: 1e400).
    await store._run(store._tx, lambda db: db.execute(
        "UPDATE actions SET next_at = 9e999 WHERE id = ?", (a.id,)))
    [back] = await store.pending_actions()
    assert back.next_at == 0.0
