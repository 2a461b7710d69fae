"""A call that cannot be folded is quarantined; every other call and tenant goes on.

Issue 8, case 1: one event made the fold raise, the engine retried that batch forever, and
no later event of any tenant was folded.  Now the call is set aside with its events and the
error, shown in /healthz and the admin API, and re-folded by an operator after a fix.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.model import Event
from gateway.store.sqlite import SQLiteStore
from gateway.web import public
from tests.test_admin import Harness as AdminHarness
from tests.test_admin import eventually, tenant_body
from tests.test_scenarios import (CALL, T0, Folding, answer, dial_in, forms, hangup, leg,
                                  parse_event)

OTHER = "0123456789abcdef0123456789abcdef"


def poison(call: str = CALL, at: float = 70) -> Event:
    """A hangup whose talk time no float can hold: ``round(duration / 1e6)`` overflows."""
    return Event(tenant=807, call=call, leg=leg("101"), kind="hangup", flow="in",
                 at=int((T0 + at) * 1_000_000), received=T0 + at, extension="101",
                 sip="7001*101", peer="+79161234567", did="74951234567", outcome="answered",
                 duration=10**400)


def events_of(call: str, *steps: tuple) -> list[Event]:
    return [parse_event({**form, "CallID": call}, url_event, 807, T0 + at)
            for at, url_event, form in forms(list(steps))]


def kinds(f: Folding, call: str) -> list[tuple[str, Any]]:
    return [(a.kind, a.payload.get("status")) for a in f.produced if a.call == call]


@pytest_twisted.ensureDeferred
async def test_a_poison_event_quarantines_its_call_and_the_log_goes_on(tmp_path: Any) -> None:
    f = await Folding(tmp_path / "q.sqlite").start()
    try:
        good = events_of(OTHER, dial_in("102", 0), answer("102", 5),
                         hangup("102", 65, "ANSWER", seconds=60))
        # One batch: a good call before and after the poison of another call.
        await f.store.append(events_of(CALL, dial_in("101", 0), answer("101", 5))
                             + good[:1] + [poison()] + good[1:])
        await f.settle(5)
        assert list(f.engine.quarantined) == [(807, CALL)]
        assert "OverflowError" in f.engine.quarantined[(807, CALL)]
        assert kinds(f, OTHER) == [("popup", None), ("popup_update", None),
                                   ("record", "success")]
        assert kinds(f, CALL) == []  # the failed batch's pop-up was not kept either
        head = (await f.store.stats())["log_head"]
        assert f.engine.cursor == head and f.engine.failing_since is None
        # Later webhooks of any call still fold.
        await f.store.append(events_of("fedcba9876543210fedcba9876543210",
                                       dial_in("103", 100)))
        await f.settle()
        assert [a.kind for a in f.produced if a.call.startswith("fedcba")] == ["popup"]
        [row] = await f.store.quarantine(None, 10)
        assert (row["tenant"], row["call"]) == (807, CALL)
        assert [e["kind"] for e in row["events"]] == ["ring", "answer", "hangup"]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_quarantined_call_stays_quarantined_after_a_restart(tmp_path: Any) -> None:
    f = await Folding(tmp_path / "q.sqlite").start()
    await f.store.append([poison()])
    await f.settle()
    await f.stop()
    await f.start()
    try:
        assert list(f.engine.quarantined) == [(807, CALL)]
        assert (await f.store.stats())["quarantined"] == 1
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_later_events_of_a_quarantined_call_are_held_and_refolded_after_a_fix(
        tmp_path: Any) -> None:
    """A CRM module's bug on one call: quarantined; fixed; re-folded in log order."""
    broken = {"on": True}

    def supports(tenant: Any, kind: str, payload: dict) -> bool:
        if broken["on"] and kind == "popup":
            raise KeyError("direction")
        return True

    f = await Folding(tmp_path / "q.sqlite", supports).start()
    try:
        await f.append(dial_in("101", 0))
        assert list(f.engine.quarantined) == [(807, CALL)]
        await f.append(answer("101", 5), hangup("101", 65, "ANSWER", seconds=60))
        assert f.produced == []
        [row] = await f.store.quarantine(807, 10)
        assert [e["kind"] for e in row["events"]] == ["ring", "answer", "hangup"]
        assert "KeyError" in row["error"]

        assert await f.engine.refold(807, CALL) == "KeyError: 'direction'"  # not fixed yet
        assert list(f.engine.quarantined) == [(807, CALL)]
        [row] = await f.store.quarantine(807, 10)
        assert len(row["events"]) == 3

        broken["on"] = False
        assert await f.engine.refold(807, CALL) is None
        assert kinds(f, CALL) == [("popup", None), ("popup_update", None), ("record", "success")]
        assert f.engine.quarantined == {} and await f.store.quarantine(None, 10) == []
        assert await f.engine.refold(807, CALL) is False  # nothing left to re-fold
        # Its next events fold as usual.
        await f.append(dial_in("101/fwd", 70))
        assert kinds(f, CALL)[-1] == ("popup", None)
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_call_that_fails_when_its_grace_timer_expires_is_quarantined(
        tmp_path: Any) -> None:
    def supports(tenant: Any, kind: str, payload: dict) -> bool:
        if payload.get("status") == "missed":
            raise ValueError("cannot map a missed call")
        return True

    f = await Folding(tmp_path / "q.sqlite", supports).start()
    try:
        await f.append(dial_in("101", 0), hangup("101", 10, "NOANSWER"))
        await f.settle(5)
        assert list(f.engine.quarantined) == [(807, CALL)]
        assert f.engine.failing_since is None and not f.engine.calls
        # A restart does not load it as an open call again.
        await f.stop()
        await f.start()
        assert not f.engine.calls and list(f.engine.quarantined) == [(807, CALL)]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_a_call_whose_stored_state_is_unreadable_is_quarantined_at_start(
        tmp_path: Any) -> None:
    f = await Folding(tmp_path / "q.sqlite").start()
    await f.append(dial_in("101", 0))
    await f.store.append(events_of(OTHER, dial_in("102", 0)))
    await f.settle()
    await f.stop()
    store = SQLiteStore(f.path, reactor)
    await store.start()
    await store._run(store._tx, lambda db: db.execute(
        "UPDATE calls SET data = json_set(data, '$.state', 'weird') WHERE key = ?", (CALL,)))
    await store.stop()
    await f.start()
    try:
        assert list(f.engine.quarantined) == [(807, CALL)]
        assert list(f.engine.calls) == [(807, OTHER)]
        await f.append(answer("101", 5))
        [row] = await f.store.quarantine(807, 10)
        assert "weird" in row["error"] and [e["kind"] for e in row["events"]] == ["answer"]
    finally:
        await f.stop()


