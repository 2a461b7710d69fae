"""The bench's call simulator: its calls are valid Telphin webhooks with a known outcome.

Every scenario of ``bench.sim`` is run through the real parser, engine and store (the
helper of the call-model table), and must give the pop-ups and records it promises; the
load generator's report is checked against a real server.
"""

from __future__ import annotations

import random
from array import array
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from bench import load, sim
from gateway.web import site
from tests.test_scenarios import TENANT, fold

TARGET = sim.Tenant(TENANT.id, TENANT.pbx.login, TENANT.key)

# What every call event carries (telphin.md §3.2, "Presence per event type").
ALWAYS = {"EventType", "CallID", "SubCallID", "CallFlow", "CallStatus", "CallerIDNum",
          "CallerIDName", "CalledNumber", "CallAPIID", "EventTime"}


def steps_of(hooks: list[sim.Webhook]) -> list[tuple[float, str, dict[str, str]]]:
    return [(hook.at, hook.event, hook.fields()) for hook in hooks]


@pytest.mark.parametrize("name", list(sim.SCENARIOS))
@pytest_twisted.ensureDeferred
async def test_a_simulated_call_gives_what_its_scenario_promises(tmp_path: Any,
                                                                 name: str) -> None:
    scenario = sim.SCENARIOS[name]
    for seed in range(3):
        call_id, steps = sim.call(name, TARGET, random.Random(seed))
        hooks = sim.webhooks(TARGET, call_id, steps, 0.0, 1.0, 1715677267.0)
        bodies = await fold(tmp_path / str(seed), steps_of(hooks), TENANT)
        commands = [b["command"] for b in bodies]
        assert (commands.count("event"), commands.count("history")) == (
            scenario.popups, scenario.records), (seed, bodies)
        for hook in hooks:
            fields = hook.fields()
            assert ALWAYS <= fields.keys(), ALWAYS - fields.keys()
            assert hook.path == f"/events/807/{hook.event}/{TENANT.pbx.login}?key={TENANT.key}"
            if fields["EventType"] == "hangup":
                assert fields["Duration"].isdigit()


def test_a_stream_is_in_send_order_and_compression_shortens_it() -> None:
    tenants = [sim.Tenant(n, f"TLP{n}", "k" * 32) for n in range(1, 6)]
    real = sim.stream(tenants, 200, 20.0, compress=1.0)
    fast = sim.stream(tenants, 200, 20.0, compress=10.0)
    assert [w.at for w in real] == sorted(w.at for w in real)
    assert len(real) == len(fast)
    assert fast[-1].at < real[-1].at
    assert {w.tenant for w in real} == {1, 2, 3, 4, 5}
    seen = {w.fields()["CallID"] for w in real}
    assert len(seen) == 200


def test_percentiles_use_the_nearest_rank() -> None:
    samples = array("d", (i / 1000 for i in range(1, 1001)))  # 1 … 1000 ms
    assert load.percentiles(samples) == {"p50": 500.0, "p90": 900.0, "p99": 990.0,
                                         "p99.9": 999.0, "max": 1000.0}


@pytest_twisted.ensureDeferred
async def test_the_load_generator_counts_every_answer() -> None:
    from bench.baseline import Bare  # a leaf answering "OK" to every request

    port = reactor.listenTCP(0, site(Bare()), interface="127.0.0.1")
    tenants = [sim.Tenant(1, "TLP1", "k" * 32)]
    requests = [w.request() for w in sim.stream(tenants, 30, 1.0, compress=1e3)]
    try:
        for rate in (0.0, 2000.0):
            done: Deferred = Deferred()
            gen = load.Load(reactor, port.getHost().port, requests, rate, 4, 60.0,
                            on_done=lambda: done.callback(None))
            gen.run()
            await done
            report = gen.report()
            assert report["statuses"] == {200: len(requests)}, report
            assert report["answered"] == report["sent"] == len(requests)
            assert report["errors"] == []
    finally:
        await port.stopListening()


def test_the_callgear_stream_is_notifications_the_gateway_takes_with_known_records() -> None:
    from twisted.internet.task import Clock

    from gateway.calls import Call, Policy
    from gateway.model import Inbound, parse_tenant
    from gateway.protocols.callgear import CallGear

    cg = parse_tenant({"id": 807, "name": "ACME", "key": TENANT.key,
                       "pbx": {"kind": "callgear", "login": "ACME",
                               "extensions": {"5001": "101", "5002": "102"}},
                       "crm": {"kind": "altegio", "api_url": "https://api.alteg.io",
                               "partner_token": "T", "crm_token": "C"},
                       "options": {"default_number": "74951234567"}})
    target = sim.Tenant(807, "ACME", TENANT.key)
    hooks = sim.callgear_stream([target], 40, 4.0, seed=3)
    assert len(hooks) == 40 * sim.CALLGEAR_EVENTS_PER_CALL
    pbx, policy, calls = CallGear(None, Clock()), Policy(), {}
    records = 0
    for hook in hooks:
        path, query = hook.path.split("?", 1)
        assert path == f"/notify/807/{hook.event}/ACME"
        inbound = Inbound("POST", hook.event, query.encode(), hook.body, hook.content_type)
        pbx.authenticate(inbound, cg)
        for ev in pbx.parse(inbound, cg, 100.0):
            call = calls.setdefault(ev.call, Call(807, ev.call))
            records += sum(e.kind == "record" for e in call.event(ev, policy))
    records += sum(e.kind == "record" for c in calls.values() for e in c.expire(policy))
    assert len(calls) == 40 and records == 40  # one record a call, answered or lost
