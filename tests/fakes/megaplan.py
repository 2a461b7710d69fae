"""
A fake Megaplan API v3 (the CRM): password/refresh tokens, CallInfo, CallRoute,
CallUserConfig, employees and contractors, as strict as /work/shared/protocols/megaplan.md
and the public RAML allow.

Markers as in the protocol notes: [C] confirmed, [I] inferred, [?] unknown. Where the real
behaviour is unknown the fake picks the stricter reading, so that a gateway built against it
sends what the notes recommend.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import secrets
import sys
from datetime import datetime
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import parse_qs, unquote_plus, urlsplit

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.exceptions import HTTPException

from tests.fakes.control import Faults, default_clock, http_reason, json_response, run_standalone

API = "/api/v3"
TOKEN_PATH = f"{API}/auth/access_token"

CALL_TYPES = ("unknown", "in", "out", "miss", "fail")
CALL_STATES = ("unknown", "calling", "talking", "finished", "hold")
CALL_FIELDS = frozenset(
    {
        "contentType", "id", "type", "state", "fromPhone", "toPhone", "fromUser", "toUser",
        "providerId", "timeFrom", "timeTo", "recordLinks",
    }
)
USER_TYPES = ("Employee", "ContractorHuman", "ContractorCompany")
CONTRACTOR_TYPES = ("ContractorHuman", "ContractorCompany")
CONTACT_TYPES = (
    "email", "jabber", "icq", "skype", "link", "phone", "telegram", "whatsapp", "viber",
    "instagram", "max_messenger",
)
CONTACT_FIELDS = frozenset({"contentType", "type", "value", "comment", "isMain"})
# The subset of the contractor fields a client is expected to send on creation; anything else
# is refused so that a typo does not pass silently [I: the real API has many more fields].
_CONTRACTOR_COMMON = frozenset({"contentType", "contactInfo", "responsibles", "description", "position"})
CONTRACTOR_FIELDS = {
    "ContractorHuman": _CONTRACTOR_COMMON | {"firstName", "middleName", "lastName", "name", "company", "gender"},
    "ContractorCompany": _CONTRACTOR_COMMON | {"name"},
}
ROUTE_TYPES = ("responsible", "random", "all")
# Paging and shaping parameters every list endpoint takes [C megaplan-raml].
LIST_PARAMS = frozenset(
    {"pageAfter", "pageBefore", "pageWith", "limit", "fields", "sortBy", "onlyRequestedFields"}
)
# Accepted by the RAML but not implemented here: refused with a message that says so, so a
# test notices instead of getting an answer the real server would not give.
_NOT_SUPPORTED = frozenset({"pageWith", "sortBy", "filter"})
FIRST_CALL_ID = 2201
FIRST_CONTRACTOR_ID = 3001
FIRST_CONFIG_ID = 101


def envelope(data: object, status: int = 200, errors: list[dict[str, str]] | None = None) -> dict[str, object]:
    """Megaplan's answer envelope [C megaplan-sdk]."""
    return {"meta": {"status": status, "errors": errors or []}, "data": data}


def error(name: str | None, message: str) -> dict[str, str]:
    """
    One element of `meta.errors`. The element shape is [?]; the RAML's ValidationError type
    has `name` and `message`, so a field error names the field in `name` [I].
    """
    return {"message": message} if name is None else {"name": name, "message": message}


@define
class MegaplanError(Exception):
    """An error answer: HTTP status (also `meta.status`), the errors, extra headers."""

    status: int
    errors: list[dict[str, str]]
    headers: dict[str, str] = field(factory=dict)

    def body(self) -> dict[str, object]:
        return envelope(None, self.status, self.errors)


def _fail(status: int, name: str | None, message: str) -> MegaplanError:
    return MegaplanError(status, [error(name, message)])


def digits(text: str) -> str:
    """A phone number reduced to its digits, the form numbers are compared in [I]."""
    return re.sub(r"\D", "", text)


def _media_type(value: bytes | None) -> str:
    return (value or b"").decode("latin-1").split(";")[0].strip().lower()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)  # type: ignore[arg-type]


def _is_zoned_datetime(text: str) -> bool:
    # ISO-8601 extended date and time joined by T, with an offset [C: "ISO-8601 with offset"].
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return False
    return len(text) > 10 and text[4] == "-" and text[10] == "T" and parsed.utcoffset() is not None


def _is_web_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


Bad = Callable[[str, str], None]


@define
class CallRecord:
    """One CallInfo with what the gateway did to it, for tests to assert on."""

    seq: int
    entity: dict[str, Any]
    via_history: bool
    # The `state` of every write that carried one, in order: calling, talking, finished...
    states: list[str] = field(factory=list)
    writes: list[dict[str, Any]] = field(factory=list)
    widget_events: int = 0

    def snapshot(self) -> dict[str, object]:
        return copy.deepcopy(
            {
                "id": self.entity["id"],
                "providerId": self.entity["providerId"],
                "entity": self.entity,
                "states": self.states,
                "writes": self.writes,
                "widget_events": self.widget_events,
                "widget": self.widget_events > 0,
                "via_history": self.via_history,
            }
        )


