"""IStore: what the engine, dispatcher and admin API need from a database, and its URL parser."""

from __future__ import annotations

from typing import Any

from zope.interface import Interface


class IStore(Interface):
    """Durable state: tenants, the event log, call state, the outbox and its attempt log.

    Every method returns a Deferred and does its database work off the reactor thread.
    """

    def start() -> Any:
        """Open the database and apply pending schema migrations."""

    def stop() -> Any:
        """Finish queued writes and close."""

    def append(events: list) -> Any:
        """Store events (group-committed with concurrent calls); fires with, per event, its
        log sequence number or None when the same PBX event was stored before."""

    def events_after(seq: int, limit: int) -> Any:
        """Up to ``limit`` (seq, Event) pairs after ``seq``, in log order."""

    def fold_cursor() -> Any:
        """The sequence number of the last event the engine folded."""

    def load_calls(keys: list) -> Any:
        """Stored state of the given (tenant, call key) pairs, as a dict."""

    def open_calls() -> Any:
        """State of every call that is not final (to re-arm timers after a restart)."""

    def commit_fold(cursor: int, calls: list, actions: list, stale_legs: list, now: float,
                    held: list, release: list) -> Any:
        """In one transaction: write call states, insert actions (ignoring ones whose
        idempotency key exists), drop pending pop-ups of ended legs, add ``held``
        (tenant, key, error, [(seq, event row)]) to the quarantine (joining a call's earlier
        held events), delete the quarantine rows of ``release`` (re-folded calls), advance
        the cursor.  Fires with (inserted actions with ids, ids of dropped pop-ups)."""

    def quarantined_keys() -> Any:
        """[((tenant, call key), error)] of every quarantined call."""

    def quarantined_events(tenant: int, key: str) -> Any:
        """A quarantined call's held (seq, Event) pairs in log order, or None."""

    def quarantine(tenant: int | None, limit: int) -> Any:
        """Quarantined calls for operators: tenant, call, at, error and held events."""

    def pending_actions() -> Any:
        """Every action still to deliver, oldest first."""

    def record_attempt(action: Any, attempt: Any) -> Any:
        """Save an action's new state and one attempt (group-committed)."""

    def tenants() -> Any:
        """Every tenant, deleted ones included (their outbox may still drain)."""

    def put_tenant(tenant: Any) -> Any:
        """Insert or replace a tenant."""

    def recent_calls(tenant: int, limit: int) -> Any:
        """The tenant's latest calls, each with its actions and their attempts."""

    def actions(state: str | None, tenant: int | None, limit: int) -> Any:
        """Actions in a state, newest first, each with its attempts."""

    def action(action_id: int) -> Any:
        """One action, or None."""

    def prune(events_before: float, actions_before: float, cursor: int) -> Any:
        """Delete old folded events, final calls and settled actions; fires with counts."""

    def stats() -> Any:
        """Counts for health: log head, fold cursor, the failed and dead actions, and the
        quarantined calls."""

    def health(quiet: float) -> Any:
        """``stats()`` plus ``commit_error`` (None when the store can commit; a test write
        when nothing was committed for ``quiet`` seconds or the last commit failed)."""

    def put_pause(bucket: str, until: float) -> Any:
        """Store that a CRM rate-limit bucket (a host) is paused until ``until`` (clock
        seconds), keeping a longer pause already stored; need not be durable."""

    def pauses(now: float) -> Any:
        """Fires with {bucket: until} of the stored pauses still running at ``now``; the
        expired ones are deleted."""


def open_store(url: str, reactor: Any) -> Any:
    """The store a ``--database`` URL names."""
    if url.startswith("sqlite:"):
        from gateway.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:"):], reactor)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:PATH")
