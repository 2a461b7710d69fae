"""CallGear (CoMagic, UIS, Novofon): its HTTP notifications parsed into normalised events, its
Call API and Data API (JSON-RPC 2.0: sessions, click-to-call, release, employees) and its
interactive call processing (callgear.md).

How the eight notifications become neutral events (callgear.md §4.5; [I] where marked):

* the call key is ``call_session_id``;
* an employee's part of a session is one leg, keyed ``e<employee_id>`` [I]: "Talk started" and
  "Talk finished" name the talk's legs (``leg_ids``: the employee's *and* the contact's), and
  nothing in them says which is the employee's, so a leg per ``leg_id`` would give the
  contact's leg a record of its own; the employee is named in every notification;
* the session itself (the scenario the caller waits in) is one more leg, ``call``, kept as a
  queue-like leg (``bridged``) so the fold's missed-call rule decides from it: "Lost call"
  ends it unbridged, "Call finished" with talk time ends it bridged;
* "Lost call" and "Call finished" end with a FINISHED fact: the PBX says the call is over.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import re
import secrets as secretslib
from datetime import datetime
from typing import Any, Callable
from urllib.parse import parse_qsl, quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient, raise_for
from gateway.model import (ANSWER, ANSWERED, FINISHED, HANGUP, NO_ANSWER, RECORDING, RING,
                           Event, Inbound, Tenant, e164, field_login, field_numbers,
                           field_only, field_text, field_url)
from gateway.protocols import IPbx, PbxConfig

log = Logger()

CALL_API = "https://callapi.callgear.com/v4.0"  # [C] callgear.md §1
DATA_API = "https://dataapi.callgear.com/v2.0"

# The session's own leg (the scenario the caller waits in) and an employee's leg.  [I]
CALL_LEG = "call"


def employee_leg(employee_id: int) -> str:
    return f"e{employee_id}"


# The eight notifications (callgear.md §4.2): the URL's {event} segment → (the event type as
# the cabinet names it, its Russian name, the variables of its template).  The variables are
# the Planfix set-up page's (seed 004), plus ``event`` (a literal: the URL's name) and the
# ``direction`` / ``employee_id`` the gateway needs where that page leaves them out.
NOTIFICATIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "call_started": (
        "Inbound call on a virtual phone number", "Входящий звонок на виртуальный номер",
        ("notification_mnemonic", "notification_name", "virtual_phone_number",
         "notification_time", "scenario_name", "contact_phone_number", "communication_number",
         "contact_id", "contact_full_name", "call_session_id")),
    "waiting": (
        "Waiting for the answer", "Ожидание ответа",
        ("notification_name", "notification_mnemonic", "virtual_phone_number",
         "notification_time", "external_id", "contact_phone_number", "contact_id",
         "employee_full_name", "employee_id", "call_source", "call_session_id", "direction",
         "leg_id")),
    "talk_started": (
        "Talk started", "Начало разговора",
        ("notification_name", "notification_mnemonic", "virtual_phone_number",
         "notification_time", "external_id", "contact_phone_number", "contact_id",
         "employee_full_name", "employee_id", "call_source", "call_session_id", "direction",
         "leg_ids")),
    "talk_finished": (
        "Talk finished", "Завершение разговора",
        ("notification_name", "notification_mnemonic", "virtual_phone_number",
         "notification_time", "external_id", "contact_phone_number", "communication_number",
         "employee_full_name", "employee_id", "call_source", "call_session_id", "direction",
         "scenario_name", "talk_time_duration", "leg_ids")),
    "call_finished": (
        "Call finished", "Завершение звонка",
        ("notification_name", "notification_mnemonic", "virtual_phone_number",
         "notification_time", "external_id", "contact_phone_number", "communication_number",
         "employee_full_name", "employee_id", "call_source", "direction", "call_session_id",
         "scenario_name", "talk_time_duration", "total_time_duration", "wait_time_duration",
         "tag_names")),
    "lost": (
        "Lost call", "Потерянный звонок",
        ("notification_name", "notification_mnemonic", "virtual_phone_number",
         "notification_time", "scenario_name", "wait_time_duration", "employee_ids",
         "contact_phone_number", "communication_number", "contact_id", "contact_full_name",
         "call_session_id")),
    "outbound": (
        "Outbound call", "Исходящий звонок",
        ("notification_name", "notification_mnemonic", "virtual_phone_number",
         "notification_time", "contact_phone_number", "contact_id", "contact_full_name",
         "call_session_id", "employee_full_name", "employee_id", "employee_phone_number")),
    "recording": (
        "Call recording completed", "Записанный разговор",
        ("notification_name", "notification_mnemonic", "virtual_phone_number",
         "notification_time", "scenario_name", "contact_phone_number", "communication_number",
         "contact_id", "contact_full_name", "call_session_id", "employee_full_name",
         "employee_id", "file_link", "file_duration", "tag_ids", "tag_names")),
}


def template(event: str) -> str:
    """The body template the customer pastes into the cabinet for ``event``: JSON with
    unquoted ``{{variable}}`` placeholders (the platform substitutes JSON literals)."""
    lines = [f'  "event": "{event}"'] + [
        f'  "{name}": {{{{{name}}}}}' for name in NOTIFICATIONS[event][2]]
    return "{\n" + ",\n".join(lines) + "\n}"


def setup_guide(tenant: Tenant, base_url: str) -> list[dict[str, str]]:
    """For each of the eight notifications, what the customer creates in the CallGear
    cabinet: ``event`` (the gateway's name), ``what`` / ``what_ru`` (the event type to
    choose), ``method``, ``url`` (under ``base_url``, with the tenant's key) and ``body`` (the
    template to paste)."""
    base = base_url.rstrip("/")
    login = quote(tenant.pbx.login, safe="")
    key = quote(tenant.key, safe="")
    return [{"event": name, "what": title, "what_ru": title_ru, "method": "POST",
             "url": f"{base}/notify/{tenant.id}/{name}/{login}?key={key}",
             "body": template(name)}
            for name, (title, title_ru, _) in NOTIFICATIONS.items()]


# Bounds on what a notification may carry, checked before anything is stored.  [I]
MAX_EVENT_AGE = 3653 * 86400  # notification_time at most this old (seconds) ...
MAX_EVENT_LEAD = 86400  # ... and at most this far ahead (a wrong time zone is within it)
MAX_SECONDS = 2 * 86400  # durations: two days, far past any real call
MAX_ID = 2**63 - 1
MAX_NUMBER = 64
MAX_TEXT = 256  # names, sources, external ids
MAX_LINK = 2048
MAX_LEGS = 100  # employee_ids / leg_ids of one notification
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)[ T](\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?")
# A placeholder the customer quoted ("{{x}}") arrives as ""value"": the value's own quotes
# doubled (callgear.md §4.1 [I]).
_DOUBLED = re.compile(r'(?<=[:\[,])(\s*)""((?:[^"\\]|\\.)*)""(?=\s*[,}\]])')
# The prefix of the gateway's click-to-call external_id: notifications carrying it are the
# gateway's own calls (Event.callback).
EXTERNAL_PREFIX = "gw-"


def _body(request: Inbound) -> dict[str, Any]:
    if not request.body.strip():
        raise BadRequest("body", "required: the notification's JSON body (method POST)")
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("body", "not UTF-8") from None
    try:
        data = json.loads(text)
    except ValueError:
        try:
            data = json.loads(_DOUBLED.sub(r'\1"\2"', text))
        except ValueError as e:
            raise BadRequest("body", f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("body", "must be a JSON object")
    return data


def _absent(value: Any) -> bool:
    # Empty placeholders arrive as null; quoted ones as "" or "null".  [I]
    return value is None or value == "" or value == "null"


def _int(data: dict[str, Any], name: str, required: bool = False, high: int = MAX_ID,
         low: int = 0) -> int | None:
    """A whole number, or the same written as a string; None when absent and not required."""
    value = data.get(name)
    if _absent(value):
        if required:
            raise BadRequest(name, "required")
        return None
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()) or len(text.lstrip("0")) > len(str(high)):
            raise BadRequest(name, f"must be a whole number, got {value[:40]!r}")
        value = int(text)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(name, f"must be a whole number, got {json.dumps(value)[:40]}")
    if not low <= value <= high:
        raise BadRequest(name, f"out of range ({value}): {low} to {high}")
    return value


def _text(data: dict[str, Any], name: str, limit: int = MAX_TEXT) -> str:
    """A string (a number is taken as its digits: phone numbers may arrive bare); ""."""
    value = data.get(name)
    if _absent(value):
        return ""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not isinstance(value, str):
        raise BadRequest(name, f"must be a string, got {json.dumps(value)[:40]}")
    if len(value) > limit:
        raise BadRequest(name, f"longer than {limit} characters ({len(value)})")
    if _CONTROL.search(value):
        raise BadRequest(name, "contains a control character")
    return value.strip()


def _number(data: dict[str, Any], name: str) -> str:
    value = _text(data, name, MAX_NUMBER)
    if value and not re.fullmatch(r"\+?[0-9]{1,20}", value):
        raise BadRequest(name, f"must be a phone number of digits, got {value[:40]!r}")
    return value


def _ids(data: dict[str, Any], name: str) -> list[int]:
    """A list of ids (an array, or the same as a JSON string, or one id); [] when empty."""
    value = data.get(name)
    if _absent(value):
        return []
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRequest(name, "must be an array of ids") from None
    if not isinstance(value, list):
        value = [value]
    if len(value) > MAX_LEGS:
        raise BadRequest(name, f"more than {MAX_LEGS} ids")
    out = []
    for i, item in enumerate(value):
        number = _int({name: item}, name)
        if number is None:
            raise BadRequest(name, f"item {i} is empty")
        out.append(number)
    return out


def _direction(data: dict[str, Any], default: str) -> str:
    value = data.get("direction")
    if _absent(value):
        return default
    if value not in ("in", "out"):
        raise BadRequest("direction", f"must be in or out, got {json.dumps(value)[:40]}")
    return value


def _time(data: dict[str, Any], zone: ZoneInfo, received: float) -> int | None:
    """``notification_time`` (account time zone, callgear.md §7 [I]) or
    ``notification_timestamp`` in microseconds since the epoch; None when neither is sent."""
    text = _text(data, "notification_time", 40)
    if text:
        match = _TIME.fullmatch(text)
        if not match:
            raise BadRequest("notification_time", f"must be YYYY-MM-DD hh:mm:ss[.ffffff], "
                             f"got {text!r}")
        parts = [int(p) for p in match.groups()[:6]]
        try:
            moment = datetime(*parts, tzinfo=zone)  # type: ignore[misc]
        except ValueError as e:
            raise BadRequest("notification_time", f"not a date: {e}") from None
        micros = int(moment.timestamp()) * 1_000_000 + int((match.group(7) or "0").ljust(6, "0"))
    else:
        seconds = _int(data, "notification_timestamp")
        if seconds is None:
            return None
        micros = seconds * 1_000_000
        text = "notification_timestamp"
    if not (received - MAX_EVENT_AGE) * 1_000_000 <= micros <= (
            received + MAX_EVENT_LEAD) * 1_000_000:
        field = "notification_time" if text != "notification_timestamp" else text
        raise BadRequest(field, f"more than {MAX_EVENT_AGE // 86400} days before or "
                         f"{MAX_EVENT_LEAD // 3600} hours after the gateway's clock")
    return micros


def _seconds(data: dict[str, Any], name: str) -> int:
    """A duration in seconds (callgear.md §7 [C]) as the event's microseconds."""
    return (_int(data, name, high=MAX_SECONDS) or 0) * 1_000_000


