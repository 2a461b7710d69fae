"""Helpers for the integration tests: real processes on loopback, plain synchronous HTTP.

Everything here is blocking on purpose: the tests drive a ``twistd gateway`` subprocess and
the fake upstreams (``python -m tests.fakes.*``) the way an operator and a PBX would, over
TCP, with bounded polls instead of fixed sleeps.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlencode

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
HOST = "127.0.0.1"

TENANT_ID = 807
LOGIN = "TLP55522"
CLIENT_ID, CLIENT_SECRET = "ID", "SECRET"
PARTNER_TOKEN = "T"
CRM_TOKEN = "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"
CLIENT_NUMBER = "+79161234567"
DID = "74951234567"
PREFIX = "7001"


class Timeout(AssertionError):
    """A bounded wait ran out; the message says what was awaited and what was seen last."""


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after
    ``timeout`` seconds.  Exceptions from the predicate count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = predicate()
        except Exception as e:  # not up yet, connection refused, ...
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}"[:2000])
        time.sleep(interval)


def free_port() -> int:
    """A TCP port that was free a moment ago (twistd needs a number, not tcp:0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    """One HTTP request on its own connection; returns (status, body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def json_request(port: int, method: str, path: str, body: Any = None,
                 headers: dict[str, str] | None = None,
                 timeout: float = 10.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})} if data is not None else \
        dict(headers or {})
    status, raw = request(port, method, path, data, hdrs, timeout)
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw.decode("utf-8", "replace")


# Processes


class Process:
    """A child process whose output goes to files in the test's directory."""

    def __init__(self, name: str, argv: list[str], cwd: Path, logdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.out_path = logdir / f"{name}.out"
        self.err_path = logdir / f"{name}.err"
        # Append: a restarted gateway keeps one log across its lives.
        with open(self.out_path, "ab") as out, open(self.err_path, "ab") as err:
            self.popen = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err,
                                          stdin=subprocess.DEVNULL, env=_env(env))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap (no-op when already gone)."""
        if self.alive():
            os.kill(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
            pass

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not go within ``grace`` seconds."""
        if self.alive():
            os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        text = ""
        for path in (self.out_path, self.err_path):
            if path.exists():
                body = path.read_text(errors="replace").splitlines()[-lines:]
                text += f"--- {path.name} (last {len(body)} lines)\n" + "\n".join(body) + "\n"
        return text


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Processes:
    """Every process one test started; ``close`` kills whatever is still running."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.all: list[Process] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Process:
        """Start a process; ``env`` is added to this process's environment."""
        proc = Process(name, argv, cwd or self.tmp, self.tmp, env)
        self.all.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.all):
            proc.stop(grace=3.0)

    def tails(self) -> str:
        return "\n".join(proc.tail() for proc in self.all)


# The fakes


