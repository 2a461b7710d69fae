"""The real ``twistd gateway`` at its edges (issue 8, cases 4, 5 and 8): requests an attacker
or a clumsy PBX would send, over raw TCP, and the whole log grepped afterwards.

One gateway (with the fakes) serves every case of a test; the file runs in a few seconds.
"""

from __future__ import annotations

import secrets
import socket
import time
from urllib.parse import urlencode

from tests.integration.harness import (
    CLIENT_ID,
    CRM_TOKEN,
    HOST,
    LOGIN,
    TENANT_ID,
    Gateway,
    Processes,
    TelphinCall,
    start_fake,
    wait_for,
)


def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read until the server closes it."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:  # answered (413, 414) and closed before all of it was sent
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return out


def status(answer: bytes) -> int | None:
    head = answer.split(b"\r\n", 1)[0].split()
    return int(head[1]) if len(head) > 1 and head[0].startswith(b"HTTP/") else None


class Secrets:
    """Distinctive values for every secret, so a grep of the log cannot miss one."""

    def __init__(self) -> None:
        self.key = "tenantkey" + secrets.token_hex(12)
        self.client_secret = "clientsecret" + secrets.token_hex(8)
        self.partner_token = "partnertoken" + secrets.token_hex(8)

    def all(self, admin_token: str) -> dict[str, str]:
        return {"tenant key": self.key, "admin token": admin_token,
                "pbx.client_secret": self.client_secret,
                "crm.partner_token": self.partner_token}


def deploy(procs: Processes, extra: tuple[str, ...] = ()) -> tuple[Gateway, Secrets]:
    s = Secrets()
    altegio = start_fake(procs, "altegio", "--partner-token", s.partner_token)
    telphin = start_fake(procs, "telphin", "--client", f"{CLIENT_ID}:{s.client_secret}")
    gateway = Gateway(procs, procs.tmp, extra)
    # Made beforehand: a token the gateway generates is printed once, on purpose.
    gateway.token_file.write_text(secrets.token_urlsafe(32) + "\n")
    gateway.start()
    code, body = gateway.admin("POST", "/api/v1/tenants", {
        "id": TENANT_ID, "name": "ACME", "key": s.key,
        "pbx": {"kind": "telphin", "login": LOGIN, "api_url": telphin.url,
                "client_id": CLIENT_ID, "client_secret": s.client_secret},
        "crm": {"kind": "altegio", "api_url": altegio.url, "partner_token": s.partner_token,
                "crm_token": CRM_TOKEN},
        "options": {"default_number": "74951234567"},
    })
    assert code == 201, body
    wait_for(lambda: CRM_TOKEN in altegio.state()["enabled"], 10, "setup/enable")
    return gateway, s


