"""The drain against a CRM that allows 5 requests/s per account, not per IP.

Altegio limits the gateway's IP as a whole; Bitrix24 and amoCRM (not built yet) limit each
portal.  The dispatcher already keeps a token bucket per key a CRM module names, so this
runs the real gateway service (store, engine, dispatcher, the Altegio module talking HTTP
to the fake) with one change: its bucket is per tenant, at 5 requests/s, and the fake
Altegio counts its limit per ``crm_token`` (``--rate-limit-by account``).

1. Build the backlog with the dispatcher off: every tenant created with its setup, then
   ``--records`` answered calls (simulated Telphin events, folded by the real engine).
2. Start the gateway on that store: the dispatcher loads the whole backlog at once.
3. Half a second in, a new call rings for the first tenant: how long its pop-up waits.

Prints one JSON object: the rate each account achieved as a fraction of its limit (its k
requests need (k - 1) / 5 s at best), the mean and the lowest over accounts, and the
pop-up's wait.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from typing import Any

from twisted.internet import defer, task

from bench import sim
from gateway import outbox
from gateway.crm import altegio
from gateway.engine import Engine
from gateway.httpclient import HttpClient
from gateway.model import POPUP, SETUP, Action, Tenant
from gateway.protocols.telphin import parse_event
from gateway.service import Gateway
from gateway.store.sqlite import SQLiteStore

RATE = 5.0


def tenant(number: int, crm: str) -> Tenant:
    return Tenant.from_json({
        "id": number, "name": f"Tenant {number}", "enabled": True, "key": "k" * 32,
        "pbx": {"kind": "telphin", "login": f"TLP{number:05d}", "queues": [sim.QUEUE],
                "ivrs": [sim.IVR]},
        "crm": {"kind": "altegio", "api_url": crm, "partner_token": "T",
                "crm_token": str(uuid.UUID(int=number))},
    })


def events(hooks: list[sim.Webhook], now: float) -> list:
    return [parse_event(hook.fields(), hook.event, hook.tenant, now)
            for hook in hooks]


async def build(reactor: Any, path: str, tenants: list[Tenant], records: int) -> None:
    store = SQLiteStore(path, reactor)
    await store.start()
    now = reactor.seconds()
    for t in tenants:
        await store.put_tenant_with_action(t, Action(
            tenant=t.id, call="", kind=SETUP, key="setup:enable", payload={"type": "enable"},
            created=now), now)
    targets = [sim.Tenant(t.id, t.pbx.login, t.key) for t in tenants]
    # Each tenant gets records / tenants answered calls (one record each).
    rng = random.Random(3)
    hooks: list[sim.Webhook] = []
    for i in range(records):
        call_id, steps = sim.call("direct answered", targets[i % len(targets)], rng)
        hooks += sim.webhooks(targets[i % len(targets)], call_id, steps, 0, 1e6, time.time())
    await store.append(events(hooks, now))
    by_id = {t.id: t for t in tenants}
    engine = Engine(store, reactor, by_id.get,
                    lambda t, kind, payload: altegio.supports(kind, payload),
                    lambda inserted, dropped: None)
    await engine.start()
    await engine.idle()
    engine.stop()
    await store.stop()


async def drain(reactor: Any, path: str, crm: str, tenants: list[Tenant]) -> dict:
    # Every account is on the fake's one address; a real per-account CRM has a host per
    # account.  So that the connection pool does not stand in for the CRM's limit, it
    # keeps as many connections to that address as the dispatcher has requests in flight.
    policy = outbox.Policy()
    gw = Gateway(SQLiteStore(path, reactor), reactor, dispatch=policy,
                 http=HttpClient(reactor, per_host=policy.max_in_flight))
    gw.dispatcher.limits = lambda action: [(f"account:{action.tenant}", RATE, 1)]
    sends: dict[int, list[float]] = {}
    popup: dict[str, float] = {}
    perform = gw.dispatcher.perform

    async def timed(action: Action) -> tuple[str, int, str]:
        at = reactor.seconds()
        result = await perform(action)
        if action.kind == POPUP:
            popup["shown"] = reactor.seconds()
        else:
            sends.setdefault(action.tenant, []).append(at)
        return result

    gw.dispatcher.perform = timed
    start = reactor.seconds()
    await gw.start()
    backlog = gw.dispatcher.depth
    await task.deferLater(reactor, 0.5, lambda: None)
    rng = random.Random(4)
    target = sim.Tenant(tenants[0].id, tenants[0].pbx.login, tenants[0].key)
    call_id, steps = sim.call("ringing", target, rng)
    popup["sent"] = reactor.seconds()
    await gw.store.append(events(sim.webhooks(target, call_id, steps, 0, 1, time.time()),
                                 popup["sent"]))
    gw.engine.poke()
    while gw.dispatcher.depth or "shown" not in popup:
        if reactor.seconds() - start > 600:
            raise RuntimeError("the backlog did not drain in 10 minutes")
        await task.deferLater(reactor, 0.05, lambda: None)
    await gw.stopService()
    # Each account's k requests need (k - 1) / RATE seconds at best; its achieved share of
    # the limit is that over the time from its first to its last request.
    shares = sorted(((len(v) - 1) / RATE) / (v[-1] - v[0]) for v in sends.values()
                    if len(v) > 1 and v[-1] > v[0])
    first = min(v[0] for v in sends.values())
    last = max(v[-1] for v in sends.values())
    wait = round((popup["shown"] - popup["sent"]) * 1000, 1)
    return {"records": sum(len(v) for v in sends.values()) - len(sends),
            "tenants": len(sends), "backlog": backlog,
            "seconds": round(last - first, 3),
            "rate_fraction": round(sum(shares) / len(shares), 3),
            "rate_fraction_min": round(shares[0], 3),
            "popup_wait": {"p50": wait, "max": wait},
            "dispatcher": gw.dispatcher.counts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crm", required=True, help="the fake's URL")
    parser.add_argument("--tenants", type=int, default=200)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--database", required=True)
    args = parser.parse_args(argv)
    tenants = [tenant(n, args.crm) for n in range(1, args.tenants + 1)]

    async def run(reactor: Any) -> None:
        await build(reactor, args.database, tenants, args.records)
        print(json.dumps(await drain(reactor, args.database, args.crm, tenants)), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
