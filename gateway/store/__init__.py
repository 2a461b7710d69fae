"""IStore: what the engine, dispatcher and admin API need from a database, and its URL parser."""

from __future__ import annotations

from typing import Any

from zope.interface import Interface


class Conflict(Exception):
    """A write would break a uniqueness rule (a second credential with the same kind and
    name); nothing was written.  The admin API answers it with 409."""


class IStore(Interface):
    """Durable state: tenants, the event log, call state, the outbox and its attempt log,
    named credentials and the tokens obtained with them.

    Every method returns a Deferred and does its database work off the reactor thread.
    Times are the caller's clock seconds (``reactor.seconds()``).
    """

    def start() -> Any:
        """Open the database and apply pending schema migrations.  Fails with
        gateway.seal.SealError when the secrets were sealed with another key than the
        store's, or the store has none; seals secrets stored in clear when it has one."""

    def reseal(new: Any) -> Any:
        """Re-seal every sealed secret with ``new`` (a gateway.seal.Sealer) in one
        transaction and use it from then on: rotating the key."""

    def stop() -> Any:
        """Finish queued writes and close; fires when closed."""

    # Event log

    def append(events: list) -> Any:
        """Store events (group-committed with concurrent calls); fires with, per event, its
        log sequence number or None when the same PBX event was stored before."""

    def events_after(seq: int, limit: int) -> Any:
        """Up to ``limit`` (seq, Event) pairs after ``seq``, in log order."""

    def fold_cursor() -> Any:
        """The sequence number of the last event the engine folded (0 before the first)."""

    # Calls

    def load_calls(keys: list) -> Any:
        """Stored state of the given (tenant, call key) pairs, as a dict."""

    def open_calls() -> Any:
        """State of every call that is not final (to re-arm timers after a restart)."""

    def commit_fold(cursor: int, calls: list, actions: list, stale_legs: list, now: float,
                    held: list = (), release: list = ()) -> Any:
        """In one transaction: write call states, insert actions (ignoring ones whose
        idempotency key exists), drop pending pop-ups of ended legs, add ``held``
        (tenant, key, error, [(seq, event row)]) to the quarantine (joining a call's earlier
        held events), delete the quarantine rows of ``release`` (re-folded calls), advance
        the cursor.  An ended leg's pending pop-up and pop-up updates are dropped.  Fires with
        (inserted actions with ids, ids of dropped actions)."""

    # Quarantine

    def quarantined_keys() -> Any:
        """[((tenant, call key), error)] of every quarantined call."""

    def quarantined_events(tenant: int, key: str) -> Any:
        """A quarantined call's held (seq, Event) pairs in log order, or None."""

    def quarantine(tenant: int | None, limit: int) -> Any:
        """Quarantined calls for operators, newest first: tenant, call, at, error and held
        events (each with its seq)."""

    # Outbox

    def pending_actions() -> Any:
        """Every action still to deliver, oldest first."""

    def record_attempt(action: Any, attempt: Any) -> Any:
        """Save an action's new state and one attempt (group-committed)."""

    def retry(action_id: int, now: float) -> Any:
        """Put a dead or failed action back in the queue, due at once and created ``now``;
        fires with the action as stored (unchanged when it was in another state), or None
        when there is no such action."""

    # Tenants

    def tenants() -> Any:
        """Every tenant, deleted ones included (their outbox may still drain)."""

    def put_tenant(tenant: Any, now: float) -> Any:
        """Insert or replace a tenant, secrets included, updated at ``now``."""

    def put_tenant_with_action(tenant: Any, action: Any, now: float) -> Any:
        """``put_tenant`` and, unless ``action`` is None, insert that action (its setup:
        enable or disable the CRM integration) in the same transaction; fires with the
        action carrying its new id, or None."""

    # Reading for operators, housekeeping, health

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

    # CRM rate limits

    def put_pause(bucket: str, until: float) -> Any:
        """Store that a CRM rate-limit bucket (a host) is paused until ``until`` (clock
        seconds), keeping a longer pause already stored; need not be durable."""

    def pauses(now: float) -> Any:
        """Fires with {bucket: until} of the stored pauses still running at ``now``; the
        expired ones are deleted."""

    # Credentials: named PBX or CRM logins an operator creates once and tenants pick by id

    def put_credential(credential: dict, now: float | None = None) -> Any:
        """Insert (no ``"id"``, or ``"id": None``) or replace (``"id"`` given: kind, name
        and fields replaced whole, ``created`` kept) a credential given as
        {"kind": str, "name": str, "fields": {...}}; other keys are ignored.  Fires with
        its id.  Ids are never reused, so a tenant naming a deleted credential never gets
        another one.  ``now`` (default: the store's reactor clock) is ``updated``, and
        ``created`` of a new one.  Fails with ``Conflict`` when another credential has the
        same (kind, name), and with KeyError when ``"id"`` names none, writing nothing
        either way (an id is only ever assigned by the store); with ValueError when kind or
        name is not a non-empty string or fields not a dict.  Durable."""

    def credentials(kind: str | None = None) -> Any:
        """Every credential (of ``kind`` when given), by id: dicts as ``credential``."""

    def credential(credential_id: int) -> Any:
        """{"id", "kind", "name", "fields": {...} (secrets included), "created",
        "updated"}, or None."""

    def delete_credential(credential_id: int) -> Any:
        """Delete a credential; fires with whether it existed.  Tenants naming it are the
        caller's concern (the store does not look into tenants)."""

    # Tokens: what the gateway obtained from a PBX or CRM API (OAuth access and refresh
    # tokens), kept so that a restart does not log in again

    def token(key: str) -> Any:
        """The data stored under ``key`` (say "megaplan:acme.megaplan.ru:robot"), or None."""

    def put_token(key: str, data: dict) -> Any:
        """Store ``data`` (a JSON object) under ``key``, replacing what was there; fires
        with None.  Not group-committed with events and need not be durable (a lost
        token costs one more login with the credential)."""

    def delete_token(key: str) -> Any:
        """Forget the token under ``key`` (say after the API refused it); fires with
        whether there was one."""

    def prune_tokens(prefix: str, before: float) -> Any:
        """Forget every token whose key starts with ``prefix`` written before ``before``
        (state a module keeps for a while only); fires with how many."""


def open_store(url: str, reactor: Any, sealer: Any = None) -> Any:
    """The store a ``--database`` URL names; ``sealer`` (gateway.seal.Sealer) seals its
    secrets."""
    if url.startswith("sqlite:"):
        from gateway.store.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:"):], reactor, sealer=sealer)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:PATH")
