"""``make demo``: the gateway with the bundled fake Telphin and fake Altegio, a demo tenant
and a few calls played through it, shown in the terminal.

Everything it starts lives under a throwaway directory (``var/demo/`` by default: its own
database, admin token, secret key and the processes' logs, removed at each start), so it
never touches ``var/gateway.sqlite``.  The calls are the bench's Telphin scenarios
(bench/sim.py: the same calls tests/test_sim.py folds), played with every pause cut to at
most a second, except that the phones ring until their pop-ups are up.  For each call the
demo prints the webhooks it sent, then the pop-ups and the history record the fake Altegio
received and the gateway's actions with their delivery attempts, read back from
``GET /api/v1/tenants/807/calls``.  Then it leaves the gateway and the fakes running, with
their URLs and the admin token file printed, until Ctrl-C, and stops every process it
started.  ``--once`` exits instead: 0 when every expected pop-up and record reached the fake
Altegio, 1 otherwise.

It lives in bench/ beside sim.py, not in gateway/, because it runs the test fakes and the
integration harness, which are not part of the installed ``gateway`` package.
"""

from __future__ import annotations

import argparse
import random
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench import sim
from tests.integration import harness
from tests.integration.harness import (
    CLIENT_ID,
    CLIENT_SECRET,
    CRM_TOKEN,
    HOST,
    LOGIN,
    PARTNER_TOKEN,
    TENANT_ID,
    FakeAltegio,
    Gateway,
    Processes,
    Timeout,
    new_key,
    start_fake,
    tenant_body,
    wait_for,
)

# The calls played, in order: the scenario names of bench/sim.py, and what the demo calls them.
CALLS = [("direct answered", "answered call to extension 101"),
         ("IVR missed", "caller hangs up in the IVR (500): a missed call"),
         ("queue with parallel ring", "queue 600 rings 101, 102 and 103 at once")]
RECORDS_URL = "https://storage.telphin.example/rec/{}.mp3"
# Files of a previous demo run, removed at start (nothing else under --dir is touched).
STATE_FILES = ("gateway.sqlite", "gateway.sqlite-wal", "gateway.sqlite-shm", "admin-token",
               "secret-key")


