"""Every PBX × every CRM on the real daemon: the same answered call, missed call and
click-to-call for each pair.  The pairs come from the drivers in matrix.py: a new module
adds its driver there, and its row or column here, without new test code."""

from __future__ import annotations

import json
import secrets

import pytest

from tests.integration.harness import TENANT_ID, Processes, burst, wait_for
from tests.integration.matrix import CRMS, PBXS, Pair


@pytest.mark.parametrize("crm", sorted(CRMS))
@pytest.mark.parametrize("pbx", sorted(PBXS))
def test_answered_missed_and_click_to_call(procs: Processes, pbx: str, crm: str) -> None:
    pair = Pair(procs, pbx, crm)
    base = 79160000000 + secrets.randbelow(10**6) * 10
    answered, missed, dialled = f"+{base + 1}", f"+{base + 2}", f"{base + 3}"

    pair.send(pair.pbx.answered(answered, "101"))
    pair.send(pair.pbx.missed(missed, "102"))
    wait_for(lambda: {("answered", answered[1:], "101")} <= set(pair.crm.records())
             and any(r[:2] == ("missed", missed[1:]) for r in pair.crm.records()),
             20, f"both calls in {crm}")
    health = pair.settled(20)
    assert not {"failed", "dead"} & set(health["actions"]), health
    records = pair.crm.records()
    # Once each: nothing recorded twice, nothing else recorded.
    assert records.count(("answered", answered[1:], "101")) == 1, records
    assert {r[1] for r in records} == {answered[1:], missed[1:]}, records
    assert all(r[0] == "missed" for r in records if r[1] == missed[1:]), records

    assert pair.crm.click(pair.gateway, pair.key, "101", dialled) == 200
    assert pair.pbx.placed() == [("101", dialled)]


# The pairs the customers run, killed in a burst: CallGear × Planfix (seed 004) and MegaFon ×
# Megaplan (seed 003); Telphin's pairs have their own (test_daemon.py, test_megaplan_daemon.py).
KILLED = [("callgear", "planfix"), ("megafon", "megaplan")]


@pytest.mark.parametrize(("pbx", "crm"), KILLED)
def test_kill_during_a_burst_each_acknowledged_call_once(procs: Processes, pbx: str,
                                                         crm: str) -> None:
    pair = Pair(procs, pbx, crm)
    # The CRM is down during the burst, so the records wait in the outbox when the kill
    # lands (a request in flight at a kill may be sent again: delivery is at least once).
    pair.crm.fake.faults(fail_status=503)
    base = 79170000000 + secrets.randbelow(10**6) * 100
    callers = {f"+{base + i}": ("101", "102")[i % 2] for i in range(40)}
    calls = [(caller, [lambda s=s: s(pair.gateway, pair.key)
                       for s in pair.pbx.answered(caller, ext)])
             for caller, ext in callers.items()]
    assert pair.gateway.proc is not None
    done, killed_after = burst([[call] for call in calls], pair.gateway.proc.kill, workers=8)
    assert 3 <= len(done) < len(calls), (len(done), killed_after)

    pair.gateway.start()
    pair.crm.fake.clear_faults()
    wait_for(lambda: {("answered", c[1:], callers[c]) for c in done}
             <= set(pair.crm.records()), 60, f"every acknowledged call in {crm}")
    health = pair.settled(60)
    assert not {"failed", "dead"} & set(health["actions"]), "\n".join(
        [f"{a['kind']} {a['leg']} {a['last_error']} {a['payload']}" for a in
         pair.gateway.admin("GET", "/api/v1/actions?state=failed")[1]]
        + [str(pair.crm.fake.state().get("violations"))]
        + [json.dumps(c) for c in pair.gateway.admin(
            "GET", f"/api/v1/tenants/{TENANT_ID}/calls?limit=100")[1]
           if any(a["state"] == "failed" for a in c.get("actions", []))])
    records = pair.crm.records()
    twice = [r for r in set(records) if records.count(r) > 1]
    assert not twice, f"recorded more than once: {twice}"
    # Nothing but the calls sent (an unacknowledged call may or may not be there).
    assert {r[1] for r in records} <= {c[1:] for c in callers}, records
    print(f"{pbx} × {crm}: {len(done)} of {len(calls)} calls acknowledged, SIGKILL after "
          f"{killed_after:.1f} s; {len(records)} records")
