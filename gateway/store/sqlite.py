"""The embedded store: SQLite in WAL mode, one connection on one thread, group commit."""

from __future__ import annotations

import json
import math
import os
import sqlite3
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from gateway.model import (DEAD, DROPPED, FAILED, PENDING, POPUP, POPUP_UPDATE, Action,
                           Attempt, Event, Tenant, legacy_outcome)
from gateway.seal import SealError, Sealer, open_all, seal_fields
from gateway.store import Conflict, IStore
from gateway.store.schema import MIGRATIONS

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class _GroupCommit:
    """Queues items from many callers and writes them in one transaction per batch.

    While one batch is being written the next one gathers, so under load a batch holds
    whatever arrived during the previous fsync and an idle store adds no delay.
    """

    def __init__(self, store: "SQLiteStore", write: Callable[[list], list],
                 max_items: int) -> None:
        self._store = store
        self._write = write
        self._max = max_items
        self._queue: list[tuple[list, Deferred]] = []
        self._busy = False

    def submit(self, items: list) -> Deferred:
        d: Deferred = Deferred()
        self._queue.append((items, d))
        if not self._busy:
            self._busy = True
            self._store.reactor.callLater(0, self._flush)
        return d

    def _flush(self) -> None:
        batch: list[tuple[list, Deferred]] = []
        count = 0
        while self._queue and (count < self._max or not batch):
            items, d = self._queue.pop(0)
            batch.append((items, d))
            count += len(items)
        flat = [item for items, _ in batch for item in items]
        d = self._store._run(self._write, flat)

        def done(results: list) -> None:
            pos = 0
            for items, waiter in batch:
                waiter.callback(results[pos:pos + len(items)])
                pos += len(items)

        def failed(f: Any) -> None:
            for _, waiter in batch:
                waiter.errback(f)

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._next())

    def _next(self) -> None:
        if self._queue:
            self._flush()
        else:
            self._busy = False

    @property
    def idle(self) -> bool:
        return not self._busy


