"""The load generator: replays a simulated Telphin stream over keep-alive connections.

Two modes:

- ``--rate R``: request *i* is due at ``i / R`` seconds (the stream's order, a constant
  rate).  Its latency is counted from that due time, not from when a free connection took
  it, so a stalled server shows in the percentiles instead of slowing the generator down
  (the "coordinated omission" correction of HdrHistogram and wrk2).
- ``--rate 0`` (saturation): every connection sends its next request as soon as the last
  one is answered; the figure is answers per second after the first second.

It is a raw HTTP/1.1 client on the Twisted reactor, with every request encoded before the
clock starts, so it needs far less CPU per request than any server it measures; the CPU it
did use is in its report.  Run it as ``python -m bench.load``; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from array import array
from typing import Any, Callable

from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint

from bench import sim


def percentiles(samples: array, points: tuple[float, ...] = (50, 90, 99, 99.9)) -> dict:
    """Exact percentiles (nearest rank) and the maximum, in milliseconds."""
    if not samples:
        return {}
    ordered = sorted(samples)
    def rank(p: float) -> int:  # 1-based; rounded so that 99.9 % of 1000 is 999
        return min(len(ordered), max(1, math.ceil(round(p / 100 * len(ordered), 6))))

    out = {f"p{p:g}": round(ordered[rank(p) - 1] * 1000, 3) for p in points}
    out["max"] = round(ordered[-1] * 1000, 3)
    return out


class Client(protocol.Protocol):
    """One keep-alive connection: one request at a time, answers parsed just enough."""

    def __init__(self, load: "Load") -> None:
        self.load = load
        self.buf = b""
        self.due = 0.0
        self.busy = False

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.load.connected(self)

    def send(self, request: bytes, due: float) -> None:
        self.busy = True
        self.due = due
        self.transport.write(request)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            status = int(head[9:12])
            body_at = end + 4
            if b"transfer-encoding: chunked" in head:
                tail = self.buf.find(b"\r\n0\r\n\r\n", body_at - 2)
                if tail < 0:
                    return
                rest = self.buf[tail + 7:]
            else:
                at = head.find(b"content-length:")
                length = int(head[at + 15:].split(b"\r\n", 1)[0]) if at >= 0 else 0
                if len(self.buf) < body_at + length:
                    return
                rest = self.buf[body_at + length:]
            self.buf = rest
            self.busy = False
            self.load.answered(self, status)

    def connectionLost(self, reason: Any) -> None:
        self.load.lost(self, reason)


class Load:
    def __init__(self, reactor: Any, port: int, requests: list[bytes], rate: float,
                 connections: int, duration: float,
                 on_done: Callable[[], Any] | None = None,
                 started_file: str | None = None) -> None:
        self.reactor = reactor
        self.started_file = started_file
        self.on_done = on_done or reactor.stop
        self.port = port
        self.requests = requests
        self.rate = rate
        self.want = connections
        self.duration = duration
        self.idle: list[Client] = []
        self.clients: list[Client] = []
        self.next = 0
        self.start = 0.0
        self.latencies = array("d")
        self.statuses: dict[int, int] = {}
        self.answers_after_warmup = 0
        self.errors: list[str] = []
        self.timer: Any = None
        self.done = False

    def run(self) -> None:
        factory = protocol.Factory.forProtocol(lambda: Client(self))
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port)
        for _ in range(self.want):
            endpoint.connect(factory).addErrback(lambda f: self.fail(f.getErrorMessage()))

    def fail(self, message: str) -> None:
        self.errors.append(message)
        self.finish()

    def connected(self, client: Client) -> None:
        self.clients.append(client)
        self.idle.append(client)
        if len(self.clients) == self.want:
            if self.started_file:
                with open(self.started_file, "w") as f:
                    f.write("sending\n")
            self.start = time.perf_counter()
            self.cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            self.reactor.callLater(self.duration, self.stop_sending)
            self.pump()

    def stop_sending(self) -> None:
        self.requests = self.requests[:self.next]
        self.check_done()

    def pump(self) -> None:
        self.timer = None
        now = time.perf_counter() - self.start
        while self.idle and self.next < len(self.requests):
            due = self.next / self.rate if self.rate else now
            if due > now:
                self.timer = self.reactor.callLater(due - now, self.pump)
                return
            client = self.idle.pop()
            client.send(self.requests[self.next], self.start + due)
            self.next += 1

    def answered(self, client: Client, status: int) -> None:
        now = time.perf_counter()
        self.latencies.append(now - client.due)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if now - self.start >= 1.0:
            self.answers_after_warmup += 1
        self.idle.append(client)
        if self.timer is None:
            self.pump()
        self.check_done()

    def lost(self, client: Client, reason: Any) -> None:
        if not self.done:
            self.fail(f"connection lost: {reason.getErrorMessage()}")

    def check_done(self) -> None:
        if self.next >= len(self.requests) and len(self.idle) == len(self.clients):
            self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.elapsed = time.perf_counter() - self.start if self.start else 0.0
        self.cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        for client in self.clients:
            client.transport.loseConnection()
        self.reactor.callLater(0.05, self.on_done)

    def report(self) -> dict[str, Any]:
        cpu = ((self.cpu1.ru_utime + self.cpu1.ru_stime)
               - (self.cpu0.ru_utime + self.cpu0.ru_stime)) if self.start else 0.0
        answered = len(self.latencies)
        return {
            "sent": self.next, "answered": answered, "statuses": self.statuses,
            "seconds": round(self.elapsed, 3),
            "rate": self.rate,
            "throughput": round(self.answers_after_warmup / max(1e-9, self.elapsed - 1.0), 1)
            if not self.rate else round(answered / max(1e-9, self.elapsed), 1),
            "latency_ms": percentiles(self.latencies),
            "cpu_seconds": round(cpu, 3),
            "cpu_share": round(cpu / self.elapsed, 3) if self.elapsed else 0.0,
            "exhausted": self.next >= len(self.requests),
            "errors": self.errors[:5],
        }


def tenants_from(path: str) -> list[sim.Tenant]:
    with open(path) as f:
        return [sim.Tenant(**t) for t in json.load(f)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tenants", required=True, help="JSON list of sim.Tenant fields")
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--mix", default="default", help="'default' or one scenario name")
    parser.add_argument("--pbx", default="telphin", choices=("telphin", "callgear"),
                        help="whose webhooks: Telphin's forms or CallGear's JSON")
    parser.add_argument("--compress", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0: saturate")
    parser.add_argument("--duration", type=float, default=3600.0, help="stop sending after")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--call-rate", type=float, default=400.0,
                        help="calls/s the stream is drawn at when saturating")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this core")
    parser.add_argument("--started-file", help="written when the first request goes")
    args = parser.parse_args(argv)
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    mix = sim.MIX if args.mix == "default" else {args.mix: 1.0}
    # The stream is drawn at the rate it will be sent at, so calls overlap as they would;
    # each call lasts its real duration / compress.  EventTime starts now.
    per_call = (sim.CALLGEAR_EVENTS_PER_CALL if args.pbx == "callgear"
                else sim.events_per_call(mix))
    call_rate = args.rate / per_call if args.rate else args.call_rate
    if args.pbx == "callgear":
        hooks = sim.callgear_stream(tenants_from(args.tenants), args.calls,
                                    args.calls / call_rate, args.compress, args.seed,
                                    epoch=time.time())
    else:
        hooks = sim.stream(tenants_from(args.tenants), args.calls, args.calls / call_rate,
                           args.compress, mix, args.seed, epoch=time.time())
    requests = [w.request() for w in hooks]
    from twisted.internet import reactor
    load = Load(reactor, args.port, requests, args.rate, args.connections, args.duration,
                started_file=args.started_file)
    reactor.callWhenRunning(load.run)
    reactor.run()
    print(json.dumps(load.report()))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
