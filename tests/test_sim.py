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
