"""
A fake CallGear (CoMagic / UIS): the Call API and the Data API as JSON-RPC 2.0 endpoints
(sessions, API keys, limits, mnemonics: callgear.md §2, §3, §6.3), and a notification sender
that renders the customer's templates for a call script and posts them (§4).

Markers as in the protocol notes: [I] where the fake picks a reading the notes leave open;
it then picks the stricter one, so a gateway built against it sends what the notes say.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import sys
from typing import Any, Callable, Mapping

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from tests.fakes.control import Faults, default_clock, http_reason, json_response, run_standalone

CALL_PATH, DATA_PATH = "/v4.0", "/v2.0"
CALL_METHODS = frozenset({"login.user", "logout.user", "start.employee_call", "release.call"})
DATA_METHODS = frozenset({"login.user", "logout.user", "get.employees"})


@define
class RpcError(Exception):
    """A JSON-RPC error answer: code, mnemonic, message and the field it is about."""

    code: int
    mnemonic: str
    message: str
    field: str | None = None
    metadata: dict[str, Any] | None = None

    def body(self, rid: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"mnemonic": self.mnemonic, "field": self.field, "value": None,
                                "params": {}, "extended_helper": None}
        if self.metadata is not None:
            data["metadata"] = self.metadata  # [I] where an error's limits travel
        return {"jsonrpc": "2.0", "id": rid,
                "error": {"code": self.code, "message": self.message, "data": data}}


def _type_error(name: str) -> RpcError:
    return RpcError(-32602, "data_type_error", "Data supplied is of wrong type", name)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _digits(value: object) -> bool:
    return isinstance(value, str) and value.isascii() and value.isdigit()


# method → {param: (required, check)}; access_token is checked apart.  [I] An unknown
# parameter is refused (-32602 unexpected_parameter) so a misspelt one cannot pass.
_PARAMS: dict[str, dict[str, tuple[bool, Callable[[Any], bool]]]] = {
    "login.user": {"login": (True, lambda v: isinstance(v, str) and bool(v)),
                   "password": (True, lambda v: isinstance(v, str))},
    "logout.user": {},
    "start.employee_call": {
        "first_call": (True, lambda v: v in ("employee", "contact")),
        "virtual_phone_number": (True, _digits),
        "contact": (True, lambda v: isinstance(v, str) and bool(v)),
        "employee": (True, lambda v: isinstance(v, dict) and _is_int(v.get("id"))
                     and set(v) <= {"id", "phone_number"}
                     and isinstance(v.get("phone_number", ""), str)),
        "switch_at_once": (False, lambda v: isinstance(v, bool)),
        "early_switching": (False, lambda v: isinstance(v, bool)),
        "show_virtual_phone_number": (False, lambda v: isinstance(v, bool)),
        "media_file_id": (False, _is_int),
        "contact_message": (False, lambda v: isinstance(v, dict)),
        "employee_message": (False, lambda v: isinstance(v, dict)),
        "external_id": (False, lambda v: isinstance(v, str)),
        "dtmf_string": (False, lambda v: isinstance(v, str) and re.fullmatch(r"[0-9*#.]*", v)),
        "direction": (False, lambda v: v in ("in", "out")),
    },
    "release.call": {"call_session_id": (True, _is_int)},
    "get.employees": {"limit": (False, lambda v: _is_int(v) and 0 < v <= 10000),
                      "offset": (False, lambda v: _is_int(v) and 0 <= v <= 100000),
                      "filter": (False, lambda v: isinstance(v, dict)),
                      "fields": (False, lambda v: isinstance(v, list)),
                      "sort": (False, lambda v: isinstance(v, list))},
}


@define
class FakeCallGear:
    """The Call API (``/v4.0``) and the Data API (``/v2.0``) of one account.

    ``api_keys`` are permanent keys; ``users`` (login → password) may open sessions with
    ``login.user`` that expire after ``session_lifetime`` by the injected clock (an expired
    one is ``access_token_invalid``, or ``expired_mnemonic`` when set).  Each API counts
    requests per minute against ``minute_limit``.  What was asked is kept in ``requests``
    (every envelope), ``calls`` (started sessions) and ``released``.
    """

    clock: IReactorTime = field(factory=default_clock)
    api_keys: set[str] = field(factory=set)
    users: dict[str, str] = field(factory=dict)
    employees: list[dict[str, Any]] = field(factory=list)
    virtual_numbers: set[str] = field(factory=set)
    session_lifetime: int = 3600
    minute_limit: int = 100
    day_limit: int = 10000
    ip_allowed: bool = True
    expired_mnemonic: str = "access_token_invalid"
    faults: Faults = field(factory=Faults)
    requests: list[dict[str, Any]] = field(factory=list, init=False)
    calls: list[dict[str, Any]] = field(factory=list, init=False)
    released: list[int] = field(factory=list, init=False)
    logins: int = field(default=0, init=False)
    _sessions: dict[str, float] = field(factory=dict, init=False, repr=False)
    _minutes: dict[str, tuple[int, int]] = field(factory=dict, init=False, repr=False)
    _days: dict[str, int] = field(factory=dict, init=False, repr=False)
    _next_session: int = field(default=3190224311, init=False, repr=False)

    app = Klein()

    def resource(self) -> IResource:
        return self.app.resource()

    def expire_sessions(self) -> None:
        """End every session, as the platform does after its hour."""
        self._sessions.clear()

    def reset(self) -> None:
        self.requests.clear()
        self.calls.clear()
        self.released.clear()
        self.logins = 0
        self._sessions.clear()
        self._minutes.clear()
        self._days.clear()
        self.faults.clear()
        self.faults.requests_seen = 0

    def state(self) -> dict[str, object]:
        now = self.clock.seconds()
        return {"requests": self.requests, "calls": self.calls, "released": self.released,
                "logins": self.logins,
                "sessions_valid": sum(1 for t in self._sessions.values() if t > now)}

    def setup(self, config: Mapping[str, object]) -> None:
        """Set ``api_keys``, ``users``, ``employees``, ``virtual_numbers``,
        ``session_lifetime``, ``minute_limit``, ``ip_allowed``, ``expired_mnemonic``;
        everything is checked before anything changes."""
        known = {"api_keys", "users", "employees", "virtual_numbers", "session_lifetime",
                 "minute_limit", "ip_allowed", "expired_mnemonic"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown setup keys: {', '.join(unknown)}")
        keys = config.get("api_keys", list(self.api_keys))
        if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
            raise ValueError("api_keys must be a list of strings")
        users = config.get("users", self.users)
        if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
            raise ValueError("users must map logins to passwords")
        employees = config.get("employees", self.employees)
        if not isinstance(employees, list) or not all(
                isinstance(e, dict) and _is_int(e.get("id")) for e in employees):
            raise ValueError("employees must be a list of objects with an integer id")
        numbers = config.get("virtual_numbers", list(self.virtual_numbers))
        if not isinstance(numbers, list) or not all(_digits(n) for n in numbers):
            raise ValueError("virtual_numbers must be a list of digit strings")
        for name in ("session_lifetime", "minute_limit"):
            value = config.get(name, getattr(self, name))
            if not _is_int(value) or value <= 0:  # type: ignore[operator]
                raise ValueError(f"{name} must be a positive integer")
        if not isinstance(config.get("ip_allowed", True), bool):
            raise ValueError("ip_allowed must be a boolean")
        if config.get("expired_mnemonic", self.expired_mnemonic) not in (
                "access_token_invalid", "access_token_expired"):
            raise ValueError("expired_mnemonic must be access_token_invalid or "
                             "access_token_expired")
        self.api_keys = set(keys)  # type: ignore[arg-type]
        self.users = dict(users)  # type: ignore[arg-type]
        self.employees = [dict(e) for e in employees]  # type: ignore[union-attr]
        self.virtual_numbers = set(numbers)  # type: ignore[arg-type]
        self.session_lifetime = config.get("session_lifetime", self.session_lifetime)  # type: ignore[assignment]
        self.minute_limit = config.get("minute_limit", self.minute_limit)  # type: ignore[assignment]
        self.ip_allowed = config.get("ip_allowed", self.ip_allowed)  # type: ignore[assignment]
        self.expired_mnemonic = config.get("expired_mnemonic", self.expired_mnemonic)  # type: ignore[assignment]

    # the endpoints

    @app.route(CALL_PATH, methods=["POST"])
    async def call_api(self, request: IRequest) -> bytes:
        return await self._serve(request, "call", CALL_METHODS)

    @app.route(DATA_PATH, methods=["POST"])
    async def data_api(self, request: IRequest) -> bytes:
        return await self._serve(request, "data", DATA_METHODS)

    async def _serve(self, request: IRequest, api: str, methods: frozenset[str]) -> bytes:
        fault = await self.faults.intercept(request, self.clock,
                                            lambda status: {"message": http_reason(status)})
        if fault is not None:
            return fault
        rid: Any = None
        entry: dict[str, Any] = {"api": api, "at": self.clock.seconds(), "body": None,
                                 "error": None}
        self.requests.append(entry)
        try:
            ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
            request.content.seek(0)
            raw = request.content.read()
            try:
                body = json.loads(raw)
            except ValueError:
                raise RpcError(-32700, "parse_error", "Parse error") from None
            entry["body"] = body
            if isinstance(body, list):
                raise RpcError(-32099, "batch_opreations_not_supported",
                               "Batch operations not supported")
            if not isinstance(body, dict):
                raise RpcError(-32600, "invalid_request", "Invalid Request")
            if "id" not in body or body["id"] is None:
                raise RpcError(-32099, "notifications_not_supported",
                               "Notifications not supported")
            rid = body["id"]
            if not (isinstance(rid, str) or _is_int(rid)) or body.get("jsonrpc") != "2.0" \
                    or set(body) - {"jsonrpc", "id", "method", "params"}:
                raise RpcError(-32600, "invalid_request", "Invalid Request")
            if ctype.split(";")[0].strip().lower() != "application/json":
                raise RpcError(-32600, "invalid_request", "Content-Type must be "
                               "application/json")  # [I]
            method = body.get("method")
            if method not in methods:
                raise RpcError(-32601, "method_not_found", "Method not found", "method")
            params = body.get("params", {})
            if not isinstance(params, dict):
                raise _type_error("params")
            if not self.ip_allowed:
                raise RpcError(-32003, "ip_not_whitelisted", "IP is not whitelisted")
            limits = self._count(api)
            self._check(method, params)
            result = self._perform(api, method, params)
            entry["method"] = method
            return json_response(request, 200, {"jsonrpc": "2.0", "id": rid, "result": {
                "data": result, "metadata": {"limits": limits}}})
        except RpcError as e:
            entry["error"] = e.mnemonic
            # [I] errors come with HTTP 200 (callgear.md §2.5, open question 7)
            return json_response(request, 200, e.body(rid))

    def _count(self, api: str) -> dict[str, int]:
        now = self.clock.seconds()
        minute = int(now // 60)
        start, used = self._minutes.get(api, (minute, 0))
        if start != minute:
            start, used = minute, 0
        reset = int((minute + 1) * 60 - now)
        day_used = self._days.get(api, 0)
        limits = {"day_limit": self.day_limit, "day_remaining": self.day_limit - day_used,
                  "day_reset": int(86400 - now % 86400), "minute_limit": self.minute_limit,
                  "minute_remaining": self.minute_limit - used, "minute_reset": reset}
        if used >= self.minute_limit:
            limits["minute_remaining"] = 0
            raise RpcError(-32029, "limit_exceeded", "Limit exceeded",
                           metadata={"limits": limits})
        self._minutes[api] = (start, used + 1)
        self._days[api] = day_used + 1
        limits["minute_remaining"] = self.minute_limit - used - 1
        limits["day_remaining"] = self.day_limit - day_used - 1
        return limits

    def _check(self, method: str, params: dict[str, Any]) -> None:
        spec = _PARAMS[method]
        for name in params:
            if name != "access_token" and name not in spec:
                raise RpcError(-32602, "unexpected_parameter", f"Unexpected parameter {name}",
                               name)
        for name, (required, check) in spec.items():
            if name not in params:
                if required:
                    raise RpcError(-32602, "required_parameter_missed",
                                   f"Required parameter {name} missed", name)
                continue
            if not check(params[name]):
                raise _type_error(name)
        if method == "login.user":
            return
        token = params.get("access_token")
        if not isinstance(token, str) or not token:
            raise RpcError(-32001, "access_token_invalid", "Access token is invalid",
                           "access_token")
        if token in self.api_keys:
            return
        expires = self._sessions.get(token)
        if expires is None:
            raise RpcError(-32001, "access_token_invalid", "Access token is invalid",
                           "access_token")
        if expires <= self.clock.seconds():
            raise RpcError(-32001, self.expired_mnemonic, "Access token has expired",
                           "access_token")

    def _perform(self, api: str, method: str, params: dict[str, Any]) -> Any:
        if method == "login.user":
            if self.users.get(params["login"]) != params["password"]:
                raise RpcError(-32001, "auth_error", "Wrong login or password", "login")
            self.logins += 1
            token = secrets.token_hex(16)
            expire_at = int(self.clock.seconds()) + self.session_lifetime
            self._sessions[token] = expire_at
            data = {"access_token": token, "expire_at": expire_at}
            return {**data, "app_id": 1103} if api == "data" else data
        if method == "logout.user":
            self._sessions.pop(params["access_token"], None)
            return {"success": True}
        if method == "get.employees":
            offset, limit = params.get("offset", 0), params.get("limit", 1000)
            return self.employees[offset:offset + limit]
        if method == "release.call":
            session = params["call_session_id"]
            if session not in {c["call_session_id"] for c in self.calls} \
                    or session in self.released:
                raise RpcError(-32602, "call_session_not_found", "Call session not found",
                               "call_session_id")
            self.released.append(session)
            return {"success": True}
        # start.employee_call
        if params.get("early_switching") and not (
                params["first_call"] == "employee" and params.get("switch_at_once")):
            raise RpcError(-32602, "invalid_parameters_combination",
                           "Invalid parameters combination", "early_switching")
        if params["virtual_phone_number"] not in self.virtual_numbers:
            raise RpcError(-32007, "virtual_phone_number_not_found",
                           "Virtual phone number not found", "virtual_phone_number")
        if not any(e["id"] == params["employee"]["id"] for e in self.employees):
            raise RpcError(-32602, "employee_not_found", "Employee not found", "employee")
        if not re.fullmatch(r"[0-9]{5,15}", params["contact"]):
            # [I] internal short numbers are not allowed as the contact
            raise _type_error("contact")
        session = self._next_session
        self._next_session += 1
        self.calls.append({"call_session_id": session, "params": {
            k: v for k, v in params.items() if k != "access_token"},
            "at": self.clock.seconds()})
        return {"call_session_id": session}


# --- notifications ----------------------------------------------------------------------


def literal(value: Any) -> str:
    """A value as the platform substitutes it into a template: a JSON literal, null for
    empty (callgear.md §4.1 [I])."""
    return "null" if value is None or value == "" else json.dumps(value, ensure_ascii=False)


def render(template: str, values: Mapping[str, Any], doubled: bool = False) -> bytes:
    """A template with its ``{{variable}}`` placeholders substituted.  ``doubled``: as when
    the customer quoted the placeholders (``"{{x}}"``): every string gets its quotes
    doubled, every number becomes a string."""
    def one(match: re.Match[str]) -> str:
        text = literal(values.get(match.group(1)))
        return f'"{text}"' if doubled else text

    text = re.sub(r"\{\{\s*([a-z_]+)\s*\}\}", one, template)
    return text.encode("utf-8")


def answered_call(session: int, contact: str, virtual: str, employee: int, talk: int,
                  day: str = "2024-05-14", external_id: str | None = None,
                  direction: str = "in") -> list[tuple[str, dict[str, Any]]]:
    """The notifications of a call an employee answered (callgear.md §4.5 order)."""
    base = {"call_session_id": session, "contact_phone_number": contact,
            "virtual_phone_number": virtual, "direction": direction,
            "external_id": external_id, "call_source": "callapi" if external_id else "va",
            "notification_name": "gw", "notification_mnemonic": None}
    who = {"employee_id": employee, "employee_full_name": "Иванов Иван"}
    legs = [session * 10 + 1, session * 10 + 3]
    script = []
    if direction == "in" and not external_id:
        script.append(("call_started", {**base, "notification_time": f"{day} 12:01:00"}))
    script += [
        ("waiting", {**base, **who, "leg_id": legs[1], "notification_time": f"{day} 12:01:01"}),
        ("talk_started", {**base, **who, "leg_ids": legs,
                          "notification_time": f"{day} 12:01:07.532"}),
        ("talk_finished", {**base, **who, "leg_ids": legs, "talk_time_duration": talk,
                           "notification_time": f"{day} 12:02:30"}),
        ("call_finished", {**base, **who, "talk_time_duration": talk,
                           "total_time_duration": talk + 7, "wait_time_duration": 7,
                           "notification_time": f"{day} 12:02:31"}),
    ]
    return script


def lost_call(session: int, contact: str, virtual: str, employees: list[int],
              day: str = "2024-05-14") -> list[tuple[str, dict[str, Any]]]:
    """An incoming call that rang ``employees`` and nobody answered."""
    base = {"call_session_id": session, "contact_phone_number": contact,
            "virtual_phone_number": virtual, "notification_name": "gw"}
    script = [("call_started", {**base, "notification_time": f"{day} 12:10:00"})]
    script += [("waiting", {**base, "employee_id": e, "leg_id": session * 10 + i,
                            "direction": "in", "notification_time": f"{day} 12:10:01"})
               for i, e in enumerate(employees)]
    script += [("lost", {**base, "employee_ids": employees, "wait_time_duration": 31,
                         "notification_time": f"{day} 12:10:40"}),
               ("call_finished", {**base, "direction": "in", "talk_time_duration": 0,
                                  "total_time_duration": 31, "wait_time_duration": 31,
                                  "notification_time": f"{day} 12:10:41"})]
    return script


async def send(post: Callable[..., Any], url_of: Callable[[str], str],
               templates: Mapping[str, str], script: list[tuple[str, dict[str, Any]]],
               doubled: bool = False) -> list[int]:
    """POST each notification of ``script`` rendered with the customer's ``templates``
    (event → template text) to ``url_of(event)``; the statuses the receiver answered."""
    statuses = []
    for event, values in script:
        response = await post(url_of(event), data=render(templates[event], values, doubled),
                              headers={"Content-Type": "application/json"})
        statuses.append(response.code)
        await response.content()
    return statuses


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", action="append", default=[])
    parser.add_argument("--user", action="append", default=[], metavar="LOGIN:PASSWORD")
    parser.add_argument("--virtual-number", action="append", default=[])
    parser.add_argument("--employee", action="append", default=[], metavar="ID=EXTENSION")
    parser.add_argument("--minute-limit", type=int, default=100)


def _build(args: argparse.Namespace, reactor: Any) -> FakeCallGear:
    users = dict(u.split(":", 1) for u in args.user)
    employees = [{"id": int(i), "full_name": f"Employee {i}",
                  "extension": {"extension_phone_number": ext}}
                 for i, ext in (e.split("=", 1) for e in args.employee)]
    return FakeCallGear(clock=reactor, api_keys=set(args.api_key), users=users,
                        employees=employees, virtual_numbers=set(args.virtual_number),
                        minute_limit=args.minute_limit)


def main(argv: list[str] | None = None) -> int:
    """Run the fake CallGear standalone (``python -m tests.fakes.callgear --help``)."""
    return run_standalone("Fake CallGear Call API and Data API", _add_arguments, _build, argv)


if __name__ == "__main__":
    sys.exit(main())