def say(text: str = "") -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, directory: Path, port: int, admin_port: int, seed: int,
                 max_gap: float, wait: float = 20.0,
                 altegio_fails: tuple[int, int | None] | None = None) -> None:
        self.dir = directory.resolve()
        self.logs = self.dir / "logs"
        self.port, self.admin_port = port, admin_port
        self.rng = random.Random(seed)
        self.max_gap = max_gap
        self.wait = wait
        self.altegio_fails = altegio_fails
        self.procs: Processes | None = None
        self.gateway: Gateway | None = None
        self.altegio: FakeAltegio | None = None
        self.telphin: harness.Fake | None = None
        self.tenant: sim.Tenant | None = None
        self.failures: list[str] = []

    # Start-up

    def fresh_directory(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in STATE_FILES:
            (self.dir / name).unlink(missing_ok=True)
        self.logs.mkdir(exist_ok=True)
        for log in list(self.logs.glob("*.out")) + list(self.logs.glob("*.err")):
            log.unlink()

    def check_ports(self) -> None:
        """Fail at once, saying why, when a port asked for is taken (a ``make run``?)."""
        for option, port in (("--port", self.port), ("--admin-port", self.admin_port)):
            if not port:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((HOST, port))
                except OSError as e:
                    raise SystemExit(f"port {port} is taken ({e.strerror}); is `make run` "
                                     f"running? Pass another {option}, or 0 for a free port")

    def start(self) -> None:
        self.check_ports()
        self.fresh_directory()
        self.procs = Processes(self.logs)
        say(f"Starting the fake Altegio, the fake Telphin and the gateway (logs in {self.logs})")
        self.altegio = start_fake(self.procs, "altegio", "--partner-token", PARTNER_TOKEN)
        self.telphin = start_fake(self.procs, "telphin", "--client", f"{CLIENT_ID}:{CLIENT_SECRET}")
        gw = Gateway(self.procs, self.dir)
        gw.db = self.dir / "gateway.sqlite"
        gw.token_file = self.dir / "admin-token"  # the secret key goes beside it
        gw.port = self.port or gw.port
        gw.admin_port = self.admin_port or gw.admin_port
        if gw.port == gw.admin_port:
            raise SystemExit("the public and admin ports must differ")
        try:
            gw.start()
        except (Timeout, AssertionError) as e:
            raise SystemExit(f"the gateway did not start (is port {gw.port} or "
                             f"{gw.admin_port} taken? try --port 0 --admin-port 0):\n{e}")
        self.gateway = gw
        say(f"  gateway:       http://{HOST}:{gw.port}   (admin API http://{HOST}:{gw.admin_port})")
        say(f"  fake Altegio:  {self.altegio.url}   (what it received: "
            f"http://{HOST}:{self.altegio.control}/_control/state)")
        say(f"  fake Telphin:  {self.telphin.url}   (state: "
            f"http://{HOST}:{self.telphin.control}/_control/state)")

    def create_tenant(self) -> None:
        assert self.gateway and self.altegio and self.telphin
        key = new_key()
        body = tenant_body(self.telphin, self.altegio, key)
        body["pbx"].update(queues=[sim.QUEUE], ivrs=[sim.IVR])
        status, answer = self.gateway.admin("POST", "/api/v1/tenants", body)
        if status != 201:
            raise SystemExit(f"creating the demo tenant: {status} {answer!r}")
        self.tenant = sim.Tenant(TENANT_ID, LOGIN, key)
        say()
        say(f"Created tenant {TENANT_ID} (\"{body['name']}\"): Telphin account {LOGIN} "
            f"→ Altegio chain {CRM_TOKEN}")
        say(f"  its Telphin webhooks: http://{HOST}:{self.gateway.port}"
            f"/events/{TENANT_ID}/<event>/{LOGIN}?key={key}")
        wait_for(lambda: CRM_TOKEN in self.altegio.state()["enabled"], 15,
                 "setup/enable at the fake Altegio")
        say("  the gateway sent Altegio setup/enable for the chain: enabled")
        if self.altegio_fails:
            status, count = self.altegio_fails
            self.altegio.faults(fail_status=status, fail_count=count)
            say(f"  the fake Altegio now answers {status} to "
                f"{'every request' if count is None else f'its next {count} request(s)'}")

    # The calls

    def play(self, number: int, name: str, title: str) -> None:
        assert self.gateway and self.altegio and self.telphin and self.tenant
        scenario = sim.SCENARIOS[name]
        call_id, steps = sim.call(name, self.tenant, self.rng)
        client = steps[0][2]["CallerIDNum"]
        # Telphin keeps the recordings; the gateway asks it for each RecID's link.
        self.telphin.setup(records={f["RecID"]: RECORDS_URL.format(f["RecID"])
                                    for _, _, f in steps if "RecID" in f})
        say()
        say(f"── Call {number}: {title} ({name!r} in bench/sim.py)")
        say(f"   from {client}, Telphin CallID {call_id}")
        started, delay, rang = time.time(), 0.0, False
        for at, event, fields in self.warp(steps):
            if event != "dial-in" and not rang:
                # The phones ring until the pop-ups are up (a real ring lasts seconds).
                rang = True
                waited = time.time()
                try:
                    wait_for(lambda: len(self.popups(client)) >= scenario.popups,
                             min(10.0, self.wait),
                             f"call {number}'s pop-ups", interval=0.05)
                except Timeout:
                    pass  # the check below names what is missing
                delay += time.time() - waited
            pause = started + at + delay - time.time()
            if pause > 0:
                time.sleep(pause)
            [hook] = sim.webhooks(self.tenant, call_id, [(at + delay, event, fields)], 0.0,
                                  1.0, started)
            status, _ = harness.request(self.gateway.port, "POST", hook.path, hook.body,
                                        {"Content-Type": hook.content_type})
            extension = fields["CalledNumber"].split("*")[-1]
            extra = f" Duration={int(fields['Duration']) / 1e6:.0f}s" if "Duration" in fields \
                else ""
            say(f"   webhook {event:<8} ext {extension:<4} {fields['CallStatus']:<8}"
                f"{extra:<16} → {status}")
            if status != 200:
                self.failures.append(f"call {number}: {event} answered {status}")

        def arrived() -> tuple[list[dict], list[dict]] | None:
            assert self.altegio
            popups = self.popups(client)
            records = [b for b in self.altegio.received("history")
                       if call_id in b.get("call_id", "")]
            if len(popups) >= scenario.popups and len(records) >= scenario.records:
                return popups, records
            return None

        try:
            popups, records = wait_for(arrived, self.wait, f"call {number}'s pop-ups and records",
                                       interval=0.1)
        except Timeout:  # the check below names what is missing
            popups = self.popups(client)
            records = [b for b in self.altegio.received("history")
                       if call_id in b.get("call_id", "")]
        say(f"   Altegio received {len(popups)} pop-up(s) (expected {scenario.popups}) and "
            f"{len(records)} history record(s) (expected {scenario.records}):")
        for b in popups:
            say(f"     pop-up  {b['type']} call from {b['phone']} on {b['user']}'s phone")
        for b in records:
            link = f", recording {b['link']}" if b.get("link") else ""
            say(f"     record  {b['type']} {b['status']}, {b['duration']} s, user {b['user']}, "
                f"at {b['date']}{link}")
        if len(popups) != scenario.popups or len(records) != scenario.records:
            self.failures.append(f"call {number} ({name}): {len(popups)} pop-ups and "
                                 f"{len(records)} records, expected {scenario.popups} and "
                                 f"{scenario.records}")
        self.show_actions(call_id)

    def popups(self, client: str) -> list[dict]:
        """The pop-ups (``event`` bodies) the fake Altegio got for calls from ``client``."""
        assert self.altegio
        return [b for b in self.altegio.received("event") if b["phone"] == client]

    def warp(self, steps: list[sim.Step]) -> list[sim.Step]:
        """The steps with every pause between two of them cut to at most ``max_gap`` s: a
        ring still comes before its answer or cancel (so the pop-ups are shown), but a
        four-minute talk takes a second.  The fields (``Duration`` too) stay as they were."""
        out, last, at = [], 0.0, 0.0
        for t, event, fields in steps:
            at += min(t - last, self.max_gap)
            last = t
            out.append((at, event, fields))
        return out

    def show_actions(self, call_id: str) -> None:
        """The gateway's own account of the call: its actions and their delivery attempts."""
        assert self.gateway
        status, calls = self.gateway.admin("GET", f"/api/v1/tenants/{TENANT_ID}/calls?limit=50")
        if status != 200:
            self.failures.append(f"GET calls: {status} {calls!r}")
            return
        mine = [c for c in calls if call_id in c["call"]]
        say(f"   the gateway's actions (GET /api/v1/tenants/{TENANT_ID}/calls):")
        for c in mine:
            for a in c["actions"]:
                tries = ", ".join(f"{t['outcome']} {t['status']}" for t in a["attempt_log"])
                say(f"     {a['kind']:<12} {a['state']:<8} attempts: {tries or '-'}")

    # Afterwards

    def summary(self) -> None:
        say()
        if self.failures:
            say("DEMO FAILED:")
            for failure in self.failures:
                say(f"  - {failure}")
        else:
            say("All calls delivered: every expected pop-up and history record reached the "
                "fake Altegio.")

    def explore(self) -> None:
        assert self.gateway and self.altegio
        gw = self.gateway
        say()
        say("Everything keeps running.  The operator UI (sign in with the admin token): "
            f"http://{HOST}:{gw.admin_port}/ui/")
        say("Or explore it with curl from another terminal:")
        say(f"  TOKEN=$(cat {gw.token_file})")
        say(f"  curl -s localhost:{gw.admin_port}/api/v1/tenants/{TENANT_ID}/calls "
            "-H \"Authorization: Bearer $TOKEN\"")
        say(f"  curl -s localhost:{gw.admin_port}/api/v1/tenants/{TENANT_ID} "
            "-H \"Authorization: Bearer $TOKEN\"")
        say(f"  curl -s localhost:{gw.port}/healthz")
        say(f"  curl -s localhost:{self.altegio.control}/_control/state   "
            "# what the fake Altegio received")
        say(f"Logs: {self.logs}.  Press Ctrl-C to stop the gateway and the fakes.")
        while True:
            time.sleep(1)
            for proc in self.procs.all if self.procs else []:
                if not proc.alive():
                    say(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
                    return

    def stop(self) -> None:
        if self.procs is not None:
            self.procs.close()
            say("Stopped the gateway and the fakes.")


def _fails(text: str) -> tuple[int, int | None]:
    status, _, count = text.partition("x")
    try:
        return int(status), int(count) if count else None
    except ValueError:
        raise argparse.ArgumentTypeError("expected STATUS or STATUSxCOUNT, e.g. 503x2") from None


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path("var/demo"),
                        help="throwaway directory: database, token, key, logs (var/demo)")
    parser.add_argument("--port", type=int, default=8080,
                        help="the gateway's public port (8080; 0: any free port)")
    parser.add_argument("--admin-port", type=int, default=8081,
                        help="the admin API's port (8081; 0: any free port)")
    parser.add_argument("--seed", type=int, default=13, help="seed of the simulated calls")
    parser.add_argument("--max-gap", type=float, default=1.0,
                        help="longest pause in seconds between two webhooks of a call (1)")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="seconds to wait for each call's pop-ups and records (20)")
    parser.add_argument("--altegio-fails", type=_fails, metavar="STATUS[xCOUNT]",
                        help="after set-up the fake Altegio answers STATUS to its next COUNT "
                             "requests (all of them without xCOUNT): 503x2 shows retries")
    parser.add_argument("--once", action="store_true",
                        help="exit after the calls: 0 if all were delivered, 1 otherwise")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Ctrl-C stops the demo even when it was started with SIGINT ignored (in the background).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    demo = Demo(args.dir, args.port, args.admin_port, args.seed, args.max_gap, args.wait,
                args.altegio_fails)
    try:
        demo.start()
        demo.create_tenant()
        for number, (name, title) in enumerate(CALLS, start=1):
            demo.play(number, name, title)
        demo.summary()
        if not args.once:
            demo.explore()
    except KeyboardInterrupt:
        say()
    except (Timeout, AssertionError) as e:
        demo.failures.append(str(e))
        demo.summary()
        if demo.procs is not None:
            say(demo.procs.tails())
    finally:
        demo.stop()
    return 1 if demo.failures else 0


if __name__ == "__main__":
    sys.exit(main())