def test_no_secret_reaches_the_log_whatever_the_request(procs: Processes) -> None:
    gw, s = deploy(procs)
    key, token = s.key.encode(), gw.token.encode()
    events = f"/events/{TENANT_ID}/dial-in/{LOGIN}".encode()
    close = b"Host: gw\r\nConnection: close\r\n"
    fields = urlencode(TelphinCall().dial_in()[1]).encode()
    public = [
        # a HEAD answered with a body made twisted.web log "Warning: HEAD request
        # <Request … uri=…>" (public.py answers HEAD without one now; the repr is masked)
        (b"HEAD " + events + b"?key=" + key + b" HTTP/1.1\r\n" + close + b"\r\n", 405),
        # a byte Twisted lets through (0x80-0xb0): the repr of such a request used to fail
        # into a "MESSAGE LOST" line holding the whole URI
        (b"HEAD " + events + b"?key=" + key + b"&x=\xa9 HTTP/1.1\r\n" + close + b"\r\n", 405),
        (b"GET " + events + b"?key=" + key + b"&x=\xa9 HTTP/1.1\r\n" + close + b"\r\n", 400),
        (b"GET /healthz?key=" + key + b"&x=\x80 HTTP/1.1\r\n" + close + b"\r\n", None),
        (b"GET /nope\xa9?key=" + key + b" HTTP/1.1\r\n" + close + b"\r\n", 400),
        # %6bey is the key (the same name once decoded): accepted, and masked
        (b"GET " + events + b"?%6bey=" + key + b"&" + fields + b" HTTP/1.1\r\n" + close
         + b"\r\n", 200),
        (b"GET " + events + b"?KEY=" + key + b"&" + fields + b" HTTP/1.1\r\n" + close
         + b"\r\n", 403),
        (b"POST " + events + b"?key=" + key + b"&client_secret=" + s.client_secret.encode()
         + b"&partner_token=" + s.partner_token.encode() + b" HTTP/1.1\r\n" + close
         + b"Content-Length: 0\r\n\r\n", 400),
        (b"GET /healthz?x=1 HTTP/1.1\r\n" + close + b"Referer: https://pbx/?key=" + key
         + b"\r\n\r\n", None),
        # bad requests carrying the key: Twisted's 400s, and the limits' 413/414/431
        (b"GET " + events + b"?key=" + key + b" HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET " + events + b"?key=" + key + b" HTTP/1.1\r\nBad Header\r\n\r\n", 400),
        (b"POST " + events + b"?key=" + key + b" HTTP/1.1\r\n" + close
         + b"Content-Length: 1073741824\r\n\r\n", 413),
        (b"POST " + events + b"?key=" + key + b" HTTP/1.1\r\n" + close
         + b"Transfer-Encoding: chunked\r\n\r\n" + b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
         + b"100000\r\n" + b"x" * 0x100000 + b"\r\n", 413),
        (b"GET " + events + b"?key=" + key + b"&pad=" + b"p" * 9000 + b" HTTP/1.1\r\n"
         + close + b"\r\n", 414),
        (b"GET " + events + b"?key=" + key + b" HTTP/1.1\r\n" + close + b"X-Big: "
         + b"b" * 9000 + b"\r\n\r\n", 431),
    ]
    for request, expected in public:
        answer = raw(gw.port, request)
        if expected is not None:
            assert status(answer) == expected, (request[:120], answer[:200])
    admin = [
        b"GET /api/v1/tenants?token=" + token + b" HTTP/1.1\r\n" + close + b"\r\n",
        b"GET /api/v1/tenants?access_token=" + token + b" HTTP/1.1\r\n" + close + b"\r\n",
        b"HEAD /api/v1/tenants?access_token=" + token + b"&x=\xa9 HTTP/1.1\r\n" + close
        + b"\r\n",
        b"GET /api/v1/tenants?Access%5FToken=" + token + b" HTTP/1.1\r\n" + close + b"\r\n",
    ]
    for request in admin:
        assert status(raw(gw.admin_port, request)) == 401
    # Let the last lines reach the file, then stop the daemon (its shutdown logs too).
    time.sleep(0.3)
    assert gw.proc is not None
    gw.proc.stop()
    log = gw.proc.output() + gw.proc.err_path.read_text(errors="replace")

    for what, value in s.all(gw.token).items():
        assert value not in log, f"the {what} is in the gateway's log"
    assert "MESSAGE LOST" not in log
    # The requests were logged (masked), so the grep above looked at something.
    for expected in ("?key=***", "?%6bey=***", "?KEY=***", "?token=***",
                     "?access_token=***", "?Access%5FToken=***", "client_secret=***",
                     '"https://pbx/?key=***"', '" 413 ', ': 414 request line', '" 431 '):
        assert expected in log, expected


def test_the_deadline_and_the_per_source_cap_flags(procs: Processes) -> None:
    gw = Gateway(procs, procs.tmp, ("--request-deadline", "1",
                                    "--max-connections-per-ip", "3")).start()
    # A slowloris: the request line is never finished.
    with socket.create_connection((HOST, gw.port), timeout=5) as slow:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        started = time.monotonic()
        answer = slow.recv(65536)
        assert status(answer) == 408, answer
        assert time.monotonic() - started < 4
    # 127.0.0.2 holds three connections and gets 503 for a fourth; 127.0.0.1 is served.
    def hog() -> socket.socket:
        return socket.create_connection((HOST, gw.port), timeout=5,
                                        source_address=("127.0.0.2", 0))

    held = [hog() for _ in range(3)]
    try:
        # (Idle, they are left to the 60 s idle timeout, not cut off by the 1 s deadline.)
        fourth = hog()
        fourth.sendall(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert status(fourth.recv(65536)) == 503
        fourth.close()
        code, body = gw.healthz()
        assert code == 200, body
    finally:
        for s in held:
            s.close()
    # Body limit of the public site: --max-body, checked before the body is read.
    answer = raw(gw.port, f"POST /events/1/dial-in/X HTTP/1.1\r\nHost: gw\r\nConnection: "
                          f"close\r\nContent-Length: {65537}\r\n\r\n".encode())
    assert status(answer) == 413, answer
