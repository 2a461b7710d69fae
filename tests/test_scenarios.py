"""The call model as a table: Telphin event sequences and the exact Altegio requests they give.

Each row is parsed by the real Telphin parser, folded by the real engine on a real (temporary)
SQLite store with an injected clock, and the actions it stores are turned into the JSON
bodies the Altegio module would POST.  Time between events is the clock advancing; after
the last event the clock runs past every grace timer.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from gateway.crm import altegio
from gateway.engine import Engine
from gateway.model import Tenant
from gateway.protocols.telphin import parse_event
from gateway.store.sqlite import SQLiteStore

CALL = "5f0c1e2a9b3d4c6e8f10a2b3c4d5e6f7"
CLIENT = "+79161234567"
DID = "74951234567"
T0 = 1715677267  # 2024-05-14T09:01:07Z
CRM_TOKEN = "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"

TENANT = Tenant.from_json({
    "id": 807, "name": "ACME", "enabled": True, "key": "k" * 24,
    "pbx": {"kind": "telphin", "login": "TLP55522", "api_url": "http://telphin.test",
            "client_id": "id", "client_secret": "secret", "queues": ["600"], "ivrs": ["500"]},
    "crm": {"kind": "altegio", "api_url": "http://altegio.test", "partner_token": "p",
            "crm_token": CRM_TOKEN},
    "options": {"timezone": "Europe/Moscow", "default_number": DID},
})

# Recordings the fake PBX can resolve; "R-GONE" has no link (the lookup keeps failing).
LINKS = {"R1": "https://storage.telphin.test/R1.mp3", "R2": "https://storage.telphin.test/R2.mp3"}


def leg(ext: str) -> str:
    """A SubCallID per extension; ``101/fwd`` is a second leg of extension 101."""
    ext, _, again = ext.partition("/")
    return f"2005{ext}-0a1b2c3d4e5f60718293a4b5c6d7e8f{'a' if again else '9'}"


def _ext_fields(ext: str) -> dict[str, str]:
    return {"CalledExtension": f"7001*{ext}@sipproxy.telphin.ru", "CalledExtensionID": f"2005{ext}",
            "CalledNumber": f"7001*{ext}"}


def dial_in(ext: str, at: float, caller: str = CLIENT, did: str = DID, **extra: str) -> tuple:
    fields = {"CallFlow": "in", "CallStatus": "CALLING", "CallerIDNum": caller,
              **_ext_fields(ext), **extra}
    if did:
        fields["CalledDID"] = did
    return ("dial-in", ext, at, fields)


def answer(ext: str, at: float, **extra: str) -> tuple:
    return ("answer", ext, at, {"CallFlow": extra.pop("CallFlow", "in"), "CallStatus": "ANSWER",
                                "CallerIDNum": CLIENT, "CalledDID": DID, **_ext_fields(ext),
                                **extra})


def hangup(ext: str, at: float, status: str, seconds: float = 0, rec: str = "",
           **extra: str) -> tuple:
    fields = {"CallFlow": "in", "CallStatus": status, "CallerIDNum": CLIENT, "CalledDID": DID,
              "Duration": str(int(seconds * 1_000_000)), **_ext_fields(ext), **extra}
    if rec:
        fields["RecID"] = rec
    return ("hangup", ext, at, fields)


def dial_out(ext: str, at: float, number: str) -> tuple:
    return ("dial-out", ext, at, {"CallFlow": "out", "CallStatus": "CALLING",
                                  "CallerIDNum": f"7001*{ext}",
                                  "CallerExtension": f"7001*{ext}@sipproxy.telphin.ru",
                                  "CallerExtensionID": f"2005{ext}", "CalledNumber": number})


def out_answer(ext: str, at: float, number: str) -> tuple:
    return ("answer", ext, at, {**dial_out(ext, at, number)[3], "CallStatus": "ANSWER"})


def out_hangup(ext: str, at: float, number: str, status: str, seconds: float = 0) -> tuple:
    return ("hangup", ext, at, {**dial_out(ext, at, number)[3], "CallStatus": status,
                                "Duration": str(int(seconds * 1_000_000))})


def popup(ext: str, phone: str = CLIENT) -> dict[str, Any]:
    return {"command": "event", "type": "incoming", "crm_token": CRM_TOKEN, "phone": phone,
            "diversion": "+" + DID, "user": ext}


def history(ext: str, status: str, duration: int, at: float, record: str,
            type: str = "incoming", phone: str = CLIENT, link: str | None = None) -> dict:
    from datetime import datetime
    from zoneinfo import ZoneInfo

    body = {"command": "history", "type": type, "crm_token": CRM_TOKEN, "phone": phone,
            "diversion": "+" + DID, "user": ext, "duration": duration, "status": status,
            "call_id": f"807-{CALL}-{record}",
            "date": datetime.fromtimestamp(T0 + at, ZoneInfo("Europe/Moscow"))
            .replace(microsecond=0).isoformat()}
    if link:
        body["link"] = link
    return body


ANSWERED_101 = [dial_in("101", 0), answer("101", 5), hangup("101", 88.5, "ANSWER", 83.48, "R1")]

SCENARIOS: dict[str, tuple[list[tuple], list[dict], dict]] = {
    "an answered call straight to an extension gives a pop-up and one answered record": (
        ANSWERED_101,
        [popup("101"), history("101", "success", 83, 0, leg("101"), link=LINKS["R1"])],
        {}),
    "a queue ringing three extensions, answered by the second, gives one record for it": (
        [dial_in("600", 0), dial_in("101", 1), dial_in("102", 1), dial_in("103", 1),
         answer("102", 4), hangup("101", 4, "CANCEL"), hangup("103", 4, "CANCEL"),
         hangup("102", 64, "ANSWER", 60), hangup("600", 64, "ANSWER", Bridged="yes")],
        [popup("101"), popup("102"), popup("103"),
         history("102", "success", 60, 1, leg("102"))],
        {}),
    "a call that ends in the IVR is one missed record for the IVR": (
        [dial_in("500", 0), hangup("500", 10, "ANSWER", 10, Bridged="no")],
        [history("500", "missed", 0, 0, "missed")],
        {}),
    "IVR then queue, nobody answers, IVR hangup first: one missed record for the queue": (
        [dial_in("500", 0), dial_in("600", 5), dial_in("101", 5), hangup("101", 25, "NOANSWER"),
         hangup("500", 30, "ANSWER", 30, Bridged="no"),
         hangup("600", 30, "ANSWER", 25, Bridged="no")],
        [popup("101"), history("600", "missed", 0, 0, "missed")],
        {}),
    "a call straight to an extension that nobody answers is missed for that extension": (
        [dial_in("101", 0), hangup("101", 20, "NOANSWER")],
        [popup("101"), history("101", "missed", 0, 0, "missed")],
        {}),
    "a transferred call gives two records: before and after the transfer": (
        [dial_in("101", 0), answer("101", 3), hangup("101", 33, "ANSWER", 30, "R1"),
         dial_in("102", 33, caller="7001*101", RemoteNumber=CLIENT), answer("102", 35),
         hangup("102", 55, "ANSWER", 20, "R2")],
        [popup("101"), history("101", "success", 30, 0, leg("101"), link=LINKS["R1"]),
         popup("102"), history("102", "success", 20, 33, leg("102"), link=LINKS["R2"])],
        {}),
    "an answered outgoing call gives one outgoing record": (
        [dial_out("101", 0, "89161234567"), out_answer("101", 7, "89161234567"),
         out_hangup("101", 52, "89161234567", "ANSWER", 45)],
        [history("101", "success", 45, 0, leg("101"), type="outgoing")],
        {}),
    "a busy outgoing call gives one outgoing record, missed": (
        [dial_out("101", 0, "89161234567"), out_hangup("101", 3, "89161234567", "BUSY")],
        [history("101", "missed", 0, 0, leg("101"), type="outgoing")],
        {}),
    "an internal call between two extensions is ignored": (
        [dial_out("101", 0, "102"), dial_in("102", 0, caller="7001*101", did=""),
         answer("102", 2), hangup("102", 12, "ANSWER", 10), out_hangup("101", 12, "102", "ANSWER", 10)],
        [],
        {}),
    "every event delivered twice changes nothing": (
        [ev for ev in ANSWERED_101 for _ in range(2)],
        [popup("101"), history("101", "success", 83, 0, leg("101"), link=LINKS["R1"])],
        {}),
    "a hangup before its dial-in still gives the record, and no late pop-up": (
        [ANSWERED_101[2], ANSWERED_101[0], ANSWERED_101[1]],
        [history("101", "success", 83, 88.5 - 83.48, leg("101"), link=LINKS["R1"])],
        {}),
    "a call to a number outside the virtual-number filter gives nothing": (
        ANSWERED_101 + [dial_in("102", 100), hangup("102", 110, "NOANSWER")],
        [],
        {"numbers": ("74950000000",)}),
    "a call through a filtered number passes the filter": (
        ANSWERED_101,
        [popup("101"), history("101", "success", 83, 0, leg("101"), link=LINKS["R1"])],
        {"numbers": ("84951234567",)}),
    "a record whose recording cannot be resolved goes without a link": (
        [dial_in("101", 0), answer("101", 5), hangup("101", 88.5, "ANSWER", 83.48, "R-GONE")],
        [popup("101"), history("101", "success", 83, 0, leg("101"))],
        {}),
    "a record with no recording at all has no link": (
        [dial_in("101", 0), answer("101", 5), hangup("101", 88.5, "ANSWER", 83.48)],
        [popup("101"), history("101", "success", 83, 0, leg("101"))],
        {}),
    "a call forwarded to a mobile and answered there is one incoming record, no missed": (
        [dial_in("600", 0), dial_in("101", 1), hangup("101", 21, "NOANSWER"),
         ("dial-out", "101/fwd", 21, {**dial_out("101", 21, "89031112233")[3],
                                      "Transfered": "yes"}),
         ("answer", "101/fwd", 25, {**out_answer("101", 25, "89031112233")[3],
                                    "Transfered": "yes"}),
         ("hangup", "101/fwd", 85, {**out_hangup("101", 85, "89031112233", "ANSWER", 60)[3],
                                    "Transfered": "yes"}),
         hangup("600", 85, "ANSWER", Bridged="yes")],
        [popup("101"), history("101", "success", 60, 21, leg("101/fwd"))],
        {}),
    "SIP routing sends the SIP account as the user": (
        ANSWERED_101,
        [popup("7001*101"),
         history("7001*101", "success", 83, 0, leg("101"), link=LINKS["R1"])],
        {"routing": "sip"}),
}


def forms(events: list[tuple]) -> list[tuple[float, str, dict[str, str]]]:
    """Table rows as (seconds after T0, URL event, the whole form the PBX posts)."""
    return [(at, url_event, {"EventType": url_event, "CallID": CALL, "SubCallID": leg(ext),
                             "EventTime": str(int((T0 + at) * 1_000_000)), **fields})
            for url_event, ext, at, fields in events]


def altegio_supports(tenant: Tenant, kind: str, payload: dict) -> bool:
    return altegio.supports(kind, payload)


async def fold(tmp_path: Any, steps: list[tuple[float, str, dict[str, str]]],
               tenant: Tenant) -> list[dict]:
    """Run (time, URL event, form) steps through parser, engine and store; the Altegio
    bodies, in action order."""
    store = SQLiteStore(str(tmp_path / "scenario.sqlite"), reactor)
    await store.start()
    clock = Clock()
    clock.advance(1_800_000_000)  # gateway time; PBX times are in the events
    produced = []
    engine = Engine(store, clock, {tenant.id: tenant}.get,
                    altegio_supports,
                    lambda inserted, dropped: produced.extend(inserted))
    try:
        await engine.start()
        elapsed = 0.0
        for at, url_event, form in steps:
            clock.advance(max(0.0, at - elapsed))
            elapsed = max(elapsed, at)
            await store.append([parse_event(form, url_event, tenant.id, clock.seconds())])
            engine.poke()
            await engine.idle()
        for _ in range(2):  # past the grace period, then past the longest call timeout
            clock.advance(5 * 3600)
            await engine.idle()
        assert not engine.calls, "every call is final once its timers ran out"
    finally:
        engine.stop()
        await store.stop()
    return [altegio.build(tenant, action, LINKS.get(action.payload.get("recording", "")))
            for action in produced]


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest_twisted.ensureDeferred
async def test_scenario(tmp_path: Any, name: str) -> None:
    events, expected, changes = SCENARIOS[name]
    tenant = attrs.evolve(TENANT, **changes)
    assert await fold(tmp_path, forms(events), tenant) == expected


class Folding:
    """A store and an engine on a test clock; what the engine hands the dispatcher."""

    def __init__(self, path: Any, supports: Any = lambda *a: True) -> None:
        self.path, self.supports = str(path), supports
        self.clock = Clock()
        self.clock.advance(T0)  # gateway time near the PBX times in the events
        self.produced: list = []

    async def start(self) -> "Folding":
        self.store = SQLiteStore(self.path, reactor)
        await self.store.start()
        self.engine = Engine(self.store, self.clock, {807: TENANT}.get, self.supports,
                             lambda inserted, dropped: self.produced.extend(inserted))
        await self.engine.start()
        return self

    async def stop(self) -> None:
        self.engine.stop()
        await self.store.stop()

    async def append(self, *steps: tuple, fold: bool = True) -> None:
        for _, url_event, form in forms(list(steps)):
            await self.store.append([parse_event(form, url_event, 807, self.clock.seconds())])
            if fold:
                await self.settle()

    async def settle(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        self.engine.poke()
        await self.engine.idle()


@pytest_twisted.ensureDeferred
async def test_missed_call_waits_for_the_grace_period(tmp_path: Any) -> None:
    """The IVR's hangup alone does not decide: the queue's may follow within the grace."""
    f = await Folding(tmp_path / "grace.sqlite").start()
    try:
        await f.append(dial_in("500", 0), hangup("500", 10, "ANSWER", Bridged="no"))
        await f.settle(2.9)
        assert f.produced == []
        await f.settle(0.2)
        assert [a.payload["status"] for a in f.produced] == ["missed"]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_grace_timer_survives_a_restart(tmp_path: Any) -> None:
    """A call waiting for its grace period when the process stops is decided after restart."""
    f = await Folding(tmp_path / "restart.sqlite").start()
    await f.append(dial_in("101", 0), hangup("101", 10, "NOANSWER"))
    await f.stop()
    assert [a.kind for a in f.produced] == ["popup", "close_popup"]  # supports everything

    f.clock.advance(10)  # the process was down past the due time
    await f.start()
    await f.engine.idle()
    await f.stop()
    assert [(a.kind, a.payload["status"]) for a in f.produced[2:]] == [("record", "missed")]


@pytest_twisted.ensureDeferred
async def test_a_failed_fold_loses_nothing(tmp_path: Any) -> None:
    """A fold whose commit fails is redone from the stored state, on a timer of its own."""
    f = await Folding(tmp_path / "fail.sqlite").start()
    commit = f.store.commit_fold
    failures = []

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(args)
            raise sqlite3.OperationalError("disk I/O error")
        return commit(*args, **kwargs)

    f.store.commit_fold = fail_once
    try:
        await f.append(dial_in("101", 0), answer("101", 5), hangup("101", 65, "ANSWER"),
                       fold=False)
        await f.settle()
        assert failures and f.produced == []
        f.clock.advance(f.engine.retry_delay)  # no webhook comes to poke it
        await f.engine.idle()
        assert [(a.kind, a.payload.get("status")) for a in f.produced] == [
            ("popup", None), ("popup_update", None), ("record", "success")]
        assert f.engine.cursor == (await f.store.stats())["log_head"]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_popup_of_a_leg_that_ended_in_the_same_batch_is_not_sent(tmp_path: Any) -> None:
    """Ring and hangup folded together: the pop-up is stored, but as dropped."""
    f = await Folding(tmp_path / "batch.sqlite", altegio_supports).start()
    try:
        await f.append(dial_in("101", 0), hangup("101", 10, "NOANSWER"), fold=False)
        await f.settle()  # one fold for both events
        await f.settle(TENANT.option("grace") + 0.1)  # the missed call is decided
        assert [(a.kind, a.state) for a in f.produced] == [("popup", "dropped"),
                                                          ("record", "pending")]
        assert [a["state"] for a in await f.store.actions(None, 807, 10)] == ["pending",
                                                                            "dropped"]
    finally:
        await f.stop()


@pytest_twisted.ensureDeferred
async def test_events_handed_over_are_folded_without_reading_them_back(tmp_path: Any) -> None:
    """The webhook hands the engine what it appended; a gap is read from the store."""
    f = await Folding(tmp_path / "fresh.sqlite", altegio_supports).start()
    reads: list[int] = []
    events_after = f.store.events_after

    def counted(seq: int, limit: int) -> Any:
        reads.append(seq)
        return events_after(seq, limit)

    f.store.events_after = counted
    try:
        steps = forms([dial_in("101", 0), answer("101", 5), hangup("101", 65, "ANSWER")])
        evs = [parse_event(form, url_event, 807, f.clock.seconds())
               for _, url_event, form in steps]
        seqs = await f.store.append(evs[:1])
        f.engine.poke(zip(seqs, evs[:1]))
        await f.engine.idle()
        assert reads == [] and [a.kind for a in f.produced] == ["popup"]
        # The answer is appended but not handed over; the hangup is: a gap.
        await f.store.append(evs[1:2])
        seqs = await f.store.append(evs[2:])
        f.engine.poke(zip(seqs, evs[2:]))
        await f.settle(TENANT.option("grace") + 0.1)
        assert reads and [(a.kind, a.payload.get("status")) for a in f.produced] == [
            ("popup", None), ("record", "success")]
        assert f.engine.cursor == (await f.store.stats())["log_head"]
    finally:
        await f.stop()
