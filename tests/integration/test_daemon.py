"""The real daemon (``twistd -n gateway``) against the fake Telphin and Altegio, over TCP.

Each test gets its own directory, database and ports, and kills every process it started.
Waits are bounded polls; the whole file is meant to run well under 90 s.
"""

from __future__ import annotations

import collections
import signal
import time
from datetime import datetime, timezone
from typing import Any

from tests.integration.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    CRM_TOKEN,
    PARTNER_TOKEN,
    Gateway,
    Processes,
    TelphinCall,
    kill_during_burst,
    new_key,
    start_fake,
    tenant_body,
    wait_for,
)

CLIENT = "+79161234567"
DIVERSION = "+74951234567"


class Deployment:
    """A gateway with tenant 807 wired to a fake Telphin and a fake Altegio."""

    def __init__(self, procs: Processes, gateway_args: tuple[str, ...] = ()) -> None:
        self.altegio = start_fake(procs, "altegio", "--partner-token", PARTNER_TOKEN)
        self.telphin = start_fake(procs, "telphin", "--client", f"{CLIENT_ID}:{CLIENT_SECRET}")
        self.gateway = Gateway(procs, procs.tmp, gateway_args).start()
        self.key = new_key()
        status, body = self.gateway.admin("POST", "/api/v1/tenants",
                                          tenant_body(self.telphin, self.altegio, self.key))
        assert status == 201, body
        # The gateway enables the chain before anything else.
        wait_for(lambda: CRM_TOKEN in self.altegio.state()["enabled"], 10,
                 "setup/enable at the fake Altegio")

    def send(self, step: tuple[str, dict[str, str]]) -> int:
        event, fields = step
        return self.gateway.event(event, fields, self.key)

    def post(self, *steps: tuple[str, dict[str, str]]) -> None:
        for step in steps:
            status = self.send(step)
            assert status == 200, f"{step[0]} answered {status}"

    def histories(self) -> list[dict[str, Any]]:
        return self.altegio.received("history")

    def events(self) -> list[dict[str, Any]]:
        return self.altegio.received("event")

    def calls(self) -> dict[str, dict]:
        status, body = self.gateway.admin("GET", "/api/v1/tenants/807/calls?limit=1000")
        assert status == 200, body
        return {call["call"]: call for call in body}


def iso(micros: int) -> str:
    """The date Altegio should get for a PBX time: ISO-8601 with an offset (tenant in UTC)."""
    return datetime.fromtimestamp(micros / 1e6, timezone.utc).replace(microsecond=0).isoformat()


def popup(user: str) -> dict[str, str]:
    """The ``event`` body of a pop-up for the client's incoming call to ``user``."""
    return {"command": "event", "type": "incoming", "crm_token": CRM_TOKEN, "phone": CLIENT,
            "diversion": DIVERSION, "user": user}


def by_call_id(histories: list[dict]) -> collections.Counter:
    return collections.Counter(h.get("call_id") for h in histories)


def strip_at(bodies: list[dict]) -> list[dict]:
    return [{k: v for k, v in b.items() if k != "_at"} for b in bodies]


# 1. End to end


def test_answered_and_missed_calls_reach_altegio(procs: Processes) -> None:
    d = Deployment(procs)
    alt = d.altegio
    record_url = "https://storage.telphin.ru/rec/7001/acme-call.mp3?sig=ab12"

    # An answered, recorded incoming call to 101.
    call = TelphinCall(ext="101", ext_id="200501")
    d.telphin.setup(records={call.rec_id: record_url})
    d.post(call.dial_in())
    # The phone rings for a while: the pop-up is shown during it.
    wait_for(lambda: len(d.events()) == 1, 10, "the pop-up for 101")
    d.post(call.answer(), call.hangup("ANSWER", duration_us=83_479_977, recorded=True))
    wait_for(lambda: call.record_id in by_call_id(d.histories()), 15, "the answered record")

    # A call straight to extension 102 that nobody answers.
    missed = TelphinCall(ext="102", ext_id="200502")
    d.post(missed.dial_in())
    wait_for(lambda: len(d.events()) == 2, 10, "the pop-up for 102")
    hung_up = time.time()
    d.post(missed.hangup("NOANSWER", duration_us=0))
    wait_for(lambda: missed.missed_id in by_call_id(d.histories()), 15, "the missed record")
    d.gateway.wait_drained(10)

    received = alt.state()["received"]
    assert not [e for e in received if e["ignored"]], "something arrived before setup/enable"
    bodies = [e["body"] for e in received]
    assert bodies[0] == {"command": "setup", "type": "enable", "crm_token": CRM_TOKEN}
    assert [b for b in bodies if b["command"] == "setup"] == bodies[:1]
    assert strip_at(d.events()) == [popup("101"), popup("102")]
    histories = d.histories()
    assert strip_at(histories) == [
        {"command": "history", "type": "incoming", "crm_token": CRM_TOKEN, "phone": CLIENT,
         "diversion": DIVERSION, "user": "101", "duration": 83, "status": "success",
         "call_id": call.record_id, "date": iso(call.ring_at), "link": record_url},
        {"command": "history", "type": "incoming", "crm_token": CRM_TOKEN, "phone": CLIENT,
         "diversion": DIVERSION, "user": "102", "duration": 0, "status": "missed",
         "call_id": missed.missed_id, "date": iso(missed.ring_at)},
    ]
    assert call.call_id in call.record_id
    # The missed call was decided only after the grace period (3 s by default).
    assert histories[1]["_at"] - hung_up >= 2.9, histories[1]["_at"] - hung_up

    # The link came from Telphin's storage_url, with one token.
    tstate = d.telphin.state()
    assert tstate["tokens_issued"] == 1
    assert [(r["path"], r["status"]) for r in tstate["requests"]] == [
        (f"/api/ver1.0/client/@me/record/{call.rec_id}/storage_url/", 200)]


