"""Secrets at rest: tenants' secrets, named credentials and obtained tokens are sealed in the
store with the key beside the admin token; another key, or none, refuses to start; the key
rotates; the database files are 0600; a database of an older gateway is sealed on its first
start with a key; and a running gateway's files hold none of its secrets in clear."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.fernet import Fernet
from twisted.internet import reactor
from twisted.python import usage

from gateway import tap
from gateway.httpclient import HttpClient
from gateway.model import parse_tenant
from gateway.seal import SealError, Sealer, key_file
from gateway.service import Gateway
from gateway.store.sqlite import SQLiteStore
from tests.test_admin import (CRM_TOKEN, KEY, PARTNER, PBX_SECRET, TOKEN, Harness, LaterStub,
                              eventually, tenant_body)
from tests.test_public import DIAL_IN

MP_PASSWORD = "megaplan-password-41c7e9"
ACCESS = "megaplan-access-token-8d2f0a6b"
REFRESH = "megaplan-refresh-token-3e9c51f7"
CRED_PASSWORD = "named-credential-password-77a1"
EXPIRED = "megaplan-access-token-expired-0c4d"
TOKEN_KEY = "megaplan:acme.megaplan.ru:robot"

TELPHIN_ALTEGIO = tenant_body()
MEGAPLAN = {**tenant_body(808), "key": "tenant-key-of-the-megaplan-one",
            "pbx": {"kind": "telphin", "login": "TLP55523", "client_id": "app2",
                    "client_secret": PBX_SECRET + "-2"},
            "crm": {"kind": "megaplan", "domain": "acme.megaplan.ru", "login": "robot",
                    "password": MP_PASSWORD}}
CREDENTIAL = {"kind": "megaplan", "name": "Main office",
              "fields": {"domain": "acme.megaplan.ru", "login": "robot",
                         "password": CRED_PASSWORD}}
SECRETS = (KEY, PBX_SECRET, PARTNER, CRM_TOKEN, MEGAPLAN["key"], PBX_SECRET + "-2",
           MP_PASSWORD, ACCESS, REFRESH, CRED_PASSWORD, EXPIRED)


def database_files(path: str) -> dict[str, bytes]:
    """The bytes of the database file and its -wal and -shm, those that exist."""
    return {suffix: Path(path + suffix).read_bytes() for suffix in ("", "-wal", "-shm")
            if os.path.exists(path + suffix)}


def in_clear(path: str) -> list[tuple[str, str]]:
    """(file suffix, secret) of every secret found in clear in the database files."""
    return [(suffix or "db", secret) for suffix, data in database_files(path).items()
            for secret in SECRETS if secret.encode() in data]


def sealed_tokens(path: str) -> list[str]:
    """Every Fernet token stored in the SQLite file."""
    db = sqlite3.connect(path)
    try:
        found = []
        for table in ("tenants", "credentials", "tokens"):
            for (data,) in db.execute(f"SELECT data FROM {table}"):
                found += re.findall(r'"\$sealed":"([^"]+)"', data)
        found += re.findall(r'"\$sealed":"([^"]+)"',
                            db.execute("SELECT probe FROM seal").fetchone()[0])
        return found
    finally:
        db.close()


async def fill(store: Any) -> int:
    """A tenant with secrets of every kind, a named credential and an OAuth token."""
    await store.put_tenant(parse_tenant(TELPHIN_ALTEGIO), 10.0)
    await store.put_tenant(parse_tenant(MEGAPLAN), 10.0)
    await store.put_token(TOKEN_KEY, {"access_token": ACCESS, "refresh_token": REFRESH})
    return await store.put_credential(CREDENTIAL, 10.0)


async def check_filled(store: Any, cid: int) -> None:
    tenants = {t.id: t for t in await store.tenants()}
    assert tenants[807].to_json(secrets=True) == parse_tenant(TELPHIN_ALTEGIO).to_json(
        secrets=True)
    assert tenants[808].crm.password == MP_PASSWORD
    assert (await store.credential(cid))["fields"] == CREDENTIAL["fields"]
    assert [c["fields"] for c in await store.credentials("megaplan")] == [
        CREDENTIAL["fields"]]
    assert await store.token(TOKEN_KEY) == {"access_token": ACCESS, "refresh_token": REFRESH}


# The sealer on its own


def test_a_sealed_value_opens_with_its_key_and_only_with_it() -> None:
    sealer, other = Sealer.generate(), Sealer.generate("var/other-key")
    sealed = sealer.seal({"password": MP_PASSWORD})
    assert MP_PASSWORD not in str(sealed)
    assert sealer.open(sealed) == {"password": MP_PASSWORD}
    with pytest.raises(SealError, match="sealed with another key than var/other-key"):
        other.open(sealed)


# The store, on every backend


@pytest_twisted.ensureDeferred
async def test_secrets_of_every_kind_round_trip_through_a_restart(store: Any,
                                                                  store_backend: Any) -> None:
    cid = await fill(store)
    await check_filled(store, cid)
    store = await store_backend.reopen(store)
    await check_filled(store, cid)


@pytest_twisted.ensureDeferred
async def test_another_key_or_none_refuses_to_start_and_says_why(store: Any,
                                                                 store_backend: Any) -> None:
    await fill(store)
    await store_backend.close(store)
    with pytest.raises(SealError, match="sealed with another key than var/lost-key"):
        await store_backend.open(Sealer.generate("var/lost-key"))
    with pytest.raises(SealError, match="holds sealed secrets and no key was given"):
        await store_backend.open(None)


@pytest_twisted.ensureDeferred
async def test_an_empty_sealed_database_refuses_another_key_too(store: Any,
                                                                store_backend: Any) -> None:
    await store_backend.close(store)  # sealed before any secret was stored
    with pytest.raises(SealError, match="another key"):
        await store_backend.open(Sealer.generate())


@pytest_twisted.ensureDeferred
async def test_resealing_rotates_the_key_of_every_secret(store: Any,
                                                         store_backend: Any) -> None:
    cid = await fill(store)
    new = Sealer.generate("the new key")
    await store.reseal(new)
    await check_filled(store, cid)  # the running store seals with the new key from now on
    await store.put_token("other", {"access_token": "x"})
    await store_backend.close(store)
    with pytest.raises(SealError, match="another key"):
        await store_backend.open()
    store = await store_backend.open(new)
    await check_filled(store, cid)
    assert await store.token("other") == {"access_token": "x"}


@pytest_twisted.ensureDeferred
async def test_secrets_stored_in_clear_are_sealed_by_the_first_start_with_a_key(
        store_backend: Any) -> None:
    clear = await store_backend.open(None)  # as an older gateway stored them
    cid = await fill(clear)
    await store_backend.close(clear)
    store = await store_backend.open()
    await check_filled(store, cid)
    await store_backend.close(store)
    with pytest.raises(SealError, match="no key"):
        await store_backend.open(None)


# The SQLite files


@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_a_clear_text_sqlite_file_holds_no_secret_once_sealed(store_backend: Any) -> None:
    path = store_backend.url[len("sqlite:"):]
    clear = await store_backend.open(None)
    # Tokens it deleted stay in free pages where SQLite is built without SECURE_DELETE
    # (Debian's has it on).
    await clear._run(lambda: clear._db.execute("PRAGMA secure_delete=OFF"))
    for n in range(100):
        await clear.put_token(f"gone{n}", {"access_token": EXPIRED, "scope": "x" * 500})
    for n in range(100):
        await clear.delete_token(f"gone{n}")
    await fill(clear)
    await store_backend.close(clear)
    assert ("db", EXPIRED) in in_clear(path), "the older gateway's file has them in clear"
    store = await store_backend.open()
    assert in_clear(path) == []
    await store.put_token(TOKEN_KEY, {"access_token": ACCESS + "-refreshed"})
    await store_backend.close(store)
    assert in_clear(path) == []


@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_the_sqlite_files_are_readable_by_their_owner_only(store_backend: Any) -> None:
    path = store_backend.url[len("sqlite:"):]
    old = os.umask(0o022)
    try:
        store = await store_backend.open()
        await fill(store)
        files = database_files(path)
        assert set(files) == {"", "-wal", "-shm"}
        for suffix in files:
            assert stat.S_IMODE(os.stat(path + suffix).st_mode) == 0o600, suffix
        await store_backend.close(store)
        # Files an older gateway made world-readable are narrowed at the next start.
        os.chmod(path, 0o644)
        store = await store_backend.open()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


@pytest.mark.backends("sqlite")
@pytest_twisted.ensureDeferred
async def test_rotating_with_the_command_replaces_the_key_file(store_backend: Any,
                                                               tmp_path: Path) -> None:
    keyfile = tmp_path / "secret-key"
    old = key_file(str(keyfile))
    old_text = keyfile.read_bytes()
    store = await store_backend.open(old)
    cid = await fill(store)
    await store_backend.close(store)
    path = store_backend.url[len("sqlite:"):]
    old_sealed = sealed_tokens(path)
    assert len(old_sealed) == 10  # the tenants' 4 + 3 secrets, a credential, a token, the probe
    done = subprocess.run([sys.executable, "-m", "gateway.seal", "rotate", "--database",
                           store_backend.url, "--secret-key-file", str(keyfile)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "secret-key.new").exists()
    assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
    assert keyfile.read_bytes() != old_text
    assert not [t for t in old_sealed for data in database_files(path).values()
                if t.encode() in data], "what the old key opens is gone from the files"
    new = key_file(str(keyfile))
    with pytest.raises(SealError, match="another key"):
        await store_backend.open(old)
    store = await store_backend.open(new)
    await check_filled(store, cid)
    await store_backend.close(store)
    # The command says so, and changes nothing, when it is given the wrong key.
    keyfile.write_bytes(Fernet.generate_key())
    done = subprocess.run([sys.executable, "-m", "gateway.seal", "rotate", "--database",
                           store_backend.url, "--secret-key-file", str(keyfile)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "sealed with another key" in done.stderr, done.stderr
    assert not (tmp_path / "secret-key.new").exists()


# The key file


def test_the_key_file_is_made_0600_beside_the_admin_token_and_read_back(
        tmp_path: Path) -> None:
    options = tap.Options()
    options.parseOptions(["--admin-token-file", str(tmp_path / "var" / "admin-token")])
    first = tap.secret_key(options)
    path = tmp_path / "var" / "secret-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = tap.secret_key(options)
    assert again.open(first.seal("x")) == "x"


@pytest.mark.parametrize("content", ["", "not a key\n"])
def test_an_empty_or_broken_key_file_is_a_usage_error(tmp_path: Path, content: str) -> None:
    (tmp_path / "k").write_text(content)
    options = tap.Options()
    options.parseOptions(["--secret-key-file", str(tmp_path / "k")])
    with pytest.raises(usage.UsageError, match="--secret-key-file"):
        tap.secret_key(options)


# A running gateway


class SealedHarness(Harness):
    """test_admin's gateway, its store sealed with ``sealer``."""

    def __init__(self, tmp_path: Any, sealer: Sealer | None) -> None:
        super().__init__(tmp_path)
        self.path = str(tmp_path / "g.sqlite")
        self.store = SQLiteStore(self.path, reactor, sealer=sealer)
        self.gw = Gateway(self.store, reactor, admin_token=TOKEN,
                          http=HttpClient(reactor, client=LaterStub(self.crm.app.resource())))