# Through the real gateway: /healthz and the admin API


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any) -> Any:
    harness = AdminHarness(tmp_path)
    await harness.start()
    await harness.create(tenant_body())
    await harness.delivered(1)  # setup/enable
    yield harness
    await harness.stop()


async def health(h: AdminHarness) -> tuple[int, dict]:
    resp = await h.client.get(h._url(0, "/healthz"))
    return resp.code, json.loads(await resp.content())


@pytest_twisted.ensureDeferred
async def test_healthz_and_the_admin_api_show_a_quarantined_call(gateway: AdminHarness) -> None:
    h = gateway
    assert (await health(h))[1]["ok"] is True
    await h.store.append([poison()])
    h.gw.engine.poke()
    await h.gw.engine.idle()
    status, body = await health(h)
    assert status == 200  # webhooks are still stored: keep the node in rotation
    assert body["ok"] is False and body["quarantined_calls"] == 1
    assert body["problems"] == ["1 calls quarantined"]

    listed = (await h.admin("GET", "/api/v1/quarantine?tenant=807")).json()
    assert [(q["tenant"], q["call"]) for q in listed] == [(807, CALL)]
    assert "OverflowError" in listed[0]["error"]
    assert listed[0]["events"][0]["duration"] == 10**400

    again = await h.admin("POST", f"/api/v1/quarantine/807/{CALL}/refold")
    assert again.status == 200 and again.json()["folded"] is False
    assert (await h.admin("POST", "/api/v1/quarantine/807/nosuchcall/refold")).status == 404

    # Another call of the same tenant still reaches the CRM.
    dial = forms([dial_in("102", 0)])[0][2]
    assert (await h.hook({**dial, "CallID": OTHER}, key=h.gw.tenants[807].key)).status == 200
    await h.delivered(2)