# 2. kill -9 during a burst


def test_kill_during_burst_loses_nothing_and_sends_nothing_twice(procs: Processes) -> None:
    d = Deployment(procs)
    d.altegio.refuse()
    calls = [TelphinCall(ext=str(101 + i % 20), ext_id=str(200501 + i % 20))
             for i in range(120)]
    done, killed_after = kill_during_burst(d.send, [(call,) for call in calls],
                                           d.gateway.proc.kill)
    assert 10 <= len(done) < len(calls), (len(done), killed_after)

    restarting = time.monotonic()
    d.gateway.start()
    d.altegio.accept()
    health = d.gateway.wait_drained(60)
    assert not {"failed", "dead"} & set(health["actions"]), health
    print(f"burst: {len(done)} of {len(calls)} calls acknowledged, SIGKILL after "
          f"{killed_after:.1f} s; restart + drain {time.monotonic() - restarting:.1f} s; "
          f"{d.altegio.state()['rejected_rate_limited']} answers 429 from the fake")

    counts = by_call_id(d.histories())
    twice = {cid: n for cid, n in counts.items() if n > 1}
    assert not twice, f"delivered more than once: {twice}"
    ours = {c.record_id: c.call_id for c in calls}
    assert set(counts) <= set(ours), set(counts) - set(ours)
    lost = sorted(c.call_id for c in calls if c.call_id in done and c.record_id not in counts)
    assert not lost, f"{len(lost)} of {len(done)} acknowledged calls never reached Altegio"
    for h in d.histories():
        assert h["status"] == "success" and h["duration"] == 12, h


# 3. Altegio down, then failing, then back


