"""A fake Telphin REST API: OAuth client-credentials tokens and recording storage URLs."""

from __future__ import annotations

import argparse
import secrets
import sys
from typing import Any, Mapping
from urllib.parse import parse_qs

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from tests.fakes.control import Faults, default_clock, http_reason, json_response, run_standalone


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


@define
class FakeTelphin:
    """
    The Telphin endpoints the gateway calls: token grant and recording storage URLs.

    Tokens expire by the injected clock and can all be revoked at once, so a test can
    make the gateway meet a 401 and watch it fetch a new token.
    """

    clients: dict[str, str]
    clock: IReactorTime = field(factory=default_clock)
    token_lifetime: int = 3600
    records: dict[str, str] = field(factory=dict)
    faults: Faults = field(factory=Faults)
    requests: list[dict[str, Any]] = field(factory=list, init=False)
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
        """Forget requests and tokens and clear the faults; clients and records stay."""
        self.requests.clear()
        self.tokens_issued = 0
        self._tokens.clear()
        self.faults.clear()
        self.faults.requests_seen = 0

    def state(self) -> dict[str, object]:
        """What the control app's `/_control/state` reports."""
        return {
            "requests": self.requests,
            "tokens_issued": self.tokens_issued,
            "tokens_valid": sum(1 for t in self._tokens.values() if t > self.clock.seconds()),
        }

    def setup(self, config: Mapping[str, object]) -> None:
        """Add `records` (RecID → URL) and `clients` (id → secret); set `token_lifetime`."""
        unknown = sorted(set(config) - {"records", "clients", "token_lifetime"})
        if unknown:
            raise ValueError(f"unknown setup keys: {', '.join(unknown)}")
        records = _string_map(config.get("records", {}), "records")
        clients = _string_map(config.get("clients", {}), "clients")
        lifetime = config.get("token_lifetime", self.token_lifetime)
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime <= 0:
            raise ValueError("token_lifetime must be a positive integer")
        self.records.update(records)
        self.clients.update(clients)
        self.token_lifetime = lifetime

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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", type=_client, action="append", default=[], metavar="ID:SECRET")
    parser.add_argument("--record", type=_record_arg, action="append", default=[], metavar="RECID=URL")
    parser.add_argument("--token-lifetime", type=int, default=3600)


def _build(args: argparse.Namespace, reactor: Any) -> FakeTelphin:
    return FakeTelphin(
        clients=dict(args.client),
        clock=reactor,
        token_lifetime=args.token_lifetime,
        records=dict(args.record),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the fake Telphin standalone (`python -m tests.fakes.telphin --help`)."""
    return run_standalone("Fake Telphin REST API", _add_arguments, _build, argv)


if __name__ == "__main__":
    sys.exit(main())
