"""The fold: events from the log applied to call state machines; state and actions stored together.

A call whose events cannot be folded (its state machine raises) is quarantined: the events
of the failed batch and every later event of that call are stored with the error instead of
being folded, the other calls of the batch are committed as usual, and the cursor moves on,
so one poison event never stalls the log for other calls and tenants.  An operator re-folds
a quarantined call (``Engine.refold``) after a fix.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Iterable

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger

from gateway.calls import Call, Effect, Policy
from gateway.model import DROPPED, Action, Event, Tenant, e164

log = Logger()


def policy_for(tenant: Tenant | None) -> Policy:
    """The call-model choices of one tenant (defaults when the tenant is gone)."""
    if tenant is None:
        return Policy()
    return Policy(numbers=frozenset(e164(n) for n in tenant.numbers),
                  internal_calls=tenant.option("internal_calls"),
                  grace=float(tenant.option("grace")),
                  queues=frozenset(tenant.pbx.queues), ivrs=frozenset(tenant.pbx.ivrs))


class Engine:
    """Folds the event log into calls, in log order, one batch per transaction.

    Open calls live in memory (and in the store); final calls are dropped from memory and
    reloaded if a late event names them.  Each call has a due time; a single timer fires
    ``expire`` on calls whose due time passed.  An event is only applied after any expiry
    that was due before it arrived, so a restart re-folds to the same result.
    """

    def __init__(self, store: Any, clock: Any, tenant: Callable[[int], Tenant | None],
                 supports: Callable[[Tenant, str, dict], bool],
                 deliver: Callable[[list[Action], list[int]], None],
                 batch: int = 2000) -> None:
        self.store = store
        self.clock = clock
        self.tenant = tenant
        self.supports = supports
        self.deliver = deliver
        self.batch = batch
        self.cursor = 0
        self.calls: dict[tuple[int, str], Call] = {}
        self._timers: list[tuple[float, int, str]] = []
        self._armed: dict[tuple[int, str], float] = {}  # one heap entry per call
        self._timer: Any = None
        self._running = False
        self._again = False
        self._idle: list[Deferred] = []
        self.folded = 0
        self._policies: dict[int, tuple[Tenant | None, Policy]] = {}
        self._broken = False
        self._stopped = False
        self.retry_delay = 1.0
        # Events just appended, by sequence number, handed over by whoever appended them:
        # folded from here instead of being read back from the store.
        self._fresh: dict[int, Event] = {}
        # Quarantined calls (tenant, key) → the error; their events are held, not folded.
        self.quarantined: dict[tuple[int, str], str] = {}
        # Calls found unreadable while loading, to be written to the quarantine with the
        # next commit.
        self._unreadable: dict[tuple[int, str], str] = {}
        self._refolds: list[tuple[tuple[int, str], Deferred]] = []
        # Why the last fold failed and since when (None while folds succeed), for /healthz.
        self.failing_since: float | None = None
        self.last_error = ""

    async def start(self) -> None:
        await self._load()
        await self._fold()
        self._arm()

    async def _load(self) -> None:
        """Cursor and open calls as the store has them (at start and after a failed fold)."""
        self.calls.clear()
        self._timers.clear()
        self._armed.clear()
        self._fresh.clear()
        self.cursor = await self.store.fold_cursor()
        self.quarantined = dict(await self.store.quarantined_keys())
        for data in await self.store.open_calls():
            key = (data.get("tenant"), data.get("key"))
            if key in self.quarantined:
                continue
            try:
                call = Call.from_state(data)
            except Exception as e:
                self._unreadable[key] = f"stored state unreadable: {e!r}"
                self.quarantined[key] = self._unreadable[key]
                log.failure("tenant {tenant} call {call}: stored state unreadable; "
                            "quarantined", tenant=key[0], login=self._login(key[0]),
                            call=key[1])
                continue
            self.calls[key] = call
            self._schedule(call)
        self._broken = False

    def _login(self, tenant_id: int) -> str | None:
        """The tenant's PBX login, for log lines (None once the tenant is gone)."""
        tenant = self.tenant(tenant_id)
        return tenant.pbx.login if tenant is not None else None

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def poke(self, appended: Iterable[tuple[int | None, Event]] = ()) -> None:
        """New events were appended: fold them soon (coalesces many pokes into one fold).

        ``appended``: the (sequence number, event) pairs the append gave (``None`` for a
        duplicate), so the fold need not read them back; anything not handed over is read
        from the store.
        """
        for seq, ev in appended:
            if seq is not None and seq > self.cursor:
                self._fresh[seq] = ev
        if self._running:
            self._again = True
        else:
            ensureDeferred(self._fold()).addErrback(
                lambda f: log.failure("fold crashed outside its own error handling", f))

    def refold(self, tenant: int, key: str) -> Deferred:
        """Fold a quarantined call's held events again (after a fix).

        Fires with None when the call folded, with the new error when it was quarantined
        again, and with ``False`` when the call was not quarantined.
        """
        d: Deferred = Deferred()
        self._refolds.append(((tenant, key), d))
        self.poke()
        return d

    def idle(self) -> Deferred:
        """Fires when the engine has folded everything it was poked for (tests, shutdown)."""
        d: Deferred = Deferred()
        if self._running:
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    async def _fold(self) -> None:
        self._running = True
        try:
            if self._broken:
                await self._load()
            while True:
                self._again = False
                while self._refolds:
                    key, waiter = self._refolds.pop(0)
                    try:
                        result = await self._refold(key)
                    except Exception as e:
                        waiter.errback(e)
                        raise
                    waiter.callback(result)
                rows = self._take_fresh()
                if not rows:
                    rows = await self.store.events_after(self.cursor, self.batch)
                    for seq, _ in rows:
                        self._fresh.pop(seq, None)
                due = self._due_calls()
                if rows or due or self._unreadable:
                    await self._fold_batch(rows, due)
                if len(rows) < self.batch and not self._again:
                    break
        except Exception as e:
            # Calls in memory may hold events whose fold was not committed: reload them
            # from the store before the next try, and try again without waiting for a
            # webhook.  (A call's own failure never gets here: it is quarantined.  This is
            # the store failing to read or commit.)
            if self.failing_since is None:
                self.failing_since = self.clock.seconds()
            self.last_error = repr(e)
            log.failure("fold failed; retrying in {delay} s from the stored state",
                        delay=self.retry_delay)
            self._broken = True
        else:
            self.failing_since = None
            self.last_error = ""
        finally:
            self._running = False
            if not self._broken:
                self._arm()
            elif not self._stopped:
                if self._timer is not None and self._timer.active():
                    self._timer.cancel()
                self._timer = self.clock.callLater(self.retry_delay, self.poke)
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def _take_fresh(self) -> list[tuple[int, Event]]:
        """The handed-over events that follow the cursor without a gap, up to a batch."""
        rows: list[tuple[int, Event]] = []
        seq = self.cursor + 1
        while seq in self._fresh and len(rows) < self.batch:
            rows.append((seq, self._fresh.pop(seq)))
            seq += 1
        return rows

    def _due_calls(self) -> list[tuple[int, str]]:
        now = self.clock.seconds()
        due = []
        while self._timers and self._timers[0][0] <= now:
            _, tenant, key = heapq.heappop(self._timers)
            self._armed.pop((tenant, key), None)
            call = self.calls.get((tenant, key))
            if call is None or call.is_final:
                continue
            if call.due <= now:
                due.append((tenant, key))
            else:  # a later event moved the due time on since this entry was pushed
                self._schedule(call)
        return due

    def _schedule(self, call: Call) -> None:
        key = (call.tenant, call.key)
        armed = self._armed.get(key)
        if armed is None or call.due < armed:
            self._armed[key] = call.due
            heapq.heappush(self._timers, (call.due, call.tenant, call.key))

    async def _refold(self, key: tuple[int, str]) -> str | None | bool:
        held = await self.store.quarantined_events(*key)
        if held is None:
            return False
        self.quarantined.pop(key, None)
        self.calls.pop(key, None)
        # The stored state is the call before its first held event; an open call whose
        # due time passed meanwhile is expired by the fold as usual.
        for k, data in (await self.store.load_calls([key])).items():
            try:
                self.calls[k] = Call.from_state(data)
            except Exception as e:
                self.quarantined[key] = f"stored state unreadable: {e!r}"
                await self._fold_batch([], [], release=[key],
                                       hold={key: (self.quarantined[key], held)})
                return self.quarantined[key]
            if not self.calls[k].is_final:
                self._schedule(self.calls[k])
        await self._fold_batch(held, self._due_calls(), release=[key])
        if key not in self.calls and key not in self.quarantined:
            return None
        return self.quarantined.get(key)

    async def _fold_batch(self, rows: list, due: list[tuple[int, str]],
                          release: list[tuple[int, str]] = (),
                          hold: dict | None = None) -> None:
        """Fold ``rows`` (and expire the ``due`` calls) in one transaction.

        ``release``: quarantined calls whose held events these rows are (a re-fold): the
        cursor stays, and their quarantine rows go in the same commit.
        """
        now = self.clock.seconds()
        refold = bool(release)
        # Held events per quarantined call, and the error for newly quarantined ones.
        held: dict[tuple[int, str], tuple[str, list]] = dict(hold or {})
        held.update((k, (error, [])) for k, error in self._unreadable.items())
        touched: dict[tuple[int, str], Call] = {}
        produced: dict[tuple[int, str], list[Action]] = {}
        stale: dict[tuple[int, str], list[tuple[int, str, str]]] = {}

        def quarantine(key: tuple[int, str], error: BaseException, upto: int = 0) -> None:
            # The call in memory holds this batch's uncommitted changes (from its events
            # in ``rows[:upto]``): forget it, and hold those events; the stored state is the
            # call before them.
            self.calls.pop(key, None)
            self._armed.pop(key, None)
            for pending in (touched, produced, stale):
                pending.pop(key, None)
            text = f"{type(error).__name__}: {error}"[:1000]
            self.quarantined[key] = text
            held[key] = (text, [(seq, ev) for seq, ev in rows[:upto]
                                if (ev.tenant, ev.call) == key])
            log.failure("tenant {tenant} call {call}: cannot be folded; quarantined with "
                        "its events (re-fold it from the admin API after a fix)",
                        tenant=key[0], login=self._login(key[0]), call=key[1])

        def emit(call: Call, effects: list[Effect], tenant: Tenant | None) -> None:
            out = produced.setdefault((call.tenant, call.key), [])
            for effect in effects:
                if tenant is None or not self.supports(tenant, effect.kind, effect.payload):
                    continue
                out.append(Action(tenant=call.tenant, call=call.key, leg=effect.leg,
                                  kind=effect.kind, key=effect.key,
                                  payload=effect.payload, created=now))

        # (Not ``set - self.calls.keys()``: that copies every open call's key per batch.)
        wanted = {(ev.tenant, ev.call) for _, ev in rows
                  if (ev.tenant, ev.call) not in self.calls
                  and (ev.tenant, ev.call) not in self.quarantined}
        if wanted:
            for key, data in (await self.store.load_calls(sorted(wanted))).items():
                try:
                    self.calls[key] = Call.from_state(data)
                except Exception as e:
                    quarantine(key, e)

        for key in due:
            call = self.calls[key]
            try:
                tenant = self.tenant(key[0])
                emit(call, call.expire(self._policy(key[0], tenant)), tenant)
            except Exception as e:
                quarantine(key, e)
                continue
            touched[key] = call
        for i, (seq, ev) in enumerate(rows):
            key = (ev.tenant, ev.call)
            if key in self.quarantined:
                held.setdefault(key, ("", []))[1].append((seq, ev))
                continue
            call = self.calls.get(key)
            if call is None:
                call = self.calls[key] = Call(ev.tenant, ev.call)
            try:
                tenant = self.tenant(ev.tenant)
                policy = self._policy(ev.tenant, tenant)
                if not call.is_final and 0 < call.due <= ev.received:
                    emit(call, call.expire(policy), tenant)
                emit(call, call.event(ev, policy), tenant)
            except Exception as e:
                quarantine(key, e, i + 1)
                continue
            if ev.kind == "hangup":
                # Whatever became of it, a pop-up for a leg that has hung up is stale.
                stale.setdefault(key, []).append((ev.tenant, ev.call, ev.leg))
            touched[key] = call
        cursor = rows[-1][0] if rows and not refold else self.cursor
        actions = [a for out in produced.values() for a in out]
        inserted, dropped = await self.store.commit_fold(
            cursor, [c.to_state() for c in touched.values()], actions,
            [leg for legs in stale.values() for leg in legs], now,
            held=[(t, k, error, [(seq, ev.to_row()) for seq, ev in evs])
                  for (t, k), (error, evs) in held.items()],
            release=list(release))
        self._unreadable.clear()
        self.cursor = cursor
        if not refold:
            self.folded += len(rows)
        if dropped:
            # A pop-up whose leg hung up within this same batch was stored and dropped at
            # once: it must not reach the dispatcher as pending.
            gone = set(dropped)
            for action in inserted:
                if action.id in gone:
                    action.state = DROPPED
        for key, call in touched.items():
            if call.is_final:
                self.calls.pop(key, None)
                self._armed.pop(key, None)
            else:
                self._schedule(call)
        self.deliver(inserted, dropped)

    def _policy(self, tenant_id: int, tenant: Tenant | None) -> Policy:
        """The tenant's policy, rebuilt only when the tenant object changed."""
        cached = self._policies.get(tenant_id)
        if cached is None or cached[0] is not tenant:
            cached = self._policies[tenant_id] = (tenant, policy_for(tenant))
        return cached[1]

    def _arm(self) -> None:
        while self._timers and (self._timers[0][1], self._timers[0][2]) not in self.calls:
            _, tenant, key = heapq.heappop(self._timers)
            self._armed.pop((tenant, key), None)
        if not self._timers:
            return
        delay = max(0.0, self._timers[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if abs(self._timer.getTime() - (self.clock.seconds() + delay)) < 0.001:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self.poke)
