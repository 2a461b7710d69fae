"""``make demo`` (bench/demo.py): the gateway, the fakes, a tenant and three calls.

The demo runs as a newcomer runs it, in a subprocess, on free ports and in the test's own
directory (never var/demo/).  ``--once`` must exit 0 only when every pop-up and record the
scenarios promise reached the fake Altegio; without it the demo must keep everything up
until Ctrl-C and then stop every process it started.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.integration.harness import HOST, REPO, json_request, request, wait_for


def demo_argv(directory: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bench.demo", "--port", "0", "--admin-port", "0",
            "--dir", str(directory), "--max-gap", "0.3", *extra]


def refused(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1):
            return False
    except OSError:
        return True


def test_once_plays_three_calls_and_checks_altegio(tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(demo_argv(tmp_path / "demo", "--once"), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert time.monotonic() - started < 30, out
    # The calls and what the fake Altegio got for each, as the scenarios promise.
    assert "── Call 1: answered call to extension 101" in out
    assert "── Call 2: caller hangs up in the IVR (500): a missed call" in out
    assert "── Call 3: queue 600 rings 101, 102 and 103 at once" in out
    counts = re.findall(r"Altegio received (\d) pop-up\(s\) \(expected (\d)\) and "
                        r"(\d) history record\(s\) \(expected (\d)\)", out)
    assert counts == [("1", "1", "1", "1"), ("0", "0", "1", "1"), ("3", "3", "1", "1")], out
    assert "record  incoming success" in out and "record  incoming missed" in out
    assert "recording https://storage.telphin.example/rec/" in out
    # Each webhook was accepted, and the gateway's own log shows every action delivered.
    webhooks = re.findall(r"webhook .* → (\d+)", out)
    assert len(webhooks) == 3 + 2 + 9 and set(webhooks) == {"200"}, out
    actions = re.findall(r"^\s+(popup|record)\s+(\w+)\s+attempts: (.*)$", out, re.M)
    assert len(actions) == (1 + 0 + 3) + (1 + 1 + 1), out  # pop-ups, then records
    assert all(state == "done" and tries.startswith("done 202") for _, state, tries in actions)
    assert "All calls delivered" in out and "DEMO FAILED" not in out
    assert "Stopped the gateway and the fakes." in out
    # Its state stayed in the directory it was given.
    assert (tmp_path / "demo" / "gateway.sqlite").exists()
    assert (tmp_path / "demo" / "admin-token").exists()


def test_keeps_running_until_ctrl_c_then_stops_everything(tmp_path: Path) -> None:
    log = tmp_path / "demo.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(demo_argv(tmp_path / "demo"), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: "Press Ctrl-C" in log.read_text() or proc.poll() is not None, 45,
                 "the demo to finish its calls")
        text = log.read_text()
        assert proc.poll() is None, text
        assert "All calls delivered" in text, text
        port, admin = map(int, re.search(
            r"gateway: +http://127\.0\.0\.1:(\d+) +\(admin API http://127\.0\.0\.1:(\d+)\)",
            text).groups())
        fakes = [int(p) for p in re.findall(r"fake \w+: +http://127\.0\.0\.1:(\d+)", text)]
        assert len(fakes) == 2, text
        token_file = re.search(r"TOKEN=\$\(cat (.+)\)", text).group(1)
        # Still up, and the printed token opens the admin API.
        token = Path(token_file).read_text().strip()
        status, calls = json_request(admin, "GET", "/api/v1/tenants/807/calls",
                                     headers={"Authorization": f"Bearer {token}"})
        assert status == 200 and len(calls) == 3, calls
        status, health = json_request(port, "GET", "/healthz")
        assert status == 200 and health["ok"], health
        ui = re.search(r"operator UI .*: (http://\S+)", text).group(1)
        assert ui == f"http://{HOST}:{admin}/ui/", text
        status, _ = request(admin, "GET", "/ui/")
        assert status in (200, 302, 303), status  # the sign-in page, or a redirect to it
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0, log.read_text()
        assert "Stopped the gateway and the fakes." in log.read_text()
        for p in (port, admin, *fakes):
            wait_for(lambda p=p: refused(p), 5, f"port {p} closed")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_once_exits_1_when_altegio_gets_nothing(tmp_path: Path) -> None:
    """The fake Altegio refuses every write after set-up (422): the demo shows the failed
    attempts, names each call's shortfall and exits 1."""
    done = subprocess.run(demo_argv(tmp_path / "demo", "--once", "--wait", "1",
                                    "--altegio-fails", "422"),
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert "the fake Altegio now answers 422 to every request" in out
    assert "All calls delivered" not in out and "DEMO FAILED:" in out
    assert "- call 1 (direct answered): 0 pop-ups and 0 records, expected 1 and 1" in out
    assert "- call 3 (queue with parallel ring): 0 pop-ups and 0 records, expected 3 and 1" \
        in out
    assert "attempts: failed 422" in out
    assert "Stopped the gateway and the fakes." in out
