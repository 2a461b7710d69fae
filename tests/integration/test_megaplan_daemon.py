"""The real daemon (``twistd -n gateway``) for a Telphin × Megaplan tenant, over TCP: the fake
Telphin and the fake Megaplan run as processes, the tenant is created through the admin API
with the fake's loopback address as its Megaplan domain (GATEWAY_ALLOW_LOOPBACK_CRM=1 in the
gateway's environment only).

Each test gets its own directory, database and ports, and kills every process it started.
Waits are bounded polls.
"""

from __future__ import annotations

import collections
import json
import secrets
import time
from typing import Any

from tests.integration.harness import (
    CLIENT_ID,
    CLIENT_NUMBER,
    CLIENT_SECRET,
    DID,
    LOGIN,
    TENANT_ID,
    Gateway,
    Processes,
    TelphinCall,
    kill_during_burst,
    new_key,
    start_fake,
    wait_for,
)

USER, PASSWORD = "robot@acme.ru", "S3cret-of-the-robot"
BOSS = "1000009"  # the default responsible: calls no employee took part in
EMPLOYEES = [
    {"id": "1000005", "name": "Иван Петров", "internalNumber": "101"},
    {"id": "1000006", "name": "Мария Сидорова", "internalNumber": "102"},
    {"id": "1000007", "name": "Пётр Иванов", "internalNumber": "sip:103@pbx.example.net"},
    {"id": "1000008", "name": "Анна Смирнова", "internalNumber": "7001*104"},
    {"id": BOSS, "name": "Старший менеджер"},
]
EXTENSIONS = {"101": "1000005", "102": "1000006", "103": "1000007", "104": "1000008"}


def digits(number: str) -> str:
    return "".join(c for c in number if c.isdigit())


