"""A fake Altegio VoIP integration API, as strict as the public documentation allows."""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections import deque
from datetime import date, datetime, timezone
from typing import Any, Mapping
from urllib.parse import urlsplit

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

ACCEPT_V2 = "application/vnd.api.v2+json"
CALL_TYPES = frozenset({"incoming", "outgoing", "internal"})
COMMAND_TYPES = {
    "setup": frozenset({"enable", "disable"}),
    "event": CALL_TYPES,
    "history": CALL_TYPES,
}
_EVENT_FIELDS = frozenset({"command", "type", "crm_token", "phone", "diversion", "user"})
COMMAND_FIELDS = {
    "setup": frozenset({"command", "type", "crm_token"}),
    "event": _EVENT_FIELDS,
    "history": _EVENT_FIELDS | {"duration", "link", "call_id", "status", "date"},
}
# `history` documents two statuses; the read-back endpoint knows seven.
WRITE_STATUSES = frozenset({"success", "missed"})
READ_STATUSES = WRITE_STATUSES | {"cancel", "busy", "notallowed", "notavailable", "notfound"}


def failure_envelope(message: str | None = None, **meta: object) -> dict[str, object]:
    """Altegio's error envelope; 404 carries an empty `meta`."""
    if message is not None:
        meta = {"message": message, **meta}
    return {"success": False, "data": None, "meta": meta}


@define
class Rejection(Exception):
    """An Altegio error answer: status, envelope message, field errors, extra headers."""

    status: int
    message: str | None
    errors: list[dict[str, str]] | None = None
    headers: dict[str, str] = field(factory=dict)

    def body(self) -> dict[str, object]:
        """The envelope Altegio sends with this status."""
        if self.errors is None:
            return failure_envelope(self.message)
        return failure_envelope(self.message, errors=self.errors)


def _invalid(errors: list[dict[str, str]]) -> Rejection:
    return Rejection(422, "An error has occurred.", errors)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _is_zoned_timestamp(text: str) -> bool:
    # A date and a time joined by T, with an offset: a naive local time would be read
    # in the chain's time zone and land hours off.
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return False
    return len(text) > 10 and text[10] in "Tt" and parsed.utcoffset() is not None


def _is_web_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def validate_command(body: Mapping[str, object]) -> list[dict[str, str]]:
    """Every problem with a `POST /voip/integration` body, one entry per bad field."""
    errors: list[dict[str, str]] = []

    def bad(name: str, message: str) -> None:
        errors.append({"field": name, "message": message})

    command = body.get("command")
    if command not in COMMAND_FIELDS:
        bad("command", "must be one of: event, history, setup")
        allowed = frozenset().union(*COMMAND_FIELDS.values())
    else:
        allowed = COMMAND_FIELDS[command]  # type: ignore[index]
    for name in sorted(set(body) - allowed):
        hint = _snake_case(name)
        if hint != name and hint in allowed:
            bad(name, f"unknown field (the field is named {hint})")
        else:
            bad(name, "unknown field")
    if command not in COMMAND_FIELDS:
        return errors

    def string(name: str, required: bool, non_empty: bool = False) -> str | None:
        if name not in body:
            if required:
                bad(name, "is required")
            return None
        value = body[name]
        if not isinstance(value, str):
            bad(name, "must be a string")
            return None
        if non_empty and not value.strip():
            bad(name, "must not be empty")
            return None
        return value

    kind = body.get("type")
    if kind not in COMMAND_TYPES[command]:  # type: ignore[index]
        bad("type", "must be one of: " + ", ".join(sorted(COMMAND_TYPES[command])))  # type: ignore[index]
    string("crm_token", required=True, non_empty=True)
    if command == "setup":
        return errors
    string("phone", required=True, non_empty=True)
    string("diversion", required=True)
    string("user", required=False)
    if command == "event":
        return errors
    if "duration" in body:
        duration = body["duration"]
        is_number = isinstance(duration, (int, float)) and not isinstance(duration, bool)
        if not is_number or not math.isfinite(duration) or duration < 0:  # type: ignore[arg-type,operator]
            bad("duration", "must be a number of seconds >= 0")
    link = string("link", required=False)
    if link is not None and not _is_web_url(link):
        bad("link", "must be an http or https URL")
    string("call_id", required=False)
    if "status" in body and body["status"] not in WRITE_STATUSES:
        bad("status", "must be one of: missed, success")
    when = string("date", required=False)
    if when is not None and not _is_zoned_timestamp(when):
        bad("date", "must be an ISO-8601 date and time with a UTC offset")
    return errors


