"""A Telphin call simulator: many tenants, many concurrent calls, the bodies Telphin posts.

A *scenario* is one call as the PBX reports it: a list of steps (seconds after the call
began, URL event, form fields).  The fields are those telphin.md §3.2 says each event
carries, in the order of its §3.3 example.  ``stream`` draws calls from the scenario mix,
spreads their starts evenly over a run, runs each call in real time divided by ``compress``,
and returns every webhook (path and form body, exactly as sent) in send order.

The scenarios and their expected outcome (pop-ups and records a CRM gets) are used by the
test suite too (tests/test_sim.py), so the bench only ever sends calls whose result is known.
"""

from __future__ import annotations

import random
from typing import Callable, Iterable
from urllib.parse import parse_qsl, urlencode

import attrs

DOMAIN = "sipproxy.telphin.ru"
QUEUE, IVR = "600", "500"  # the queue and IVR extensions every simulated tenant has

Step = tuple[float, str, dict[str, str]]  # (seconds after the call began, URL event, fields)


@attrs.frozen
class Tenant:
    """Who the webhooks are for: the three parts of a tenant's Telphin URLs."""

    id: int
    login: str
    key: str
    prefix: str = "7001"  # the Telphin client prefix of its extensions
    did: str = "74951234567"

    def path(self, event: str) -> str:
        return f"/events/{self.id}/{event}/{self.login}?key={self.key}"


@attrs.frozen
class Webhook:
    """One request as Telphin sends it, ``at`` seconds after the stream's start."""

    at: float
    tenant: int
    call: str
    event: str
    path: str
    body: bytes
    content_type: str = "application/x-www-form-urlencoded"

    def fields(self) -> dict[str, str]:
        """The form fields, decoded, as the gateway reads them."""
        return dict(parse_qsl(self.body.decode()))

    def request(self, host: str = "127.0.0.1") -> bytes:
        """The whole HTTP/1.1 request, for a keep-alive connection."""
        return (f"POST {self.path} HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\n\r\n").encode() + self.body


def _hex(rng: random.Random, n: int = 32) -> str:
    return f"{rng.getrandbits(4 * n):0{n}x}"


class CallIds:
    """The ids one call's events share (telphin.md §3.2)."""

    def __init__(self, rng: random.Random, tenant: Tenant) -> None:
        self.rng = rng
        self.tenant = tenant
        self.call = _hex(rng)
        self.api = f"35847{rng.randrange(10**5):05d}-{self.call[:8]}-{self.call[8:12]}"
        self.client = f"+7916{rng.randrange(10**7):07d}"

    def sip(self, ext: str) -> str:
        return f"{self.tenant.prefix}*{ext}"

    def ext_id(self, ext: str) -> str:
        return f"2005{ext}"

    def leg(self, ext: str) -> str:
        return f"{self.ext_id(ext)}-{_hex(self.rng)}"

    def incoming(self, leg: str, ext: str, event: str, status: str,
                 caller: str | None = None, **extra: str) -> dict[str, str]:
        caller = caller or self.client
        return {"EventType": event, "CallID": self.call, "SubCallID": leg, "CallFlow": "in",
                "CallStatus": status, "CallerIDNum": caller, "CallerIDName": caller,
                "CalledDID": self.tenant.did, "CalledNumber": self.sip(ext),
                "CalledExtension": f"{self.sip(ext)}@{DOMAIN}",
                "CalledExtensionID": self.ext_id(ext), "CallAPIID": self.api, **extra}

    def outgoing(self, leg: str, ext: str, event: str, status: str, number: str,
                 **extra: str) -> dict[str, str]:
        return {"EventType": event, "CallID": self.call, "SubCallID": leg, "CallFlow": "out",
                "CallStatus": status, "CallerIDNum": self.sip(ext),
                "CallerIDName": self.sip(ext), "CallerExtension": f"{self.sip(ext)}@{DOMAIN}",
                "CallerExtensionID": self.ext_id(ext), "CalledNumber": number,
                "CallAPIID": self.api, **extra}

    def hung(self, fields: dict[str, str], status: str, seconds: float,
             recorded: bool = False, **extra: str) -> dict[str, str]:
        """``fields`` of the same leg as its hangup: status, Duration (µs), maybe RecID."""
        out = {**fields, "EventType": "hangup", "CallStatus": status,
               "Duration": str(int(seconds * 1_000_000)), **extra}
        if recorded:
            out["RecID"] = f"{fields['SubCallID'].split('-')[0]}-{_hex(self.rng).upper()}"
        return out

    def answered_leg(self, ext: str, ring: float, wait: float, talk: float,
                     caller: str | None = None, **extra: str) -> list[Step]:
        """An incoming leg that rings ``wait`` s, is answered, talks ``talk`` s, is recorded."""
        leg = self.leg(ext)
        base = self.incoming(leg, ext, "dial-in", "CALLING", caller, **extra)
        return [(ring, "dial-in", base),
                (ring + wait, "answer", {**base, "EventType": "answer", "CallStatus": "ANSWER"}),
                (ring + wait + talk, "hangup", self.hung(base, "ANSWER", talk, recorded=True))]


