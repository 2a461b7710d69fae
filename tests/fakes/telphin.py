"""
A fake Telphin REST API: OAuth client-credentials tokens, who-am-I, the extension list,
recording storage URLs and the click-to-call callback (telphin.md §1, §2, §6, §7).

Choices the protocol notes leave open are marked [I] where they are made.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import re
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from tests.fakes.control import (
    Faults,
    default_clock,
    http_reason,
    json_response,
    read_json_object,
    run_standalone,
)

# The who-am-I answer (§1.1); `setup({"user": {...}})` overrides single fields. The values
# are the notes' constructed example.
DEFAULT_USER: dict[str, object] = {
    "id": 41127,
    "login": "TLP55522",
    "client_id": 7001,
    "extension_id": None,
    "dealer_id": 12,
    "admin": True,
    "access": "full",
    "extension_group_id": None,
    "timezone": "Europe/Moscow",
}
EXTENSION_TYPES = frozenset({"phone", "queue", "ivr", "fax"})
EXTENSION_STATUSES = frozenset({"active", "blocked"})
# [I] The notes document `?page=N` but not the page size.
DEFAULT_EXTENSION_PAGE_SIZE = 50


@define
class TelphinError(Exception):
    """A Telphin error answer: the status and the JSON body that goes with it."""

    status: int
    body: dict[str, str]


def _unauthorized() -> TelphinError:
    return TelphinError(401, {"message": "Unauthorized"})


def _string_map(value: object, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError(f"{what} must be an object of strings")
    return value


def _digits(text: str) -> bool:
    # str.isdigit alone lets through "²", which int() refuses.
    return text.isascii() and text.isdigit()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _extension_entry(extension_id: str, value: object) -> tuple[int, dict[str, object]]:
    # `"200501": "7001*101"` or `"200501": {"name": "7001*101", "type": "queue", ...}`.
    if not _digits(extension_id):
        raise ValueError(f"extension id {extension_id!r} must be digits")
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict):
        raise ValueError(f"extension {extension_id} must be a name or an object")
    unknown = sorted(set(value) - {"name", "type", "status", "label"})
    if unknown:
        raise ValueError(f"extension {extension_id}: unknown keys: {', '.join(unknown)}")
    entry = {"id": int(extension_id), "name": value.get("name"), "type": value.get("type", "phone"),
             "status": value.get("status", "active"), "label": value.get("label", "")}
    if not isinstance(entry["name"], str) or not entry["name"]:
        raise ValueError(f"extension {extension_id}: name must be a non-empty string")
    if entry["type"] not in EXTENSION_TYPES:
        raise ValueError(f"extension {extension_id}: type must be one of {sorted(EXTENSION_TYPES)}")
    if entry["status"] not in EXTENSION_STATUSES:
        raise ValueError(f"extension {extension_id}: status must be active or blocked")
    if not isinstance(entry["label"], str):
        raise ValueError(f"extension {extension_id}: label must be a string")
    return int(extension_id), entry


def _string(value: object) -> bool:
    return isinstance(value, str)


def _count(value: object) -> bool:
    return _is_int(value) and value >= 0  # type: ignore[operator]


# The callback body (§6): field → (check, what the refusal says it must be). `src_num` and
# `dst_num` are required; the others may be absent or null ([I] the Go SDK sends null for
# every option it does not set, so Telphin must take null as "not given").
_CALLBACK_FIELDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "src_num": (
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(n, str) and n for n in v),
        "a non-empty array of non-empty strings",
    ),
    "dst_num": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "caller_id_name": (_string, "a string"),
    "caller_id_number": (_string, "a string"),
    "src_caller_id_name": (_string, "a string"),
    "src_caller_id_number": (_string, "a string"),
    "src_ani": (_string, "a string"),
    "dst_ani": (_string, "a string"),
    "announce_sound_id": (_is_int, "an integer"),
    "dst_announce_sound_id": (_is_int, "an integer"),
    "dst_dtmf": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[0-9*#Ww]*", v) is not None,
        "a string of 0-9 * # W w",
    ),
    "allow_public_transfer": (lambda v: isinstance(v, bool), "a boolean"),
    # [I] A negative duration or wait makes no sense; the notes give no bounds.
    "call_duration": (_count, "an integer >= 0"),
    "wait_for_pickup": (_count, "an integer >= 0"),
    "transfer_after_src_hangup": (_string, "a string"),
    "transfer_after_dst_hangup": (_string, "a string"),
}
_REQUIRED_CALLBACK_FIELDS = ("src_num", "dst_num")


def _bad_request(message: str) -> TelphinError:
    # [I] The notes give "4xx" for a refused callback; 400 is the natural one.
    return TelphinError(400, {"message": message})


def _check_callback(body: dict[str, Any]) -> None:
    """Refuse the first problem, always naming the field: unknown, then missing, then type."""
    # [I] Real Telphin may ignore an unknown (misspelt) field; the fake refuses it so a
    # typo in the gateway cannot pass unnoticed.
    unknown = sorted(set(body) - set(_CALLBACK_FIELDS))
    if unknown:
        raise _bad_request(f"{unknown[0]}: unknown field")
    for name in _REQUIRED_CALLBACK_FIELDS:
        if body.get(name) is None:
            raise _bad_request(f"{name}: required")
    for name, (check, expected) in _CALLBACK_FIELDS.items():
        if body.get(name) is not None and not check(body[name]):
            raise _bad_request(f"{name}: must be {expected}")


@define
class FakeTelphin:
    """
    The Telphin endpoints the gateway calls: token grant, who-am-I, the extension list,
    recording storage URLs and click-to-call callbacks.

    Tokens expire by the injected clock and can all be revoked at once, so a test can
    make the gateway meet a 401 and watch it fetch a new token. Each accepted callback
    is kept in `callbacks`, so a test can assert exactly what the gateway asked for.
    """

    clients: dict[str, str]
    clock: IReactorTime = field(factory=default_clock)
    token_lifetime: int = 3600
    records: dict[str, str] = field(factory=dict)
    faults: Faults = field(factory=Faults)
    # extension id → {"id", "name": "7001*101", "type", "status", "label"} (§2's list item)
    extensions: dict[int, dict[str, object]] = field(factory=dict)
    user: dict[str, object] = field(factory=lambda: dict(DEFAULT_USER))
    extension_page_size: int = DEFAULT_EXTENSION_PAGE_SIZE
    requests: list[dict[str, Any]] = field(factory=list, init=False)
    callbacks: list[dict[str, Any]] = field(factory=list, init=False)
    tokens_issued: int = field(default=0, init=False)
    # access token → the clock time at which it stops working
    _tokens: dict[str, float] = field(factory=dict, init=False, repr=False)

    app = Klein()

    def resource(self) -> IResource:
        """The public API as a Twisted Web resource."""
        return self.app.resource()

    def expire_all_tokens(self) -> None:
        """Revoke every issued token, as a server-side expiry would."""
        self._tokens.clear()

    def reset(self) -> None:
        """Forget requests, callbacks and tokens and clear the faults; the configuration stays."""
        self.requests.clear()
        self.callbacks.clear()
        self.tokens_issued = 0
        self._tokens.clear()
        self.faults.clear()
        self.faults.requests_seen = 0

    def state(self) -> dict[str, object]:
        """What the control app's `/_control/state` reports."""
        return {
            "requests": self.requests,
            "callbacks": self.callbacks,
            "tokens_issued": self.tokens_issued,
            "tokens_valid": sum(1 for t in self._tokens.values() if t > self.clock.seconds()),
        }

    def setup(self, config: Mapping[str, object]) -> None:
        """
        Add `records` (RecID → URL), `clients` (id → secret) and `extensions` (id → name
        such as `"7001*101"`, or → `{"name", "type", "status", "label"}`); override fields
        of the who-am-I `user`; set `token_lifetime` and `extension_page_size`.

        Everything is checked before anything changes.
        """
        unknown = sorted(set(config) - {
            "records", "clients", "token_lifetime", "extensions", "user", "extension_page_size",
        })
        if unknown:
            raise ValueError(f"unknown setup keys: {', '.join(unknown)}")
        records = _string_map(config.get("records", {}), "records")
        clients = _string_map(config.get("clients", {}), "clients")
        lifetime = config.get("token_lifetime", self.token_lifetime)
        if not _is_int(lifetime) or lifetime <= 0:  # type: ignore[operator]
            raise ValueError("token_lifetime must be a positive integer")
        page_size = config.get("extension_page_size", self.extension_page_size)
        if not _is_int(page_size) or page_size <= 0:  # type: ignore[operator]
            raise ValueError("extension_page_size must be a positive integer")
        extensions = config.get("extensions", {})
        if not isinstance(extensions, dict):
            raise ValueError("extensions must be an object: id → name or object")
        entries = dict(_extension_entry(k, v) for k, v in extensions.items())
        user = config.get("user", {})
        if not isinstance(user, dict):
            raise ValueError("user must be an object")
        unknown = sorted(set(user) - set(DEFAULT_USER))
        if unknown:
            raise ValueError(f"user: unknown fields: {', '.join(unknown)}")
        if "client_id" in user and not _is_int(user["client_id"]):
            raise ValueError("user: client_id must be an integer")
        self.records.update(records)
        self.clients.update(clients)
        self.token_lifetime = lifetime  # type: ignore[assignment]
        self.extension_page_size = page_size  # type: ignore[assignment]
        self.extensions.update(entries)
        self.user.update(user)

    async def _fault(self, request: IRequest) -> bytes | None:
        return await self.faults.intercept(
            request, self.clock, lambda status: {"message": http_reason(status)}
        )

    def _record(self, request: IRequest) -> None:
        entry = {
            "method": request.method.decode("ascii"),
            # As sent, so a test can tell `@me` from `%40me`.
            "path": request.path.decode("latin-1"),
            "at": self.clock.seconds(),
            "status": None,
        }
        self.requests.append(entry)

        def answered(_: object) -> None:
            entry["status"] = request.code

        request.notifyFinish().addCallbacks(answered, lambda _: None)

    def _authorize(self, request: IRequest) -> None:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        if not header.startswith("Bearer "):
            raise _unauthorized()
        expires = self._tokens.get(header[len("Bearer "):])
        if expires is None or expires <= self.clock.seconds():
            raise _unauthorized()

    @app.handle_errors(TelphinError)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        error: TelphinError = failure.value  # type: ignore[assignment]
        return json_response(request, error.status, error.body)

    @app.route("/oauth/token", methods=["POST"])
    async def token(self, request: IRequest) -> bytes:
        fault = await self._fault(request)
        if fault is not None:
            return fault
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise TelphinError(400, {"error": "invalid_request"})
        request.content.seek(0)
        form = {
            name: values[0]
            for name, values in parse_qs(request.content.read().decode("utf-8")).items()
        }
        if "grant_type" not in form:
            raise TelphinError(400, {"error": "invalid_request"})
        if form["grant_type"] != "client_credentials":
            raise TelphinError(400, {"error": "unsupported_grant_type"})
        client_id = form.get("client_id")
        if client_id not in self.clients or self.clients[client_id] != form.get("client_secret"):
            raise TelphinError(401, {"error": "invalid_client"})
        access_token = secrets.token_hex(16)
        self._tokens[access_token] = self.clock.seconds() + self.token_lifetime
        self.tokens_issued += 1
        return json_response(
            request,
            200,
            {
                "access_token": access_token,
                "token_type": "Bearer",
                "expires_in": self.token_lifetime,
                "scope": "all",
            },
        )

    async def _storage_url(
        self, request: IRequest, record_uuid: str, owner_ok: bool = True
    ) -> bytes:
        self._record(request)
        fault = await self._fault(request)
        if fault is not None:
            return fault
        self._authorize(request)
        if not owner_ok:
            raise TelphinError(404, {"message": "Not found"})
        if record_uuid not in self.records:
            raise TelphinError(404, {"message": "Record not found"})
        return json_response(request, 200, {"record_url": self.records[record_uuid]})

    @app.route(
        "/api/ver1.0/client/<client_id>/record/<record_uuid>/storage_url/", methods=["GET"]
    )
    async def client_storage_url(self, request: IRequest, client_id: str, record_uuid: str) -> bytes:
        # Twisted has already percent-decoded the segment, so `%40me` arrives as `@me`.
        owner_ok = client_id == "@me" or client_id.isdigit()
        return await self._storage_url(request, record_uuid, owner_ok)

    @app.route(
        "/api/ver1.0/extension/<extension_id>/record/<record_uuid>/storage_url/", methods=["GET"]
    )
    async def extension_storage_url(
        self, request: IRequest, extension_id: str, record_uuid: str
    ) -> bytes:
        return await self._storage_url(request, record_uuid)

    async def _authorized(self, request: IRequest) -> bytes | None:
        """Record, apply faults, demand a live token; a fault's body when one fires."""
        self._record(request)
        fault = await self._fault(request)
        if fault is not None:
            return fault
        self._authorize(request)
        return None

    @app.route("/api/ver1.0/user/", methods=["GET"])
    async def who_am_i(self, request: IRequest) -> bytes:
        fault = await self._authorized(request)
        if fault is not None:
            return fault
        return json_response(request, 200, self.user)

    @app.route("/api/ver1.0/client/<client_id>/extension/", methods=["GET"])
    async def extension_list(self, request: IRequest, client_id: str) -> bytes:
        fault = await self._authorized(request)
        if fault is not None:
            return fault
        # [I] Another client's id: the same 404 the unknown routes give.
        if client_id not in ("@me", str(self.user["client_id"])):
            raise TelphinError(404, {"message": "Not found"})
        args = {k.decode("latin-1"): v[-1].decode("utf-8") for k, v in request.args.items()}
        wanted = args.get("type")
        if wanted is not None and wanted not in EXTENSION_TYPES:
            raise _bad_request("type: must be one of fax, ivr, phone, queue")
        page = args.get("page", "1")
        # [I] Pages count from 1; a page past the end is an empty list.
        if not _digits(page) or int(page) < 1:
            raise _bad_request("page: must be an integer >= 1")
        matching = [
            dict(e) for _, e in sorted(self.extensions.items())
            if wanted is None or e["type"] == wanted
        ]
        start = (int(page) - 1) * self.extension_page_size
        return json_response(request, 200, matching[start:start + self.extension_page_size])

    @app.route("/api/ver1.0/extension/<extension_id>/callback/", methods=["POST"])
    async def callback(self, request: IRequest, extension_id: str) -> bytes:
        fault = await self._authorized(request)
        if fault is not None:
            return fault
        # [I] The extension is looked up before the body is read; 404 as for a record.
        extension = self.extensions.get(int(extension_id)) if _digits(extension_id) else None
        if extension is None:
            raise TelphinError(404, {"message": "Extension not found"})
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise _bad_request("Content-Type: must be application/json")
        try:
            body = read_json_object(request)
        except ValueError as e:
            raise _bad_request(str(e)) from None
        _check_callback(body)
        # Shaped like the notes' constructed answer: a 32-hex call id (the events'
        # CallID/CallBackID [I]) and a `cb-` call-API id made from it [I].
        call_id = secrets.token_hex(16)
        answer = {"call_api_id": f"cb-{call_id[:16]}", "call_id": call_id}
        self.callbacks.append({
            "extension_id": extension["id"],
            "extension_name": extension["name"],
            "src_num": body["src_num"],
            "dst_num": body["dst_num"],
            "caller_id_name": body.get("caller_id_name"),
            "caller_id_number": body.get("caller_id_number"),
            "body": body,
            **answer,
            "at": self.clock.seconds(),
        })
        return json_response(request, 200, answer)

    @app.route("/api/ver1.0/", branch=True)
    async def unknown(self, request: IRequest) -> bytes:
        # Anything else under the REST base is a request the fake was not built for:
        # answer 404 so the test notices instead of passing by accident.
        self._record(request)
        fault = await self._fault(request)
        if fault is not None:
            return fault
        self._authorize(request)
        raise TelphinError(404, {"message": "Not found"})


