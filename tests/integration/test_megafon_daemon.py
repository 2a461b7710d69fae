"""MegaFon × Megaplan (seed 003's pair) on the real daemon, beyond the matrix's calls: the
PBX's own scripts (tests/fakes/megafon.py) of a group call and a missed group call, posted
to the one CRM URL as the PBX posts them, and its synchronous ``contact`` lookup."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from tests.fakes.megafon import CLIENT, script
from tests.integration.harness import LOGIN, TENANT_ID, Processes, request, wait_for
from tests.integration.matrix import EMPLOYEES, MegaFonSide, Pair


def post(pair: Pair, command: dict[str, str]) -> tuple[int, bytes]:
    return request(pair.gateway.port, "POST", f"/vats/{TENANT_ID}/crm/{LOGIN}",
                   urlencode({**command, "crm_token": MegaFonSide.CRM_TOKEN}).encode(),
                   {"Content-Type": "application/x-www-form-urlencoded"})


def cards(pair: Pair, callid: str) -> dict[str, dict[str, Any]]:
    """Megaplan's CallInfos of the call, by the employee they are for."""
    users = {user: ext for ext, user in EMPLOYEES.items()}
    out = {}
    for call in pair.crm.fake.calls():
        if callid in call["providerId"]:
            out[users.get((call["entity"].get("toUser") or {}).get("id"), "?")] = call
    return out


def test_a_group_call_and_a_missed_one_reach_megaplan(procs: Processes) -> None:
    pair = Pair(procs, "megafon", "megaplan")
    group = script("group", callid="grp1")
    for command in group[:2]:
        assert post(pair, command)[0] == 200, command
    # The phones ring for a while (a pop-up for a leg that ended before it went out is
    # never shown, nor closed).
    wait_for(lambda: set(cards(pair, "grp1")) == {"101", "102"}, 20, "both cards ringing")
    for command in group[2:]:
        assert post(pair, command)[0] == 200, command
    # Both ringing employees got the card; 101 talked, 102's finished unanswered.
    wait_for(lambda: (lambda c: set(c) == {"101", "102"} and all(
        x["states"][-1] == "finished" for x in c.values()))(cards(pair, "grp1")), 20,
        "both cards of the group call finished")
    group = cards(pair, "grp1")
    assert group["101"]["states"] == ["calling", "talking", "finished"]
    assert group["101"]["entity"]["type"] == "in"
    assert group["101"]["entity"]["recordLinks"] == ["https://myats.megapbx.ru/rec/grp1.mp3"]
    assert group["102"]["states"] == ["calling", "finished"]
    assert group["102"]["entity"]["type"] == "miss"

    missed = script("missed", callid="miss1")
    for command in missed[:2]:
        assert post(pair, command)[0] == 200, command
    wait_for(lambda: set(cards(pair, "miss1")) == {"101", "102"}, 20, "both cards ringing")
    for command in missed[2:]:
        assert post(pair, command)[0] == 200, command
    wait_for(lambda: any(c["via_history"] for c in cards(pair, "miss1").values())
             or len(cards(pair, "miss1")) >= 2 and all(
                 c["states"][-1] == "finished" for c in cards(pair, "miss1").values()),
             20, "the missed group call in Megaplan")
    health = pair.settled(20)
    assert not {"failed", "dead"} & set(health["actions"]), health
    missed = [c for c in pair.crm.fake.calls() if "miss1" in c["providerId"]]
    assert missed and all(c["entity"]["type"] == "miss" and c["states"][-1] == "finished"
                          for c in missed), missed
    assert not any(c["entity"]["type"] == "in" for c in missed)


def test_the_contact_lookup_names_the_responsible_employee(procs: Processes) -> None:
    pair = Pair(procs, "megafon", "megaplan")
    pair.crm.fake.setup(routes={f"+{CLIENT}": [EMPLOYEES["102"]]})
    status, body = post(pair, script("contact")[0])
    assert (status, json.loads(body)) == (200, {"responsible": "102"})
    # A caller Megaplan does not know: a valid, empty answer.
    status, body = post(pair, {**script("contact")[0], "phone": "79990000000"})
    assert (status, json.loads(body)) == (200, {})
