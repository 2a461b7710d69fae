"""Telphin: its event webhooks parsed into normalised events, and its REST API (OAuth, recordings)."""

from __future__ import annotations

from typing import Any, Mapping

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient, retry_after
from gateway.model import Event, Tenant

log = Logger()

# URL event segment / EventType → normalised event kind.
EVENT_KINDS = {"dial-in": "ring", "dial-out": "ring", "answer": "answer", "hangup": "hangup"}


def _extension(value: str) -> tuple[str, str]:
    """``7001*101@sipproxy.telphin.ru`` → (``101``, ``7001*101``); plain ``101`` stays."""
    sip = value.split("@", 1)[0]
    return sip.rsplit("*", 1)[-1], sip


def _int(fields: Mapping[str, str], name: str, required: bool) -> int:
    value = fields.get(name, "")
    if not value:
        if required:
            raise BadRequest(name, "required")
        return 0
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(name, f"must be a whole number of microseconds, got {value[:40]!r}")
    return int(value)


def parse_event(fields: Mapping[str, str], url_event: str, tenant: int,
                received: float) -> Event:
    """One Telphin call event (form fields, first value of each) as a normalised event."""
    if url_event not in EVENT_KINDS:
        raise BadRequest("event", f"unknown event {url_event[:40]!r}; expected one of "
                         + ", ".join(EVENT_KINDS), status=404)
    event_type = fields.get("EventType", url_event)
    if event_type not in EVENT_KINDS:
        raise BadRequest("EventType", f"unknown event type {event_type[:40]!r}")
    if event_type != url_event:
        raise BadRequest("EventType", f"{event_type!r} arrived on the URL for {url_event!r}")
    for name in ("CallID", "SubCallID"):
        if not fields.get(name):
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
        extension, sip = _extension(fields.get("CalledExtension") or fields.get("CalledNumber", ""))
        # After an internal transfer the outside party is RemoteNumber, not the caller.
        peer = fields.get("RemoteNumber") or fields.get("CallerIDNum", "")
    else:
        extension, sip = _extension(fields.get("CallerExtension") or fields.get("CallerIDNum", ""))
        peer = fields.get("CalledNumber", "")
    return Event(
        tenant=tenant,
        call=fields["CallID"].lower(),
        leg=fields["SubCallID"],
        kind=EVENT_KINDS[event_type],
        flow=flow,
        at=_int(fields, "EventTime", required=True),
        received=received,
        extension=extension,
        sip=sip,
        peer=peer,
        did=fields.get("CalledDID", ""),
        status=fields.get("CallStatus", "").upper(),
        duration=_int(fields, "Duration", required=False),
        recording=fields.get("RecID", ""),
        bridged={"yes": True, "no": False}.get(bridged_text),
        transferred=fields.get("Transfered", "").lower() == "yes",
        callback=fields.get("CallBackID", ""),
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