# Scenarios: (rng, ids) → steps.  Times are real seconds, as a PBX would space them.

def direct_answered(rng: random.Random, ids: CallIds) -> list[Step]:
    return ids.answered_leg("101", 0.0, rng.uniform(2, 12), rng.uniform(20, 240))


def queue_parallel_ring(rng: random.Random, ids: CallIds) -> list[Step]:
    """A queue rings three extensions at once; one answers, the other two are cancelled."""
    queue = ids.leg(QUEUE)
    qbase = ids.incoming(queue, QUEUE, "dial-in", "CALLING")
    exts = ["101", "102", "103"]
    winner = rng.choice(exts)
    wait, talk = rng.uniform(3, 20), rng.uniform(20, 300)
    steps: list[Step] = [(0.0, "dial-in", qbase)]
    for ext in exts:
        if ext == winner:
            steps += ids.answered_leg(ext, 1.0, wait, talk)
        else:
            leg = ids.leg(ext)
            base = ids.incoming(leg, ext, "dial-in", "CALLING")
            steps += [(1.0, "dial-in", base),
                      (1.0 + wait, "hangup", ids.hung(base, "CANCEL", 0))]
    end = 1.0 + wait + talk
    steps.append((end, "hangup", ids.hung(qbase, "ANSWER", end, Bridged="yes")))
    return sorted(steps, key=lambda s: s[0])


def ivr_missed(rng: random.Random, ids: CallIds) -> list[Step]:
    """The caller hangs up in the IVR: one missed record, after the grace period."""
    leg = ids.leg(IVR)
    base = ids.incoming(leg, IVR, "dial-in", "CALLING")
    seconds = rng.uniform(5, 30)
    return [(0.0, "dial-in", base),
            (seconds, "hangup", ids.hung(base, "ANSWER", seconds, Bridged="no"))]


def transfer(rng: random.Random, ids: CallIds) -> list[Step]:
    """101 answers, then transfers the caller to 102: two records."""
    first = ids.answered_leg("101", 0.0, rng.uniform(2, 10), rng.uniform(10, 60))
    end = first[-1][0]
    second = ids.answered_leg("102", end, rng.uniform(2, 10), rng.uniform(20, 180),
                              caller=ids.sip("101"), RemoteNumber=ids.client)
    return first + second


def outgoing(rng: random.Random, ids: CallIds) -> list[Step]:
    """101 dials a client's mobile, who answers: one outgoing record."""
    leg, number = ids.leg("101"), f"8916{rng.randrange(10**7):07d}"
    base = ids.outgoing(leg, "101", "dial-out", "CALLING", number)
    wait, talk = rng.uniform(3, 15), rng.uniform(20, 240)
    return [(0.0, "dial-out", base),
            (wait, "answer", {**base, "EventType": "answer", "CallStatus": "ANSWER"}),
            (wait + talk, "hangup", ids.hung(base, "ANSWER", talk))]


def duplicated(rng: random.Random, ids: CallIds) -> list[Step]:
    """An answered call whose every event the PBX sends twice (a retry 0.1–1 s later)."""
    steps = direct_answered(rng, ids)
    return sorted(steps + [(t + rng.uniform(0.1, 1.0), e, f) for t, e, f in steps],
                  key=lambda s: s[0])


def out_of_order(rng: random.Random, ids: CallIds) -> list[Step]:
    """An answered call whose hangup overtakes its dial-in and answer: a record, no pop-up."""
    steps = direct_answered(rng, ids)
    end = steps[-1][0]
    return [(end, steps[2][1], steps[2][2]), (end + 0.05, steps[0][1], steps[0][2]),
            (end + 0.1, steps[1][1], steps[1][2])]


def ringing(rng: random.Random, ids: CallIds) -> list[Step]:
    """Only the dial-in of a call to 101: it stays open (the memory measure)."""
    return direct_answered(rng, ids)[:1]


@attrs.frozen
class Scenario:
    build: Callable[[random.Random, CallIds], list[Step]]
    weight: float  # share of the default mix
    popups: int  # incoming pop-ups a CRM shows
    records: int  # call-history records a CRM gets