def parse_notification(data: dict[str, Any], event: str, tenant: Tenant, received: float,
                       extension_of: Callable[[int], str]) -> list[Event]:
    """One notification (its JSON body) as the normalised events it carries.

    ``extension_of(employee_id)`` gives an employee's short number.  Every field used is
    bounded here; anything malformed is BadRequest naming the field."""
    if event not in NOTIFICATIONS:
        raise BadRequest("event", f"unknown notification {event[:40]!r}; expected one of "
                         + ", ".join(NOTIFICATIONS), status=404)
    literal = data.get("event")
    if not _absent(literal) and literal != event:
        raise BadRequest("event", f"{json.dumps(literal)[:40]} arrived on the URL for "
                         f"{event!r}")
    call = _int(data, "call_session_id", required=True, low=1)
    try:
        zone = ZoneInfo(tenant.pbx.timezone or tenant.option("timezone"))
    except (ZoneInfoNotFoundError, ValueError):
        zone = ZoneInfo("UTC")
    at = _time(data, zone, received)
    if at is None:
        # No time of its own: two deliveries are told apart by nothing but their content.
        canonical = json.dumps(data, sort_keys=True, ensure_ascii=False).encode()
        dedup = f"{event}#{hashlib.sha256(canonical).hexdigest()[:24]}"
        at = int(received * 1_000_000)
    else:
        # The event's name too: "Talk finished" and "Call finished" may end the same leg in
        # the same second, and are two notifications.  The session too: a leg is named by
        # its employee ("e8841"), and stored keys are unique per tenant, not per call, so
        # two calls reaching one employee in one second would be one.
        dedup = f"{call}:{event}@{at}"
    flow = _direction(data, "out" if event == "outbound" else "in")
    contact = _number(data, "contact_phone_number")
    did = _number(data, "virtual_phone_number")
    external = _text(data, "external_id", 128)
    callback = external if external.startswith(EXTERNAL_PREFIX) else ""
    employee = _int(data, "employee_id")
    common = dict(tenant=tenant.id, call=str(call), flow=flow, at=at, received=received,
                  peer=contact, did=did, callback=callback, dedup=dedup)

    def on_employee(kind: str, who: int | None, **fields: Any) -> Event:
        assert who is not None
        extension = extension_of(who)
        if not extension and event == "outbound":
            own = _number(data, "employee_phone_number")
            extension = own if 0 < len(own) <= 5 else ""
        return Event(leg=employee_leg(who), kind=kind, extension=extension or str(who),
                     sip=str(who), **{**common, **fields})

    if event == "call_started":
        return [Event(leg=CALL_LEG, kind=RING, bridged=False, **common)]
    if event == "lost":
        employees = _ids(data, "employee_ids")
        _seconds(data, "wait_time_duration")  # checked: a bad value is a 400, not ignored
        return ([on_employee(HANGUP, who, outcome=NO_ANSWER) for who in employees]
                + [Event(leg=CALL_LEG, kind=HANGUP, bridged=False, outcome=NO_ANSWER,
                         **common),
                   Event(leg=CALL_LEG, kind=FINISHED, **common)])
    if event == "call_finished":
        talk = _seconds(data, "talk_time_duration")
        for name in ("total_time_duration", "wait_time_duration"):
            _seconds(data, name)
        outcome = ANSWERED if talk else NO_ANSWER
        events = []
        if employee is not None:
            events.append(on_employee(HANGUP, employee, outcome=outcome, duration=talk))
        if flow == "in":
            events.append(Event(leg=CALL_LEG, kind=HANGUP, bridged=bool(talk),
                                outcome=outcome, **common))
        return events + [Event(leg=CALL_LEG, kind=FINISHED, **common)]
    # The rest are an employee's: without one (an operator number, a forward outside) there
    # is no one to tell; the session's end still comes with "Call finished".  [I]
    if employee is None:
        return []
    if event in ("waiting", "outbound"):
        if event == "waiting":
            _int(data, "leg_id")
        return [on_employee(RING, employee)]
    if event == "talk_started":
        _ids(data, "leg_ids")
        return [on_employee(ANSWER, employee)]
    if event == "talk_finished":
        _ids(data, "leg_ids")
        return [on_employee(HANGUP, employee, outcome=ANSWERED,
                            duration=_seconds(data, "talk_time_duration"))]
    # recording
    link = _text(data, "file_link", MAX_LINK)
    if not link:
        raise BadRequest("file_link", "required")
    if not re.match(r"https?://[^\s/]+", link):
        raise BadRequest("file_link", "must be an http(s) URL")
    _seconds(data, "file_duration")
    return [on_employee(RECORDING, employee, recording=link)]


