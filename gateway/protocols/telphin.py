"""Telphin: its event webhooks parsed into normalised events, and its REST API (OAuth, recordings)."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient, retry_after
from gateway.model import Event, Tenant

log = Logger()

# URL event segment / EventType → normalised event kind.
EVENT_KINDS = {"dial-in": "ring", "dial-out": "ring", "answer": "answer", "hangup": "hangup"}


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
        status=text["CallStatus"].upper(),
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
        if resp.status != 200:
            _raise_for(resp, "token")
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
            if resp.status != 200:
                _raise_for(resp, path)
            return resp.json()

    async def recording_url(self, tenant: Tenant, recording: str) -> str:
        """A direct link to a recording (``RecID``), as Telphin's storage hands it out."""
        body = await self._get(tenant, f"/client/@me/record/{recording}/storage_url/")
        url = body.get("record_url") if isinstance(body, dict) else None
        if not isinstance(url, str) or not url:
            raise Retryable("storage_url: no record_url in the answer")
        return url


def _raise_for(resp: Any, what: str) -> None:
    if resp.status == 429 or resp.status >= 500:
        raise Retryable(f"{what}: HTTP {resp.status}", resp.status, resp.excerpt(),
                        retry_after(resp))
    raise Permanent(f"{what}: HTTP {resp.status}", resp.status, resp.excerpt())