def _client(text: str) -> tuple[str, str]:
    client_id, sep, secret = text.partition(":")
    if not sep or not client_id:
        raise argparse.ArgumentTypeError("expected ID:SECRET")
    return client_id, secret


def _record_arg(text: str) -> tuple[str, str]:
    rec_id, sep, url = text.partition("=")
    if not sep or not rec_id:
        raise argparse.ArgumentTypeError("expected RECID=URL")
    return rec_id, url


def _extension_arg(text: str) -> tuple[int, dict[str, object]]:
    extension_id, sep, name = text.partition("=")
    try:
        return _extension_entry(extension_id, name if sep else None)
    except ValueError:
        raise argparse.ArgumentTypeError("expected ID=NAME, e.g. 200501=7001*101") from None


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", type=_client, action="append", default=[], metavar="ID:SECRET")
    parser.add_argument("--record", type=_record_arg, action="append", default=[], metavar="RECID=URL")
    parser.add_argument("--extension", type=_extension_arg, action="append", default=[],
                        metavar="ID=NAME", help="a phone extension, e.g. 200501=7001*101")
    parser.add_argument("--token-lifetime", type=int, default=3600)


def _build(args: argparse.Namespace, reactor: Any) -> FakeTelphin:
    return FakeTelphin(
        clients=dict(args.client),
        clock=reactor,
        token_lifetime=args.token_lifetime,
        records=dict(args.record),
        extensions=dict(args.extension),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the fake Telphin standalone (`python -m tests.fakes.telphin --help`)."""
    return run_standalone("Fake Telphin REST API", _add_arguments, _build, argv)


if __name__ == "__main__":
    sys.exit(main())
