"""Telphin: its event webhooks parsed into normalised events, its REST API (OAuth, recordings,
click-to-call) and its call-interactive format (telphin.md)."""

from __future__ import annotations

import hmac
import re
from datetime import datetime, timezone
from typing import Any, Callable, Mapping
from xml.sax.saxutils import escape, quoteattr

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient, raise_for
from gateway.model import (ANSWERED, BUSY, CANCELLED, FAILED_CALL, NO_ANSWER, Event, Inbound,
                           Tenant, field_numbers, field_only, field_text, field_url,
                           field_login)
from gateway.protocols import IPbx, PbxConfig

log = Logger()

# URL event segment / EventType → normalised event kind.
EVENT_KINDS = {"dial-in": "ring", "dial-out": "ring", "answer": "answer", "hangup": "hangup"}
# CallStatus of a hangup → the gateway's outcome; any other non-empty status (CONGESTION,
# CHANUNAVAIL, ...) is a failure.  CALLING (dial-in/out) says nothing yet.
OUTCOMES = {"ANSWER": ANSWERED, "NOANSWER": NO_ANSWER, "BUSY": BUSY, "CANCEL": CANCELLED,
            "CALLING": "", "": ""}


# Bounds on what a webhook may carry, checked before the event is stored; a value outside
# them is a 400 naming the field, so nothing the fold or a CRM request cannot handle is
# ever stored.  [I]
# EventTime may lag the gateway's clock by this much (seconds): late and replayed events,
# with years to spare; anything older (EventTime=0 is 1970) is a broken PBX clock.
MAX_EVENT_AGE = 3653 * 86400
# ... and lead it by this much: clock skew, even a PBX sending local time as if it were
# UTC (at most 14 hours off); beyond it the time is not a real one.
MAX_EVENT_LEAD = 86400
# The longest talk time (microseconds) a leg may report: two days, far past any real call
# and far inside what the record's seconds and Altegio's ``duration`` can carry.
MAX_DURATION = 2 * 86400 * 1_000_000
# CallID (32 hex), SubCallID and RecID (``<id>-<32 hex>``), CallBackID: ids are under 64
# characters in every sample; twice that leaves room for a format change, not for abuse.
MAX_ID = 128
# Numbers and extensions (``+79161234567``, ``7001*101@sipproxy.telphin.ru``): E.164 is at
# most 15 digits, a SIP extension with its domain a few dozen characters.
MAX_NUMBER = 64
# CallStatus: the longest Telphin sends is ``CHANUNAVAIL`` (11).
MAX_STATUS = 32

# C0 controls, DEL and C1 controls: never part of an id, a number or a status.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# The string fields parse_event uses, each with its length bound and whether it is a number:
# numbers lose surrounding whitespace, and one that is only whitespace is the same as absent
# (an empty number is never forwarded to a CRM).
_TEXTS = (("CallID", MAX_ID, False), ("SubCallID", MAX_ID, False), ("RecID", MAX_ID, False),
          ("CallBackID", MAX_ID, False), ("CallStatus", MAX_STATUS, False),
          *((name, MAX_NUMBER, True) for name in (
              "CallerIDNum", "CalledDID", "CalledNumber", "CalledExtension", "CallerExtension",
              "RemoteNumber")))


def _extension(value: str) -> tuple[str, str]:
    """``7001*101@sipproxy.telphin.ru`` → (``101``, ``7001*101``); plain ``101`` stays."""
    sip = value.split("@", 1)[0]
    return sip.rsplit("*", 1)[-1], sip


def _texts(fields: Mapping[str, str]) -> dict[str, str]:
    """The string fields of ``_TEXTS``, "" when absent: each at most its limit as sent (the
    lengths first, so a long value costs nothing more), none with a control character."""
    get = fields.get
    texts = {}
    for name, limit, number in _TEXTS:
        value = get(name)
        if value:
            if len(value) > limit:
                raise BadRequest(name, f"longer than {limit} characters ({len(value)})")
            texts[name] = value.strip() if number else value
        else:
            texts[name] = ""
    # One scan of them all, and which field only when it fails.  For ASCII (every real
    # event) isprintable() is exactly "no control character", and cheaper than the regex.
    joined = "".join(texts.values())
    if not (joined.isascii() and joined.isprintable()) and _CONTROL.search(joined):
        for name, value in texts.items():
            if _CONTROL.search(value):
                raise BadRequest(name, "contains a control character")
    return texts