@pytest_twisted.ensureDeferred
async def test_refold_all_after_a_fix(gateway: AdminHarness) -> None:
    h = gateway
    original = h.gw.engine.supports

    def buggy(tenant: Any, kind: str, payload: dict) -> bool:
        raise RuntimeError("bug in the CRM module")

    h.gw.engine.supports = buggy
    dial = forms([dial_in("101", 0)])[0][2]
    assert (await h.hook(dial, key=h.gw.tenants[807].key)).status == 200
    await eventually(lambda: h.gw.engine.quarantined)
    h.gw.engine.supports = original
    reply = (await h.admin("POST", "/api/v1/quarantine/refold")).json()
    assert reply == {"folded": [{"tenant": 807, "call": CALL}], "quarantined": []}
    await h.delivered(2)  # the pop-up
    assert (await health(h))[1]["ok"] is True


@pytest_twisted.ensureDeferred
async def test_healthz_is_503_while_the_store_cannot_commit(gateway: AdminHarness) -> None:
    """Case 7: a read-only (or full) store answered every webhook 503 and /healthz 200."""
    h = gateway
    await h.store._run(h.store._db.execute, "PRAGMA query_only=1")
    try:
        dial = forms([dial_in("101", 0)])[0][2]
        resp = await h.client.post(
            h._url(0, f"/events/807/dial-in/TLP55522?key={h.gw.tenants[807].key}"),
            data=dial)
        assert resp.code == 503 and b"not stored" in await resp.content()
        status, body = await health(h)
        assert status == 503 and body["ok"] is False
        assert "store cannot commit" in body["problems"][0]
    finally:
        await h.store._run(h.store._db.execute, "PRAGMA query_only=0")
    status, body = await health(h)
    assert (status, body["ok"]) == (200, True)


@pytest_twisted.ensureDeferred
async def test_healthz_answers_in_bounded_time_when_the_store_hangs(
        gateway: AdminHarness, monkeypatch: Any) -> None:
    h = gateway
    monkeypatch.setattr(public, "HEALTH_TIMEOUT", 0.2)
    frozen = threading.Event()
    h.store._run(frozen.wait, 10)  # the store's one thread blocks, as on a frozen disk
    try:
        started = reactor.seconds()
        status, body = await health(h)
        assert status == 503 and body["problems"] == ["store: no answer within 0.2 s"]
        assert reactor.seconds() - started < 2
    finally:
        frozen.set()


@pytest_twisted.ensureDeferred
async def test_healthz_says_when_the_fold_keeps_failing(gateway: AdminHarness) -> None:
    h = gateway
    commit = h.store.commit_fold

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk I/O error")

    h.store.commit_fold = failing
    try:
        dial = forms([dial_in("101", 0)])[0][2]
        assert (await h.hook(dial, key=h.gw.tenants[807].key)).status == 200
        await h.gw.engine.idle()
        status, body = await health(h)
        assert status == 200 and body["ok"] is False
        assert body["problems"][0].startswith("fold failing for ")
        assert "disk I/O error" in body["problems"][0]
    finally:
        h.store.commit_fold = commit
    await eventually(lambda: h.gw.engine.failing_since is None)
    assert (await health(h))[1]["ok"] is True


# Case 10: the admin API's bodies


@pytest.mark.parametrize("raw", [b"[" * 100_000 + b"]" * 100_000,
                                 b'{"a":' * 50 + b"1" + b"}" * 50,
                                 json.dumps({"name": [[[[[[[[["x"]]]]]]]]]}).encode()])
@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_is_a_400_naming_the_body(gateway: AdminHarness,
                                                           raw: bytes) -> None:
    reply = await gateway.admin("POST", "/api/v1/tenants", raw=raw)
    assert reply.status == 400 and reply.header("Content-Type") == "application/json"
    assert reply.json()["field"] == "body" and "nested" in reply.json()["error"]


@pytest_twisted.ensureDeferred
async def test_an_oversized_admin_body_is_413(gateway: AdminHarness) -> None:
    reply = await gateway.admin("POST", "/api/v1/tenants",
                                raw=json.dumps({"name": "x" * 300_000}).encode())
    assert reply.status == 413 and reply.json()["field"] == "body"
