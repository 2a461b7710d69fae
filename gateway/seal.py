"""Secrets at rest: the key file, sealing and opening stored values with it, key rotation.

What the store seals: the secret fields of every tenant (``Tenant.secret_fields()``: its
webhook key and what its PBX and CRM modules declare ``secrets``), the fields of named
credentials, and the tokens the gateway obtains (``put_token``).  A sealed value stands in
the stored JSON as ``{"$sealed": "<Fernet token>"}``, the token sealing the value's JSON, so
the rest of a tenant row stays readable for an operator.

Fernet (AES-128-CBC with HMAC-SHA256, from ``cryptography``) rather than raw AES-GCM: it is
authenticated, picks its own IV (no nonce to manage or to repeat), and its key is one
URL-safe text line, kept in a file like the admin token.

Rotating the key (with the gateway stopped)::

    python -m gateway.seal rotate --database sqlite:var/gateway.sqlite \\
        --secret-key-file var/secret-key

re-seals every sealed value with a new key in one transaction, then puts the new key in
the key file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Iterable

import attrs
from cryptography.fernet import Fernet, InvalidToken

SEALED = "$sealed"

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class SealError(Exception):
    """The store's secrets cannot be opened (no key, or another key than the one they were
    sealed with): the store refuses to start rather than hand out empty secrets."""


@attrs.frozen
class Sealer:
    """Seals and opens values with one key; ``source`` names the key (its file) in errors."""

    fernet: Fernet = attrs.field(repr=False)
    source: str = "the key given"

    @classmethod
    def from_key(cls, key: str | bytes, source: str = "the key given") -> "Sealer":
        """A sealer on a Fernet key (32 bytes, URL-safe base64); ValueError when it is not."""
        try:
            return cls(Fernet(key.strip()), source)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: not a Fernet key (32 bytes, URL-safe base64): "
                             f"{e}") from None

    @classmethod
    def generate(cls, source: str = "a new key") -> "Sealer":
        return cls(Fernet(Fernet.generate_key()), source)

    def seal(self, value: Any) -> dict[str, str]:
        """``value`` (anything JSON) sealed: ``{"$sealed": token}``."""
        return {SEALED: self.fernet.encrypt(_dumps(value).encode()).decode("ascii")}

    def open(self, sealed: dict[str, str]) -> Any:
        """The value a ``seal`` sealed; SealError when another key sealed it."""
        try:
            return json.loads(self.fernet.decrypt(sealed[SEALED].encode("ascii")))
        except (InvalidToken, ValueError, TypeError):
            raise SealError(f"the database's secrets were sealed with another key than "
                            f"{self.source}: start with the key file they were sealed "
                            f"with (--secret-key-file)") from None


def is_sealed(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and SEALED in value


def open_all(data: Any, sealer: Sealer | None) -> Any:
    """``data`` with every sealed value in it opened; SealError if one is and no key."""
    if is_sealed(data):
        if sealer is None:
            raise SealError("the database holds sealed secrets and no key was given: "
                            "start with the key file they were sealed with "
                            "(--secret-key-file)")
        return sealer.open(data)
    if isinstance(data, dict):
        return {k: open_all(v, sealer) for k, v in data.items()}
    if isinstance(data, list):
        return [open_all(v, sealer) for v in data]
    return data


def seal_fields(data: dict[str, Any], dotted: Iterable[str], sealer: Sealer) -> dict[str, Any]:
    """A copy of ``data`` with the fields named ``a.b`` sealed (missing ones skipped)."""
    data = json.loads(_dumps(data))
    for name in dotted:
        *path, last = name.split(".")
        section = data
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict) and last in section and not is_sealed(section[last]):
            section[last] = sealer.seal(section[last])
    return data


def key_file(path: str) -> Sealer:
    """The sealer on the key in ``path``, creating the file (mode 0600) on first start.

    ValueError when the file is empty or holds no key."""
    if os.path.exists(path):
        with open(path, "rb") as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"{path} is empty")
        return Sealer.from_key(key, path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    key = Fernet.generate_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    print(f"gateway: generated the key that seals secrets in the database: {path} (keep it "
          f"with the database's backups, apart from them)", file=sys.stderr)
    return Sealer.from_key(key, f"{path} (generated just now)")


def default_key_file(admin_token_file: str) -> str:
    """``secret-key`` beside the admin token file."""
    return os.path.join(os.path.dirname(admin_token_file), "secret-key")


async def rotate(reactor: Any, database: str, path: str, new_path: str = "") -> None:
    """Re-seal every secret in ``database`` with a new key, then put it in ``path``.

    The new key is written first to ``new_path`` (default ``path + ".new"``; used as it is
    when it exists, so a rotation that died before its commit can be run again); should
    the process die between the commit and the rename, the database opens with that file:
    move it over ``path``.  Run it with the gateway stopped: a running gateway would go on
    sealing with the old key."""
    from gateway.store import open_store

    if not os.path.exists(path):
        raise ValueError(f"{path}: no such key file")
    store = open_store(database, reactor, sealer=key_file(path))
    try:
        await store.start()  # SealError when the key file is not the database's key
        new_path = new_path or path + ".new"
        await store.reseal(key_file(new_path))
    finally:
        await store.stop()
    os.replace(new_path, path)


def main(argv: list[str] | None = None) -> None:
    """``python -m gateway.seal rotate``: rotate the key (the gateway stopped)."""
    parser = argparse.ArgumentParser(prog="python -m gateway.seal",
                                     description="Secrets at rest in the gateway's store.")
    commands = parser.add_subparsers(dest="command", required=True)
    rot = commands.add_parser("rotate", help="re-seal every secret with a new key (run it "
                                             "with the gateway stopped)")
    rot.add_argument("--database", default="sqlite:var/gateway.sqlite")
    rot.add_argument("--secret-key-file", default="var/secret-key")
    rot.add_argument("--new-key-file", default="",
                     help="the new key (generated if absent; default: KEYFILE.new)")
    args = parser.parse_args(argv)
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    async def run(reactor: Any) -> None:
        try:
            await rotate(reactor, args.database, args.secret_key_file, args.new_key_file)
        except (SealError, ValueError) as e:
            print(f"gateway.seal: {e}", file=sys.stderr)
            raise SystemExit(1)
        print(f"gateway.seal: every secret re-sealed; the new key is in "
              f"{args.secret_key_file}", file=sys.stderr)

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":  # pragma: no cover
    main()