SCENARIOS = {
    "direct answered": Scenario(direct_answered, 0.35, 1, 1),
    "queue with parallel ring": Scenario(queue_parallel_ring, 0.2, 3, 1),
    "IVR missed": Scenario(ivr_missed, 0.1, 0, 1),
    "transfer": Scenario(transfer, 0.1, 2, 2),
    "outgoing": Scenario(outgoing, 0.15, 0, 1),
    "duplicates": Scenario(duplicated, 0.05, 1, 1),
    "out of order": Scenario(out_of_order, 0.05, 0, 1),
    "ringing": Scenario(ringing, 0.0, 1, 0),
}
MIX = {name: s.weight for name, s in SCENARIOS.items() if s.weight}


def events_per_call(mix: dict[str, float] = MIX, seed: int = 1, sample: int = 2000) -> float:
    """The mean number of webhooks one call of ``mix`` gives."""
    rng = random.Random(seed)
    ids = CallIds(rng, Tenant(1, "L", "k"))
    names, weights = list(mix), list(mix.values())
    return sum(len(SCENARIOS[rng.choices(names, weights)[0]].build(rng, ids))
               for _ in range(sample)) / sample


def call(name: str, tenant: Tenant, rng: random.Random) -> tuple[str, list[Step]]:
    """One call of scenario ``name``: its CallID and steps."""
    ids = CallIds(rng, tenant)
    return ids.call, SCENARIOS[name].build(rng, ids)


def webhooks(tenant: Tenant, call_id: str, steps: Iterable[Step], start: float,
             compress: float, epoch: float) -> list[Webhook]:
    """The call's steps as requests: sent at ``start + t / compress`` seconds into the stream;
    ``EventTime`` is that moment on the wall clock whose stream start is ``epoch``."""
    out = []
    for t, event, fields in steps:
        at = start + t / compress
        form = {**fields, "EventTime": str(int((epoch + at) * 1_000_000))}
        out.append(Webhook(at, tenant.id, call_id, event, tenant.path(event),
                           urlencode(form).encode()))
    return out


def stream(tenants: list[Tenant], calls: int, duration: float, compress: float = 10.0,
           mix: dict[str, float] = MIX, seed: int = 1, epoch: float = 0.0) -> list[Webhook]:
    """``calls`` calls, their starts spread evenly over ``duration`` seconds, each with a
    tenant and a scenario drawn from ``mix``; every webhook of every call, in send order."""
    rng = random.Random(seed)
    names, weights = list(mix), list(mix.values())
    out: list[Webhook] = []
    for i in range(calls):
        tenant = tenants[rng.randrange(len(tenants))]
        call_id, steps = call(rng.choices(names, weights)[0], tenant, rng)
        out += webhooks(tenant, call_id, steps, duration * i / calls, compress, epoch)
    out.sort(key=lambda w: w.at)
    return out


# CallGear: the eight HTTP notifications, JSON rendered from the templates a customer pastes
# (gateway/protocols/callgear.py), the scripts of its fake (tests/fakes/callgear.py).

CALLGEAR_MIX = {"answered": 0.7, "lost": 0.3}
CALLGEAR_EVENTS_PER_CALL = 0.7 * 5 + 0.3 * 5  # answered: 5 notifications; lost (2 rung): 5


def callgear_stream(tenants: list[Tenant], calls: int, duration: float,
                    compress: float = 10.0, seed: int = 1,
                    epoch: float = 0.0) -> list[Webhook]:
    """``calls`` CallGear calls (answered by one employee, or lost after ringing two), their
    starts spread evenly over ``duration`` s; every notification, in send order."""
    import time

    from gateway.protocols.callgear import template
    from tests.fakes.callgear import answered_call, lost_call, render

    rng = random.Random(seed)
    out: list[Webhook] = []
    for i in range(calls):
        tenant = tenants[rng.randrange(len(tenants))]
        session = rng.randrange(10**9, 10**10)
        client = f"7916{rng.randrange(10**7):07d}"
        start = duration * i / calls
        day = time.strftime("%Y-%m-%d", time.gmtime(epoch + start))
        if rng.random() < CALLGEAR_MIX["answered"]:
            talk = rng.randint(20, 240)
            script = answered_call(session, client, tenant.did, 5001, talk, day=day)
            offsets = [0, 1, 7, 7 + talk, 8 + talk]
        else:
            script = lost_call(session, client, tenant.did, [5001, 5002], day=day)
            offsets = [0, 1, 1, 40, 41]
        for (event, values), offset in zip(script, offsets):
            out.append(Webhook(start + offset / compress, tenant.id, str(session), event,
                               f"/notify/{tenant.id}/{event}/{tenant.login}?key={tenant.key}",
                               render(template(event), values), "application/json"))
    out.sort(key=lambda w: w.at)
    return out
