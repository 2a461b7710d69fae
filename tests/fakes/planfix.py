"""
A fake Planfix telephony API ("Planfix API for telephony", /tel/api) as strict as
/work/shared/protocols/planfix.md, and Planfix's side of the other direction: the `setup`
and `makeCall` requests it sends to the PBX (here: the gateway).

Markers as in the protocol notes: [C] confirmed, [I] inferred, [?] unknown. Where the real
behaviour is unknown the fake takes the stricter reading: form bodies only, `planfix_token`
(not `token`) on every command, unknown fields refused, and the ring-group rules of §4
checked per (callid, ext). A request that breaks those rules is refused 400 (or, with
`sequence: "flag"`, accepted) and always named in `violations`; a malformed request is
refused 400 with the reason kept in its `requests` entry (`why`).

Standalone: `python -m tests.fakes.planfix --planfix-token T [--contact PHONE=NAME:EXT]`
serves /tel/api and the control API (/_control/state, /_control/setup, /_control/faults,
/_control/reset). `python -m tests.fakes.planfix send URL TOKEN cmd=makeCall from=101
to=7910...` posts one of Planfix's commands to a gateway and prints the answer.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlsplit

from attrs import define, field
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from tests.fakes.control import Faults, default_clock, http_reason, json_response, run_standalone

API = "/tel/api"
COMMANDS = ("event", "record", "contact", "ping")
EVENTS = ("INCOMING", "OUTGOING", "ACCEPTED", "COMPLETED")
TYPES = ("in", "out")
STATUSES = {"in": ("Success", "Missed", "Cancelled"),
            "out": ("Success", "Busy", "NoAnswer", "NotAvailable", "NotAllowed")}
# Fields each command takes [C §3]; `data_<field>` on COMPLETED too.
EVENT_FIELDS = frozenset({"cmd", "type", "event", "phone", "diversion", "ext", "callid",
                          "duration", "is_recorded", "status", "record_link", "planfix_token"})
RECORD_FIELDS = frozenset({"cmd", "callid", "record_link", "is_temp", "planfix_token"})
CONTACT_FIELDS = frozenset({"cmd", "phone", "callid", "planfix_token"})
PING_FIELDS = frozenset({"cmd", "planfix_token"})

# Per (callid, ext) pop-up states.
RINGING, TALKING, CLOSED, FINAL = "ringing", "talking", "closed", "final"


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def _is_web_url(text: str) -> bool:
    parts = urlsplit(text)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


class PlanfixError(Exception):
    """An error answer in Planfix's shape: `{"error": message}` with its status."""

    def __init__(self, status: int, message: str, violation: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.violation = violation


def invalid(violation: str | None = None) -> PlanfixError:
    return PlanfixError(400, "Invalid parameters", violation)


@define
class FakePlanfix:
    """
    One Planfix account's /tel/api. Configure with `setup()` (also `POST /_control/setup`):
    `planfix_token`, the PBX side (`pbx_url`, `pbx_token`, what `ping` echoes and what
    `send_setup`/`make_call` use), `contacts` {phone: {contact_name?, responsible?} | null},
    `sequence` "refuse" | "flag", `own_url` (the planfix_url `send_setup` announces).
    """

    planfix_token: str
    clock: IReactorTime = field(factory=default_clock)
    faults: Faults = field(factory=Faults)
    pbx_url: str = ""
    pbx_token: str = ""
    own_url: str = "https://test.planfix.ru/tel/api"
    sequence: str = "refuse"
    contacts: dict[str, dict[str, Any]] = field(factory=dict)
    requests: list[dict[str, Any]] = field(factory=list, init=False)
    events: list[dict[str, str]] = field(factory=list, init=False)
    records: list[dict[str, str]] = field(factory=list, init=False)
    violations: list[str] = field(factory=list, init=False)
    # callid → ext → list of states it went through
    popups: dict[str, dict[str, list[str]]] = field(factory=dict, init=False)
    # callid → the final COMPLETED events (what Planfix writes into its analytics)
    completed: dict[str, list[dict[str, str]]] = field(factory=dict, init=False)
    # what the Planfix side sent to the PBX, with the answers it showed
    sent: list[dict[str, Any]] = field(factory=list, init=False)

    app = Klein()

    # --- control --------------------------------------------------------------------------

    def resource(self) -> IResource:
        return self.app.resource()

    def reset(self) -> None:
        """Forget what was received and sent, clear the faults; configuration stays."""
        for kept in (self.requests, self.events, self.records, self.violations, self.sent):
            kept.clear()
        self.popups.clear()
        self.completed.clear()
        self.faults.clear()
        self.faults.requests_seen = 0

    def state(self) -> dict[str, object]:
        return copy.deepcopy({
            "requests": self.requests, "events": self.events, "records": self.records,
            "violations": self.violations, "popups": self.popups,
            "completed": self.completed, "sent": self.sent,
            "contacts": self.contacts, "sequence": self.sequence,
        })

    def setup(self, config: Mapping[str, object]) -> None:
        """Change the configuration; everything is checked before anything changes."""
        known = {"planfix_token", "pbx_url", "pbx_token", "own_url", "contacts", "sequence"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown setup keys: {', '.join(unknown)}")
        for name in ("planfix_token", "pbx_url", "pbx_token", "own_url"):
            if name in config and not isinstance(config[name], str):
                raise ValueError(f"{name} must be a string")
        if "planfix_token" in config and not config["planfix_token"]:
            raise ValueError("planfix_token must not be empty")
        sequence = config.get("sequence", self.sequence)
        if sequence not in ("refuse", "flag"):
            raise ValueError('sequence must be "refuse" or "flag"')
        contacts = dict(self.contacts)
        raw = config.get("contacts", {})
        if not isinstance(raw, dict):
            raise ValueError("contacts must be an object of phone → contact")
        for number, contact in raw.items():
            key = digits(number)
            if not key:
                raise ValueError(f"contacts: {number!r} has no digits")
            if contact is None:
                contacts.pop(key, None)
                continue
            if not isinstance(contact, dict) or set(contact) - {"contact_name", "responsible"}:
                raise ValueError(f"contacts: {number}: expected {{contact_name?, responsible?}}")
            responsible = contact.get("responsible")
            if responsible is not None and (isinstance(responsible, bool) or not isinstance(
                    responsible, (int, str))):
                raise ValueError(f"contacts: {number}: responsible must be a short number")
            contacts[key] = dict(contact)
        for name in ("planfix_token", "pbx_url", "pbx_token", "own_url"):
            if name in config:
                setattr(self, name, config[name])
        self.sequence = sequence  # type: ignore[assignment]
        self.contacts = contacts

    # --- the API --------------------------------------------------------------------------

    @app.route(API, branch=False)
    async def tel_api(self, request: IRequest) -> bytes:
        request.content.seek(0)
        raw = request.content.read()
        entry: dict[str, Any] = {
            "method": request.method.decode("ascii"),
            "content_type": (request.getHeader(b"content-type") or b"").decode("latin-1"),
            "raw": raw.decode("utf-8", "replace"), "form": None, "status": None,
            "answer": None, "at": self.clock.seconds()}
        self.requests.append(entry)
        fault = await self.faults.intercept(request, self.clock,
                                            lambda status: {"error": http_reason(status)})
        if fault is not None:
            entry["status"] = request.code
            return fault
        try:
            status, answer = self._answer(request, raw, entry)
        except PlanfixError as e:
            entry["why"] = e.violation  # what was wrong, for a test's message
            status, answer = e.status, {"error": e.message}
        entry["status"], entry["answer"] = status, answer
        if answer is None:  # 200 with an empty body [C: "200 (empty body)"]
            request.setResponseCode(status)
            return b""
        return json_response(request, status, answer)

    @app.route("/", branch=True)
    def unknown(self, request: IRequest) -> bytes:
        self.requests.append({"method": request.method.decode("ascii"),
                              "path": request.path.decode("latin-1"), "status": 404})
        return json_response(request, 404, {"error": "Not found"})

    def _answer(self, request: IRequest, raw: bytes, entry: dict[str, Any]) -> tuple[int, Any]:
        if request.method != b"POST":
            raise PlanfixError(405, "Method not allowed")
        ctype = (request.getHeader(b"content-type") or b"").decode("latin-1")
        if ctype.split(";")[0].strip().lower() != "application/x-www-form-urlencoded":
            raise invalid(f"not a form body: Content-Type {ctype!r}")
        if urlsplit(request.uri.decode("latin-1")).query:
            raise invalid("fields in the query string: Planfix takes them in the body [I]")
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                              strict_parsing=True, errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise invalid("the body is not UTF-8 form data") from None
        entry["form"] = pairs
        form: dict[str, str] = {}
        for name, value in pairs:
            if name in form:
                raise invalid(f"{name} given twice")
            form[name] = value
        if form.get("planfix_token") != self.planfix_token:
            raise PlanfixError(401, "Invalid token")
        cmd = form.get("cmd")
        if cmd == "event":
            return self._event(form)
        if cmd == "record":
            return self._record(form)
        if cmd == "contact":
            self._only(form, CONTACT_FIELDS)
            self._required(form, "phone")
            contact = self.contacts.get(digits(form["phone"]))
            return 200, ({} if contact is None else dict(contact))  # unknown: {} [I §8 q3]
        if cmd == "ping":
            self._only(form, PING_FIELDS)
            return 200, {"pbxToken": self.pbx_token, "pbxUrl": self.pbx_url}
        raise invalid(f"unknown cmd {cmd!r}")

    @staticmethod
    def _only(form: Mapping[str, str], allowed: frozenset[str]) -> None:
        extra = sorted(n for n in form if n not in allowed and not (
            form.get("cmd") == "event" and n.startswith("data_") and len(n) > 5))
        if extra:
            raise invalid(f"unknown fields {', '.join(extra)}")

    @staticmethod
    def _required(form: Mapping[str, str], *names: str) -> None:
        for name in names:
            if not form.get(name, "").strip():
                raise invalid(f"{form.get('cmd')}: {name} is required")

    def _event(self, form: dict[str, str]) -> tuple[int, None]:
        self._only(form, EVENT_FIELDS)
        self._required(form, "type", "event", "phone", "ext", "callid")
        kind, event = form["type"], form["event"]
        if kind not in TYPES:
            raise invalid(f"event: type {kind!r}")
        if event not in EVENTS:
            raise invalid(f"event: event {event!r}")
        # `diversion` is "always" [C]; its absence is accepted on COMPLETED only, as the
        # document's own COMPLETED example omits it [I].
        if event != "COMPLETED" and "diversion" not in form:
            raise invalid(f"event {event}: diversion is required")
        final_fields = ("duration", "is_recorded", "status", "record_link")
        if event == "COMPLETED":
            self._required(form, "duration", "is_recorded", "status")
            if not form["duration"].isascii() or not form["duration"].isdigit():
                raise invalid("COMPLETED: duration must be whole seconds")
            if form["is_recorded"] not in ("0", "1"):
                raise invalid("COMPLETED: is_recorded must be 0 or 1")
            if form["status"] not in STATUSES[kind]:
                raise invalid(f"COMPLETED: status {form['status']!r} is not one of type "
                              f"{kind}'s")
            if "record_link" in form and not _is_web_url(form["record_link"]):
                raise invalid("COMPLETED: record_link must be a URL")
        else:
            given = [n for n in final_fields if n in form] + [
                n for n in form if n.startswith("data_")]
            if given:
                raise invalid(f"{event}: {', '.join(given)} belong to COMPLETED")
        self._sequence(form)
        event_entry = {k: v for k, v in form.items() if k != "planfix_token"}
        self.events.append(event_entry)
        return 200, None

    def _sequence(self, form: dict[str, str]) -> None:
        """The ring-group rules of §4 for one (callid, ext)."""
        call, ext, event = form["callid"], form["ext"], form["event"]
        states = self.popups.get(call, {}).get(ext, [])
        now = states[-1] if states else None
        problem = None
        status = form.get("status")
        if event in ("INCOMING", "OUTGOING"):
            if now in (RINGING, TALKING):
                problem = f"{event} for ext {ext} of {call}, whose pop-up is open"
            new = RINGING
        elif event == "ACCEPTED":
            if now != RINGING:
                problem = (f"ACCEPTED for ext {ext} of {call}, never sent INCOMING/OUTGOING"
                           if now is None else f"ACCEPTED for ext {ext} of {call} in {now}")
            new = TALKING
        elif status == "Cancelled":
            if now not in (RINGING, TALKING):
                problem = (f"COMPLETED Cancelled for ext {ext} of {call}, "
                           + ("never sent INCOMING/OUTGOING" if now is None else
                              "after COMPLETED"))
            new = CLOSED
        else:
            # A final result: once per ext; after Cancelled only the call's Missed [I §8 q6];
            # without a pop-up it is a call that went in as history (a missed call in a
            # queue, a pop-up the PBX side dropped) [I §4].
            if now == FINAL:
                problem = f"COMPLETED after COMPLETED for ext {ext} of {call}"
            elif now == CLOSED and status != "Missed":
                problem = f"COMPLETED {status} for ext {ext} of {call} after Cancelled"
            new = FINAL
        if problem is not None:
            self.violations.append(problem)
            if self.sequence == "refuse":
                raise invalid(problem)
        self.popups.setdefault(call, {}).setdefault(ext, []).append(new)
        if new == FINAL:
            self.completed.setdefault(call, []).append(
                {k: v for k, v in form.items() if k != "planfix_token"})

    def _record(self, form: dict[str, str]) -> tuple[int, None]:
        self._only(form, RECORD_FIELDS)
        self._required(form, "callid", "record_link")
        if not _is_web_url(form["record_link"]):
            raise invalid("record: record_link must be a URL")
        if form.get("is_temp", "0") not in ("0", "1"):
            raise invalid("record: is_temp must be 0 or 1")
        finals = self.completed.get(form["callid"], [])
        if not any(f.get("is_recorded") == "1" for f in finals):
            problem = (f"record for {form['callid']}, which had no COMPLETED with "
                       "is_recorded=1")
            self.violations.append(problem)
            if self.sequence == "refuse":
                raise invalid(problem)
        self.records.append({k: v for k, v in form.items() if k != "planfix_token"})
        return 200, None

    # --- Planfix's side: commands to the PBX --------------------------------------------

    async def send(self, client: Any, fields: Mapping[str, str],
                   url: str | None = None) -> tuple[int, str]:
        """POST one command to the PBX URL (form-encoded, as Planfix does [C §1]) with
        Planfix's `token`; (status, body text) — the text Planfix shows the user for a
        non-200 [C §2.2]."""
        form = {**fields, "token": self.pbx_token}
        resp = await client.post(url or self.pbx_url, data=form)
        text = (await resp.content()).decode("utf-8", "replace")
        self.sent.append({"fields": {k: v for k, v in form.items() if k != "token"},
                          "status": resp.code, "answer": text,
                          "shown": None if resp.code == 200 else text})
        return resp.code, text

    async def send_setup(self, client: Any) -> tuple[int, str]:
        """The integration switched on in Planfix: its URL and token sent to the PBX."""
        return await self.send(client, {"cmd": "setup", "planfix_token": self.planfix_token,
                                        "planfix_url": self.own_url})

    async def make_call(self, client: Any, extension: str, number: str) -> tuple[int, str]:
        """A user clicked a client's number in Planfix."""
        return await self.send(client, {"cmd": "makeCall", "from": extension, "to": number})


# --- standalone ------------------------------------------------------------------------------


def _contact_arg(text: str) -> tuple[str, dict[str, Any]]:
    phone, sep, rest = text.partition("=")
    name, _, ext = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if not sep or not digits(phone):
        raise argparse.ArgumentTypeError("expected PHONE=NAME[:EXT]")
    contact: dict[str, Any] = {}
    if name:
        contact["contact_name"] = name
    if ext:
        contact["responsible"] = int(ext) if ext.isdigit() else ext
    return phone, contact


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--planfix-token", required=True, help="the token Planfix shows")
    parser.add_argument("--pbx-url", default="", help="the PBX URL entered in Planfix")
    parser.add_argument("--pbx-token", default="", help="the PBX token entered in Planfix")
    parser.add_argument("--contact", type=_contact_arg, action="append", default=[],
                        metavar="PHONE=NAME[:EXT]")
    parser.add_argument("--sequence", choices=("refuse", "flag"), default="refuse")


def _build(args: argparse.Namespace, reactor: Any) -> FakePlanfix:
    fake = FakePlanfix(args.planfix_token, clock=reactor)
    fake.setup({"pbx_url": args.pbx_url, "pbx_token": args.pbx_token,
                "contacts": dict(args.contact), "sequence": args.sequence})
    return fake


def send_main(argv: list[str]) -> int:
    """`send URL PBX_TOKEN name=value...`: one of Planfix's commands to a PBX (gateway)."""
    parser = argparse.ArgumentParser(prog="python -m tests.fakes.planfix send",
                                     description="Send one Planfix command to a PBX URL")
    parser.add_argument("url")
    parser.add_argument("token", help="the PBX token (sent as token)")
    parser.add_argument("fields", nargs="+", metavar="name=value",
                        help="cmd=makeCall from=101 to=79101234567 | cmd=setup "
                             "planfix_token=... planfix_url=...")
    args = parser.parse_args(argv)
    fields = dict(f.partition("=")[::2] for f in args.fields)
    import treq
    from twisted.internet import task
    from twisted.internet.defer import ensureDeferred

    async def go(reactor: Any) -> None:
        fake = FakePlanfix("-", clock=reactor, pbx_url=args.url, pbx_token=args.token)
        status, text = await fake.send(treq, fields)
        print(json.dumps({"status": status, "answer": text}, ensure_ascii=False), flush=True)
        if status != 200:
            raise SystemExit(1)

    task.react(lambda reactor: ensureDeferred(go(reactor)))  # exits with go's status
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the fake Planfix standalone, or `send` one command to a gateway."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["send"]:
        return send_main(argv[1:])
    return run_standalone("Fake Planfix telephony API (/tel/api)", _add_arguments, _build, argv)


if __name__ == "__main__":
    sys.exit(main())
