"""MegaFon virtual PBX, "API for CRM" (also Gravitel and resellers, megafon.md): the PBX posts
every command (``event``, ``history``, ``contact``, ``rating``) form-encoded to one CRM URL,
``/vats/{tenant}/crm/{login}``, with ``crm_token``; the gateway places calls through the
legacy command endpoint (``makeCall``) or REST v1 (``/makecall``).

How the commands become neutral events (megafon.md §5; the [I] choices are named there and in
the README draft):

* call key ``callid``, leg key ``user`` (the PBX login; unique within the call);
* ``event``: INCOMING / OUTGOING ring the leg, ACCEPTED answers it, CANCELLED ends it
  unanswered; COMPLETED and TRANSFERRED say the leg talked but do not end it, because the
  talk time and the recording only come in ``history``;
* ``history`` is the record: it ends its ``user``'s leg (outcome, talk time, ``link``,
  ``rating``) and closes the call (``CLOSING``: decided a grace later, since it may overtake
  the last ``event``);
* ``rating`` gives the leg a score (an ``answer`` that changes nothing else);
* none of them carries a time of its own: ``at`` is the gateway's clock and ``dedup`` names
  the notification (call, command, type), so a repeated delivery is stored once.
"""

from __future__ import annotations

import hmac
import json
import re
from datetime import datetime, timezone
from typing import Any, Mapping

import attrs
from twisted.internet.defer import Deferred, ensureDeferred, succeed
from twisted.logger import Logger
from zope.interface import implementer

from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient, raise_for
from gateway.model import (ANSWERED, BUSY, CANCELLED, CLOSING, FAILED_CALL, NO_ANSWER, Event,
                           Inbound, Tenant, digits, field_choice, field_login, field_numbers,
                           field_only, field_text, field_url)
from gateway.protocols import IPbx, PbxConfig

log = Logger()

# event.type → (neutral kind, flow when the event has no ``direction``, outcome).
EVENT_TYPES = {
    "INCOMING": ("ring", "in", ""),
    "OUTGOING": ("ring", "out", ""),
    "ACCEPTED": ("answer", "in", ""),
    # The talk is over, but its time and recording come in history, which ends the leg.
    "COMPLETED": ("answer", "in", ""),
    "TRANSFERRED": ("answer", "in", ""),
    "CANCELLED": ("hangup", "in", CANCELLED),
}
# history.status, lower case → outcome (megafon.md §2.3: the case varies between sources).
STATUSES = {"success": ANSWERED, "missed": NO_ANSWER, "cancel": CANCELLED, "busy": BUSY,
            "notavailable": FAILED_CALL, "notallowed": FAILED_CALL, "notfound": FAILED_CALL}
COMMANDS = ("event", "history", "contact", "rating")

MAX_ID = 128  # callid, user, ext, group names
MAX_NUMBER = 32  # phone, diversion, telnum
MAX_LINK = 2048
MAX_SECONDS = 2 * 86400  # duration / wait: two days is past any real call
MAX_RATING = 100
MAX_START_AGE = 3653 * 86400  # history.start: as far back as Telphin's event times
MAX_START_LEAD = 86400

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NUMBER = re.compile(r"\+?[0-9]{1,31}")
_START = re.compile(r"[0-9]{8}T[0-9]{6}Z")

# Answers to a refused PBX request (megafon.md §2.1), by what was wrong.
INVALID_REQUEST = {"error": "Invalid request"}
INVALID_TOKEN = {"error": "Invalid token"}
INVALID_PARAMETERS = {"error": "Invalid parameters"}


def _text(fields: Mapping[str, str], name: str, limit: int = MAX_ID,
          required: bool = False) -> str:
    value = fields.get(name, "").strip()
    if not value:
        if required:
            raise BadRequest(name, "required")
        return ""
    if len(value) > limit:
        raise BadRequest(name, f"longer than {limit} characters ({len(value)})")
    if _CONTROL.search(value):
        raise BadRequest(name, "contains a control character")
    return value