@define
class FakeMegaplan:
    """
    The Megaplan API v3 endpoints a telephony gateway uses.

    Configure employees, routes and contractors with `setup()` (also `POST /_control/setup`).
    Tokens expire by the injected clock; `expire_all_tokens()` revokes them at once.
    """

    username: str
    password: str
    clock: IReactorTime = field(factory=default_clock)
    token_lifetime: int = 172800
    faults: Faults = field(factory=Faults)
    requests: list[dict[str, Any]] = field(factory=list, init=False)
    token_requests: int = field(default=0, init=False)
    tokens_issued: dict[str, int] = field(factory=lambda: {"password": 0, "refresh_token": 0}, init=False)
    # employee id → {"id", "name", "internalNumber", "settings", "configId"}
    employees: dict[str, dict[str, Any]] = field(factory=dict, init=False)
    # phone digits → {"type", "timeout", "employees": [ids], "delay"}
    routes: dict[str, dict[str, Any]] = field(factory=dict, init=False)
    # request path → seconds to wait before answering (after faults, before the work)
    delays: dict[str, float] = field(factory=dict, init=False)
    calls: list[CallRecord] = field(factory=list, init=False)
    contractors_created: list[str] = field(factory=list, init=False)
    contractors_created_by_phone: dict[str, int] = field(factory=dict, init=False)
    _contractors: dict[str, dict[str, Any]] = field(factory=dict, init=False, repr=False)
    _tokens: dict[str, float] = field(factory=dict, init=False, repr=False)
    _refresh_tokens: set[str] = field(factory=set, init=False, repr=False)
    _next_call: int = field(default=FIRST_CALL_ID, init=False, repr=False)
    _next_contractor: int = field(default=FIRST_CONTRACTOR_ID, init=False, repr=False)
    _next_config: int = field(default=FIRST_CONFIG_ID, init=False, repr=False)

    app = Klein()

    # --- control --------------------------------------------------------------------------

    def resource(self) -> IResource:
        """The public API as a Twisted Web resource."""
        return self.app.resource()

    def expire_all_tokens(self, refresh_too: bool = False) -> None:
        """Revoke every access token (and every refresh token if asked), as a server would."""
        self._tokens.clear()
        if refresh_too:
            self._refresh_tokens.clear()

    def reset(self) -> None:
        """Forget requests, tokens, calls and created contractors, and clear the faults;
        credentials, employees, routes, configured contractors and delays stay."""
        self.requests.clear()
        self.token_requests = 0
        self.tokens_issued = {"password": 0, "refresh_token": 0}
        self._tokens.clear()
        self._refresh_tokens.clear()
        self.calls.clear()
        self._next_call = FIRST_CALL_ID
        for contractor_id in self.contractors_created:
            self._contractors.pop(contractor_id, None)
        self.contractors_created.clear()
        self.contractors_created_by_phone.clear()
        self.faults.clear()
        self.faults.requests_seen = 0

    def state(self) -> dict[str, object]:
        """What the control app's `/_control/state` reports."""
        now = self.clock.seconds()
        return {
            "requests": copy.deepcopy(self.requests),
            "token_requests": self.token_requests,
            "tokens_issued": dict(self.tokens_issued),
            "tokens_valid": sum(1 for t in self._tokens.values() if t > now),
            "token_lifetime": self.token_lifetime,
            "calls": [call.snapshot() for call in self.calls],
            "contractors_created": [copy.deepcopy(self._contractors[i]) for i in self.contractors_created],
            "contractors_created_by_phone": dict(self.contractors_created_by_phone),
        }

    def call(self, provider_id: str) -> dict[str, object] | None:
        """The snapshot of the latest call with this providerId, or None."""
        record = self._latest(provider_id)
        return None if record is None else record.snapshot()

    def setup(self, config: Mapping[str, object]) -> None:
        """
        Change the configuration; everything is checked before anything changes.

        Keys: `credentials` {username, password}; `token_lifetime` (seconds > 0);
        `employees` [{id, name, internalNumber?, settings?}] (added or replaced by id);
        `routes` {phone: [employee ids] | {employees, type?, timeout?, delay?} | null};
        `contractors` [ContractorHuman/ContractorCompany bodies, `id` optional];
        `delays` {request path: seconds (0 removes)}; `expire_tokens` "access" | "all".
        """
        known = {"credentials", "token_lifetime", "employees", "routes", "contractors", "delays", "expire_tokens"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown setup keys: {', '.join(unknown)}")
        username, password = self.username, self.password
        if "credentials" in config:
            credentials = config["credentials"]
            if not isinstance(credentials, dict) or set(credentials) - {"username", "password"} or not all(
                isinstance(v, str) and v for v in credentials.values()
            ):
                raise ValueError("credentials must be an object with non-empty username and/or password strings")
            username = credentials.get("username", username)
            password = credentials.get("password", password)
        lifetime = config.get("token_lifetime", self.token_lifetime)
        if not _is_int(lifetime) or lifetime <= 0:  # type: ignore[operator]
            raise ValueError("token_lifetime must be a positive integer")
        employees = copy.deepcopy(self.employees)
        next_config = self._next_config
        for item in self._list(config.get("employees", []), "employees"):
            entry, next_config = self._employee_entry(item, employees, next_config)
            employees[entry["id"]] = entry
        routes = copy.deepcopy(self.routes)
        raw_routes = config.get("routes", {})
        if not isinstance(raw_routes, dict):
            raise ValueError("routes must be an object of phone → route")
        for phone, route in raw_routes.items():
            key = digits(phone)
            if not key:
                raise ValueError(f"routes: {phone!r} has no digits")
            if route is None:
                routes.pop(key, None)
            else:
                routes[key] = self._route_entry(phone, route, employees)
        delays = dict(self.delays)
        raw_delays = config.get("delays", {})
        if not isinstance(raw_delays, dict):
            raise ValueError("delays must be an object of path → seconds")
        for path, seconds in raw_delays.items():
            if not path.startswith("/") or not _is_number(seconds) or seconds < 0:
                raise ValueError(f"delays: {path!r} must map a path starting with / to seconds >= 0")
            if seconds:
                delays[path] = float(seconds)
            else:
                delays.pop(path, None)
        expire = config.get("expire_tokens")
        if expire not in (None, "access", "all"):
            raise ValueError('expire_tokens must be "access" or "all"')
        contractors = []
        for n, item in enumerate(self._list(config.get("contractors", []), "contractors")):
            problems: list[dict[str, str]] = []
            if not isinstance(item, dict):
                raise ValueError(f"contractors[{n}] must be an object")
            item = dict(item)
            given_id = item.pop("id", None)
            if given_id is not None and (not isinstance(given_id, str) or not given_id.isdigit()):
                raise ValueError(f"contractors[{n}].id must be a string of digits")
            self._check_contractor(item, lambda name, msg: problems.append(error(name, msg)), employees)
            if problems:
                raise ValueError(f"contractors[{n}]: " + "; ".join(f"{p['name']}: {p['message']}" for p in problems))
            contractors.append((given_id, item))
        # Everything checked: apply.
        self.username, self.password = username, password
        self.token_lifetime = lifetime  # type: ignore[assignment]
        self.employees, self._next_config = employees, next_config
        self.routes, self.delays = routes, delays
        for given_id, item in contractors:
            self._store_contractor(item, given_id)
        if expire is not None:
            self.expire_all_tokens(refresh_too=expire == "all")

    @staticmethod
    def _list(value: object, what: str) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError(f"{what} must be a list")
        return value

    @staticmethod
    def _employee_entry(
        item: object, employees: Mapping[str, dict[str, Any]], next_config: int
    ) -> tuple[dict[str, Any], int]:
        if not isinstance(item, dict):
            raise ValueError("employees must be objects")
        unknown = sorted(set(item) - {"id", "name", "internalNumber", "settings"})
        if unknown:
            raise ValueError(f"employees: unknown keys {', '.join(unknown)}")
        employee_id, name = item.get("id"), item.get("name")
        if not isinstance(employee_id, str) or not employee_id.isdigit():
            raise ValueError("employees: id must be a string of digits")
        if not isinstance(name, str) or not name:
            raise ValueError(f"employees: {employee_id} needs a name")
        internal = item.get("internalNumber")
        if internal is not None and (not isinstance(internal, str) or not internal):
            raise ValueError(f"employees: {employee_id} internalNumber must be a non-empty string or null")
        settings = item.get("settings", "{}")
        if not isinstance(settings, str):
            raise ValueError(f"employees: {employee_id} settings must be a (JSON) string")
        previous = employees.get(employee_id)
        if previous is not None:
            config_id = previous["configId"]
        else:
            config_id, next_config = str(next_config), next_config + 1
        entry = {"id": employee_id, "name": name, "internalNumber": internal, "settings": settings, "configId": config_id}
        return entry, next_config

    @staticmethod
    def _route_entry(phone: str, route: object, employees: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(route, list):
            route = {"employees": route}
        if not isinstance(route, dict):
            raise ValueError(f"routes: {phone} must be a list of employee ids or an object")
        unknown = sorted(set(route) - {"employees", "type", "timeout", "delay"})
        if unknown:
            raise ValueError(f"routes: {phone}: unknown keys {', '.join(unknown)}")
        ids = route.get("employees", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"routes: {phone}: employees must be a list of id strings")
        missing = [i for i in ids if i not in employees]
        if missing:
            raise ValueError(f"routes: {phone}: unknown employees {', '.join(missing)}")
        kind = route.get("type", "responsible")
        if kind not in ROUTE_TYPES:
            raise ValueError(f"routes: {phone}: type must be one of {', '.join(ROUTE_TYPES)}")
        timeout = route.get("timeout", 20)
        if not _is_int(timeout) or timeout <= 0:
            raise ValueError(f"routes: {phone}: timeout must be a positive integer")
        delay = route.get("delay", 0)
        if not _is_number(delay) or delay < 0:
            raise ValueError(f"routes: {phone}: delay must be seconds >= 0")
        return {"employees": list(ids), "type": kind, "timeout": timeout, "delay": float(delay)}

    # --- plumbing -------------------------------------------------------------------------

    def _record(self, request: IRequest) -> dict[str, Any]:
        _, _, raw_query = request.uri.decode("latin-1").partition("?")
        entry: dict[str, Any] = {
            "method": request.method.decode("ascii"),
            "path": request.path.decode("latin-1"),
            "query": unquote_plus(raw_query) if raw_query else None,
            "body": None,
            "at": self.clock.seconds(),
            "status": None,
        }
        if _media_type(request.getHeader(b"content-type")) == "application/json":
            request.content.seek(0)
            try:
                entry["body"] = json.loads(request.content.read() or b"null")
            except ValueError:
                pass
            request.content.seek(0)
        self.requests.append(entry)

        def answered(_: object) -> None:
            entry["status"] = request.code

        request.notifyFinish().addCallbacks(answered, lambda _: None)
        return entry

    async def _prologue(self, request: IRequest, authorize: bool = True) -> bytes | None:
        """What every public route does before its work: record, faults, delay, bearer."""
        self._record(request)
        return await self._gate(request, authorize)

    async def _gate(self, request: IRequest, authorize: bool) -> bytes | None:
        fault = await self.faults.intercept(
            request, self.clock, lambda status: envelope(None, status, [error(None, http_reason(status))])
        )
        if fault is not None:
            return fault
        delay = self.delays.get(request.path.decode("latin-1"))
        if delay:
            await deferLater(self.clock, delay, lambda: None)
        if authorize:
            self._authorize(request)
        return None

    def _authorize(self, request: IRequest) -> None:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _fail(401, None, "Authorization: Bearer <access_token> is required")
        expires = self._tokens.get(token)
        if expires is None:
            raise _fail(401, None, "unknown or revoked access token")
        if expires <= self.clock.seconds():
            raise _fail(401, None, "access token expired")

    @staticmethod
    def _ok(request: IRequest, data: object) -> bytes:
        return json_response(request, 200, envelope(data))

    @staticmethod
    def _params(
        request: IRequest, allowed: Iterable[str], required: Iterable[str] = ()
    ) -> dict[str, Any]:
        """
        The GET parameters: one JSON object, URL-encoded, as the whole query string [C].
        `+` decodes to a space as in a form-decoded query [I], so a raw `+` in a phone is lost
        here as it would be on a server that url-decodes: encode it as %2B.
        """
        _, sep, raw = request.uri.decode("latin-1").partition("?")
        params: object = {}
        if raw:
            try:
                text = unquote_plus(raw, encoding="utf-8", errors="strict")
            except UnicodeDecodeError:
                raise _fail(400, "query", "the query is not UTF-8 once URL-decoded") from None
            try:
                params = json.loads(text)
            except ValueError:
                if "=" in text:
                    names = ", ".join(sorted(parse_qs(text, keep_blank_values=True)))
                    message = f"GET parameters must be one JSON object after '?', not key=value pairs ({names})"
                else:
                    message = "GET parameters must be one JSON object after '?'; the query is not JSON"
                raise _fail(400, "query", message) from None
        if not isinstance(params, dict):
            raise _fail(400, "query", "GET parameters must be a JSON object")
        allowed = frozenset(allowed)
        problems = [error(name, "unknown parameter") for name in sorted(set(params) - allowed)]
        problems += [
            error(name, "is not supported by the fake") for name in sorted(set(params) & _NOT_SUPPORTED)
        ]
        problems += [error(name, "is required") for name in required if name not in params]
        if "limit" in params and not (_is_int(params["limit"]) and params["limit"] > 0):
            problems.append(error("limit", "must be a positive integer"))
        for name in ("pageAfter", "pageBefore"):
            if name in params and not (
                isinstance(params[name], dict) and isinstance(params[name].get("id"), str)
            ):
                problems.append(error(name, "must be an entity reference {contentType, id}"))
        if "onlyRequestedFields" in params and not isinstance(params["onlyRequestedFields"], bool):
            problems.append(error("onlyRequestedFields", "must be a boolean"))
        if problems:
            raise MegaplanError(400, problems)
        return params

    @staticmethod
    def _page(items: list[dict[str, Any]], params: Mapping[str, Any]) -> list[dict[str, Any]]:
        ids = [item["id"] for item in items]
        if "pageAfter" in params:
            ref = params["pageAfter"]["id"]
            items = items[ids.index(ref) + 1 :] if ref in ids else []
        if "pageBefore" in params:
            ref = params["pageBefore"]["id"]
            items = items[: ids.index(ref)] if ref in ids else []
            if "limit" in params:
                return items[-params["limit"] :]
        if "limit" in params:
            items = items[: params["limit"]]
        return items

    @staticmethod
    def _json_body(request: IRequest) -> object:
        if _media_type(request.getHeader(b"content-type")) != "application/json":
            raise _fail(415, "Content-Type", "POST bodies must be JSON (Content-Type: application/json)")
        request.content.seek(0)
        try:
            return json.loads(request.content.read().decode("utf-8"))
        except ValueError as e:
            raise _fail(400, "body", f"body is not JSON: {e}") from None

    def _json_object(self, request: IRequest) -> dict[str, Any]:
        body = self._json_body(request)
        if not isinstance(body, dict):
            raise _fail(400, "body", "body must be a JSON object")
        return body

    @app.handle_errors(MegaplanError)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        rejection: MegaplanError = failure.value  # type: ignore[assignment]
        return json_response(request, rejection.status, rejection.body(), rejection.headers)

    # --- auth -----------------------------------------------------------------------------

    @app.route(TOKEN_PATH, methods=["POST"])
    async def access_token(self, request: IRequest) -> bytes:
        self.token_requests += 1
        entry = self._record(request)
        fault = await self._gate(request, authorize=False)
        if fault is not None:
            return fault
        form = self._form(request)
        # Not the password: only what a test needs to tell the grants apart.
        entry["body"] = {"grant_type": form.get("grant_type")}
        grant = form.get("grant_type")
        if grant is None:
            raise _fail(400, "grant_type", "is required")
        if grant == "password":
            missing = [error(name, "is required") for name in ("username", "password") if not form.get(name)]
            if missing:
                raise MegaplanError(400, missing)
            if form["username"] != self.username or form["password"] != self.password:
                raise _fail(401, None, "wrong username or password")
        elif grant == "refresh_token":
            refresh = form.get("refresh_token")
            if not refresh:
                raise _fail(400, "refresh_token", "is required")
            if refresh not in self._refresh_tokens:
                raise _fail(401, "refresh_token", "unknown, used or revoked refresh token")
            # Rotated: a refresh token works once [I].
            self._refresh_tokens.discard(refresh)
        else:
            raise _fail(400, "grant_type", "must be password or refresh_token")
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self._tokens[access] = self.clock.seconds() + self.token_lifetime
        self._refresh_tokens.add(refresh)
        self.tokens_issued[grant] += 1
        # Flat, not enveloped [C].
        return json_response(
            request,
            200,
            {"access_token": access, "expires_in": self.token_lifetime, "token_type": "bearer", "refresh_token": refresh},
        )

    @staticmethod
    def _form(request: IRequest) -> dict[str, str]:
        """The token request's form fields, url-encoded or multipart [C]."""
        content_type = request.getHeader(b"content-type") or b""
        media = _media_type(content_type)
        request.content.seek(0)
        raw = request.content.read()
        if media == "application/x-www-form-urlencoded":
            try:
                parsed = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw))
            except (UnicodeDecodeError, ValueError):
                raise _fail(400, "body", "not a url-encoded form") from None
            return {name: values[0] for name, values in parsed.items()}
        if media == "multipart/form-data":
            message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type + b"\r\n\r\n" + raw)
            if not message.is_multipart():
                raise _fail(400, "body", "not a multipart form")
            form = {}
            for part in message.iter_parts():
                name = part.get_param("name", header="content-disposition")
                if name:
                    form[str(name)] = (part.get_payload(decode=True) or b"").decode("utf-8")
            return form
        raise _fail(
            400, "Content-Type", "the token request must be a form (application/x-www-form-urlencoded or multipart/form-data)"
        )

    # --- CallInfo -------------------------------------------------------------------------

    def _check_ref(self, value: object, name: str, kinds: Iterable[str], bad: Bad, employees: Mapping[str, Any] | None = None) -> None:
        """An entity reference {contentType, id} to something that exists here [I]."""
        kinds = tuple(kinds)
        if not isinstance(value, dict):
            bad(name, "must be a reference {contentType, id}")
            return
        kind, ref_id = value.get("contentType"), value.get("id")
        if kind not in kinds:
            bad(f"{name}.contentType", f"must be one of: {', '.join(kinds)}")
            return
        if not isinstance(ref_id, str) or not ref_id:
            bad(f"{name}.id", "must be a non-empty id string")
            return
        if kind == "Employee":
            if ref_id not in (self.employees if employees is None else employees):
                bad(f"{name}.id", f"no Employee {ref_id}")
        elif self._contractors.get(ref_id, {}).get("contentType") != kind:
            bad(f"{name}.id", f"no {kind} {ref_id}")

    def _check_call(
        self,
        body: Mapping[str, Any],
        bad: Bad,
        prefix: str = "",
        required: Iterable[str] = (),
        own_id: str | None = None,
    ) -> None:
        """Every problem with a CallInfo body, one per field, named with `prefix`."""
        for name in sorted(set(body) - CALL_FIELDS):
            bad(prefix + name, "unknown field")
        # Whether contentType is required is [?]: the notes say send it, so it is required.
        if body.get("contentType") != "CallInfo":
            bad(prefix + "contentType", 'must be "CallInfo"')
        if "id" in body and (own_id is None or body["id"] != own_id):
            bad(prefix + "id", "is read-only")
        for name in required:
            if name not in body:
                bad(prefix + name, "is required")
        if "type" in body and body["type"] not in CALL_TYPES:
            bad(prefix + "type", "must be one of: " + ", ".join(CALL_TYPES))
        if "state" in body and body["state"] not in CALL_STATES:
            bad(prefix + "state", "must be one of: " + ", ".join(CALL_STATES))
        if "providerId" in body and (not isinstance(body["providerId"], str) or not body["providerId"].strip()):
            bad(prefix + "providerId", "must be a non-empty string")
        for name in ("fromPhone", "toPhone"):
            if name in body and not isinstance(body[name], str):
                bad(prefix + name, "must be a string")
        for name in ("fromUser", "toUser"):
            if body.get(name) is not None:
                self._check_ref(body[name], prefix + name, USER_TYPES, bad)
        for name in ("timeFrom", "timeTo"):
            if body.get(name) is not None:
                self._check_datetime(body[name], prefix + name, bad)
        if "recordLinks" in body:
            links = body["recordLinks"]
            if not isinstance(links, list):
                bad(prefix + "recordLinks", "must be a list of URL strings")
            else:
                for n, link in enumerate(links):
                    if not isinstance(link, str) or not _is_web_url(link):
                        bad(f"{prefix}recordLinks[{n}]", "must be an http or https URL")

    @staticmethod
    def _check_datetime(value: object, name: str, bad: Bad) -> None:
        if not isinstance(value, dict) or value.get("contentType") != "DateTime":
            bad(name, 'must be {"contentType": "DateTime", "value": ...}')
            return
        extra = sorted(set(value) - {"contentType", "value"})
        if extra:
            bad(f"{name}.{extra[0]}", "unknown field")
        text = value.get("value")
        if not isinstance(text, str) or not _is_zoned_datetime(text):
            bad(f"{name}.value", "must be an ISO-8601 date and time with a UTC offset")

    def _validated(self, check: Callable[[Bad], None]) -> None:
        problems: list[dict[str, str]] = []
        check(lambda name, message: problems.append(error(name, message)))
        if problems:
            raise MegaplanError(400, problems)

    def _latest(self, provider_id: object) -> CallRecord | None:
        # "If several match, the latest is edited" [C]: the one created last.
        for record in reversed(self.calls):
            if record.entity["providerId"] == provider_id:
                return record
        return None

    def _by_id(self, call_id: str) -> CallRecord:
        for record in self.calls:
            if record.entity["id"] == call_id:
                return record
        raise _fail(404, None, f"CallInfo {call_id} not found")

    def _create_call(self, body: Mapping[str, Any], via: str, widget: bool) -> CallRecord:
        entity: dict[str, Any] = {
            "contentType": "CallInfo", "id": str(self._next_call), "type": None, "state": None,
            "fromPhone": None, "toPhone": None, "fromUser": None, "toUser": None,
            "providerId": None, "timeFrom": None, "timeTo": None, "recordLinks": [],
        }
        self._next_call += 1
        record = CallRecord(seq=len(self.calls), entity=entity, via_history=via == "history")
        self.calls.append(record)
        self._write(record, body, via, widget)
        return record

    def _write(self, record: CallRecord, body: Mapping[str, Any], via: str, widget: bool) -> None:
        for name, value in body.items():
            if name not in ("contentType", "id"):
                # recordLinks and the rest are replaced, not merged [?].
                record.entity[name] = copy.deepcopy(value)
        if "state" in body:
            record.states.append(body["state"])
        if widget:
            record.widget_events += 1
        record.writes.append({"via": via, "at": self.clock.seconds(), "body": copy.deepcopy(dict(body)), "widget": widget})

    @app.route(f"{API}/callInfo", methods=["POST"])
    async def create_call(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        body = self._json_object(request)
        # type and state are required here though the RAML marks them optional [I]: the
        # widget's mode comes from them.
        self._validated(lambda bad: self._check_call(body, bad, required=("type", "state", "providerId")))
        record = self._create_call(body, "create", widget=True)
        return self._ok(request, copy.deepcopy(record.entity))

    @app.route(f"{API}/callInfo", methods=["GET"])
    async def list_calls(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        params = self._params(request, LIST_PARAMS)
        return self._ok(request, self._page([copy.deepcopy(r.entity) for r in self.calls], params))

    @app.route(f"{API}/callInfo/provider", methods=["GET"])
    async def get_call_by_provider(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        params = self._params(request, {"providerId"}, required=("providerId",))
        record = self._latest(params["providerId"])
        if record is None:
            raise _fail(404, "providerId", f"no CallInfo with providerId {params['providerId']!r}")
        return self._ok(request, copy.deepcopy(record.entity))

    @app.route(f"{API}/callInfo/provider", methods=["POST"])
    async def update_call_by_provider(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        body = self._json_object(request)
        self._validated(lambda bad: self._check_call(body, bad, required=("providerId",)))
        record = self._latest(body["providerId"])
        if record is None:
            raise _fail(404, "providerId", f"no CallInfo with providerId {body['providerId']!r}")
        self._write(record, body, "provider", widget=True)
        return self._ok(request, copy.deepcopy(record.entity))

    @app.route(f"{API}/callInfo/history", methods=["POST"])
    async def import_history(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        body = self._json_body(request)
        if not isinstance(body, list):
            raise _fail(400, "body", "body must be a JSON array of CallInfo")

        def check(bad: Bad) -> None:
            seen: set[str] = set()
            for n, item in enumerate(body):
                prefix = f"[{n}]."
                if not isinstance(item, dict):
                    bad(f"[{n}]", "must be a CallInfo object")
                    continue
                self._check_call(item, bad, prefix, required=("providerId",))
                # Created or updated "in finished state" [C]; another state is refused [I].
                if "state" in item and item["state"] != "finished":
                    bad(prefix + "state", "history takes finished calls only")
                provider_id = item.get("providerId")
                if not isinstance(provider_id, str):
                    continue
                if self._latest(provider_id) is None and provider_id not in seen and "type" not in item:
                    bad(prefix + "type", "is required to create a call")
                seen.add(provider_id)

        self._validated(check)
        answer = []
        for item in body:
            item = {**item, "state": "finished"}
            record = self._latest(item["providerId"])
            if record is None:
                record = self._create_call(item, "history", widget=False)
            else:
                self._write(record, item, "history", widget=False)
            answer.append(copy.deepcopy(record.entity))
        return self._ok(request, answer)

    @app.route(f"{API}/callInfo/<call_id>", methods=["GET"])
    async def get_call(self, request: IRequest, call_id: str) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        self._params(request, ())
        return self._ok(request, copy.deepcopy(self._by_id(call_id).entity))

    @app.route(f"{API}/callInfo/<call_id>", methods=["POST"])
    async def update_call(self, request: IRequest, call_id: str) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        record = self._by_id(call_id)
        body = self._json_object(request)
        self._validated(lambda bad: self._check_call(body, bad, own_id=call_id))
        self._write(record, body, "id", widget=True)
        return self._ok(request, copy.deepcopy(record.entity))

    @app.route(f"{API}/callInfo/<call_id>/setContractor", methods=["POST"])
    async def set_contractor(self, request: IRequest, call_id: str) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        record = self._by_id(call_id)
        body = self._json_object(request)
        self._validated(lambda bad: self._check_ref(body, "body", CONTRACTOR_TYPES, bad))
        # fromUser for incoming and missed, toUser for outgoing [C]; fail and unknown are
        # treated as incoming [?].
        target = "toUser" if record.entity["type"] == "out" else "fromUser"
        ref = {"contentType": body["contentType"], "id": body["id"]}
        record.entity[target] = ref
        # Whether the widget hears of it is [?]: not counted as a widget event.
        record.writes.append({"via": "setContractor", "at": self.clock.seconds(), "body": copy.deepcopy(body), "widget": False})
        return self._ok(request, copy.deepcopy(record.entity))

    # --- routing and employees ------------------------------------------------------------

    def _employee_ref(self, employee_id: str) -> dict[str, str]:
        return {"contentType": "Employee", "id": employee_id, "name": self.employees[employee_id]["name"]}

    @app.route(f"{API}/callRoute", methods=["GET"])
    async def call_route(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        # `phone` is optional in the RAML; asking for a route without one is refused here [I].
        params = self._params(request, {"phone"}, required=("phone",))
        phone = params["phone"]
        if not isinstance(phone, str) or not digits(phone):
            raise _fail(400, "phone", "must be a phone number string")
        route = self.routes.get(digits(phone))
        if route and route["delay"]:
            await deferLater(self.clock, route["delay"], lambda: None)
        # `users`: clients and employees that have this number [C]; here the contractors.
        users = [self._contractor_ref(c) for c in self._contractors.values() if digits(phone) in self._phones(c)]
        return self._ok(
            request,
            {
                "contentType": "CallRoute",
                "type": route["type"] if route else "responsible",
                "timeout": route["timeout"] if route else 20,
                "employees": [self._employee_ref(i) for i in route["employees"]] if route else [],
                "users": users,
            },
        )

    def _user_config(self, employee: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "contentType": "CallUserConfig",
            "id": employee["configId"],
            "employee": {"contentType": "Employee", "id": employee["id"]},
            "internalNumber": employee["internalNumber"],
            "settings": employee["settings"],
        }

    def _user_configs(self) -> list[dict[str, Any]]:
        # Only employees with telephony settings (an internal number) have a record [I].
        with_number = [e for e in self.employees.values() if e["internalNumber"] is not None]
        return [self._user_config(e) for e in sorted(with_number, key=lambda e: int(e["configId"]))]

    @app.route(f"{API}/callUserConfig", methods=["GET"])
    async def list_user_configs(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        params = self._params(request, LIST_PARAMS)
        return self._ok(request, self._page(self._user_configs(), params))

    @app.route(f"{API}/callUserConfig/Employee/<employee_id>", methods=["GET"])
    async def user_config_of(self, request: IRequest, employee_id: str) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        self._params(request, ())
        employee = self.employees.get(employee_id)
        if employee is None or employee["internalNumber"] is None:
            raise _fail(404, None, f"no CallUserConfig for Employee {employee_id}")
        return self._ok(request, self._user_config(employee))

    @app.route(f"{API}/employee", methods=["GET"])
    async def list_employees(self, request: IRequest) -> bytes:
        # [I] The shape beyond {contentType, id, name} is not modelled.
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        params = self._params(request, LIST_PARAMS | {"q"})
        items = [self._employee_ref(i) for i in sorted(self.employees, key=int)]
        q = params.get("q")
        if isinstance(q, str) and q:
            items = [e for e in items if q.casefold() in e["name"].casefold()]
        return self._ok(request, self._page(items, params))

    # --- contractors ----------------------------------------------------------------------

    @staticmethod
    def _phones(contractor: Mapping[str, Any]) -> list[str]:
        return [digits(c["value"]) for c in contractor.get("contactInfo", []) if c.get("type") == "phone"]

    @staticmethod
    def _contractor_ref(contractor: Mapping[str, Any]) -> dict[str, str]:
        return {"contentType": contractor["contentType"], "id": contractor["id"], "name": contractor["name"]}

    def _check_contractor(self, body: Mapping[str, Any], bad: Bad, employees: Mapping[str, Any] | None = None) -> None:
        kind = body.get("contentType")
        if kind not in CONTRACTOR_TYPES:
            bad("contentType", "must be ContractorHuman or ContractorCompany")
            return
        for name in sorted(set(body) - CONTRACTOR_FIELDS[kind]):
            bad(name, "unknown field" if name != "id" else "is read-only")
        for name in ("firstName", "middleName", "lastName", "name", "description", "position"):
            if name in body and not isinstance(body[name], str):
                bad(name, "must be a string")
        if kind == "ContractorCompany":
            if not isinstance(body.get("name"), str) or not body["name"].strip():
                bad("name", "is required")
        elif not any(isinstance(body.get(n), str) and body[n].strip() for n in ("firstName", "lastName", "middleName", "name")):
            bad("firstName", "a ContractorHuman needs a firstName, lastName, middleName or name")
        if "gender" in body and body["gender"] not in ("male", "female"):
            bad("gender", "must be male or female")
        if "company" in body:
            self._check_ref(body["company"], "company", ("ContractorCompany",), bad)
        contacts = body.get("contactInfo", [])
        if not isinstance(contacts, list):
            bad("contactInfo", "must be a list of ContactInfo")
            contacts = []
        for n, item in enumerate(contacts):
            prefix = f"contactInfo[{n}]"
            if not isinstance(item, dict):
                bad(prefix, "must be a ContactInfo object")
                continue
            for name in sorted(set(item) - CONTACT_FIELDS):
                bad(f"{prefix}.{name}", "unknown field")
            if item.get("contentType") != "ContactInfo":
                bad(f"{prefix}.contentType", 'must be "ContactInfo"')
            # The RAML leaves `type` optional; without one a number could not be found again [I].
            if item.get("type") not in CONTACT_TYPES:
                bad(f"{prefix}.type", "must be one of: " + ", ".join(CONTACT_TYPES))
            if not isinstance(item.get("value"), str) or not item["value"].strip():
                bad(f"{prefix}.value", "is required")
            elif item.get("type") == "phone" and not digits(item["value"]):
                bad(f"{prefix}.value", "a phone needs digits")
            if "comment" in item and not isinstance(item["comment"], str):
                bad(f"{prefix}.comment", "must be a string")
            if "isMain" in item and not isinstance(item["isMain"], bool):
                bad(f"{prefix}.isMain", "must be a boolean")
        responsibles = body.get("responsibles", [])
        if not isinstance(responsibles, list):
            bad("responsibles", "must be a list of Employee references")
            responsibles = []
        for n, ref in enumerate(responsibles):
            self._check_ref(ref, f"responsibles[{n}]", ("Employee",), bad, employees)

    def _store_contractor(self, body: Mapping[str, Any], given_id: str | None = None) -> dict[str, Any]:
        if given_id is None:
            while str(self._next_contractor) in self._contractors:
                self._next_contractor += 1
            given_id = str(self._next_contractor)
            self._next_contractor += 1
        entity = copy.deepcopy(dict(body))
        entity["id"] = given_id
        if entity["contentType"] == "ContractorHuman" and not entity.get("name"):
            parts = (entity.get(n) for n in ("lastName", "firstName", "middleName"))
            entity["name"] = " ".join(p for p in parts if p)
        entity["contactInfo"] = [
            {"comment": None, "isMain": False, **c} for c in entity.get("contactInfo", [])
        ]
        entity["responsibles"] = [
            {"contentType": "Employee", "id": r["id"]} for r in entity.get("responsibles", [])
        ]
        self._contractors[given_id] = entity
        return entity

    def _matches(self, contractor: Mapping[str, Any], q: str) -> bool:
        """`q` searches name, e-mail and phone [C]; phones by digits, the rest by substring [I]."""
        needle = q.strip().casefold()
        if not needle:
            return True
        texts = [contractor.get("name") or ""] + [
            c["value"] for c in contractor.get("contactInfo", []) if c.get("type") != "phone"
        ]
        if any(needle in t.casefold() for t in texts):
            return True
        wanted = digits(q)
        return bool(wanted) and len(wanted) >= 3 and any(wanted in p for p in self._phones(contractor))

    @app.route(f"{API}/contractor", methods=["GET"])
    async def search_contractors(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        params = self._params(request, LIST_PARAMS | {"q", "filter"})
        q = params.get("q", "")
        if not isinstance(q, str):
            raise _fail(400, "q", "must be a string")
        found = [copy.deepcopy(c) for c in self._contractors.values() if self._matches(c, q)]
        return self._ok(request, self._page(found, params))

    @app.route(f"{API}/contractor", methods=["POST"])
    async def create_contractor(self, request: IRequest) -> bytes:
        fault = await self._prologue(request)
        if fault is not None:
            return fault
        body = self._json_object(request)
        self._validated(lambda bad: self._check_contractor(body, bad))
        entity = self._store_contractor(body)
        self.contractors_created.append(entity["id"])
        for phone in set(self._phones(entity)):
            self.contractors_created_by_phone[phone] = self.contractors_created_by_phone.get(phone, 0) + 1
        return self._ok(request, copy.deepcopy(entity))

    # --- anything else ----------------------------------------------------------------------

    @app.route("/", branch=True)
    async def unknown(self, request: IRequest) -> bytes:
        # A request the fake was not built for: answer so that the test notices.
        fault = await self._prologue(request, authorize=False)
        if fault is not None:
            return fault
        path = request.path.decode("latin-1")
        adapter = self.app.url_map.bind("megaplan.test")
        for method in ("GET", "POST"):
            if method == request.method.decode("ascii"):
                continue
            try:
                endpoint, _ = adapter.match(path, method=method)
            except HTTPException:
                continue
            if endpoint != "unknown_branch" and endpoint != "unknown":
                raise MegaplanError(405, [error(None, f"{request.method.decode('ascii')} not allowed here")], {"Allow": method})
        if path.startswith(API + "/"):
            self._authorize(request)
        raise _fail(404, None, "Not found")


def _employee_arg(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit() or not parts[1]:
        raise argparse.ArgumentTypeError("expected ID:NAME[:INTERNAL_NUMBER]")
    return {"id": parts[0], "name": parts[1], "internalNumber": parts[2] if len(parts) == 3 else None}


def _route_arg(text: str) -> tuple[str, list[str]]:
    phone, sep, ids = text.partition("=")
    if not sep or not digits(phone) or not ids:
        raise argparse.ArgumentTypeError("expected PHONE=EMPLOYEE_ID[,EMPLOYEE_ID...]")
    return phone, ids.split(",")


def _contractor_arg(text: str) -> dict[str, Any]:
    name, sep, phone = text.rpartition(":")
    if not sep or not name or not digits(phone):
        raise argparse.ArgumentTypeError("expected NAME:PHONE")
    return {
        "contentType": "ContractorHuman",
        "firstName": name,
        "contactInfo": [{"contentType": "ContactInfo", "type": "phone", "value": phone}],
    }


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--username", required=True, help="the integration user's login")
    parser.add_argument("--password", required=True)
    parser.add_argument("--token-lifetime", type=int, default=172800, help="seconds (expires_in)")
    parser.add_argument("--employee", type=_employee_arg, action="append", default=[], metavar="ID:NAME[:EXT]")
    parser.add_argument("--route", type=_route_arg, action="append", default=[], metavar="PHONE=ID[,ID...]")
    parser.add_argument("--contractor", type=_contractor_arg, action="append", default=[], metavar="NAME:PHONE")
    parser.add_argument("--config", type=argparse.FileType("r"), help="a JSON file of setup() keys, applied last")


def _build(args: argparse.Namespace, reactor: Any) -> FakeMegaplan:
    fake = FakeMegaplan(args.username, args.password, clock=reactor, token_lifetime=args.token_lifetime)
    fake.setup({"employees": args.employee, "routes": dict(args.route), "contractors": args.contractor})
    if args.config is not None:
        fake.setup(json.load(args.config))
    return fake


def main(argv: list[str] | None = None) -> int:
    """Run the fake Megaplan standalone (`python -m tests.fakes.megaplan --help`)."""
    return run_standalone("Fake Megaplan API v3 (telephony, employees, contractors)", _add_arguments, _build, argv)


if __name__ == "__main__":
    sys.exit(main())