def _int(fields: Mapping[str, str], name: str, required: bool, low: int, high: int,
         bounds: Callable[[], str]) -> int:
    """A whole number of ASCII digits within [low, high]; ``bounds()`` says what they mean
    (called for the error only: the common case formats nothing).  The digits are counted
    before ``int()``, so thousands of them are a 400, not int()'s ValueError (a 500)."""
    value = fields.get(name, "")
    if not value:
        if required:
            raise BadRequest(name, "required")
        return 0
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(name, f"must be a whole number of microseconds, got {value[:40]!r}")
    significant = value.lstrip("0")
    if len(significant) > len(str(high)):
        raise BadRequest(name, f"out of range ({len(value)} digits): {bounds()}")
    number = int(significant or "0")
    if not low <= number <= high:
        raise BadRequest(name, f"out of range ({number}): {bounds()}")
    return number


def _utc(micros: int) -> str:
    return datetime.fromtimestamp(micros // 1_000_000, timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def _event_time(fields: Mapping[str, str], received: float) -> int:
    low = max(1, int((received - MAX_EVENT_AGE) * 1_000_000))
    high = int((received + MAX_EVENT_LEAD) * 1_000_000)
    return _int(fields, "EventTime", True, low, high, lambda: (
        f"microseconds since the epoch from {_utc(low)} to {_utc(high)} "
        f"({MAX_EVENT_AGE // 86400} days before to {MAX_EVENT_LEAD // 3600} hours after "
        "the gateway's clock)"))


def parse_event(fields: Mapping[str, str], url_event: str, tenant: int,
                received: float) -> Event:
    """One Telphin call event (form fields, first value of each) as a normalised event.

    Every field it uses is bounded here (lengths, control characters, numeric ranges), so
    an event that is stored can always be folded and sent; anything else is BadRequest."""
    if url_event not in EVENT_KINDS:
        raise BadRequest("event", f"unknown event {url_event[:40]!r}; expected one of "
                         + ", ".join(EVENT_KINDS), status=404)
    event_type = fields.get("EventType", url_event)
    if event_type not in EVENT_KINDS:
        raise BadRequest("EventType", f"unknown event type {event_type[:40]!r}")
    if event_type != url_event:
        raise BadRequest("EventType", f"{event_type!r} arrived on the URL for {url_event!r}")
    text = _texts(fields)
    for name in ("CallID", "SubCallID"):
        if not text[name]:
            raise BadRequest(name, "required")
    flow = fields.get("CallFlow", "").lower()
    if flow not in ("in", "out"):
        # dial-in / dial-out say it themselves; answer and hangup must carry it.
        flow = {"dial-in": "in", "dial-out": "out"}.get(event_type, "")
        if not flow:
            raise BadRequest("CallFlow", "required: in or out")
    bridged_text = fields.get("Bridged", "").lower()
    if bridged_text not in ("", "yes", "no"):
        raise BadRequest("Bridged", "must be yes or no")
    if flow == "in":
        extension, sip = _extension(text["CalledExtension"] or text["CalledNumber"])
        # After an internal transfer the outside party is RemoteNumber, not the caller.
        peer = text["RemoteNumber"] or text["CallerIDNum"]
    else:
        extension, sip = _extension(text["CallerExtension"] or text["CallerIDNum"])
        peer = text["CalledNumber"]
    return Event(
        tenant=tenant,
        call=text["CallID"].lower(),
        leg=text["SubCallID"],
        kind=EVENT_KINDS[event_type],
        flow=flow,
        at=_event_time(fields, received),
        received=received,
        extension=extension,
        sip=sip,
        peer=peer,
        did=text["CalledDID"],
        outcome=OUTCOMES.get(text["CallStatus"].upper(), FAILED_CALL),
        duration=_int(fields, "Duration", False, 0, MAX_DURATION, lambda: (
            f"at most {MAX_DURATION} microseconds ({MAX_DURATION // 3_600_000_000} hours)")),
        recording=text["RecID"],
        bridged={"yes": True, "no": False}.get(bridged_text),
        transferred=fields.get("Transfered", "").lower() == "yes",
        callback=text["CallBackID"],
    )


class TelphinClient:
    """Telphin's REST API for one gateway: OAuth tokens cached per application, recordings."""

    # Renew a token this long before Telphin says it expires.
    MARGIN = 60.0

    def __init__(self, http: HttpClient, clock: Any) -> None:
        self.http = http
        self.clock = clock
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._pending: dict[tuple[str, str], list[Deferred]] = {}

    async def _token(self, tenant: Tenant, fresh: bool = False) -> str:
        key = (tenant.pbx.api_url, tenant.pbx.client_id)
        cached = self._tokens.get(key)
        if cached and not fresh and cached[1] > self.clock.seconds():
            return cached[0]
        if key in self._pending:  # one token request per application at a time
            waiter: Deferred = Deferred()
            self._pending[key].append(waiter)
            return await waiter
        self._pending[key] = []
        try:
            token = await self._grant(tenant)
        except Exception as e:
            for waiter in self._pending.pop(key):
                waiter.errback(e)
            raise
        for waiter in self._pending.pop(key):
            waiter.callback(token)
        return token

    async def _grant(self, tenant: Tenant) -> str:
        if not tenant.pbx.api_url or not tenant.pbx.client_id:
            raise Permanent("pbx.api_url and pbx.client_id are not set")
        resp = await self.http.request("POST", f"{tenant.pbx.api_url}/oauth/token", data={
            "grant_type": "client_credentials",
            "client_id": tenant.pbx.client_id,
            "client_secret": tenant.pbx.client_secret,
        })
        raise_for(resp, "token")
        try:
            body = resp.json()
            token, lifetime = body["access_token"], float(body.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError):
            raise Retryable("token: unreadable answer", resp.status, resp.excerpt()) from None
        expires = self.clock.seconds() + max(0.0, lifetime - self.MARGIN)
        self._tokens[(tenant.pbx.api_url, tenant.pbx.client_id)] = (token, expires)
        return token

    async def _get(self, tenant: Tenant, path: str) -> Any:
        url = f"{tenant.pbx.api_url}/api/ver1.0{path}"
        for fresh in (False, True):
            token = await self._token(tenant, fresh=fresh)
            resp = await self.http.request("GET", url, headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json"})
            if resp.status == 401 and not fresh:
                continue  # the token expired early or was revoked: renew it once
            return raise_for(resp, path).json()

    async def _post(self, tenant: Tenant, path: str, body: dict[str, Any]) -> Any:
        url = f"{tenant.pbx.api_url}/api/ver1.0{path}"
        for fresh in (False, True):
            token = await self._token(tenant, fresh=fresh)
            resp = await self.http.request("POST", url, json=body, headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json"})
            if resp.status == 401 and not fresh:
                continue
            return raise_for(resp, path).json()

    async def callback(self, tenant: Tenant, extension_id: str, extension: str,
                       number: str) -> str:
        """Ring ``extension`` first, then ``number`` (telphin.md §6), showing the dialled
        number as the caller id so the employee can redial it (seed 002)."""
        body = await self._post(tenant, f"/extension/{extension_id}/callback/", {
            "src_num": [extension], "dst_num": number,
            "caller_id_name": number, "caller_id_number": number})
        call = body.get("call_id") if isinstance(body, dict) else None
        if not isinstance(call, str) or not call:
            raise Retryable("callback: no call_id in the answer")
        return call

    async def recording_url(self, tenant: Tenant, recording: str) -> str:
        """A direct link to a recording (``RecID``), as Telphin's storage hands it out."""
        body = await self._get(tenant, f"/client/@me/record/{recording}/storage_url/")
        url = body.get("record_url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url:
            raise Retryable("storage_url: no record_url in the answer")
        return url


@attrs.frozen
class TelphinConfig(PbxConfig):
    """A Telphin account: its login, and the REST application that reads its recordings and
    places click-to-call calls (both optional: events arrive without them)."""

    api_url: str = ""
    client_id: str = ""
    client_secret: str = attrs.field(default="", repr=False)
    # Short extension → Telphin's extension id, for click-to-call (the callback API is
    # addressed by id; telphin.md documents no lookup of ids by number).  [I]
    extension_ids: dict[str, str] = attrs.field(factory=dict)
    # The IVR variable call-interactive sets ("Transfer to number in variable" reads it).
    variable: str = "number"


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,31}")


@implementer(IPbx)
class Telphin:
    kind = "telphin"
    prefix = "events"
    secrets = ("client_secret",)
    config_type = TelphinConfig
    credential_fields = ("api_url", "client_id", "client_secret")

    def __init__(self, http: HttpClient, clock: Any) -> None:
        self.client = TelphinClient(http, clock)

    @staticmethod
    def parse_config(section: dict[str, Any]) -> TelphinConfig:
        field_only(section, "pbx", {f.name for f in attrs.fields(TelphinConfig)})
        ids = section.get("extension_ids", {})
        if not isinstance(ids, dict) or not all(
                isinstance(k, str) and isinstance(v, (str, int)) and not isinstance(v, bool)
                and str(v).isdigit() and len(str(v)) <= 20 for k, v in ids.items()):
            raise BadRequest("pbx.extension_ids", "must map extensions to numeric ids")
        variable = field_text(section, "pbx.variable") or "number"
        if not _VARIABLE.fullmatch(variable):
            raise BadRequest("pbx.variable", "1-32 letters, digits and '_', not starting with "
                             "a digit")
        credential = section.get("credential")
        return TelphinConfig(
            kind="telphin",
            login=field_login(section, "pbx.login"),
            api_url=field_url(section, "pbx.api_url", required=False),
            client_id=field_text(section, "pbx.client_id"),
            client_secret=field_text(section, "pbx.client_secret"),
            queues=field_numbers(section, "pbx.queues"),
            ivrs=field_numbers(section, "pbx.ivrs"),
            extension_ids={k: str(v) for k, v in ids.items()},
            variable=variable,
            credential=credential if isinstance(credential, int) else None,
        )

    def authenticate(self, request: Inbound, tenant: Tenant) -> None:
        # The key is part of the URL the PBX was given; a body field cannot stand in for it.
        if not hmac.compare_digest(request.query_key().encode(), tenant.key.encode()):
            raise BadRequest("key", "wrong or missing key", status=403)

    def parse(self, request: Inbound, tenant: Tenant, received: float) -> list[Event]:
        return [parse_event(request.form(), request.name, tenant.id, received)]

    @staticmethod
    def setup_guide(tenant: Tenant, base: str) -> list[dict[str, str]]:
        """The event URLs for the account's extensions (telphin.md §3.1: one per event,
        the same for dial-in and dial-out), and the IVR's call-interactive URL (§5)."""
        login, key = tenant.pbx.login, tenant.key
        out = [{"what": f"event {event}", "method": "POST",
                "url": f"{base}/events/{tenant.id}/{event}/{login}?key={key}"}
               for event in EVENT_KINDS]
        out.append({"what": "IVR rule Call interactive (then: transfer to the number in "
                            f"variable {tenant.pbx.variable})", "method": "POST",
                    "url": f"{base}/cid/{tenant.id}/getmanager/{login}?key={key}"})
        return out

    @staticmethod
    def is_lookup(request: Inbound) -> bool:
        return False  # call-interactive has its own URL, /cid/…

    @staticmethod
    def refusal(error: BadRequest) -> tuple[bytes, bytes]:
        return b"text/plain; charset=utf-8", f"{error}\n".encode()

    def recording_url(self, tenant: Tenant, recording: str) -> Deferred | None:
        if not tenant.pbx.api_url or not tenant.pbx.client_id:
            return None
        return ensureDeferred(self.client.recording_url(tenant, recording))

    def interactive_number(self, request: Inbound) -> str:
        fields = request.form()
        number = fields.get("CallerIDNum", "").strip()
        if not number:
            raise BadRequest("CallerIDNum", "required")
        if len(number) > MAX_NUMBER or _CONTROL.search(number):
            raise BadRequest("CallerIDNum", f"not a number of at most {MAX_NUMBER} characters")
        return number

    def interactive_answer(self, tenant: Tenant, extension: str | None) -> tuple[bytes, bytes]:
        """``<SetVar>`` with the manager's extension (telphin.md §5.2-5.3), or an empty
        ``<Response/>`` so the IVR goes on to its next rule."""
        head = '<?xml version="1.0" encoding="UTF-8"?>\n'
        if not extension:
            return b"text/xml; charset=utf-8", (head + "<Response/>\n").encode()
        name = quoteattr(tenant.pbx.variable)
        return b"text/xml; charset=utf-8", (
            f"{head}<Response><SetVar name={name}>{escape(extension)}</SetVar></Response>\n"
        ).encode()

    def call(self, tenant: Tenant, extension: str, number: str) -> Deferred:
        if not tenant.pbx.api_url or not tenant.pbx.client_id:
            raise Permanent("click-to-call needs pbx.api_url, pbx.client_id and "
                            "pbx.client_secret (a Telphin REST application)")
        short = extension.split("*")[-1]
        extension_id = tenant.pbx.extension_ids.get(short)
        if not extension_id:
            raise Permanent(f"pbx.extension_ids has no id for extension {short}: add "
                            f'"{short}": "<its id in the Telphin cabinet>"')
        return ensureDeferred(self.client.callback(tenant, extension_id, short, number))

    def hangup(self, tenant: Tenant, call: str) -> Deferred:
        raise NotImplementedError("Telphin's REST API as documented (telphin.md) has no way "
                                  "to end a call")
