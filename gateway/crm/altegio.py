"""Altegio (YCLIENTS): pop-ups, call history and setup through ``POST /voip/integration``."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import attrs
import hyperlink
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from gateway.crm import Command, CrmConfig, ICrm, plain_command, plain_guide
from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient, Response, raise_for
from gateway.model import (POPUP, RECORD, SETUP, Action, Inbound, Tenant, digits, e164,
                           field_only, field_text, field_url)

ACCEPT = "application/vnd.api.v2+json"
# Altegio allows 5 requests/s per source IP, whatever tenant they are for.  No burst: a
# bucket of 5 could send 10 within one second of the server's window.
RATE, BURST = 5.0, 1


def supports(kind: str, payload: dict[str, Any]) -> bool:
    """Altegio has incoming pop-ups, history and setup; no close, no answered, no contacts.

    ``event`` and ``history`` require the client's ``phone`` (altegio.md §2.1, §2.2), so a
    pop-up or a record of a call with no client number (an anonymous caller, an outgoing
    leg with no dialled number) is not made at all: Altegio would refuse it, a pop-up
    without a number shows no client, and a history entry it cannot attach to any client
    is no history.  [I]"""
    if kind == POPUP:
        return payload.get("direction") == "incoming" and bool(_client(payload))
    if kind == RECORD:
        return bool(_client(payload))
    return kind == SETUP


def account(tenant: Tenant) -> str:
    """The Altegio account a tenant's config names: the chain (``crm_token``) on its host.
    Tenants sharing it share its ``setup`` switch."""
    return f"{hyperlink.URL.from_text(tenant.crm.api_url).host}/{tenant.crm.crm_token}"


def limits(tenant: Tenant) -> list[tuple[str, float, int]]:
    """One bucket per Altegio host, shared by all tenants."""
    return [(f"altegio:{hyperlink.URL.from_text(tenant.crm.api_url).host}", RATE, BURST)]


def _plus(number: str) -> str:
    """Altegio's examples use +E.164; short or empty numbers pass as they are."""
    bare = e164(number)
    return f"+{bare}" if len(bare) > 6 else number


def _client(payload: dict[str, Any]) -> str:
    """The client's number, or "" when there is none: empty, blank, or with no digit at all
    (a withheld caller id such as ``anonymous``) is not a phone Altegio can use."""
    client = payload.get("client")
    if not isinstance(client, str) or not digits(client):
        return ""
    return client.strip()


def _user(tenant: Tenant, payload: dict[str, Any]) -> str:
    return payload["sip"] if tenant.routing == "sip" else payload["extension"]


def _date(tenant: Tenant, micros: int) -> str:
    tz = ZoneInfo(tenant.option("timezone"))
    return datetime.fromtimestamp(micros / 1_000_000, tz).replace(microsecond=0).isoformat()


def build(tenant: Tenant, action: Action, link: str | None = None) -> dict[str, Any]:
    """The JSON body for one action (pure: the scenario tests compare these)."""
    p = action.payload
    base = {"crm_token": tenant.crm.crm_token}
    if action.kind == SETUP:
        return {"command": "setup", "type": p["type"], **base}
    client = _client(p)
    if not client:
        # supports() keeps these out of the outbox; one queued before it did is refused
        # here, without a request Altegio would answer 422.
        raise ValueError("no client number: Altegio requires phone")
    diversion = _plus(p["did"] or tenant.company_number)
    body = {"command": "event" if action.kind == POPUP else "history", "type": p["direction"],
            **base, "phone": _plus(client), "diversion": diversion}
    user = _user(tenant, p)
    if user:
        body["user"] = user
    if action.kind == POPUP:
        return body
    body.update(duration=p["duration"], status=p["status"], call_id=p["record_id"],
                date=_date(tenant, p["started"]))
    if link:
        body["link"] = link
    return body


def _reason(error: Exception) -> str:
    text = str(error) or "no detail"
    return f"{type(error).__name__}: {text[:200]}"


async def perform(http: HttpClient, tenant: Tenant, action: Action,
                  link: str | None = None) -> tuple[str, Response]:
    """Send one action; returns (request summary, answer) or raises Retryable/Permanent."""
    try:
        body = build(tenant, action, link)
    except Exception as e:
        # build() is pure: what fails now (a date out of range, a missing payload key, an
        # unknown timezone) fails on every try, so it is a permanent failure with its
        # reason, re-drivable after a fix, never retried for --max-age.
        raise Permanent(f"cannot build the request: {_reason(e)}") from e
    url = f"{tenant.crm.api_url}/api/v1/voip/integration"
    summary = f"POST {url} {body['command']}/{body['type']}" + (
        f" call_id={body['call_id']}" if "call_id" in body else "")
    resp = await http.request("POST", url, json=body, headers={
        "Accept": ACCEPT,
        "Authorization": f"Bearer {tenant.crm.partner_token}",
    })
    return summary, raise_for(resp, summary)


@attrs.frozen
class AltegioConfig(CrmConfig):
    """An Altegio chain: the API host, the partner (developer) token that writes into any
    chain that installed the integration, and the chain's ``crm_token`` (altegio.md §1)."""

    api_url: str = ""
    partner_token: str = attrs.field(default="", repr=False)
    crm_token: str = attrs.field(default="", repr=False)