def _number(fields: Mapping[str, str], name: str, required: bool = False) -> str:
    value = _text(fields, name, MAX_NUMBER, required)
    if value and not _NUMBER.fullmatch(value):
        raise BadRequest(name, f"must be digits, got {value[:40]!r}")
    return value


def _int(fields: Mapping[str, str], name: str, high: int, required: bool = False) -> int:
    value = fields.get(name, "").strip()
    if not value:
        if required:
            raise BadRequest(name, "required")
        return 0
    if not (value.isascii() and value.isdigit()) or len(value.lstrip("0")) > len(str(high)):
        raise BadRequest(name, f"must be a whole number from 0 to {high}")
    number = int(value)
    if number > high:
        raise BadRequest(name, f"must be a whole number from 0 to {high}")
    return number


def _start(fields: Mapping[str, str], received: float) -> int:
    """history.start, ``YYYYmmddTHHMMSSZ`` UTC (24-hour), as microseconds."""
    value = fields.get("start", "").strip()
    if not value:
        raise BadRequest("start", "required")
    if not _START.fullmatch(value):
        raise BadRequest("start", f"must be YYYYmmddTHHMMSSZ, got {value[:40]!r}")
    try:
        when = datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        raise BadRequest("start", f"not a date and time: {value!r}") from None
    seconds = when.timestamp()
    if not received - MAX_START_AGE <= seconds <= received + MAX_START_LEAD:
        raise BadRequest("start", f"{value} is too far from the gateway's clock")
    return int(seconds) * 1_000_000


def _link(fields: Mapping[str, str]) -> str:
    value = _text(fields, "link", MAX_LINK)
    if value and not re.match(r"https?://[^\s/]+", value):
        raise BadRequest("link", "must be an http(s) URL")
    return value


def parse_command(fields: Mapping[str, str], tenant: int, received: float) -> list[Event]:
    """The neutral events of one ``event`` / ``history`` / ``rating`` command (form fields,
    first value of each); BadRequest naming the field otherwise."""
    cmd = fields.get("cmd", "")
    callid = _text(fields, "callid", required=True)
    at = int(received * 1_000_000)
    common = {"tenant": tenant, "call": callid, "received": received}
    if cmd == "event":
        kind_text = fields.get("type", "").strip().upper()
        if kind_text not in EVENT_TYPES:
            raise BadRequest("type", "must be one of " + ", ".join(EVENT_TYPES))
        kind, flow, outcome = EVENT_TYPES[kind_text]
        direction = fields.get("direction", "").strip().lower()
        if direction not in ("", "in", "out"):
            raise BadRequest("direction", "must be in or out")
        user = _text(fields, "user", required=True)
        return [Event(**common, leg=user, kind=kind, flow=direction or flow, at=at,
                      extension=_text(fields, "ext") or user, sip=user,
                      peer=_number(fields, "phone", required=True),
                      did=_number(fields, "diversion"), outcome=outcome,
                      dedup=f"{callid}:event:{kind_text}")]
    if cmd == "history":
        flow = fields.get("type", "").strip().lower()
        if flow not in ("in", "out"):
            raise BadRequest("type", "must be in or out")
        status = fields.get("status", "").strip().lower()
        if status not in STATUSES:
            raise BadRequest("status", "must be one of Success, missed, Cancel, Busy, "
                             "NotAvailable, NotAllowed, NotFound")
        start = _start(fields, received)
        duration = _int(fields, "duration", MAX_SECONDS, required=True)
        wait = _int(fields, "wait", MAX_SECONDS)
        # ``duration`` is the whole call, ``wait`` the time to answer (megafon.md §5's
        # scenario: 89 s with 6 s waiting is 83 s of talk).  [I]
        talk = duration - wait if duration >= wait else duration
        user = _text(fields, "user")
        peer = _number(fields, "phone", required=True)
        did = _number(fields, "diversion")
        rating = _int(fields, "rating", MAX_RATING)
        link = _link(fields)
        closing = Event(**common, leg="", kind=CLOSING, flow=flow, at=start, peer=peer,
                        did=did, dedup=f"{callid}:history")
        if not user:
            # A missed group call may name no one (megafon.md §8 q4): the legs its events
            # rang decide the missed record.  [I]
            return [closing]
        outcome = STATUSES[status]
        return [Event(**common, leg=user, kind="hangup", flow=flow,
                      at=start + duration * 1_000_000, extension=_text(fields, "ext") or user,
                      sip=user, peer=peer, did=did, outcome=outcome,
                      duration=talk * 1_000_000 if outcome == ANSWERED else 0,
                      recording=link if outcome == ANSWERED else "", rating=rating,
                      dedup=f"{callid}:history"), closing]
    if cmd == "rating":
        user = _text(fields, "user", required=True)
        rating = _int(fields, "rating", MAX_RATING, required=True)
        # A score means the leg talked: an answer, which changes nothing else.  [I]
        return [Event(**common, leg=user, kind="answer", flow="in", at=at,
                      extension=_text(fields, "ext") or user, sip=user,
                      peer=_number(fields, "phone"), rating=rating,
                      dedup=f"{callid}:rating")]
    raise BadRequest("cmd", "must be one of " + ", ".join(COMMANDS))