class Deployment:
    """A gateway with tenant 807 wired to a fake Telphin and a fake Megaplan."""

    def __init__(self, procs: Processes) -> None:
        self.megaplan = start_fake(procs, "megaplan", "--username", USER,
                                   "--password", PASSWORD)
        self.megaplan.setup(employees=EMPLOYEES)
        self.telphin = start_fake(procs, "telphin", "--client", f"{CLIENT_ID}:{CLIENT_SECRET}")
        self.gateway = Gateway(procs, procs.tmp,
                               env={"GATEWAY_ALLOW_LOOPBACK_CRM": "1"}).start()
        self.key = new_key()
        status, body = self.gateway.admin("POST", "/api/v1/tenants", {
            "id": TENANT_ID, "name": "ACME", "key": self.key,
            "pbx": {"kind": "telphin", "login": LOGIN, "api_url": self.telphin.url,
                    "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
            "crm": {"kind": "megaplan", "domain": self.megaplan.domain, "login": USER,
                    "password": PASSWORD, "create_client": True,
                    "default_responsible": BOSS},
            "options": {"timezone": "Europe/Moscow"},
        })
        assert status == 201, body
        # setup/enable logs in and reads the telephony settings before anything else.
        wait_for(lambda: self.paths().count("/api/v3/callUserConfig") >= 1, 10,
                 "setup/enable at the fake Megaplan")

    def state(self) -> dict[str, Any]:
        return self.megaplan.state()

    def settled(self, timeout: float) -> dict[str, Any]:
        """Until nothing is left to fold, deliver or finish: the outbox empty, no request in
        flight, twice in a row (``wait_drained`` alone returns with attempts still in
        flight)."""
        seen: list[bool] = []

        def quiet() -> dict[str, Any] | None:
            status, body = self.gateway.healthz()
            idle = status == 200 and body["outbox_depth"] == 0 and \
                body["fold_lag_events"] == 0 and body["in_flight"] == 0
            seen.append(idle)
            return body if seen[-2:] == [True, True] else None
        return wait_for(quiet, timeout, "the outbox to drain, nothing in flight",
                        interval=0.3)

    def paths(self) -> list[str]:
        return [r["path"] for r in self.state()["requests"]]

    def send(self, step: tuple[str, dict[str, str]]) -> int:
        event, fields = step
        return self.gateway.event(event, fields, self.key)

    def post(self, *steps: tuple[str, dict[str, str]]) -> None:
        for step in steps:
            status = self.send(step)
            assert status == 200, f"{step[0]} answered {status}"

    def calls(self) -> dict[str, list[dict[str, Any]]]:
        """The fake's CallInfos by providerId (a list: more than one is a duplicate)."""
        out: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for call in self.state()["calls"]:
            out[call["providerId"]].append(call)
        return out

    def call(self, provider_id: str) -> dict[str, Any] | None:
        found = self.calls().get(provider_id)
        return found[-1] if found else None


def employee(ident: str) -> dict[str, str]:
    return {"contentType": "Employee", "id": ident}


# 1. End to end


def test_answered_and_missed_calls_reach_megaplan(procs: Processes) -> None:
    d = Deployment(procs)
    record_url = "https://storage.telphin.ru/rec/7001/acme-call.mp3?sig=ab12"

    # An answered, recorded incoming call to 101 from a number Megaplan does not know.
    call = TelphinCall(ext="101", ext_id="200501")
    d.telphin.setup(records={call.rec_id: record_url})
    d.post(call.dial_in())
    # The widget shows the call ringing while the phone rings.
    wait_for(lambda: (d.call(call.record_id) or {}).get("states") == ["calling"], 10,
             "the ringing CallInfo for 101")
    d.post(call.answer())
    wait_for(lambda: d.call(call.record_id)["states"] == ["calling", "talking"], 10,
             "the CallInfo talking")
    d.post(call.hangup("ANSWER", duration_us=83_479_977, recorded=True))
    wait_for(lambda: d.call(call.record_id)["states"] == ["calling", "talking", "finished"],
             15, "the CallInfo finished")

    # A call straight to 102 that nobody answers: its pop-up finishes, and the call goes
    # in as history (the missed call no employee took, for the default responsible).
    missed = TelphinCall(ext="102", ext_id="200502")
    d.post(missed.dial_in())
    wait_for(lambda: (d.call(missed.record_id) or {}).get("states") == ["calling"], 10,
             "the ringing CallInfo for 102")
    d.post(missed.hangup("NOANSWER", duration_us=0))
    wait_for(lambda: d.call(missed.missed_id), 15, "the missed call's history")
    health = d.settled(10)
    assert not {"failed", "dead"} & set(health["actions"]), health

    calls = d.calls()
    assert set(calls) == {call.record_id, missed.record_id, missed.missed_id}, set(calls)
    assert all(len(found) == 1 for found in calls.values()), calls
    state = d.state()

    answered = calls[call.record_id][0]
    entity = answered["entity"]
    assert answered["states"] == ["calling", "talking", "finished"]
    assert not answered["via_history"] and answered["widget"]
    assert (entity["type"], entity["state"]) == ("in", "finished")
    assert (entity["fromPhone"], entity["toPhone"]) == (digits(CLIENT_NUMBER), DID)
    assert entity["toUser"] == employee(EXTENSIONS["101"])
    assert entity["recordLinks"] == [record_url]
    assert entity["timeFrom"]["value"].endswith("+03:00")
    assert entity["timeTo"]["value"].endswith("+03:00")
    # The new number became one client, attached to the call (fromUser of an incoming call).
    [client] = state["contractors_created"]
    assert state["contractors_created_by_phone"] == {digits(CLIENT_NUMBER): 1}
    assert entity["fromUser"] == {"contentType": client["contentType"], "id": client["id"]}
    assert client["responsibles"] == [employee(EXTENSIONS["101"])]

    ringing = calls[missed.record_id][0]
    assert ringing["states"] == ["calling", "finished"]
    assert (ringing["entity"]["type"], ringing["entity"]["toUser"]) == (
        "miss", employee(EXTENSIONS["102"]))

    history = calls[missed.missed_id][0]
    assert history["via_history"] and not history["widget"]
    assert history["states"] == ["finished"]
    assert (history["entity"]["type"], history["entity"]["fromPhone"]) == (
        "miss", digits(CLIENT_NUMBER))
    assert history["entity"]["toUser"] == employee(BOSS)
    # The known client was found, not created again, and set on the history call too.
    assert history["entity"]["fromUser"] == entity["fromUser"]

    # One login for everything (setup/enable); the recording link from Telphin's storage.
    assert state["tokens_issued"] == {"password": 1, "refresh_token": 0}
    assert [(r["path"], r["status"]) for r in d.telphin.state()["requests"]] == [
        (f"/api/ver1.0/client/@me/record/{call.rec_id}/storage_url/", 200)]


# 2. kill -9 during a burst of calls from new numbers


def test_kill_during_a_burst_each_call_once_each_client_once(procs: Processes) -> None:
    d = Deployment(procs)
    # A contractor takes a while to create: the kill may well land with one in flight.
    d.megaplan.setup(delays={"/api/v3/contractor": 0.2})
    base = 79031000000 + secrets.randbelow(10**6) * 10
    singles = [TelphinCall(ext=str(101 + i % 4), ext_id=str(200501 + i % 4),
                           caller=f"+{base + i}") for i in range(24)]
    # Three new numbers that call twice at once (two lines ringing two extensions).
    pairs = [(TelphinCall(ext="101", ext_id="200501", caller=f"+{base + 100 + i}"),
              TelphinCall(ext="102", ext_id="200502", caller=f"+{base + 100 + i}"))
             for i in range(3)]
    every = singles + [c for pair in pairs for c in pair]
    # The pairs first: they are the ones that race to create a client.
    done, killed_after = kill_during_burst(
        d.send, list(pairs) + [(call,) for call in singles], d.gateway.proc.kill, workers=8)
    assert 3 <= len(done) < len(every), (len(done), killed_after)

    restarting = time.monotonic()
    d.gateway.start()
    health = d.settled(60)
    assert not {"failed", "dead"} & set(health["actions"]), health
    state = d.state()
    print(f"burst: {len(done)} of {len(every)} calls acknowledged, SIGKILL after "
          f"{killed_after:.1f} s; restart + drain {time.monotonic() - restarting:.1f} s; "
          f"{len(state['requests'])} requests to the fake Megaplan")

    calls = d.calls()
    twice = {pid: len(found) for pid, found in calls.items() if len(found) > 1}
    assert not twice, f"more than one CallInfo for: {twice}"
    ours = {c.record_id for c in every}
    assert set(calls) <= ours, set(calls) - ours
    acknowledged = [c for c in every if c.call_id in done]
    lost = sorted(c.record_id for c in acknowledged if c.record_id not in calls)
    assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged calls not in Megaplan"
    for c in acknowledged:
        entity = calls[c.record_id][0]["entity"]
        assert (entity["type"], entity["state"]) == ("in", "finished"), entity
        assert entity["fromPhone"] == digits(c.caller), entity
        assert entity["toUser"] == employee(EXTENSIONS[c.ext]), entity

    # One client per number, however many calls, concurrent or retried after the kill.
    created = state["contractors_created_by_phone"]
    more = {phone: n for phone, n in created.items() if n != 1}
    assert not more, f"numbers with more than one contractor: {more}"
    assert set(created) <= {digits(c.caller) for c in every}, created
    # The two calls at once from one new number share the one client wherever both have
    # one.
    for a, b in pairs:
        clients = {json.dumps(calls[c.record_id][0]["entity"]["fromUser"]) for c in (a, b)
                   if c.call_id in done}
        clients.discard("null")
        assert len(clients) <= 1, clients



# 3. A pop-up cut in half by the kill (each was a bug of the Megaplan module)


def cut_pop_up(d: Deployment, call: TelphinCall) -> None:
    """The call rings; the pop-up's CallInfo is created and, while the module looks for the
    client (slow contractor requests), the gateway is killed and started again."""
    d.megaplan.setup(delays={"/api/v3/contractor": 1.5})
    d.post(call.dial_in())
    wait_for(lambda: d.call(call.record_id), 10, "the ringing CallInfo")
    d.gateway.proc.kill()
    d.megaplan.setup(delays={"/api/v3/contractor": 0})


def test_a_pop_up_cut_by_the_kill_and_sent_again_makes_one_call_info(
        procs: Processes) -> None:
    d = Deployment(procs)
    call = TelphinCall(ext="101", ext_id="200501", caller="+79035551234")
    cut_pop_up(d, call)
    d.gateway.start()  # the leg still rings: the pop-up is sent again
    d.settled(20)
    d.post(call.answer(), call.hangup("ANSWER", duration_us=12_400_000))
    d.settled(20)
    found = d.calls()[call.record_id]
    assert [c["states"] for c in found] == [["calling", "talking", "finished"]], found
    assert found[0]["entity"]["fromUser"] is not None
    assert d.state()["contractors_created_by_phone"] == {digits(call.caller): 1}


def test_a_pop_up_cut_by_the_kill_and_dropped_still_gets_its_client(
        procs: Processes) -> None:
    d = Deployment(procs)
    call = TelphinCall(ext="101", ext_id="200501", caller="+79035551234")
    cut_pop_up(d, call)
    d.megaplan.refuse()  # Megaplan unreachable while the call ends
    d.gateway.start()
    d.post(call.answer(), call.hangup("ANSWER", duration_us=12_400_000))

    def popup_settled() -> bool:
        status, body = d.gateway.admin("GET", "/api/v1/tenants/807/calls?limit=10")
        actions = {c["call"]: c for c in body}.get(call.call_id, {}).get("actions", [])
        return any(a["kind"] == "popup" and a["state"] == "dropped" for a in actions)
    wait_for(popup_settled, 20, "the pop-up dropped (its leg ended)")
    d.megaplan.accept()
    d.settled(30)
    [found] = d.calls()[call.record_id]
    assert found["entity"]["state"] == "finished"
    assert d.state()["contractors_created_by_phone"] == {digits(call.caller): 1}
    assert found["entity"]["fromUser"] is not None, found
