"""Every PBX × every CRM on the real daemon: the same answered call, missed call and
click-to-call for each pair.  The pairs come from the drivers in matrix.py: a new module
adds its driver there, and its row or column here, without new test code."""

from __future__ import annotations

import secrets

import pytest

from tests.integration.harness import Processes, wait_for
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