def _bearer_parts(request: IRequest) -> tuple[str | None, list[str]]:
    """The Bearer token and the other comma-separated parts of Authorization."""
    header = request.getHeader(b"authorization")
    if header is None:
        return None, []
    first, *rest = [part.strip() for part in header.decode("latin-1").split(",")]
    if not first.startswith("Bearer "):
        return None, rest
    return first[len("Bearer "):], rest


def _media_type(value: bytes | None) -> str:
    return (value or b"").decode("latin-1").split(";")[0].strip().lower()


def _query_value(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    return values[0].decode("utf-8") if values else None


def _query_list(request: IRequest, name: str) -> list[str]:
    return [v.decode("utf-8") for v in request.args.get(name.encode("ascii"), [])]


@define
class FakeAltegio:
    """
    The Altegio endpoints the gateway writes to, plus the read-back a test verifies with.

    Records every accepted write in `received`, without de-duplication, so a test can see
    exactly what the gateway delivered and how often.
    """

    partner_token: str
    user_token: str = "user-token"
    clock: IReactorTime = field(factory=default_clock)
    rate_limit: float | None = 5.0
    # "ip": Altegio's own limit, per client IP; "account": per crm_token, as CRMs that
    # limit each customer's account do (the bench's per-account drain).
    rate_limit_by: str = "ip"
    faults: Faults = field(factory=Faults)
    received: list[dict[str, Any]] = field(factory=list, init=False)
    enabled: set[str] = field(factory=set, init=False)
    rejected_rate_limited: int = field(default=0, init=False)
    _windows: dict[str, deque[float]] = field(factory=dict, init=False, repr=False)
    # The Marketplace (altegio.md §4): the partner's application, each location's link
    # (pending / active / freezed / uninstalled), the activation callbacks received (with
    # their answer) and answers to force on the next callbacks (say [503] or [422]).
    application_id: int = 912
    installs: dict[int, str] = field(factory=dict, init=False)
    callbacks: list[dict[str, Any]] = field(factory=list, init=False)
    status_requests: list[int] = field(factory=list, init=False)
    callback_answers: list[int] = field(factory=list, init=False)

    app = Klein()

    def resource(self) -> IResource:
        """The public API as a Twisted Web resource."""
        return self.app.resource()

    def histories(self) -> list[dict[str, Any]]:
        """The `history` bodies Altegio would have saved, duplicates included."""
        return self._processed("history")

    def events(self) -> list[dict[str, Any]]:
        """The `event` bodies that would have shown a pop-up."""
        return self._processed("event")

    def reset(self) -> None:
        """Forget everything received, the enabled chains, the rate windows and the faults."""
        self.received.clear()
        self.enabled.clear()
        self._windows.clear()
        self.rejected_rate_limited = 0
        self.installs.clear()
        self.callbacks.clear()
        self.status_requests.clear()
        self.callback_answers.clear()
        self.faults.clear()
        self.faults.requests_seen = 0

    def state(self) -> dict[str, object]:
        """What the control app's `/_control/state` reports."""
        return {
            "received": self.received,
            "enabled": sorted(self.enabled),
            "rejected_rate_limited": self.rejected_rate_limited,
            "rate_limit": self.rate_limit,
            "installs": {str(k): v for k, v in self.installs.items()},
            "callbacks": self.callbacks,
        }

    def setup(self, config: Mapping[str, object]) -> None:
        """Set `rate_limit` (a positive number or null) and/or `enable` a list of crm_tokens."""
        unknown = sorted(set(config) - {"rate_limit", "enable", "grant", "callback_answers"})
        if unknown:
            raise ValueError(f"unknown setup keys: {', '.join(unknown)}")
        rate_limit = config.get("rate_limit", self.rate_limit)
        if rate_limit is not None and (
            isinstance(rate_limit, bool)
            or not isinstance(rate_limit, (int, float))
            or rate_limit <= 0
        ):
            raise ValueError("rate_limit must be a positive number or null")
        tokens = config.get("enable", [])
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError("enable must be a list of crm_token strings")
        grant = config.get("grant", [])
        answers = config.get("callback_answers", [])
        if not isinstance(grant, list) or not all(
            isinstance(g, int) and not isinstance(g, bool) for g in grant
        ):
            raise ValueError("grant must be a list of location ids")
        if not isinstance(answers, list) or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in answers
        ):
            raise ValueError("callback_answers must be a list of HTTP statuses")
        self.rate_limit = rate_limit  # type: ignore[assignment]
        self.enabled.update(tokens)
        self.grant(*grant)
        self.callback_answers.extend(answers)

    def _processed(self, command: str) -> list[dict[str, Any]]:
        return [
            entry["body"]
            for entry in self.received
            if not entry["ignored"] and entry["body"]["command"] == command
        ]

    def _admit(self, request: IRequest, account: str | None = None) -> None:
        """Apply the rate limit (per IP, or per account once the body named it); requests
        it turns away do not use up the window."""
        if self.rate_limit is None or (self.rate_limit_by == "account") != (account is not None):
            return
        now = self.clock.seconds()
        address = request.getClientAddress()
        key = account if account is not None else getattr(address, "host", str(address))
        window = self._windows.setdefault(key, deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if len(window) >= self.rate_limit:
            self.rejected_rate_limited += 1
            raise Rejection(429, "Too many requests", headers={"Retry-After": "1"})
        window.append(now)

    def _check_accept(self, request: IRequest) -> None:
        offered = (request.getHeader(b"accept") or b"").decode("latin-1").split(",")
        if ACCEPT_V2 not in {_media_type(item.encode("latin-1")) for item in offered}:
            raise Rejection(406, f"The Accept header must be {ACCEPT_V2}.")

    async def _prologue(self, request: IRequest) -> bytes | None:
        """Faults first, then the rate limit: what every public route does before its work."""
        fault = await self.faults.intercept(
            request, self.clock, lambda status: failure_envelope(http_reason(status))
        )
        if fault is None:
            self._admit(request)
        return fault

    @app.handle_errors(Rejection)
    def _rejected(self, request: IRequest, failure: Failure) -> bytes:
        rejection: Rejection = failure.value  # type: ignore[assignment]
        return json_response(request, rejection.status, rejection.body(), rejection.headers)

    @app.route("/api/v1/voip/integration", methods=["POST"])
    async def integration(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        token, others = _bearer_parts(request)
        if token != self.partner_token:
            raise Rejection(401, "Authentication needed.")
        if others:
            # This endpoint uses partner-only security; a User part is refused.
            raise Rejection(403, "Access denied.")
        self._check_accept(request)
        if _media_type(request.getHeader(b"content-type")) != "application/json":
            raise _invalid([{"field": "Content-Type", "message": "must be application/json"}])
        try:
            body = read_json_object(request)
        except ValueError as e:
            raise _invalid([{"field": "body", "message": str(e)}]) from None
        errors = validate_command(body)
        if errors:
            raise _invalid(errors)
        self._admit(request, account=str(body["crm_token"]))
        ignored = False
        if body["command"] == "setup":
            if body["type"] == "enable":
                self.enabled.add(body["crm_token"])
            else:
                self.enabled.discard(body["crm_token"])
        else:
            # Altegio answers 202 and then drops work for a chain that is not enabled.
            ignored = body["crm_token"] not in self.enabled
        self.received.append({"at": self.clock.seconds(), "body": body, "ignored": ignored})
        return json_response(
            request, 202, {"success": True, "data": None, "meta": {"message": "Accepted"}}
        )

    # The Marketplace

    def grant(self, *salons: int) -> None:
        """The owner pressed Connect and granted access: the locations' links are pending."""
        for salon in salons:
            self.installs[salon] = "pending"

    def lifecycle(self, salon: int, event: str, partner_token: str | None = None,
                  **extra: object) -> dict[str, object]:
        """The lifecycle webhook body Altegio sends the app's callback URL (§4.3), with the
        link's state changed as Altegio's own would be."""
        if event == "uninstall":
            self.installs[salon] = "uninstalled"
        elif event == "freeze":
            self.installs[salon] = "freezed"
        elif event == "payment" and self.installs.get(salon) == "freezed":
            self.installs[salon] = "active"
        return {"salon_id": salon, "application_id": self.application_id, "event": event,
                "partner_token": self.partner_token if partner_token is None
                else partner_token, **extra}

    async def send_lifecycle(self, url: str, salon: int, event: str,
                             partner_token: str | None = None, **extra: object) -> int:
        """POST a lifecycle webhook to ``url``; the gateway's HTTP status."""
        import treq

        resp = await treq.post(url, json=self.lifecycle(salon, event, partner_token, **extra))
        await resp.content()
        return resp.code

    def _marketplace_auth(self, request: IRequest) -> None:
        token, others = _bearer_parts(request)
        if token != self.partner_token or others:
            raise Rejection(401, "Authentication needed.")

    @app.route("/marketplace/partner/callback", methods=["POST"])
    async def partner_callback(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        self._marketplace_auth(request)
        try:
            body = read_json_object(request)
        except ValueError as e:
            raise _invalid([{"field": "body", "message": str(e)}]) from None
        entry: dict[str, Any] = {"at": self.clock.seconds(), "body": body}
        self.callbacks.append(entry)
        if self.callback_answers:
            entry["status"] = status = self.callback_answers.pop(0)
            if status == 201:
                self.installs[body.get("salon_id")] = "active"  # type: ignore[index]
                request.setResponseCode(201)
                return b""
            if status == 400:
                raise Rejection(400, "Агрегатор не найден")
            if status == 422:
                raise _invalid([{"field": "salon_id", "message": "forced"}])
            return json_response(request, status, failure_envelope(http_reason(status)))
        errors = []
        salon = body.get("salon_id")
        if not isinstance(salon, int) or isinstance(salon, bool):
            errors.append({"field": "salon_id", "message": "must be a number"})
        app_id = body.get("application_id")
        if not isinstance(app_id, int) or isinstance(app_id, bool):
            errors.append({"field": "application_id", "message": "must be a number"})
        if "api_key" in body and not isinstance(body["api_key"], str):
            errors.append({"field": "api_key", "message": "must be a string"})
        urls = body.get("webhook_urls", [])
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            errors.append({"field": "webhook_urls", "message": "must be a list of URLs"})
        if errors:
            entry["status"] = 422
            raise _invalid(errors)
        # Not pending (never granted, already active, frozen, uninstalled) or not this
        # partner's application: "aggregator not found" (§4.2).
        if app_id != self.application_id or self.installs.get(salon) != "pending":
            entry["status"] = 400
            raise Rejection(400, "Агрегатор не найден")
        self.installs[salon] = "active"
        entry["status"] = 201
        request.setResponseCode(201)
        return b""

    @app.route("/marketplace/salon/<int:salon>/application/<int:app_id>", methods=["GET"])
    async def install_status(self, request: IRequest, salon: int, app_id: int) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        self._marketplace_auth(request)
        self.status_requests.append(salon)
        status = self.installs.get(salon)
        if app_id != self.application_id or status in (None, "uninstalled"):
            return json_response(request, 404, failure_envelope())
        return json_response(request, 200, {"success": True, "data": {
            "connection_status": {"status": status, "created_at": "2026-01-01 00:00:00"},
            "payments": [], "logs": []}, "meta": []})

    @app.route("/marketplace/salon/<int:salon>/application/<int:app_id>/uninstall",
               methods=["POST"])
    async def partner_uninstall(self, request: IRequest, salon: int, app_id: int) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        self._marketplace_auth(request)
        if app_id != self.application_id:
            raise Rejection(400, "Агрегатор не найден")
        self.installs[salon] = "uninstalled"  # idempotent
        return json_response(request, 200, {"success": True, "data": None, "meta": []})

    @app.route("/api/v1/voip/integration/calls", methods=["GET"])
    async def calls(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        token, others = _bearer_parts(request)
        if token != self.partner_token or others != [f"User {self.user_token}"]:
            raise Rejection(401, "Authentication needed.")
        self._check_accept(request)
        date_from, date_to, limit, page = self._calls_query(request)
        phone = _query_value(request, "phone")
        types = set(_query_list(request, "types[]"))
        statuses = set(_query_list(request, "statuses[]"))
        items = []
        for number, entry in enumerate(self.received, start=1):
            body = entry["body"]
            if entry["ignored"] or body["command"] != "history":
                continue
            call_date = body.get("date") or datetime.fromtimestamp(
                entry["at"], timezone.utc
            ).isoformat()
            item = {
                "id": number,
                "client_id": 0,
                "caller_phone": body["phone"],
                "record_link": body.get("link"),
                "duration": body.get("duration", 0),
                "status": body.get("status"),
                "type": body["type"],
                "call_date": call_date,
            }
            # The day as written, in the call's own offset, is what the range selects on.
            if not date_from <= datetime.fromisoformat(call_date).date() <= date_to:
                continue
            if phone is not None and item["caller_phone"] != phone:
                continue
            if types and item["type"] not in types:
                continue
            if statuses and item["status"] not in statuses:
                continue
            items.append(item)
        shown = items if limit is None else items[(page - 1) * limit : page * limit]
        return json_response(
            request, 200, {"success": True, "data": shown, "meta": {"count": len(items)}}
        )

    def _calls_query(self, request: IRequest) -> tuple[date, date, int | None, int]:
        """The read-back's required range and paging; 422 naming each bad parameter."""
        errors: list[dict[str, str]] = []
        if not _query_value(request, "salon_id"):
            errors.append({"field": "salon_id", "message": "is required"})
        days: list[date] = []
        for name in ("date_from", "date_to"):
            value = _query_value(request, name)
            try:
                if value is None or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
                    raise ValueError(value)
                days.append(date.fromisoformat(value))
            except ValueError:
                errors.append({"field": name, "message": "must be a date YYYY-MM-DD"})
        for name, allowed in (("types[]", CALL_TYPES), ("statuses[]", READ_STATUSES)):
            for value in _query_list(request, name):
                if value not in allowed:
                    errors.append({"field": name, "message": f"unknown value {value!r}"})
        paging: dict[str, int | None] = {}
        for name in ("page", "limit"):
            value = _query_value(request, name)
            if value is None:
                paging[name] = None
            elif value.isdigit() and int(value) > 0:
                paging[name] = int(value)
            else:
                errors.append({"field": name, "message": "must be a positive integer"})
        if errors:
            raise _invalid(errors)
        return days[0], days[1], paging["limit"], paging["page"] or 1

    @app.route("/", branch=True)
    async def unknown(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        return json_response(request, 404, failure_envelope())


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--partner-token", required=True)
    parser.add_argument("--user-token", default="user-token")
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=5.0,
        help="requests per second per client IP (or account); 0 turns the limit off",
    )
    parser.add_argument("--rate-limit-by", choices=("ip", "account"), default="ip")


def _build(args: argparse.Namespace, reactor: Any) -> FakeAltegio:
    return FakeAltegio(
        partner_token=args.partner_token,
        user_token=args.user_token,
        clock=reactor,
        rate_limit=args.rate_limit or None,
        rate_limit_by=args.rate_limit_by,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the fake Altegio standalone (`python -m tests.fakes.altegio --help`)."""
    return run_standalone("Fake Altegio VoIP integration API", _add_arguments, _build, argv)


if __name__ == "__main__":
    sys.exit(main())
