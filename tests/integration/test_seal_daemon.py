"""Secrets at rest on the real daemon: the key file it makes beside the admin token, a
database holding none of the tenant's secrets in clear, and a start with another key
refused with a message that says so."""

from __future__ import annotations

import os
import stat

from cryptography.fernet import Fernet

from tests.integration.harness import (CLIENT_ID, CRM_TOKEN, Gateway, Processes,
                                       TelphinCall, new_key, start_fake, tenant_body,
                                       wait_for)

# Longer than the harness's "SECRET" and "T", which a grep would find anywhere.
CLIENT_SECRET = "telphin-client-secret-5e8a1c"
PARTNER_TOKEN = "altegio-partner-token-93bd07"


def test_the_daemon_seals_secrets_and_refuses_another_key(procs: Processes) -> None:
    altegio = start_fake(procs, "altegio", "--partner-token", PARTNER_TOKEN)
    telphin = start_fake(procs, "telphin", "--client", f"{CLIENT_ID}:{CLIENT_SECRET}")
    gateway = Gateway(procs, procs.tmp).start()
    key = new_key()
    body = tenant_body(telphin, altegio, key)
    body["pbx"]["client_secret"] = CLIENT_SECRET
    body["crm"]["partner_token"] = PARTNER_TOKEN
    status, reply = gateway.admin("POST", "/api/v1/tenants", body)
    assert status == 201, reply
    wait_for(lambda: CRM_TOKEN in altegio.state()["enabled"], 10, "setup/enable")
    call = TelphinCall()
    assert gateway.event(*call.dial_in(), key) == 200
    wait_for(lambda: altegio.received("event"), 10, "the pop-up")
    gateway.wait_drained(10)
    key_file = procs.tmp / "secret-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    secrets = (CLIENT_SECRET, CRM_TOKEN, PARTNER_TOKEN, key)
    db = str(gateway.db)

    def in_clear() -> list[tuple[str, str]]:
        found = []
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(db + suffix):
                assert stat.S_IMODE(os.stat(db + suffix).st_mode) == 0o600, suffix
                data = open(db + suffix, "rb").read()
                found += [(suffix, s) for s in secrets if s.encode() in data]
        return found

    assert in_clear() == []  # running: the WAL and its index too
    gateway.proc.stop()
    assert in_clear() == []

    key_file.write_bytes(Fernet.generate_key() + b"\n")
    refused = procs.start("gateway-another-key", gateway.argv(), cwd=procs.tmp)
    assert refused.wait(30) == 1  # it exits on its own, saying it failed
    assert f"sealed with another key than {key_file}" in refused.output(), refused.tail()
    assert "gateway ready" not in refused.output()