def call_id_of(body: bytes) -> str:
    """makeCall's answer: documented as the bare call id, a live PBX sent a JSON object
    (megafon.md §3): either, or ``""``."""
    text = body.decode("utf-8", "replace").strip()
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if isinstance(value, dict):
        for name in ("callid", "callId", "CallID", "call_id", "uid", "id"):
            if isinstance(value.get(name), (str, int)) and not isinstance(value[name], bool):
                return str(value[name]).strip()
        return ""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        value = str(value).strip()
        return value if re.fullmatch(r"[A-Za-z0-9_.:\-]{1,128}", value) else ""
    return ""


class MegaFonClient:
    """The gateway → PBX side: click-to-call and the employee directory (cached)."""

    DIRECTORY_FRESH = 600.0  # seconds an employee list is reused
    PAGE = 100

    def __init__(self, http: HttpClient, clock: Any) -> None:
        self.http = http
        self.clock = clock
        self._directory: dict[tuple[str, str, str], tuple[float, list[dict[str, str]]]] = {}

    @staticmethod
    def _moved(resp: Any, what: str, tenant: Tenant) -> None:
        if 300 <= resp.status < 400:
            raise Permanent(f"{what}: HTTP {resp.status}: the PBX name in pbx.api_url "
                            f"({tenant.pbx.api_url}) is wrong (MegaFon redirects an unknown "
                            "ATS to its portal)", resp.status, resp.excerpt())
        if resp.status in (401, 403):
            key = "pbx.api_key" if tenant.pbx.api == "rest" else "pbx.token"
            raise Permanent(f"{what}: HTTP {resp.status}: the PBX refused {key}",
                            resp.status, resp.excerpt())

    async def _legacy(self, tenant: Tenant, cmd: str, **params: str) -> Any:
        resp = await self.http.request(
            "POST", f"{tenant.pbx.api_url}/sys/crm_api.wcgp",
            data={"cmd": cmd, "token": tenant.pbx.token, **params})
        self._moved(resp, cmd, tenant)
        return raise_for(resp, f"POST /sys/crm_api.wcgp {cmd}")

    async def _rest(self, tenant: Tenant, method: str, path: str, body: Any = None,
                    params: Any = None) -> Any:
        resp = await self.http.request(
            method, f"{tenant.pbx.api_url}/crmapi/v1{path}", json=body, params=params,
            headers={"X-API-KEY": tenant.pbx.api_key, "Accept": "application/json"})
        self._moved(resp, f"{method} {path}", tenant)
        return raise_for(resp, f"{method} /crmapi/v1{path}")

    async def make_call(self, tenant: Tenant, user: str, phone: str) -> str:
        """Ring ``user`` (login, extension or direct number) first, then ``phone``."""
        number = digits(phone)  # makeCall rejects a leading "+" (megafon.md §3)
        if not number:
            raise Permanent(f"not a number to call: {phone[:40]!r}")
        if tenant.pbx.api == "rest":
            resp = await self._rest(tenant, "POST", "/makecall",
                                    {"user": user, "phone": number})
        else:
            resp = await self._legacy(tenant, "makeCall", user=user, phone=number)
        call = call_id_of(resp.body)
        if not call:
            raise Retryable("makeCall: no call id in the answer", resp.status, resp.excerpt())
        return call

    async def employees(self, tenant: Tenant) -> list[dict[str, str]]:
        """The PBX's employees as {"login", "name", "ext"}, reused for ``DIRECTORY_FRESH``."""
        key = (tenant.pbx.api_url, tenant.pbx.api, tenant.pbx.login)
        cached = self._directory.get(key)
        now = self.clock.seconds()
        if cached and cached[0] > now:
            return cached[1]
        out: list[dict[str, str]] = []
        if tenant.pbx.api == "rest":
            start = 0
            while True:
                body = (await self._rest(tenant, "GET", "/users",
                                         params={"start": str(start),
                                                 "limit": str(self.PAGE)})).json()
                items = body.get("items") if isinstance(body, dict) else None
                if not isinstance(items, list):
                    raise Retryable("GET /users: no items in the answer")
                out += [{"login": str(i.get("login", "")), "name": str(i.get("name", "")),
                         "ext": str(i.get("ext", ""))} for i in items if isinstance(i, dict)]
                total = (body.get("info") or {}).get("total", 0)
                start += len(items)
                if not items or not isinstance(total, int) or start >= total:
                    break
        else:
            try:
                body = (await self._legacy(tenant, "accounts")).json()
            except ValueError:
                raise Retryable("accounts: not JSON") from None
            if not isinstance(body, list):
                raise Retryable("accounts: not a list")
            out = [{"login": str(i.get("name", "")), "name": str(i.get("realName", "")),
                    "ext": str(i.get("ext", ""))} for i in body if isinstance(i, dict)]
        self._directory[key] = (now + self.DIRECTORY_FRESH, out)
        return out