def test_altegio_outage_retries_records_and_drops_stale_popups(procs: Processes) -> None:
    d = Deployment(procs, ("--max-age", "600"))
    alt = d.altegio
    record_url = "https://storage.telphin.ru/rec/7001/outage.mp3"

    alt.refuse()  # connection refused
    outage = time.monotonic()
    a1, a2, a3 = (TelphinCall(ext="101", ext_id="200501") for _ in range(3))
    d.telphin.setup(records={a1.rec_id: record_url})
    ringing = TelphinCall(ext="103", ext_id="200503")
    d.post(ringing.dial_in())  # still ringing when Altegio comes back
    d.post(a1.dial_in(), a1.answer(), a1.hangup("ANSWER", 31_600_000, recorded=True))
    d.post(a2.dial_in(), a2.answer(), a2.hangup("ANSWER", 5_400_000))
    missed = TelphinCall(ext="102", ext_id="200502")  # rang and ended during the outage
    d.post(missed.dial_in(), missed.hangup("NOANSWER"))
    wait_for(lambda: time.monotonic() - outage >= 3, 5, "3 s of refused connections")

    alt.accept()
    seen = alt.faults(fail_status=503)["requests_seen"]  # up, but answering 503
    d.post(a3.dial_in(), a3.answer(), a3.hangup("ANSWER", 60_200_000))
    wait_for(lambda: alt.state()["faults"]["requests_seen"] > seen and
             time.monotonic() - outage >= 6, 10, "3 s of 503 answers")
    alt.clear_faults()
    back = time.time()

    expected = {a1.record_id: 32, a2.record_id: 5, a3.record_id: 60, missed.missed_id: 0}
    wait_for(lambda: set(expected) <= set(by_call_id(d.histories())), 40,
             "every record after the outage")
    wait_for(lambda: d.events(), 10, "the pop-up of the call still ringing")
    d.gateway.wait_drained(30)
    recovered = time.time() - back

    histories = d.histories()
    assert by_call_id(histories) == {cid: 1 for cid in expected}
    for h in histories:
        assert h["duration"] == expected[h["call_id"]]
        assert h["status"] == ("missed" if h["call_id"] == missed.missed_id else "success")
    assert [h.get("link") for h in histories if h["call_id"] == a1.record_id] == [record_url]
    # The call still ringing when Altegio came back got its pop-up, once; the calls that
    # had ended during the outage got none.
    assert strip_at(d.events()) == [popup("103")]

    # The operator's view: every record was retried, through both kinds of failure.
    calls = d.calls()
    statuses = []
    for call in (a1, a2, a3, missed):
        actions = calls[call.call_id]["actions"]
        records = [a for a in actions if a["kind"] == "record"]
        assert len(records) == 1 and records[0]["state"] == "done", records
        log = records[0]["attempt_log"]
        assert [a["outcome"] for a in log] == ["retry"] * (len(log) - 1) + ["done"], log
        # One pop-up per leg, stored as dropped: never shown late.
        assert [a["state"] for a in actions if a["kind"] == "popup"] == ["dropped"], actions
        # A record waits behind its call's pop-up, so the retries of a call may all be
        # the pop-up's: count the call's attempts together.
        retries = [a for action in actions for a in action["attempt_log"]
                   if a["outcome"] == "retry"]
        assert retries, actions
        statuses += [a["status"] for a in retries]
    assert None in statuses, "no attempt met the refused connection"
    assert 503 in statuses, "no attempt met the 503 answers"

    # The call that was ringing through the outage ends normally afterwards.
    d.post(ringing.answer(), ringing.hangup("ANSWER", 9_000_000))
    wait_for(lambda: ringing.record_id in by_call_id(d.histories()), 15, "the last record")
    d.gateway.wait_drained(10)
    assert by_call_id(d.histories())[ringing.record_id] == 1
    assert strip_at(d.events()).count(popup("103")) == 1
    print(f"outage: everything delivered {recovered:.1f} s after Altegio recovered")


def test_popup_of_a_call_that_ended_is_never_shown_late(procs: Processes) -> None:
    d = Deployment(procs)
    alt = d.altegio
    # Altegio takes the connection and does not answer: the pop-up's first try hangs.
    seen = alt.faults(hang=True)["requests_seen"]
    call = TelphinCall()
    d.post(call.dial_in())
    wait_for(lambda: alt.state()["faults"]["requests_seen"] > seen, 10,
             "the pop-up's try to reach Altegio")
    d.post(call.answer(), call.hangup("ANSWER", 4_000_000))
    wait_for(lambda: any(a["kind"] == "record" for a in
                         d.calls().get(call.call_id, {}).get("actions", [])),
             10, "the hangup to be folded")
    # Now the hung try fails (503) and Altegio recovers.
    alt.faults(hang=False, fail_status=503, fail_count=1)
    wait_for(lambda: call.record_id in by_call_id(d.histories()), 15, "the record")
    d.gateway.wait_drained(10)
    assert d.events() == [], "a pop-up was shown after its call had ended"


# 4. Clean shutdown


def test_sigterm_shuts_down_cleanly(procs: Processes) -> None:
    d = Deployment(procs)
    call = TelphinCall()
    d.post(call.dial_in())
    wait_for(lambda: d.events(), 10, "the pop-up")
    proc = d.gateway.proc
    stopping = time.monotonic()
    proc.signal(signal.SIGTERM)
    rc = proc.wait(5)
    took = time.monotonic() - stopping
    log = proc.output()
    # twistd stops the service, then re-raises SIGTERM on itself so that a supervisor sees
    # "ended by SIGTERM" (twisted.application.app._exitWithSignal): -15 is a clean exit.
    assert rc in (0, -signal.SIGTERM), rc
    assert "Server Shut Down." in log, log[-2000:]
    assert "Traceback" not in log and "Unhandled" not in log, log[-4000:]
    assert took < 5

    # Nothing was lost: the open call is still open after a restart on the same database.
    d.gateway.start()
    status, health = d.gateway.healthz()
    assert health["open_calls"] == 1 and health["outbox_depth"] == 0, health
    assert call.call_id in d.calls()