def _window(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 < seconds <= 3600:
        raise ValueError("--altegio-activation-window: seconds, more than 0 and at most "
                         "3600")
    return seconds


@implementer(ICrm)
class Altegio:
    kind = "altegio"
    # The crm_token names the chain to the partner token: with it, anyone holding the
    # partner token writes into the chain's account.
    secrets = ("partner_token", "crm_token")
    config_type = AltegioConfig
    credential_fields = ("api_url", "partner_token")
    has_responsible = False

    # The Marketplace (altegio.md §4): the owner's registration page and the lifecycle
    # webhook, served under /altegio/ (gateway.crm.ICrm.site_prefix).
    site_prefix = "altegio"
    # A registration (one visit of the redirect page) is useless after its activation
    # window; anyone can start one, so they go after twice the default window.
    transient_tokens = {"altegio-mp:reg:": 2 * 3600.0}
    gateway_options = [
        ["altegio-partner-token-file", None, "",
         "File holding the partner token of the gateway's Altegio Marketplace application "
         "(the registration page and the lifecycle webhook are off without it)."],
        ["altegio-application-id", None, "",
         "The id of the gateway's Altegio Marketplace application."],
        ["altegio-api-url", None, "https://api.alteg.io",
         "Altegio's API URL, the crm.api_url of tenants the Marketplace registers."],
        ["altegio-marketplace-url", None, "https://app.alteg.io",
         "Where the Marketplace callbacks go (POST /marketplace/partner/callback)."],
        ["altegio-frame-ancestors", None, "https://alteg.io https://*.alteg.io",
         "Origins allowed to frame the registration page (CSP frame-ancestors)."],
        ["altegio-activation-window", None, "3600",
         "Seconds after the owner's Connect within which the activation may go out "
         "(Altegio's contract: one hour; shorter only for tests)."],
    ]

    def __init__(self, http: HttpClient, clock: Any = None, store: Any = None) -> None:
        self.http = http
        from gateway.crm.altegio_marketplace import Settings
        self.settings = Settings()
        self.marketplace: Any = None

    def configure(self, options: Any) -> None:
        """The gateway's Marketplace settings from its twistd options (``gateway_options``);
        ``ValueError`` saying which is wrong."""
        from gateway.crm.altegio_marketplace import Settings
        token = ""
        path = options.get("altegio-partner-token-file") or ""
        if path:
            try:
                with open(path) as f:
                    token = f.read().strip()
            except OSError as e:
                raise ValueError(f"--altegio-partner-token-file: {e}") from None
            if not token:
                raise ValueError(f"--altegio-partner-token-file: {path} is empty")
        app = str(options.get("altegio-application-id") or "").strip()
        if app and not (app.isascii() and app.isdigit()):
            raise ValueError("--altegio-application-id: a positive integer")
        if bool(token) != bool(app):
            raise ValueError("--altegio-partner-token-file and --altegio-application-id go "
                             "together")
        defaults = Settings()
        self.settings = Settings(
            partner_token=token, application_id=int(app or 0),
            api_url=(options.get("altegio-api-url") or defaults.api_url).rstrip("/"),
            marketplace_url=(options.get("altegio-marketplace-url")
                             or defaults.marketplace_url).rstrip("/"),
            frame_ancestors=options.get("altegio-frame-ancestors")
            or defaults.frame_ancestors,
            window=_window(options.get("altegio-activation-window") or defaults.window))

    def site(self, gateway: Any) -> Any:
        """The twisted.web resource of ``/altegio/…`` (the Marketplace)."""
        from gateway.crm.altegio_marketplace import Marketplace
        if self.marketplace is None or self.marketplace.gw is not gateway:
            self.marketplace = Marketplace(self, gateway)
        return self.marketplace.resource()

    @staticmethod
    def parse_config(section: dict[str, Any]) -> AltegioConfig:
        field_only(section, "crm", {f.name for f in attrs.fields(AltegioConfig)})
        credential = section.get("credential")
        return AltegioConfig(
            kind="altegio",
            api_url=field_url(section, "crm.api_url", required=True),
            partner_token=field_text(section, "crm.partner_token", required=True),
            crm_token=field_text(section, "crm.crm_token", required=True),
            credential=credential if isinstance(credential, int) else None,
        )

    @staticmethod
    def check_tenant(tenant: Tenant) -> None:
        # Altegio requires ``diversion`` (the company number) on every call; an outgoing
        # call has no DID of its own, so it takes options.default_number, else the first
        # of numbers.  With neither, every outgoing record would be refused 422.
        if not tenant.company_number:
            raise BadRequest("options.default_number", "required when numbers is empty: "
                             "Altegio needs the company number of outgoing calls")

    @staticmethod
    def account(tenant: Tenant) -> str:
        return account(tenant)

    @staticmethod
    def supports(tenant: Tenant, kind: str, payload: dict[str, Any]) -> bool:
        return supports(kind, payload)

    @staticmethod
    def limits(tenant: Tenant) -> list[tuple[str, float, int]]:
        return limits(tenant)

    def perform(self, tenant: Tenant, action: Action, link: str | None) -> Deferred:
        if action.kind == SETUP and action.payload.get("type") in ("activate", "lifecycle"):
            return ensureDeferred(self._marketplace(tenant, action))
        return ensureDeferred(perform(self.http, tenant, action, link))

    async def _marketplace(self, tenant: Tenant, action: Action) -> tuple[str, Response]:
        if self.marketplace is None:
            raise Retryable("the Marketplace is not started (no public site yet)")
        return await self.marketplace.perform(tenant, action)

    def responsible(self, tenant: Tenant, number: str) -> Deferred:
        raise NotImplementedError("Altegio has no responsible-manager lookup")

    @staticmethod
    def setup_guide(tenant: Tenant, base: str) -> list[dict[str, str]]:
        return plain_guide(tenant, base)

    @staticmethod
    def command(request: Inbound, tenant: Tenant, action: str) -> Command:
        # Altegio has no click-to-call of its own (altegio.md): the gateway's plain form,
        # authenticated by the tenant's key, for a button an operator sets up.
        return plain_command(request, tenant, action)
