"""A strict fake MegaFon virtual PBX, "API for CRM" (megafon.md §7).

CRM → PBX: the legacy command endpoint ``POST /sys/crm_api.wcgp`` (form ``cmd`` + ``token``:
``makeCall``, ``accounts``, ``history`` as CSV, ``subscriptionStatus``; ``400 {"error":
"Invalid parameters: [cmd]"}`` for anything else, the spec's misspelt ``subscribtionstatus``
included; a ``+`` in ``phone`` refused) and REST v1 under ``/crmapi/v1`` (``X-API-KEY``;
``POST /makecall``, paged ``GET /users``; errors ``{"message"}``).  ``wrong_ats`` makes every
route answer ``301`` to the portal, as an unknown ATS name does.

PBX → CRM: ``script(name)`` builds the commands the PBX posts for a call (group ring, hunt,
transfer, missed, outgoing), ``send(url, commands)`` posts them form-encoded with
``crm_token``, one after another, and keeps the answers (a ``contact`` answer is the
routing decision).  ``reorder`` swaps a script's ``history`` and the last ``event`` before
it, ``repeat`` sends every command twice.

Standalone: ``python -m tests.fakes.megafon --token T --api-key K --crm-token C
[--send URL --scenario group]``; the shared control API ``/_control/{state,setup,reset,
faults}`` (``setup``: ``wrong_ats``, ``make_call_answer``, ``accounts``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any, Mapping
from urllib.parse import urlencode

import treq
from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from tests.fakes.control import (Faults, default_clock, json_response,
                                 read_json_object, run_standalone)

LEGACY = "/sys/crm_api.wcgp"
REST = "/crmapi/v1"
PORTAL = "https://megapbx.ru/"
CLIENT = "79161234567"
DID = "74951234567"
START = "20240514T090107Z"
LINK = "https://myats.megapbx.ru/rec/{callid}.mp3"

DEFAULT_ACCOUNTS = [
    {"name": "ivanov", "realName": "Иван Иванов", "ext": "101", "telnum": "74957654321",
     "email": "ivanov@acme.ru"},
    {"name": "petrov", "realName": "Пётр Петров", "ext": "102", "telnum": "",
     "email": "petrov@acme.ru"},
    {"name": "sidorov", "realName": "Сидор Сидоров", "ext": "103", "telnum": "",
     "email": ""},
]


def _form(request: IRequest) -> dict[str, str]:
    request.content.seek(0)
    out: dict[str, str] = {}
    for name, values in request.args.items():
        out.setdefault(name.decode(), values[0].decode("utf-8", "replace"))
    return out


def _event(callid: str, kind: str, user: str, ext: str, **extra: str) -> dict[str, str]:
    return {"cmd": "event", "type": kind, "phone": CLIENT, "diversion": DID, "user": user,
            "ext": ext, "callid": callid, **extra}


def _history(callid: str, status: str, user: str, ext: str, duration: int, wait: int,
             kind: str = "in", link: bool = True, **extra: str) -> dict[str, str]:
    fields = {"cmd": "history", "type": kind, "status": status, "phone": CLIENT,
              "diversion": DID, "user": user, "ext": ext, "start": START,
              "wait": str(wait), "duration": str(duration), "callid": callid, **extra}
    if link and status.lower() == "success":
        fields["link"] = LINK.format(callid=callid)
    return fields


def script(name: str, callid: str = "7f2c9b10a4") -> list[dict[str, str]]:
    """The commands the PBX posts for one scripted call (megafon.md §5), in order."""
    if name == "group":  # simultaneous ring of 101 and 102, ivanov answers, 83 s of talk
        return [_event(callid, "INCOMING", "ivanov", "101"),
                _event(callid, "INCOMING", "petrov", "102"),
                _event(callid, "ACCEPTED", "ivanov", "101"),
                _event(callid, "CANCELLED", "petrov", "102"),
                _event(callid, "COMPLETED", "ivanov", "101"),
                _history(callid, "Success", "ivanov", "101", 89, 6)]
    if name == "hunt":  # 101, then 102, then 103 answers
        return [_event(callid, "INCOMING", "ivanov", "101"),
                _event(callid, "CANCELLED", "ivanov", "101"),
                _event(callid, "INCOMING", "petrov", "102"),
                _event(callid, "CANCELLED", "petrov", "102"),
                _event(callid, "INCOMING", "sidorov", "103"),
                _event(callid, "ACCEPTED", "sidorov", "103"),
                _event(callid, "COMPLETED", "sidorov", "103"),
                _history(callid, "Success", "sidorov", "103", 70, 30)]
    if name == "transfer":  # ivanov answers and transfers to petrov (a call of its own)
        second = f"{callid}-2"
        return [_event(callid, "INCOMING", "ivanov", "101"),
                _event(callid, "ACCEPTED", "ivanov", "101"),
                _event(callid, "TRANSFERRED", "ivanov", "101", second_callid=second),
                _event(second, "INCOMING", "petrov", "102"),
                _event(second, "ACCEPTED", "petrov", "102"),
                _history(callid, "Success", "ivanov", "101", 40, 5),
                _event(second, "COMPLETED", "petrov", "102"),
                _history(second, "Success", "petrov", "102", 62, 2)]
    if name == "missed":  # the group rings, nobody answers, the caller hangs up
        return [_event(callid, "INCOMING", "ivanov", "101"),
                _event(callid, "INCOMING", "petrov", "102"),
                _event(callid, "CANCELLED", "ivanov", "101"),
                _event(callid, "CANCELLED", "petrov", "102"),
                _history(callid, "missed", "ivanov", "101", 25, 25)]
    if name == "outgoing":  # ivanov dials the client, who is busy
        return [_event(callid, "OUTGOING", "ivanov", "101", direction="out"),
                _history(callid, "Busy", "ivanov", "101", 4, 4, kind="out")]
    if name == "contact":
        return [{"cmd": "contact", "phone": CLIENT, "callid": callid, "diversion": DID}]
    if name == "rating":
        return [{"cmd": "rating", "callid": callid, "rating": "5", "phone": CLIENT,
                 "user": "ivanov", "ext": "101"}]
    raise ValueError(f"unknown scenario {name!r}: group, hunt, transfer, missed, outgoing, "
                     "contact, rating")


def reordered(commands: list[dict[str, str]]) -> list[dict[str, str]]:
    """The script with its (last) history sent before the event just before it."""
    out = list(commands)
    for i in range(len(out) - 1, 0, -1):
        if out[i]["cmd"] == "history" and out[i - 1]["cmd"] == "event":
            out[i - 1], out[i] = out[i], out[i - 1]
            break
    return out


@define
class FakeMegaFon:
    """One ATS (``ats``): its keys, its employees, and what it was asked and answered."""

    token: str
    api_key: str
    crm_token: str
    ats: str = "myats"
    clock: IReactorTime = field(factory=default_clock)
    faults: Faults = field(factory=Faults)
    accounts: list[dict[str, str]] = field(factory=lambda: [dict(a) for a in DEFAULT_ACCOUNTS])
    wrong_ats: bool = False
    # How makeCall answers: "bare" (the documented call id) or "json" (a live PBX's object).
    make_call_answer: str = "bare"
    requests: list[dict[str, Any]] = field(factory=list, init=False)
    calls: list[dict[str, str]] = field(factory=list, init=False)
    sent: list[dict[str, Any]] = field(factory=list, init=False)
    _next: int = field(default=1, init=False, repr=False)

    app = Klein()

    # --- control ------------------------------------------------------------------------

    def resource(self) -> IResource:
        return self.app.resource()

    def state(self) -> dict[str, object]:
        return {"ats": self.ats, "wrong_ats": self.wrong_ats,
                "make_call_answer": self.make_call_answer, "accounts": self.accounts,
                "calls": self.calls, "sent": self.sent, "requests": len(self.requests)}

    def setup(self, config: Mapping[str, object]) -> None:
        unknown = set(config) - {"wrong_ats", "make_call_answer", "accounts"}
        if unknown:
            raise ValueError(f"unknown setup fields: {', '.join(sorted(unknown))}")
        if "wrong_ats" in config:
            if not isinstance(config["wrong_ats"], bool):
                raise ValueError("wrong_ats must be a boolean")
            self.wrong_ats = config["wrong_ats"]
        if "make_call_answer" in config:
            if config["make_call_answer"] not in ("bare", "json"):
                raise ValueError("make_call_answer must be bare or json")
            self.make_call_answer = str(config["make_call_answer"])
        if "accounts" in config:
            accounts = config["accounts"]
            if not isinstance(accounts, list) or not all(
                    isinstance(a, dict) and isinstance(a.get("name"), str) for a in accounts):
                raise ValueError("accounts must be a list of objects with a name")
            self.accounts = [dict(a) for a in accounts]

    def reset(self) -> None:
        self.requests.clear()
        self.calls.clear()
        self.sent.clear()
        self.wrong_ats = False
        self.faults.clear()
        self.faults.requests_seen = 0

    # --- PBX → CRM ----------------------------------------------------------------------

    async def send(self, url: str, commands: list[dict[str, str]],
                   crm_token: str | None = None, repeat: bool = False) -> list[tuple[int, bytes]]:
        """Post ``commands`` to the CRM URL, one at a time, each with ``crm_token``; the
        (status, body) of each answer."""
        answers = []
        for fields in commands:
            for _ in range(2 if repeat else 1):
                body = {**fields, "crm_token": self.crm_token if crm_token is None
                        else crm_token}
                resp = await treq.post(url, data=urlencode(body).encode(), headers={
                    "Content-Type": "application/x-www-form-urlencoded"})
                content = await resp.content()
                self.sent.append({"fields": fields, "status": resp.code,
                                  "answer": content.decode("utf-8", "replace")})
                answers.append((resp.code, content))
        return answers

    # --- CRM → PBX ----------------------------------------------------------------------

    async def _gate(self, request: IRequest, rest: bool) -> bytes | None:
        self.requests.append({"method": request.method.decode(), "path": request.path.decode(),
                              "args": _form(request) if not rest else None})
        if self.wrong_ats:
            request.setResponseCode(301)
            request.setHeader(b"Location", PORTAL.encode())
            request.setHeader(b"content-type", b"text/html")
            return b"<html><body>Moved to the portal</body></html>"
        return await self.faults.intercept(
            request, self.clock,
            (lambda s: {"message": f"HTTP {s}"}) if rest else (lambda s: {"error": f"HTTP {s}"}))

    def _user(self, who: str) -> dict[str, str] | None:
        for account in self.accounts:
            if who and who in (account.get("name"), account.get("ext"), account.get("telnum")):
                return account
        return None

    def _start_call(self, who: str, phone: str, via: str) -> str:
        callid = f"{self._next:010x}"
        self._next += 1
        self.calls.append({"callid": callid, "user": who, "phone": phone, "via": via})
        return callid

    @app.route(LEGACY, methods=["POST"])
    async def legacy(self, request: IRequest) -> bytes:
        gated = await self._gate(request, rest=False)
        if gated is not None:
            return gated
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
        if ctype != b"application/x-www-form-urlencoded":
            return json_response(request, 400, {"error": "Invalid parameters: form expected"})
        fields = _form(request)
        if fields.get("token") != self.token:
            return json_response(request, 401, {"error": "Invalid token"})
        cmd = fields.get("cmd", "")
        if cmd == "makeCall":
            user, phone = fields.get("user", ""), fields.get("phone", "")
            if not phone or not re.fullmatch(r"[0-9]{3,20}", phone):
                return json_response(request, 400, {"error": "Invalid parameters: [phone]"})
            if self._user(user) is None:
                return json_response(request, 400, {"error": "Invalid parameters: [user]"})
            callid = self._start_call(user, phone, "legacy")
            if self.make_call_answer == "json":
                return json_response(request, 200, {"callid": callid})
            request.setHeader(b"content-type", b"text/plain")
            return callid.encode()
        if cmd == "accounts":
            return json_response(request, 200, self.accounts)
        if cmd == "subscriptionStatus":
            if self._user(fields.get("user", "")) is None:
                return json_response(request, 400, {"error": "Invalid parameters: [user]"})
            return json_response(request, 200, {"status": "on"})
        if cmd == "history":
            request.setHeader(b"content-type", b"text/plain")
            return "".join(
                f"{c['callid']},out,{c['phone']},{c['user']},{DID},{START},0,0,\n"
                for c in self.calls).encode()
        return json_response(request, 400, {"error": "Invalid parameters: [cmd]"})

    def _rest_key(self, request: IRequest) -> bytes | None:
        if (request.getHeader(b"x-api-key") or b"").decode("latin-1") != self.api_key:
            return json_response(request, 401, {"message": "Invalid API key"})
        return None

    @app.route(f"{REST}/makecall", methods=["POST"])
    async def rest_makecall(self, request: IRequest) -> bytes:
        gated = await self._gate(request, rest=True) or self._rest_key(request)
        if gated is not None:
            return gated
        try:
            body = read_json_object(request)
        except ValueError as e:
            return json_response(request, 400, {"message": str(e)})
        user, phone = body.get("user"), body.get("phone")
        if not isinstance(phone, str) or not re.fullmatch(r"[0-9]{3,20}", phone):
            return json_response(request, 400, {"message": "phone: digits only"})
        if not isinstance(user, str) or self._user(user) is None:
            return json_response(request, 400, {"message": "user: unknown"})
        return json_response(request, 200, {"callid": self._start_call(user, phone, "rest")})

    @app.route(f"{REST}/users", methods=["GET"])
    async def rest_users(self, request: IRequest) -> bytes:
        gated = await self._gate(request, rest=True) or self._rest_key(request)
        if gated is not None:
            return gated
        try:
            start = int(request.args.get(b"start", [b"0"])[0])
            limit = int(request.args.get(b"limit", [b"50"])[0])
        except ValueError:
            return json_response(request, 400, {"message": "start and limit are integers"})
        if start < 0 or not 1 <= limit <= 100:
            return json_response(request, 400, {"message": "start >= 0, limit 1-100"})
        items = [{"login": a["name"], "name": a.get("realName", ""), "ext": a.get("ext", "")}
                 for a in self.accounts]
        return json_response(request, 200, {"items": items[start:start + limit],
                                            "info": {"total": len(items)}})


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", required=True, help="the legacy endpoint's key")
    parser.add_argument("--api-key", required=True, help="REST v1 X-API-KEY")
    parser.add_argument("--crm-token", required=True, help="what the PBX sends the CRM")
    parser.add_argument("--ats", default="myats")
    parser.add_argument("--json-make-call", action="store_true",
                        help="makeCall answers a JSON object instead of the bare call id")
    parser.add_argument("--send", metavar="URL", help="play --scenario to this CRM URL at start")
    parser.add_argument("--scenario", default="group")


def _build(args: argparse.Namespace, reactor: Any) -> FakeMegaFon:
    fake = FakeMegaFon(args.token, args.api_key, args.crm_token, ats=args.ats, clock=reactor)
    if args.json_make_call:
        fake.make_call_answer = "json"
    if args.send:
        def play() -> None:
            from twisted.internet.defer import ensureDeferred
            ensureDeferred(fake.send(args.send, script(args.scenario))).addErrback(
                lambda f: print(f"send failed: {f.value}", file=sys.stderr))
        reactor.callWhenRunning(play)
    return fake


def main(argv: list[str] | None = None) -> int:
    """Run the fake MegaFon standalone (``python -m tests.fakes.megafon --help``)."""
    return run_standalone("Fake MegaFon virtual PBX (API for CRM)", _add_arguments, _build,
                          argv)


if __name__ == "__main__":
    sys.exit(main())