@implementer(IStore)
class SQLiteStore:
    """IStore on a SQLite file (WAL, synchronous=FULL: a commit survives a power cut).

    With a ``sealer`` every secret is sealed with its key (gateway.seal); without one, a
    database whose secrets were sealed refuses to start and secrets are written in clear
    (the daemon always has a key: only tests and tools open a store without one)."""

    def __init__(self, path: str, reactor: Any, batch: int = 2000,
                 sealer: Sealer | None = None) -> None:
        self.path = path
        self.reactor = reactor
        self._sealer = sealer
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="sqlite")
        self._db: sqlite3.Connection | None = None
        self._durable = True
        # The last write transaction's outcome, for /healthz: when it committed, and the
        # error of the last failure (cleared by the next commit).
        self.committed_at = 0.0
        self.commit_error = ""
        self._appends = _GroupCommit(self, self._append_sync, batch)
        self._attempts = _GroupCommit(self, self._attempt_sync, batch)

    def _run(self, fn: Callable, *args: Any) -> Deferred:
        return deferToThreadPool(self.reactor, self._pool, fn, *args)

    # Life cycle

    def start(self) -> Deferred:
        self._pool.start()
        return self._run(self._open_sync)

    def _open_sync(self) -> None:
        if self.path != ":memory:" and os.path.dirname(self.path):
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if self.path != ":memory:" and not os.path.exists(self.path):
            # Secrets live in it: created 0600 (SQLite gives -wal and -shm the same mode).
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                db.execute("BEGIN")
                for statement in script.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={number}")
                db.execute("COMMIT")
            self._check_seal(db)
            if self.path != ":memory:":
                for suffix in ("", "-wal", "-shm"):  # made by an older gateway, or a copy
                    if os.path.exists(self.path + suffix):
                        os.chmod(self.path + suffix, 0o600)
        except BaseException:
            db.close()
            raise
        self._db = db

    # Sealed secrets (gateway.seal)

    def _check_seal(self, db: sqlite3.Connection) -> None:
        """Refuse another key, or none, than the one the secrets were sealed with; with a key,
        seal what an earlier gateway stored in clear (once, in one transaction)."""
        row = db.execute("SELECT probe FROM seal WHERE id = 1").fetchone()
        if row is not None:
            open_all(json.loads(row[0]), self._sealer)  # SealError: no key, another key
            return
        if self._sealer is None:
            return
        clear = any(db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()
                    for table in ("tenants", "credentials", "tokens"))
        db.execute("BEGIN IMMEDIATE")
        try:
            self._reseal_rows(db, None, self._sealer)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if clear:
            self._scrubbed(db)

    def _reseal_rows(self, db: sqlite3.Connection, old: Sealer | None, new: Sealer) -> None:
        """Open every stored secret with ``old`` and seal it with ``new`` (or seal the clear
        ones, ``old`` None), and store the probe of ``new``."""
        for id_, data in db.execute("SELECT id, data FROM tenants").fetchall():
            opened = open_all(json.loads(data), old)
            db.execute("UPDATE tenants SET data = ? WHERE id = ?",
                       (_dumps(self._sealed_tenant(opened, new)), id_))
        for id_, data in db.execute("SELECT id, data FROM credentials").fetchall():
            db.execute("UPDATE credentials SET data = ? WHERE id = ?",
                       (_dumps(new.seal(open_all(json.loads(data), old))), id_))
        for key, data in db.execute("SELECT key, data FROM tokens").fetchall():
            db.execute("UPDATE tokens SET data = ? WHERE key = ?",
                       (_dumps(new.seal(open_all(json.loads(data), old))), key))
        db.execute("INSERT OR REPLACE INTO seal (id, probe) VALUES (1, ?)",
                   (_dumps(new.seal("probe")),))

    @staticmethod
    def _scrubbed(db: sqlite3.Connection) -> None:
        """After ``_reseal_rows`` committed: what it replaced (clear secrets, or ones the
        old key opens) is still in free pages, with every older value an older gateway
        replaced or deleted (refreshed tokens), and in the WAL.  VACUUM rewrites the file
        without them; the WAL is then copied back and emptied.  Once, not on every write:
        from then on every secret written is sealed."""
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @staticmethod
    def _sealed_tenant(data: dict[str, Any], sealer: Sealer | None) -> dict[str, Any]:
        if sealer is None:
            return data
        return seal_fields(data, Tenant.from_json(data).secret_fields(), sealer)

    def _sealed(self, value: Any) -> Any:
        return value if self._sealer is None else self._sealer.seal(value)

    def _opened(self, data: str) -> Any:
        return open_all(json.loads(data), self._sealer)

    def reseal(self, new: Sealer) -> Deferred:
        """Re-seal every secret with ``new`` in one transaction, and use it from then on
        (rotating the key: gateway.seal)."""
        def write(db: sqlite3.Connection) -> None:
            if self._sealer is None:
                raise SealError("re-sealing needs the key the secrets are sealed with")
            self._reseal_rows(db, self._sealer, new)

        def checkpoint() -> None:
            assert self._db is not None
            self._scrubbed(self._db)

        def done(_: None) -> Deferred:
            self._sealer = new
            return self._run(checkpoint)
        return self._run(self._tx, write).addCallback(done)

    def stop(self) -> Deferred:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Let queued group commits finish before the thread goes away.
        while not (self._appends.idle and self._attempts.idle):
            d: Deferred = Deferred()
            self.reactor.callLater(0.01, d.callback, None)
            await d
        if self._db is not None:
            await self._run(self._db.close)
        self._pool.stop()

    def _tx(self, fn: Callable[[sqlite3.Connection], Any], durable: bool = True) -> Any:
        """Run ``fn`` in one write transaction.

        ``durable``: the commit waits for fsync (survives a power cut).  Otherwise the commit
        survives the process being killed but not a power cut (WAL, synchronous=NORMAL):
        for what can be redone from durable rows.  A fold is redone from the event log and
        its cursor, and an attempt's outcome lost that way means the action is sent again
        (at least once, as after any crash); the next durable commit makes both durable too.
        """
        db = self._db
        assert db is not None
        if durable != self._durable:
            db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._durable = durable
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = fn(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as e:
            self.commit_error = f"{type(e).__name__}: {e}"
            raise
        self.committed_at = self.reactor.seconds()
        self.commit_error = ""
        return result

    # Event log

    def append(self, events: list[Event]) -> Deferred:
        return self._appends.submit(events)

    def _append_sync(self, events: list[Event]) -> list[int | None]:
        def write(db: sqlite3.Connection) -> list[int | None]:
            out: list[int | None] = []
            for ev in events:
                cur = db.execute(
                    "INSERT OR IGNORE INTO events (tenant, natural_key, data) VALUES (?, ?, ?)",
                    (ev.tenant, ev.natural_key, _dumps(ev.to_row())))
                out.append(cur.lastrowid if cur.rowcount else None)
            return out
        return self._tx(write)

    def events_after(self, seq: int, limit: int) -> Deferred:
        def read() -> list[tuple[int, Event]]:
            assert self._db is not None
            rows = self._db.execute(
                "SELECT seq, data FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
            return [(s, Event.from_row(json.loads(d))) for s, d in rows]
        return self._run(read)

    def fold_cursor(self) -> Deferred:
        def read() -> int:
            assert self._db is not None
            row = self._db.execute("SELECT seq FROM cursors WHERE name = 'fold'").fetchone()
            return row[0] if row else 0
        return self._run(read)

    # Calls

    def load_calls(self, keys: list[tuple[int, str]]) -> Deferred:
        def read() -> dict[tuple[int, str], dict]:
            assert self._db is not None
            out = {}
            for tenant, key in keys:
                row = self._db.execute("SELECT data FROM calls WHERE tenant = ? AND key = ?",
                                       (tenant, key)).fetchone()
                if row:
                    out[(tenant, key)] = json.loads(row[0])
            return out
        return self._run(read)

    def open_calls(self) -> Deferred:
        def read() -> list[dict]:
            assert self._db is not None
            rows = self._db.execute("SELECT data FROM calls WHERE final = 0")
            return [json.loads(d) for (d,) in rows]
        return self._run(read)

    def commit_fold(self, cursor: int, calls: list[dict], actions: list[Action],
                    stale_legs: list[tuple[int, str, str]], now: float,
                    held: list[tuple[int, str, str, list]] = (),
                    release: list[tuple[int, str]] = ()) -> Deferred:
        def write(db: sqlite3.Connection) -> tuple[list[Action], list[int]]:
            for tenant, key in release:
                db.execute("DELETE FROM quarantine WHERE tenant = ? AND key = ?",
                           (tenant, key))
            for tenant, key, error, events in held:
                row = db.execute("SELECT error, events FROM quarantine WHERE tenant = ? "
                                 "AND key = ?", (tenant, key)).fetchone()
                if row:  # a call quarantined earlier: its later events join the held ones
                    error, events = row[0], json.loads(row[1]) + events
                db.execute("INSERT OR REPLACE INTO quarantine (tenant, key, at, error, "
                           "events) VALUES (?, ?, ?, ?, ?)",
                           (tenant, key, now, error or "quarantined", _dumps(events)))
            for data in calls:
                db.execute(
                    "INSERT OR REPLACE INTO calls (tenant, key, final, updated, data) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (data["tenant"], data["key"], int(data["state"] == "final"), now,
                     _dumps(data)))
            inserted = []
            for a in actions:
                cur = db.execute(
                    "INSERT OR IGNORE INTO actions (tenant, call, leg, kind, key, payload, "
                    "created, state, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (a.tenant, a.call, a.leg, a.kind, a.key, _dumps(a.payload), a.created,
                     a.state, a.next_at))
                if cur.rowcount:
                    a.id = cur.lastrowid
                    inserted.append(a)
            dropped = []
            for tenant, call, leg in stale_legs:
                # A pop-up and its "answered" update are for a live leg only.
                rows = db.execute(
                    "UPDATE actions SET state = ?, last_error = 'leg ended before delivery' "
                    "WHERE tenant = ? AND call = ? AND leg = ? AND kind IN (?, ?) "
                    "AND state = ? RETURNING id",
                    (DROPPED, tenant, call, leg, POPUP, POPUP_UPDATE, PENDING)).fetchall()
                dropped.extend(r[0] for r in rows)
            db.execute("INSERT OR REPLACE INTO cursors (name, seq) VALUES ('fold', ?)",
                       (cursor,))
            return inserted, dropped
        return self._run(self._tx, write, False)

    # Quarantine

    def quarantined_keys(self) -> Deferred:
        """(tenant, call key) → error of every quarantined call."""
        def read() -> list[tuple[tuple[int, str], str]]:
            assert self._db is not None
            rows = self._db.execute("SELECT tenant, key, error FROM quarantine")
            return [((tenant, key), error) for tenant, key, error in rows]
        return self._run(read)

    def quarantined_events(self, tenant: int, key: str) -> Deferred:
        """A quarantined call's held (seq, Event) pairs, in log order; None if it is not."""
        def read() -> list[tuple[int, Event]] | None:
            assert self._db is not None
            row = self._db.execute("SELECT events FROM quarantine WHERE tenant = ? AND "
                                   "key = ?", (tenant, key)).fetchone()
            if row is None:
                return None
            return sorted(((seq, Event.from_row(data)) for seq, data in json.loads(row[0])),
                          key=lambda pair: pair[0])
        return self._run(read)

    def quarantine(self, tenant: int | None, limit: int) -> Deferred:
        """Quarantined calls for operators, newest first, with their held events."""
        def read() -> list[dict]:
            assert self._db is not None
            where, args = ("WHERE tenant = ?", [tenant]) if tenant is not None else ("", [])
            rows = self._db.execute(f"SELECT tenant, key, at, error, events FROM quarantine "
                                    f"{where} ORDER BY at DESC LIMIT ?", (*args, limit))
            return [{"tenant": t, "call": k, "at": at, "error": error,
                     "events": [{"seq": seq, **data} for seq, data in json.loads(events)]}
                    for t, k, at, error, events in rows]
        return self._run(read)

    # Outbox

    def pending_actions(self) -> Deferred:
        def read() -> list[Action]:
            assert self._db is not None
            rows = self._db.execute(
                f"SELECT {_ACTION_COLUMNS} FROM actions WHERE state = ? ORDER BY id",
                (PENDING,))
            return [_action(r) for r in rows]
        return self._run(read)

    def record_attempt(self, action: Action, attempt: Attempt) -> Deferred:
        return self._attempts.submit([(action.id, action.state, action.attempts,
                                       action.next_at, action.last_error, attempt)])

    def _attempt_sync(self, items: list) -> list[None]:
        def write(db: sqlite3.Connection) -> list[None]:
            for action_id, state, attempts, next_at, last_error, at in items:
                db.execute("UPDATE actions SET state = ?, attempts = ?, next_at = ?, "
                           "last_error = ? WHERE id = ?",
                           (state, attempts, next_at, last_error, action_id))
                db.execute("INSERT INTO attempts (action, at, outcome, status, request, "
                           "answer) VALUES (?, ?, ?, ?, ?, ?)",
                           (at.action, at.at, at.outcome, at.status, at.request, at.answer))
            return [None] * len(items)
        return self._tx(write, False)

    def retry(self, action_id: int, now: float) -> Deferred:
        """Put a dead or failed action back in the queue; fires with it, or None."""
        def write(db: sqlite3.Connection) -> Action | None:
            db.execute("UPDATE actions SET state = ?, next_at = ?, created = ? "
                       "WHERE id = ? AND state IN ('dead', 'failed')",
                       (PENDING, 0.0, now, action_id))
            row = db.execute(f"SELECT {_ACTION_COLUMNS} FROM actions WHERE id = ?",
                             (action_id,)).fetchone()
            return _action(row) if row else None
        return self._run(self._tx, write)

    # Tenants

    def tenants(self) -> Deferred:
        def read() -> list[Tenant]:
            assert self._db is not None
            rows = self._db.execute("SELECT data FROM tenants ORDER BY id")
            return [Tenant.from_json(self._opened(d)) for (d,) in rows]
        return self._run(read)

    def put_tenant(self, tenant: Tenant, now: float) -> Deferred:
        def write(db: sqlite3.Connection) -> None:
            data = self._sealed_tenant(tenant.to_json(secrets=True), self._sealer)
            db.execute("INSERT OR REPLACE INTO tenants (id, data, updated) VALUES (?, ?, ?)",
                       (tenant.id, _dumps(data), now))
        return self._run(self._tx, write)

    def put_tenant_with_action(self, tenant: Tenant, action: Action | None,
                               now: float) -> Deferred:
        """Save a tenant and queue its setup action in one transaction."""
        def write(db: sqlite3.Connection) -> Action | None:
            db.execute("INSERT OR REPLACE INTO tenants (id, data, updated) VALUES (?, ?, ?)",
                       (tenant.id, _dumps(self._sealed_tenant(tenant.to_json(secrets=True),
                                                              self._sealer)), now))
            if action is None:
                return None
            cur = db.execute(
                "INSERT INTO actions (tenant, call, leg, kind, key, payload, created, state, "
                "next_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (action.tenant, action.call, action.leg, action.kind, action.key,
                 _dumps(action.payload), action.created, action.state, action.next_at))
            action.id = cur.lastrowid
            return action
        return self._run(self._tx, write)

    def prune(self, events_before: float, actions_before: float, cursor: int) -> Deferred:
        """Delete folded events and final calls older than ``events_before``, and settled
        actions (with their attempts) older than ``actions_before``."""
        def write(db: sqlite3.Connection) -> dict[str, int]:
            calls = db.execute("DELETE FROM calls WHERE final = 1 AND updated < ?",
                               (events_before,)).rowcount
            # Events carry their arrival time in the JSON; folded ones can go.
            events = db.execute(
                "DELETE FROM events WHERE seq <= ? AND json_extract(data, '$.received') < ?",
                (cursor, events_before)).rowcount
            db.execute("DELETE FROM attempts WHERE action IN (SELECT id FROM actions WHERE "
                       "state != 'pending' AND created < ?)", (actions_before,))
            actions = db.execute("DELETE FROM actions WHERE state != 'pending' AND created < ?",
                                 (actions_before,)).rowcount
            return {"events": events, "calls": calls, "actions": actions}
        return self._run(self._tx, write)

    # Reading for operators

    def _attempts_of(self, ids: list[int]) -> dict[int, list[dict]]:
        assert self._db is not None
        out: dict[int, list[dict]] = {i: [] for i in ids}
        for chunk in range(0, len(ids), 500):
            part = ids[chunk:chunk + 500]
            rows = self._db.execute(
                "SELECT action, at, outcome, status, request, answer FROM attempts WHERE "
                f"action IN ({','.join('?' * len(part))}) ORDER BY id", part)
            for action, at, outcome, status, request, answer in rows:
                out[action].append({"at": at, "outcome": outcome, "status": status,
                                    "request": request, "answer": answer})
        return out

    def _with_attempts(self, rows: list) -> list[dict]:
        actions = [_action(r) for r in rows]
        attempts = self._attempts_of([a.id for a in actions])
        return [{**a.summary(), "attempt_log": attempts[a.id]} for a in actions]

    def recent_calls(self, tenant: int, limit: int) -> Deferred:
        def read() -> list[dict]:
            assert self._db is not None
            calls = self._db.execute(
                "SELECT key, final, updated, data FROM calls WHERE tenant = ? "
                "ORDER BY updated DESC LIMIT ?", (tenant, limit)).fetchall()
            out = []
            for key, final, updated, data in calls:
                rows = self._db.execute(
                    f"SELECT {_ACTION_COLUMNS} FROM actions WHERE tenant = ? AND call = ? "
                    "ORDER BY id", (tenant, key)).fetchall()
                state = json.loads(data)
                out.append({"call": key, "final": bool(final), "updated": updated,
                            "started": state["started"],
                            "legs": [{**{k: leg[k] for k in ("key", "kind", "extension",
                                                             "peer", "did", "state")},
                                      "outcome": _outcome(leg)}
                                     for leg in state["legs"]],
                            "actions": self._with_attempts(rows)})
            return out
        return self._run(read)

    def actions(self, state: str | None, tenant: int | None, limit: int) -> Deferred:
        def read() -> list[dict]:
            assert self._db is not None
            where, args = [], []
            if state:
                where.append("state = ?")
                args.append(state)
            if tenant is not None:
                where.append("tenant = ?")
                args.append(tenant)
            clause = f"WHERE {' AND '.join(where)}" if where else ""
            rows = self._db.execute(f"SELECT {_ACTION_COLUMNS} FROM actions {clause} "
                                    "ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
            return self._with_attempts(rows)
        return self._run(read)

    def action(self, action_id: int) -> Deferred:
        def read() -> dict | None:
            assert self._db is not None
            rows = self._db.execute(f"SELECT {_ACTION_COLUMNS} FROM actions WHERE id = ?",
                                    (action_id,)).fetchall()
            found = self._with_attempts(rows)
            return found[0] if found else None
        return self._run(read)

    def stats(self) -> Deferred:
        return self._run(self._stats_sync)

    def _stats_sync(self) -> dict[str, Any]:
        assert self._db is not None
        head = self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
        cursor = self._db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM cursors WHERE name = 'fold'").fetchone()[0]
        # Only the states an operator must act on: counting every settled action
        # (kept 30 days) made /healthz scan the whole table (14 ms at 40,000 rows,
        # on the thread every append waits for).
        states = dict(self._db.execute(
            "SELECT state, COUNT(*) FROM actions WHERE state IN (?, ?) GROUP BY state",
            (FAILED, DEAD)).fetchall())
        quarantined = self._db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
        return {"log_head": head, "fold_cursor": cursor, "actions": states,
                "quarantined": quarantined}

    def health(self, quiet: float) -> Deferred:
        """``stats()`` plus ``commit_error``: None when the store can commit.

        Under load the last commit says it; when nothing was committed for ``quiet``
        seconds, or the last commit failed, a small durable write tries again (a full or
        read-only disk fails it).
        """
        def check() -> dict[str, Any]:
            if self.commit_error or self.reactor.seconds() - self.committed_at > quiet:
                try:
                    self._tx(lambda db: db.execute(
                        "INSERT OR REPLACE INTO cursors (name, seq) VALUES ('health', ?)",
                        (int(self.reactor.seconds()),)))
                except sqlite3.Error:
                    pass  # _tx kept the error
            return {**self._stats_sync(), "commit_error": self.commit_error or None}
        return self._run(check)

    # Pauses

    def put_pause(self, bucket: str, until: float) -> Deferred:
        """Store that a CRM bucket (host) is paused until ``until``; a longer stored pause
        stays.  Not durable (a commit survives the process, not a power cut): a lost pause
        costs one more 429."""
        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO pauses (bucket, until) VALUES (?, ?) ON CONFLICT (bucket) "
                       "DO UPDATE SET until = max(until, excluded.until)", (bucket, until))
        return self._run(self._tx, write, False)

    def pauses(self, now: float) -> Deferred:
        """bucket → until of the pauses still running at ``now``; expired ones are deleted."""
        def write(db: sqlite3.Connection) -> dict[str, float]:
            db.execute("DELETE FROM pauses WHERE until <= ?", (now,))
            return dict(db.execute("SELECT bucket, until FROM pauses").fetchall())
        return self._run(self._tx, write, False)

    # Credentials

    def put_credential(self, credential: dict, now: float | None = None) -> Deferred:
        """Insert a credential, or replace the one with its ``"id"``; fires with the id.
        Another with the same (kind, name) fails it with ``Conflict``, an unknown id with
        KeyError."""
        at = self.reactor.seconds() if now is None else now

        def write(db: sqlite3.Connection) -> int:
            # .get: a missing key is a bad credential, not KeyError (an unknown id).
            kind, name = credential.get("kind"), credential.get("name")
            fields = credential.get("fields")
            if not (isinstance(kind, str) and kind and isinstance(name, str) and name):
                raise ValueError("a credential needs a kind and a name")
            if not isinstance(fields, dict):
                raise ValueError("a credential's fields must be an object")
            id_ = credential.get("id")
            # Checked first, inside the write transaction (one writer): a failed INSERT
            # would count as a failed commit for /healthz.
            other = db.execute("SELECT id FROM credentials WHERE kind = ? AND name = ? "
                               "AND id IS NOT ?", (kind, name, id_)).fetchone()
            if other:
                raise Conflict(f"credential {other[0]} is already named {name!r} for "
                               f"{kind!r}")
            data = _dumps(self._sealed(fields))
            if id_ is None:
                return db.execute("INSERT INTO credentials (kind, name, data, created, "
                                  "updated) VALUES (?, ?, ?, ?, ?)",
                                  (kind, name, data, at, at)).lastrowid
            if not db.execute("UPDATE credentials SET kind = ?, name = ?, data = ?, "
                              "updated = ? WHERE id = ?",
                              (kind, name, data, at, id_)).rowcount:
                raise KeyError(f"no credential {id_}")
            return id_
        return self._run(self._tx, write)

    def credentials(self, kind: str | None = None) -> Deferred:
        def read() -> list[dict]:
            assert self._db is not None
            query = f"SELECT {_CREDENTIAL_COLUMNS} FROM credentials"
            if kind is None:
                rows = self._db.execute(f"{query} ORDER BY id")
            else:
                rows = self._db.execute(f"{query} WHERE kind = ? ORDER BY id", (kind,))
            return [self._credential(r) for r in rows]
        return self._run(read)

    def credential(self, credential_id: int) -> Deferred:
        def read() -> dict | None:
            assert self._db is not None
            row = self._db.execute(f"SELECT {_CREDENTIAL_COLUMNS} FROM credentials "
                                   "WHERE id = ?", (credential_id,)).fetchone()
            return self._credential(row) if row else None
        return self._run(read)

    def delete_credential(self, credential_id: int) -> Deferred:
        def write(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM credentials WHERE id = ?",
                              (credential_id,)).rowcount > 0
        return self._run(self._tx, write)

    # Tokens

    def token(self, key: str) -> Deferred:
        def read() -> dict | None:
            assert self._db is not None
            row = self._db.execute("SELECT data FROM tokens WHERE key = ?", (key,)).fetchone()
            return self._opened(row[0]) if row else None
        return self._run(read)

    def put_token(self, key: str, data: dict) -> Deferred:
        """Store a token, as small writes are (like a pause): its own short transaction on
        the store's thread, between group commits, and not durable (a commit survives the
        process, not a power cut): a lost token costs one more login.  ``updated`` is for
        an operator reading the file."""
        at = self.reactor.seconds()

        def write(db: sqlite3.Connection) -> None:
            if not isinstance(data, dict):
                raise ValueError("a token's data must be an object")
            db.execute("INSERT OR REPLACE INTO tokens (key, data, updated) VALUES (?, ?, ?)",
                       (key, _dumps(self._sealed(data)), at))
        return self._run(self._tx, write, False)

    def delete_token(self, key: str) -> Deferred:
        def write(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM tokens WHERE key = ?", (key,)).rowcount > 0
        return self._run(self._tx, write, False)

    def prune_tokens(self, prefix: str, before: float) -> Deferred:
        def write(db: sqlite3.Connection) -> int:
            # A key range, not LIKE: a prefix may hold _ or %.
            return db.execute("DELETE FROM tokens WHERE key >= ? AND key < ? AND updated < ?",
                              (prefix, prefix + "\U0010ffff", before)).rowcount
        return self._run(self._tx, write, False)

    def _credential(self, row: tuple) -> dict:
        id_, kind, name, data, created, updated = row
        return {"id": id_, "kind": kind, "name": name, "fields": self._opened(data),
                "created": created, "updated": updated}


_CREDENTIAL_COLUMNS = "id, kind, name, data, created, updated"




_ACTION_COLUMNS = ("id, tenant, call, leg, kind, key, payload, created, state, attempts, "
                   "next_at, last_error")


def _action(row: tuple) -> Action:
    (id_, tenant, call, leg, kind, key, payload, created, state, attempts, next_at,
     last_error) = row
    if not math.isfinite(next_at):  # written before Retry-After was bounded
        next_at = 0.0
    return Action(tenant=tenant, call=call, leg=leg, kind=kind, key=key,
                  payload=json.loads(payload), created=created, id=id_, state=state,
                  attempts=attempts, next_at=next_at, last_error=last_error)


def _outcome(leg: dict[str, Any]) -> str:
    """A stored leg's outcome (legs stored before outcomes were neutral have a status)."""
    if "outcome" in leg:
        return leg["outcome"]
    return legacy_outcome(leg.get("status", ""))