# --- the JSON-RPC client --------------------------------------------------------------------

# Mnemonics (callgear.md §2.5): a session token the platform no longer takes (log in again,
# once), and what may pass by itself.  Every other mnemonic is permanent.
SESSION_MNEMONICS = frozenset({"access_token_expired", "access_token_invalid"})
RETRY_MNEMONICS = frozenset({"limit_exceeded", "internal_error"})
# What the operator should do, for the mnemonics a customer's set-up causes.
HINTS = {
    "ip_not_whitelisted": "allow the gateway's IP under Account → Security rules → API "
                          "(Call API and Data API separately)",
    "access_token_invalid": "pbx.access_token is not a valid API key",
    "access_token_expired": "pbx.access_token has expired: generate a permanent key",
    "access_token_blocked": "pbx.access_token is blocked in the cabinet",
    "auth_error": "pbx.api_login / pbx.password are wrong",
    "virtual_phone_number_not_found": "pbx.virtual_number is not a number of this account",
    "employee_not_found": "the employee of pbx.extensions is not in this account",
    "no_active_phone_number": "the employee has no active phone number",
    "call_session_not_found": "no such call (it has ended)",
}
# Renew a session this long before its hour runs out (callgear.md §2.2 [C]: 1 hour).
SESSION_LIFETIME = 3600.0
SESSION_MARGIN = 300.0
# A limit_exceeded answer without metadata.limits: wait this long.  [I]
LIMIT_DEFAULT_WAIT = 60.0


