"""The fold's corners: the tenant's policy at expiry, late events of broken calls, re-folds.

tests/test_quarantine.py and the scenario tables pin the fold's rules; these pin what they
leave free: a call decided by its timer uses its tenant's choices (not the defaults), a late
event of a final call whose stored state is unreadable quarantines that call instead of
failing the fold, a re-fold never moves the log cursor, and a call whose state was repaired
is re-folded and expires as usual.  Found by ``make mutate``.
"""

from __future__ import annotations

from typing import Any

import attrs
import pytest_twisted
from twisted.internet import reactor

from gateway.engine import Engine, policy_for
from gateway.model import Tenant
from gateway.store.sqlite import SQLiteStore
from tests.test_quarantine import OTHER, events_of
from tests.test_scenarios import CALL, TENANT, Folding, dial_in, hangup, leg


def test_a_tenants_policy_carries_its_numbers_options_queues_and_ivrs() -> None:
    tenant = attrs.evolve(TENANT, numbers=("84951234567",),
                          options={**TENANT.options, "grace": 7, "internal_calls": True})
    policy = policy_for(tenant)
    assert policy.numbers == frozenset({"74951234567"})
    assert (policy.grace, policy.internal_calls) == (7.0, True)
    assert (policy.queues, policy.ivrs) == (frozenset({"600"}), frozenset({"500"}))


async def corrupt(path: str, call: str = CALL) -> None:
    store = SQLiteStore(path, reactor)
    await store.start()
    await store._run(store._tx, lambda db: db.execute(
        "UPDATE calls SET data = json_set(data, '$.state', 'weird') WHERE key = ?", (call,)))
    await store.stop()


async def repair(f: Folding, call: str = CALL, state: str = "open") -> None:
    await f.store._run(f.store._tx, lambda db: db.execute(
        "UPDATE calls SET data = json_set(data, '$.state', ?) WHERE key = ?", (state, call)))


class TenantFolding(Folding):
    """Folding for another version of the test tenant."""

    def __init__(self, path: Any, tenant: Tenant) -> None:
        super().__init__(path)
        self.tenant = tenant

    async def start(self) -> "TenantFolding":
        self.store = SQLiteStore(self.path, reactor)
        await self.store.start()
        self.engine = Engine(self.store, self.clock, {807: self.tenant}.get, self.supports,
                             lambda inserted, dropped: self.produced.extend(inserted))
        await self.engine.start()
        return self


@pytest_twisted.ensureDeferred
async def test_a_call_decided_by_its_timer_uses_its_tenants_number_filter(tmp_path: Any) -> None:
    outside = attrs.evolve(TENANT, numbers=("74950000000",))
    f = await TenantFolding(tmp_path / "e.sqlite", outside).start()
    try:
        await f.append(dial_in("101", 0), hangup("101", 20, "NOANSWER"))
        await f.settle(3600)
        assert f.produced == [] and not f.engine.calls
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_late_event_of_a_final_call_whose_state_is_unreadable_quarantines_it(
        tmp_path: Any) -> None:
    f = await Folding(tmp_path / "e.sqlite").start()
    await f.append(dial_in("101", 0), hangup("101", 20, "NOANSWER"))
    await f.settle(3600)  # final, and gone from memory
    assert not f.engine.calls
    await f.stop()
    await corrupt(f.path)
    await f.start()
    try:
        await f.store.append(events_of(CALL, hangup("102", 4000, "NOANSWER")))
        await f.settle()
        assert list(f.engine.quarantined) == [(807, CALL)]
        assert "weird" in f.engine.quarantined[(807, CALL)]
        assert f.engine.failing_since is None
        assert f.engine.cursor == (await f.store.stats())["log_head"]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_refold_keeps_the_cursor_and_a_held_call_stays_out_of_memory(
        tmp_path: Any) -> None:
    f = await Folding(tmp_path / "e.sqlite").start()
    await f.append(dial_in("101", 0))
    await f.stop()
    await corrupt(f.path)
    await f.start()
    try:
        assert list(f.engine.quarantined) == [(807, CALL)]
        await f.append(hangup("101", 20, "NOANSWER"))
        assert (807, CALL) not in f.engine.calls  # held, not loaded
        head = (await f.store.stats())["log_head"]
        folded = f.engine.folded

        error = await f.engine.refold(807, CALL)  # still unreadable
        await f.engine.idle()
        assert error.startswith("stored state unreadable: ValueError(") and "weird" in error
        assert f.engine.quarantined[(807, CALL)] == error
        [row] = await f.store.quarantine(807, 10)
        assert row["error"] == error and [e["kind"] for e in row["events"]] == ["hangup"]
        assert (f.engine.cursor, f.engine.folded) == (head, folded)

        await repair(f)
        assert await f.engine.refold(807, CALL) is None
        assert f.engine.quarantined == {} and await f.store.quarantine(None, 10) == []
        assert (f.engine.cursor, f.engine.folded) == (head, folded)
        await f.engine.idle()  # the re-fold's own fold pass
        assert [a.kind for a in f.produced] == ["popup", "close_popup"]  # popup: before the restart
        await f.settle(5)  # the repaired call's grace timer runs as for any call
        assert [a.kind for a in f.produced] == ["popup", "close_popup", "record"]
        assert f.produced[-1].payload["status"] == "missed"
        assert not f.engine.calls
    finally:
        await f.stop()