@pytest_twisted.ensureDeferred
async def test_a_running_gateway_keeps_no_secret_in_clear_in_its_files(tmp_path: Path) -> None:
    sealer = Sealer.generate()
    harness = SealedHarness(tmp_path, sealer)
    await harness.start()
    try:
        reply = await harness.admin("POST", "/api/v1/credentials", CREDENTIAL)
        assert reply.status == 201, reply.body
        await harness.create(TELPHIN_ALTEGIO)
        await harness.create(MEGAPLAN)
        await harness.gw.store.put_token(TOKEN_KEY, {"access_token": ACCESS,
                                                     "refresh_token": REFRESH})
        assert (await harness.hook(DIAL_IN)).status == 200
        await eventually(lambda: harness.crm.received)
        # The admin API is as before: secrets write-only, said to be set.
        shown = await harness.admin("GET", "/api/v1/tenants/807")
        assert shown.json()["secrets_set"] == {"key": True, "pbx.client_secret": True,
                                               "crm.partner_token": True,
                                               "crm.crm_token": True}
        assert not [s for s in SECRETS if s.encode() in shown.body]
        assert in_clear(harness.path) == []
    finally:
        await harness.stop()
    assert in_clear(harness.path) == []
    # And a restart with the same key has them all.
    store = SQLiteStore(harness.path, reactor, sealer=sealer)
    try:
        await store.start()
        tenants = {t.id: t for t in await store.tenants()}
        assert tenants[807].crm.crm_token == CRM_TOKEN
        assert tenants[808].crm.password == MP_PASSWORD
        assert await store.token(TOKEN_KEY) == {"access_token": ACCESS,
                                                "refresh_token": REFRESH}
    finally:
        await store.stop()