@attrs.define
class Refused(Permanent):
    """The platform refused a request for good; ``mnemonic`` says why."""

    mnemonic: str = ""


def rpc_error(error: Any, body: dict[str, Any], summary: str, status: int,
              excerpt: str) -> Exception:
    """The exception a JSON-RPC error answer means, decided by ``error.data.mnemonic``
    (never the numeric code, which many mnemonics share)."""
    data = error.get("data") if isinstance(error, dict) else None
    mnemonic = data.get("mnemonic") if isinstance(data, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(mnemonic, str) or not mnemonic:
        return Retryable(f"{summary}: an error without a mnemonic", status, excerpt)
    text = f"{summary}: {mnemonic}"
    if isinstance(message, str) and message:
        text += f" ({message[:200]})"
    if isinstance(data, dict) and isinstance(data.get("field"), str):
        text += f", field {data['field'][:60]}"
    if mnemonic in HINTS:
        text += f": {HINTS[mnemonic]}"
    if mnemonic == "limit_exceeded":
        return Retryable(text, status, excerpt, _limit_wait(body, data))
    if mnemonic in RETRY_MNEMONICS:
        return Retryable(text, status, excerpt)
    return Refused(text, status, excerpt, mnemonic)


def _limit_wait(body: dict[str, Any], data: dict[str, Any]) -> float:
    """Seconds until the exhausted limit resets (``metadata.limits``: of the answer, or of
    the error's data)."""
    for holder in (body.get("metadata"), data.get("metadata"), data):
        limits = holder.get("limits") if isinstance(holder, dict) else None
        if not isinstance(limits, dict):
            continue
        waits = []
        for span in ("minute", "day"):
            remaining, reset = limits.get(f"{span}_remaining"), limits.get(f"{span}_reset")
            if isinstance(reset, (int, float)) and not isinstance(reset, bool) and reset >= 0:
                if remaining == 0 or remaining is None:
                    waits.append(float(reset))
        if waits:
            return min(max(waits), 86400.0)
        reset = limits.get("minute_reset")
        if isinstance(reset, (int, float)) and not isinstance(reset, bool) and reset >= 0:
            return min(float(reset), 86400.0)
    return LIMIT_DEFAULT_WAIT


class CallGearClient:
    """The Call API and Data API for one gateway: sessions shared per account (one login in
    flight at a time), the employees of each tenant cached and refreshed in the background."""

    # Employees are fetched again when older than this (seconds), and not more often than
    # REFRESH_GAP when an unknown employee asks for it.  [I]
    EMPLOYEES_TTL = 3600.0
    REFRESH_GAP = 60.0
    PAGE = 1000

    def __init__(self, http: HttpClient, clock: Any) -> None:
        self.http = http
        self.clock = clock
        self._ids = itertools.count(1)
        self._sessions: dict[tuple[str, str], tuple[str, float]] = {}
        self._pending: dict[tuple[str, str], list[Deferred]] = {}
        # tenant id → (employee id → extension, when fetched); when a refresh last started
        self.employees: dict[int, tuple[dict[int, str], float]] = {}
        self._refreshing: dict[int, Deferred] = {}
        self._last_refresh: dict[int, float] = {}
        self.logins = 0

    # sessions

    async def _token(self, tenant: Tenant, url: str, stale: str | None = None) -> str:
        pbx = tenant.pbx
        if pbx.access_token:
            return pbx.access_token
        if not pbx.api_login:
            raise Permanent("CallGear API access needs pbx.access_token (an API key) or "
                            "pbx.api_login and pbx.password")
        key = (url, pbx.api_login)
        cached = self._sessions.get(key)
        if cached and cached[0] != stale and cached[1] > self.clock.seconds():
            return cached[0]
        if key in self._pending:  # one login.user per account at a time
            waiter: Deferred = Deferred()
            self._pending[key].append(waiter)
            return await waiter
        self._pending[key] = []
        try:
            token = await self._login(tenant, url)
        except Exception as e:
            for waiter in self._pending.pop(key):
                waiter.errback(e)
            raise
        for waiter in self._pending.pop(key):
            waiter.callback(token)
        return token

    async def _login(self, tenant: Tenant, url: str) -> str:
        self.logins += 1
        data = await self._send(url, "login.user", {"login": tenant.pbx.api_login,
                                                    "password": tenant.pbx.password})
        token = data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise Retryable("login.user: no access_token in the answer")
        now = self.clock.seconds()
        expires = now + SESSION_LIFETIME
        expire_at = data.get("expire_at")
        if isinstance(expire_at, (int, float)) and not isinstance(expire_at, bool):
            expires = min(expires, float(expire_at))
        self._sessions[(url, tenant.pbx.api_login)] = (token, expires - SESSION_MARGIN)
        return token

    async def _send(self, url: str, method: str, params: dict[str, Any]) -> Any:
        """One JSON-RPC request (always with an id, never a batch); its ``result.data``."""
        rid = f"gw-{next(self._ids)}"
        resp = await self.http.request("POST", url, json={
            "jsonrpc": "2.0", "id": rid, "method": method, "params": params},
            headers={"Accept": "application/json"})
        summary = f"POST {url} {method}"
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and "error" in body:
            raise rpc_error(body["error"], body, summary, resp.status, resp.excerpt())
        raise_for(resp, summary)
        if not isinstance(body, dict) or not isinstance(body.get("result"), dict):
            raise Retryable(f"{summary}: not a JSON-RPC answer", resp.status, resp.excerpt())
        if body.get("id") != rid:
            raise Retryable(f"{summary}: the answer is for another request", resp.status,
                            resp.excerpt())
        return body["result"].get("data")

    async def rpc(self, tenant: Tenant, url: str, method: str, params: dict[str, Any]) -> Any:
        """``method`` with the tenant's credentials; a session the platform no longer takes
        is renewed once (concurrent requests share the one login)."""
        token = await self._token(tenant, url)
        try:
            return await self._send(url, method, {**params, "access_token": token})
        except Refused as e:
            if e.mnemonic not in SESSION_MNEMONICS or tenant.pbx.access_token:
                raise
        token = await self._token(tenant, url, stale=token)
        return await self._send(url, method, {**params, "access_token": token})

    # employees

    def extension(self, tenant: Tenant, employee_id: int) -> str:
        """The short number of an employee: the tenant's ``extensions``, else the cached
        ``get.employees``; "" when unknown (a refresh is started for next time)."""
        known = tenant.pbx.extensions.get(str(employee_id))
        if known:
            return known
        cached = self.employees.get(tenant.id)
        found = cached[0].get(employee_id, "") if cached else ""
        stale = cached is None or cached[1] + self.EMPLOYEES_TTL <= self.clock.seconds()
        if (not found or stale) and self.can_call(tenant):
            self.refresh(tenant)
        return found

    def refresh(self, tenant: Tenant) -> Deferred:
        """Fetch the tenant's employees in the background (one fetch at a time, at most one
        every REFRESH_GAP seconds); fires when done, never fails."""
        if tenant.id in self._refreshing:
            return self._refreshing[tenant.id]
        last = self._last_refresh.get(tenant.id)
        if last is not None and last + self.REFRESH_GAP > self.clock.seconds():
            return succeed(None)
        self._last_refresh[tenant.id] = self.clock.seconds()

        def done(_: Any) -> None:
            self._refreshing.pop(tenant.id, None)

        def failed(failure: Any) -> None:
            done(None)
            log.warn("tenant {tenant}: get.employees failed: {error}", tenant=tenant.id,
                     error=str(failure.value))

        d = ensureDeferred(self._fetch_employees(tenant))
        self._refreshing[tenant.id] = d
        d.addCallbacks(done, failed)
        return d

    async def _fetch_employees(self, tenant: Tenant) -> None:
        found: dict[int, str] = {}
        offset = 0
        while True:
            data = await self.rpc(tenant, tenant.pbx.data_api_url, "get.employees",
                                  {"limit": self.PAGE, "offset": offset})
            if not isinstance(data, list):
                raise Retryable("get.employees: data is not a list")
            for item in data:
                if not isinstance(item, dict) or not isinstance(item.get("id"), int):
                    continue
                ext = item.get("extension")
                number = ext.get("extension_phone_number") if isinstance(ext, dict) else None
                if isinstance(number, str) and number.strip():
                    found[item["id"]] = number.strip()
            if len(data) < self.PAGE:
                break
            offset += self.PAGE
        self.employees[tenant.id] = (found, self.clock.seconds())

    @staticmethod
    def can_call(tenant: Tenant) -> bool:
        return bool(tenant.pbx.access_token or tenant.pbx.api_login)

    # calls

    async def employee_id(self, tenant: Tenant, extension: str) -> int:
        for employee, short in tenant.pbx.extensions.items():
            if short == extension:
                return int(employee)
        if self.can_call(tenant):
            cached = self.employees.get(tenant.id)
            if cached is None:
                await self.refresh(tenant)
                cached = self.employees.get(tenant.id)
            for employee, short in (cached[0] if cached else {}).items():
                if short == extension:
                    return employee
        raise Permanent(f"no CallGear employee has the short number {extension[:20]}: add "
                        f'"<employee_id>": "{extension[:20]}" to pbx.extensions')

    async def start_employee_call(self, tenant: Tenant, extension: str, number: str) -> str:
        """``start.employee_call`` (callgear.md §3.1): the employee first, then ``number``,
        from the tenant's virtual number, tagged with an external_id of the gateway."""
        employee = await self.employee_id(tenant, extension)
        external = f"{EXTERNAL_PREFIX}{tenant.id}-{secretslib.token_hex(6)}"
        data = await self.rpc(tenant, tenant.pbx.call_api_url, "start.employee_call", {
            "first_call": "employee",
            "virtual_phone_number": tenant.pbx.virtual_number,
            "contact": e164(number),
            "employee": {"id": employee},
            "external_id": external,
        })
        session = data.get("call_session_id") if isinstance(data, dict) else None
        if not isinstance(session, int) or isinstance(session, bool):
            raise Retryable("start.employee_call: no call_session_id in the answer")
        return str(session)

    async def release(self, tenant: Tenant, call: str) -> str:
        data = await self.rpc(tenant, tenant.pbx.call_api_url, "release.call",
                              {"call_session_id": int(call)})
        ok = data.get("success") if isinstance(data, dict) else None
        if ok not in (True, "true"):
            raise Retryable("release.call: no success in the answer")
        return call


@attrs.frozen
class CallGearConfig(PbxConfig):
    """A CallGear (CoMagic, UIS, Novofon) account: its API hosts, an API key or a login for
    sessions, the virtual number click-to-call shows, and the employees' short numbers."""

    call_api_url: str = CALL_API
    data_api_url: str = DATA_API
    access_token: str = attrs.field(default="", repr=False)  # an API key ("access by key")
    api_login: str = ""  # or a cabinet user for login.user sessions
    password: str = attrs.field(default="", repr=False)
    virtual_number: str = ""  # click-to-call: the number the contact sees
    # employee_id → short number (the set-up page's "short numbers of employees")
    extensions: dict[str, str] = attrs.field(factory=dict)
    # notification_time's zone; "" is the tenant's options.timezone  [I] callgear.md §9.4
    timezone: str = ""
    # interactive processing with no manager: {"returned_code": this}, the scenario's branch
    fallback_code: int = 1


@implementer(IPbx)
class CallGear:
    kind = "callgear"
    prefix = "notify"
    secrets = ("access_token", "password")
    config_type = CallGearConfig
    credential_fields = ("call_api_url", "data_api_url", "access_token", "api_login",
                         "password")

    def __init__(self, http: HttpClient, clock: Any) -> None:
        self.client = CallGearClient(http, clock)

    @staticmethod
    def parse_config(section: dict[str, Any]) -> CallGearConfig:
        field_only(section, "pbx", {f.name for f in attrs.fields(CallGearConfig)})
        extensions = section.get("extensions", {})
        if not isinstance(extensions, dict) or not all(
                isinstance(k, str) and k.isascii() and k.isdigit() and len(k) <= 18
                and isinstance(v, str) and re.fullmatch(r"[0-9]{1,5}", v)
                for k, v in extensions.items()):
            raise BadRequest("pbx.extensions", "must map employee ids (digits) to short "
                             "numbers of 1-5 digits")
        token = field_text(section, "pbx.access_token")
        api_login = field_text(section, "pbx.api_login")
        password = field_text(section, "pbx.password")
        if token and api_login:
            raise BadRequest("pbx.api_login", "give an API key (pbx.access_token) or a "
                             "login and password, not both")
        if api_login and not password:
            raise BadRequest("pbx.password", "required with pbx.api_login")
        if password and not api_login:
            raise BadRequest("pbx.api_login", "required with pbx.password")
        virtual = field_text(section, "pbx.virtual_number")
        if virtual and not re.fullmatch(r"\+?[0-9 ()\-]{5,30}", virtual):
            raise BadRequest("pbx.virtual_number", "must be a phone number")
        zone = field_text(section, "pbx.timezone")
        if zone:
            try:
                ZoneInfo(zone)
            except (ZoneInfoNotFoundError, ValueError):
                raise BadRequest("pbx.timezone", "unknown time zone") from None
        code = section.get("fallback_code", 1)
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 99:
            raise BadRequest("pbx.fallback_code", "must be a whole number 0-99")
        credential = section.get("credential")
        return CallGearConfig(
            kind="callgear",
            login=field_login(section, "pbx.login"),
            call_api_url=field_url(section, "pbx.call_api_url", required=False) or CALL_API,
            data_api_url=field_url(section, "pbx.data_api_url", required=False) or DATA_API,
            access_token=token, api_login=api_login, password=password,
            virtual_number=e164(virtual) if virtual else "",
            extensions=dict(extensions), timezone=zone, fallback_code=code,
            queues=field_numbers(section, "pbx.queues"),
            ivrs=field_numbers(section, "pbx.ivrs"),
            credential=credential if isinstance(credential, int) else None,
        )

    def authenticate(self, request: Inbound, tenant: Tenant) -> None:
        # CallGear signs nothing (callgear.md §4.1): the key in the URL is the proof.
        if not hmac.compare_digest(request.query_key().encode(), tenant.key.encode()):
            raise BadRequest("key", "wrong or missing key", status=403)

    def parse(self, request: Inbound, tenant: Tenant, received: float) -> list[Event]:
        return parse_notification(_body(request), request.name, tenant, received,
                                  lambda who: self.client.extension(tenant, who))

    @staticmethod
    def setup_guide(tenant: Tenant, base: str) -> list[dict[str, str]]:
        return setup_guide(tenant, base)

    @staticmethod
    def is_lookup(request: Inbound) -> bool:
        return False  # interactive processing has its own URL, /cid/…

    @staticmethod
    def refusal(error: BadRequest) -> tuple[bytes, bytes]:
        return b"text/plain; charset=utf-8", f"{error}\n".encode()

    def recording_url(self, tenant: Tenant, recording: str) -> Deferred | None:
        # Notifications carry the link itself (file_link); nothing to look up.
        if re.match(r"https?://", recording):
            return succeed(recording)
        return None

    def interactive_number(self, request: Inbound) -> str:
        """``numa`` of an interactive-processing request (callgear.md §5): query string,
        form body or JSON body."""
        fields: dict[str, Any] = {}
        if request.body.strip() and (request.content_type.endswith("json")
                                     or request.body.lstrip()[:1] == b"{"):
            data = _body(request)
            fields = {k: v for k, v in data.items()}
        elif request.body:
            try:
                fields = dict(parse_qsl(request.body.decode("utf-8"), keep_blank_values=True))
            except UnicodeDecodeError:
                raise BadRequest("body", "not UTF-8 form data") from None
        for name, value in parse_qsl(request.query.decode("utf-8", "replace"),
                                     keep_blank_values=True):
            fields.setdefault(name, value)
        number = _number(fields, "numa")
        if not number:
            raise BadRequest("numa", "required: the caller's number")
        return number

    def interactive_answer(self, tenant: Tenant, extension: str | None) -> tuple[bytes, bytes]:
        """``{"phones": [extension]}``, or ``{"returned_code": pbx.fallback_code}`` so the
        scenario goes on down its other branch."""
        body = ({"phones": [extension]} if extension
                else {"returned_code": tenant.pbx.fallback_code})
        return b"application/json; charset=utf-8", json.dumps(body).encode()

    def call(self, tenant: Tenant, extension: str, number: str) -> Deferred:
        if not self.client.can_call(tenant):
            raise Permanent("click-to-call needs pbx.access_token (an API key) or "
                            "pbx.api_login and pbx.password")
        if not tenant.pbx.virtual_number:
            raise Permanent("click-to-call needs pbx.virtual_number: the account's virtual "
                            "number the contact sees")
        if not e164(number):
            raise Permanent("no number to call")
        return ensureDeferred(self.client.start_employee_call(tenant, extension, number))

    def hangup(self, tenant: Tenant, call: str) -> Deferred:
        if not self.client.can_call(tenant):
            raise Permanent("hang-up needs pbx.access_token or pbx.api_login and "
                            "pbx.password")
        if not (call.isascii() and call.isdigit() and 0 < len(call) <= 19):
            raise Permanent(f"{call[:40]!r} is not a CallGear call_session_id")
        return ensureDeferred(self.client.release(tenant, call))