class Fake:
    """A fake upstream in its own process, steered through its control port."""

    def __init__(self, proc: Process, port: int, control: int) -> None:
        self.proc = proc
        self.port = port
        self.control = control
        self.url = f"http://{HOST}:{port}"

    def _control(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = json_request(self.control, method, f"/_control/{path}", body)
        if status != 200:
            raise AssertionError(f"{self.proc.name} control {path}: {status} {answer!r}")
        return answer

    def faults(self, **fields: Any) -> Any:
        return self._control("POST", "faults", fields)

    def clear_faults(self) -> Any:
        return self._control("POST", "faults", {"clear": True})

    def refuse(self) -> Any:
        return self._control("POST", "refuse")

    def accept(self) -> Any:
        return self._control("POST", "accept")

    def setup(self, **config: Any) -> Any:
        return self._control("POST", "setup", config)

    def state(self) -> dict[str, Any]:
        return self._control("GET", "state")


class FakeMegaplan(Fake):
    """``python -m tests.fakes.megaplan``: ``domain`` is what a tenant's ``crm.domain`` is
    set to (the gateway needs GATEWAY_ALLOW_LOOPBACK_CRM=1 to accept it)."""

    @property
    def domain(self) -> str:
        return f"{HOST}:{self.port}"

    def calls(self) -> list[dict]:
        """Snapshots of every CallInfo (providerId, entity, states, writes, via_history)."""
        return self.state()["calls"]


class FakeAltegio(Fake):
    def received(self, command: str | None = None, include_ignored: bool = False) -> list[dict]:
        """Accepted bodies (with their arrival time under ``_at``), oldest first."""
        out = []
        for entry in self.state()["received"]:
            if entry["ignored"] and not include_ignored:
                continue
            if command is None or entry["body"]["command"] == command:
                out.append({**entry["body"], "_at": entry["at"]})
        return out


def start_fake(procs: Processes, kind: str, *args: str, timeout: float = 15.0,
               name: str | None = None) -> Any:
    """Start ``python -m tests.fakes.<kind>`` and wait for its ``READY`` line.  Give each
    fake of a kind its own ``name``: its output file is named after it."""
    proc = procs.start(name or f"fake-{kind}", [sys.executable, "-m", f"tests.fakes.{kind}",
                                        "--port", "0", "--control-port", "0", *args],
                       cwd=REPO)

    def ready() -> tuple[int, int] | None:
        if not proc.alive():
            raise AssertionError(f"fake {kind} exited with {proc.popen.returncode}:\n"
                                 + proc.tail())
        for line in proc.output().splitlines():
            if line.startswith("READY "):
                fields = dict(part.split("=", 1) for part in line.split()[1:])
                return int(fields["port"]), int(fields["control"])
        return None

    try:
        port, control = wait_for(ready, timeout, f"fake {kind} READY")
    except Timeout:
        raise Timeout(f"fake {kind} not ready:\n{proc.tail()}") from None
    cls = {"altegio": FakeAltegio, "megaplan": FakeMegaplan}.get(kind, Fake)
    return cls(proc, port, control)


# The gateway


class Gateway:
    """``twistd -n gateway`` in a subprocess, with its own directory, ports and database."""

    def __init__(self, procs: Processes, directory: Path, extra: Iterable[str] = (),
                 env: dict[str, str] | None = None) -> None:
        self.procs = procs
        self.dir = directory
        self.port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.port:
            self.admin_port = free_port()
        self.db = directory / "g.sqlite"
        self.token_file = directory / "token"
        self.extra = list(extra)
        self.env = dict(env or {})  # added to the gateway process's environment
        self.proc: Process | None = None
        self.lives = 0

    def argv(self) -> list[str]:
        return [str(TWISTD), "-n", "--pidfile=", "gateway",
                "--listen", f"tcp:{self.port}:interface={HOST}",
                "--admin-listen", f"tcp:{self.admin_port}:interface={HOST}",
                "--database", f"sqlite:{self.db}",
                "--admin-token-file", str(self.token_file), *self.extra]

    def start(self, timeout: float = 20.0) -> "Gateway":
        self.lives += 1
        self.proc = self.procs.start(f"gateway-{self.dir.name}-{self.lives}", self.argv(),
                                     cwd=self.dir, env=self.env)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> dict:
        proc = self.proc
        assert proc is not None

        def ready() -> dict | None:
            if not proc.alive():
                raise AssertionError(f"gateway exited with {proc.popen.returncode}:\n"
                                     + proc.tail())
            status, body = self.healthz()
            return body if status == 200 and isinstance(body, dict) and body.get("ok") \
                else None

        try:
            return wait_for(ready, timeout, "gateway /healthz ok")
        except Timeout:
            raise Timeout(f"gateway not ready:\n{proc.tail()}") from None

    def healthz(self) -> tuple[int, Any]:
        return json_request(self.port, "GET", "/healthz", timeout=5)

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return json_request(self.admin_port, method, path, body,
                            {"Authorization": f"Bearer {self.token}"})

    def event(self, event: str, fields: dict[str, str], key: str,
              timeout: float = 10.0) -> int:
        """POST one Telphin event, form-encoded; returns the HTTP status."""
        status, _ = request(
            self.port, "POST", f"/events/{TENANT_ID}/{event}/{LOGIN}?key={key}",
            urlencode(fields).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"}, timeout)
        return status

    def wait_drained(self, timeout: float) -> dict:
        """Until nothing is left to fold or deliver (outbox depth 0, fold lag 0)."""
        def drained() -> dict | None:
            status, body = self.healthz()
            if status == 200 and body["outbox_depth"] == 0 and body["fold_lag_events"] == 0:
                return body
            return None
        return wait_for(drained, timeout, "the outbox to drain", interval=0.2)


def tenant_body(telphin: Fake, altegio: Fake, key: str) -> dict[str, Any]:
    return {
        "id": TENANT_ID, "name": "ACME", "key": key,
        "pbx": {"kind": "telphin", "login": LOGIN, "api_url": telphin.url,
                "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET},
        "crm": {"kind": "altegio", "api_url": altegio.url, "partner_token": PARTNER_TOKEN,
                "crm_token": CRM_TOKEN},
        "options": {"default_number": "74951234567"},
    }


def new_key() -> str:
    return secrets.token_urlsafe(24)  # 32 URL-safe characters


# Telphin events


def now_us() -> int:
    return int(time.time() * 1_000_000)


class TelphinCall:
    """One incoming call from the client's number to extension ``ext`` (one leg), as the
    form fields Telphin would post (telphin.md §3.3)."""

    def __init__(self, ext: str = "101", ext_id: str = "200501",
                 caller: str = CLIENT_NUMBER) -> None:
        self.call_id = secrets.token_hex(16)
        self.sub_call_id = f"{ext_id}-{secrets.token_hex(16)}"
        self.ext = ext
        self.ext_id = ext_id
        self.caller = caller
        self.api_id = f"3584700000-{self.call_id[:8]}"
        self.rec_id = f"{ext_id}-{secrets.token_hex(16).upper()}"
        self.ring_at = 0

    @property
    def record_id(self) -> str:
        """The gateway's ``call_id`` for this leg's record."""
        return f"{TENANT_ID}-{self.call_id}-{self.sub_call_id}"

    @property
    def missed_id(self) -> str:
        return f"{TENANT_ID}-{self.call_id}-missed"

    def _base(self, event_type: str, status: str, at: int) -> dict[str, str]:
        return {
            "EventType": event_type, "CallID": self.call_id, "SubCallID": self.sub_call_id,
            "CallFlow": "in", "CallStatus": status,
            "CallerIDNum": self.caller, "CallerIDName": self.caller,
            "CalledDID": DID, "CalledNumber": f"{PREFIX}*{self.ext}",
            "CalledExtension": f"{PREFIX}*{self.ext}@sipproxy.telphin.ru",
            "CalledExtensionID": self.ext_id, "CallAPIID": self.api_id,
            "EventTime": str(at),
        }

    def dial_in(self, at: int | None = None) -> tuple[str, dict[str, str]]:
        self.ring_at = at or now_us()
        return "dial-in", self._base("dial-in", "CALLING", self.ring_at)

    def answer(self, at: int | None = None) -> tuple[str, dict[str, str]]:
        return "answer", self._base("answer", "ANSWER", at or now_us())

    def hangup(self, status: str = "ANSWER", duration_us: int = 0, recorded: bool = False,
               at: int | None = None) -> tuple[str, dict[str, str]]:
        fields = self._base("hangup", status, at or now_us())
        fields["Duration"] = str(duration_us)
        if recorded:
            fields["RecID"] = self.rec_id
        return "hangup", fields


def kill_during_burst(send: Callable[[tuple[str, dict[str, str]]], int],
                      groups: list[tuple["TelphinCall", ...]], kill: Callable[[], None],
                      workers: int = 20) -> tuple[set[str], float]:
    """Answered Telphin calls (dial-in, answer, hangup each; the calls of one group step by
    step together, as two lines ringing at once) sent from a thread pool, and ``kill``
    called half way (see ``burst``).  The ids of the calls every webhook of which was
    answered 200, and when the kill came."""
    def steps(call: TelphinCall) -> list[Callable[[], int]]:
        return [lambda s=s: send(s) for s in (
            call.dial_in(), call.answer(), call.hangup("ANSWER", duration_us=12_400_000))]
    return burst([[(call.call_id, steps(call)) for call in group] for group in groups],
                 kill, workers)


def burst(groups: list[list[tuple[str, list[Callable[[], int]]]]], kill: Callable[[], None],
          workers: int = 20) -> tuple[set[str], float]:
    """Calls sent from a thread pool, each a name and its webhooks (each a function that
    sends it and gives the HTTP status); the calls of one group go step by step together.
    ``kill`` is called once half the webhooks have gone, while the rest are still being
    sent.  Returns the names of the calls every webhook of which was answered 200, and how
    many seconds in the kill came."""
    total = sum(len(steps) for group in groups for _, steps in group)
    sent = 0
    lock = threading.Lock()
    half = threading.Event()
    complete: set[str] = set()

    def one(step: Callable[[], int]) -> int:
        nonlocal sent
        try:
            return step()
        except OSError:  # refused, reset or cut short by the kill
            return 0
        finally:
            with lock:
                sent += 1
                if sent >= total // 2:
                    half.set()

    def run(group: list[tuple[str, list[Callable[[], int]]]]) -> None:
        ok = {name: True for name, _ in group}
        for at in range(max(len(steps) for _, steps in group)):
            for name, steps in group:
                if at < len(steps) and ok[name] and one(steps[at]) != 200:
                    ok[name] = False
        with lock:
            complete.update(name for name, good in ok.items() if good)

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run, group) for group in groups]
        assert half.wait(30), "the burst did not get half way"
        kill()
        killed_after = time.monotonic() - started
        for f in futures:
            f.result(timeout=30)
    with lock:
        return set(complete), killed_after