def ended_101() -> list[tuple]:
    """Extension 101 rings and nobody answers: due at T0 + 20 + the 3 s grace."""
    return [dial_in("101", 0), hangup("101", 20, "NOANSWER")]


@pytest_twisted.ensureDeferred
async def test_an_event_that_arrives_exactly_at_the_due_time_finds_the_call_decided(
        tmp_path: Any) -> None:
    f = await Folding(tmp_path / "e.sqlite").start()
    try:
        await f.store.append(events_of(CALL, *ended_101()))
        await f.settle()
        # Stored with its arrival time before the timer ran (a restart replays it so).
        await f.store.append(events_of(CALL, dial_in("102", 23)))
        await f.settle()
        assert [(a.kind, a.leg) for a in f.produced] == [
            ("popup", leg("101")), ("close_popup", leg("101")), ("record", "")]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_one_call_failing_at_expiry_does_not_keep_the_others_open(tmp_path: Any) -> None:
    def supports(tenant: Any, kind: str, payload: dict) -> bool:
        if payload.get("status") == "missed" and payload.get("extension") == "102":
            raise ValueError("cannot map this missed call")
        return True

    f = await Folding(tmp_path / "e.sqlite", supports).start()
    try:
        # Both due at the same time; OTHER's key sorts first, and it is the one that fails.
        await f.store.append(events_of(OTHER, dial_in("102", 0), hangup("102", 20, "NOANSWER"))
                             + events_of(CALL, *ended_101()))
        await f.settle()
        await f.settle(30)
        assert list(f.engine.quarantined) == [(807, OTHER)]
        assert [(a.call, a.payload["status"]) for a in f.produced if a.kind == "record"] == [
            (CALL, "missed")]
        assert not f.engine.calls
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_call_quarantined_in_a_batch_keeps_its_pending_popups(tmp_path: Any) -> None:
    f = await Folding(tmp_path / "e.sqlite").start()
    try:
        await f.append(dial_in("101", 0))
        # One batch: 101 hangs up (its pop-up would be stale), then a talk on 102 cannot be
        # folded: the whole batch of the call is held, so 101's pop-up stays as it was.
        poison = attrs.evolve(events_of(CALL, hangup("102", 10, "ANSWER", 5))[0],
                              duration=10**400)
        await f.store.append(events_of(CALL, hangup("101", 10, "NOANSWER")) + [poison])
        await f.settle()
        assert list(f.engine.quarantined) == [(807, CALL)]
        pending = await f.store.pending_actions()
        assert [a.leg for a in pending if a.kind == "popup"] == [leg("101")]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_later_event_of_a_quarantined_call_does_not_bring_it_back_into_memory(
        tmp_path: Any) -> None:
    def supports(tenant: Any, kind: str, payload: dict) -> bool:
        if kind == "close_popup":
            raise KeyError("direction")
        return True

    f = await Folding(tmp_path / "e.sqlite", supports).start()
    try:
        await f.append(dial_in("101", 0))  # folded and stored
        await f.append(hangup("101", 20, "NOANSWER"))  # cannot be folded
        assert list(f.engine.quarantined) == [(807, CALL)]
        await f.append(dial_in("102", 30))  # held with it
        assert (807, CALL) not in f.engine.calls
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_repaired_call_with_no_held_events_is_decided_at_its_refold(
        tmp_path: Any) -> None:
    f = await Folding(tmp_path / "e.sqlite").start()
    await f.store.append(events_of(CALL, *ended_101()))
    await f.settle()
    await f.stop()
    await corrupt(f.path)
    f.clock.advance(60)  # its due time passes while it is quarantined
    await f.start()
    try:
        assert list(f.engine.quarantined) == [(807, CALL)]
        await repair(f)
        assert await f.engine.refold(807, CALL) is None
        await f.engine.idle()
        assert [(a.kind, a.payload.get("status")) for a in f.produced][-1] == ("record", "missed")
        assert not f.engine.calls
    finally:
        await f.stop()