@attrs.frozen
class MegaFonConfig(PbxConfig):
    """A MegaFon ATS: the key it sends (``crm_token``) and how the gateway calls it."""

    crm_token: str = attrs.field(default="", repr=False)
    api_url: str = ""  # https://<ats>.megapbx.ru
    token: str = attrs.field(default="", repr=False)  # the legacy endpoint's key
    api_key: str = attrs.field(default="", repr=False)  # REST v1 X-API-KEY
    api: str = "legacy"  # legacy | rest


@implementer(IPbx)
class MegaFon:
    kind = "megafon"
    prefix = "vats"
    secrets = ("crm_token", "token", "api_key")
    config_type = MegaFonConfig
    credential_fields = ("api_url", "token", "api_key", "api", "crm_token")

    def __init__(self, http: HttpClient, clock: Any) -> None:
        self.client = MegaFonClient(http, clock)

    @staticmethod
    def parse_config(section: dict[str, Any]) -> MegaFonConfig:
        field_only(section, "pbx", {f.name for f in attrs.fields(MegaFonConfig)})
        crm_token = field_text(section, "pbx.crm_token", required=True)
        if len(crm_token) > 256:
            raise BadRequest("pbx.crm_token", "at most 256 characters")
        api = field_choice({"api": section.get("api", "legacy")}, "pbx.api",
                           ("legacy", "rest"))
        token = field_text(section, "pbx.token")
        api_key = field_text(section, "pbx.api_key")
        credential = section.get("credential")
        return MegaFonConfig(
            kind="megafon",
            login=field_login(section, "pbx.login"),
            crm_token=crm_token,
            api_url=field_url(section, "pbx.api_url", required=False),
            token=token,
            api_key=api_key,
            api=api,
            queues=field_numbers(section, "pbx.queues"),
            ivrs=field_numbers(section, "pbx.ivrs"),
            credential=credential if isinstance(credential, int) else None,
        )

    @staticmethod
    def setup_guide(tenant: Tenant, base: str) -> list[dict[str, str]]:
        """The one CRM URL of "Integration with your own CRM" (megafon.md §1): no key in it,
        the PBX proves itself with ``crm_token``, which the cabinet issues and the tenant's
        ``pbx.crm_token`` must hold."""
        return [{"what": "CRM URL (Integration with your own CRM); its key goes into "
                         "pbx.crm_token", "method": "POST",
                 "url": f"{base}/vats/{tenant.id}/crm/{tenant.pbx.login}"}]

    def authenticate(self, request: Inbound, tenant: Tenant) -> None:
        if request.method != "POST":
            raise BadRequest("method", "Invalid request: use POST")
        try:
            fields = request.form()
        except BadRequest as e:
            raise BadRequest(e.field, e.message) from None  # Invalid parameters, 400
        sent = fields.get("crm_token", "")
        if not hmac.compare_digest(sent.encode(), tenant.pbx.crm_token.encode()):
            raise BadRequest("crm_token", "wrong or missing crm_token", status=401)

    def parse(self, request: Inbound, tenant: Tenant, received: float) -> list[Event]:
        return parse_command(request.form(), tenant.id, received)

    @staticmethod
    def is_lookup(request: Inbound) -> bool:
        return request.form().get("cmd") == "contact"

    @staticmethod
    def refusal(error: BadRequest) -> tuple[bytes, bytes]:
        if error.field == "method":
            body = INVALID_REQUEST
        elif error.status == 401:
            body = INVALID_TOKEN
        elif error.status == 400:
            body = INVALID_PARAMETERS
        else:  # not the PBX's fault in its terms (unknown tenant, a body too large)
            body = {"error": str(error)}
        return b"application/json", json.dumps(body).encode()

    def recording_url(self, tenant: Tenant, recording: str) -> Deferred:
        return succeed(recording)  # history's ``link`` is the recording's URL already

    def interactive_number(self, request: Inbound) -> str:
        fields = request.form()
        _text(fields, "callid")
        return _number(fields, "phone", required=True)

    def interactive_answer(self, tenant: Tenant, extension: str | None) -> tuple[bytes, bytes]:
        """``{"responsible": …}`` (an extension: the PBX takes a login, an extension or a
        direct number), or ``{}`` so the PBX routes as it would without a CRM."""
        body = {"responsible": extension} if extension else {}
        return b"application/json", json.dumps(body).encode()

    def call(self, tenant: Tenant, extension: str, number: str) -> Deferred:
        pbx = tenant.pbx
        if not pbx.api_url:
            raise Permanent("click-to-call needs pbx.api_url (https://<ats>.megapbx.ru)")
        if pbx.api == "rest" and not pbx.api_key:
            raise Permanent("click-to-call through REST v1 needs pbx.api_key (X-API-KEY)")
        if pbx.api == "legacy" and not pbx.token:
            raise Permanent("click-to-call through the legacy endpoint needs pbx.token")
        return ensureDeferred(self._call(tenant, extension, number))

    async def _call(self, tenant: Tenant, extension: str, number: str) -> str:
        return await self.client.make_call(tenant, await self.login_of(tenant, extension),
                                           number)

    async def login_of(self, tenant: Tenant, extension: str) -> str:
        """The PBX login of an extension, from the cached employee list; the extension
        itself (makeCall takes one too) when the list does not have it or cannot be read."""
        try:
            employees = await self.client.employees(tenant)
        except (Retryable, Permanent) as e:
            if isinstance(e, Permanent) and e.status is not None and 300 <= e.status < 400:
                raise
            log.info("tenant {tenant}: employee list not read ({error}); calling by "
                     "extension", tenant=tenant.id, error=str(e))
            return extension
        for employee in employees:
            if employee["ext"] == extension and employee["login"]:
                return employee["login"]
        return extension

    def hangup(self, tenant: Tenant, call: str) -> Deferred:
        raise NotImplementedError("MegaFon's API for CRM (megafon.md §3-4) has no way to end "
                                  "a call")
