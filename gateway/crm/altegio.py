"""Altegio (YCLIENTS): pop-ups, call history and setup through ``POST /voip/integration``."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import hyperlink

from gateway.errors import Permanent, Retryable
from gateway.httpclient import HttpClient, Response, retry_after
from gateway.model import POPUP, RECORD, SETUP, Action, Tenant, e164

ACCEPT = "application/vnd.api.v2+json"
# Altegio allows 5 requests/s per source IP, whatever tenant they are for.  No burst: a
# bucket of 5 could send 10 within one second of the server's window.
RATE, BURST = 5.0, 1


def supports(kind: str, payload: dict[str, Any]) -> bool:
    """Altegio has incoming pop-ups, history and setup; no close, no answered, no contacts."""
    if kind == POPUP:
        return payload.get("direction") == "incoming"
    return kind in (RECORD, SETUP)


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
    diversion = _plus(p["did"] or tenant.option("default_number"))
    body = {"command": "event" if action.kind == POPUP else "history", "type": p["direction"],
            **base, "phone": _plus(p["client"]), "diversion": diversion}
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


async def perform(http: HttpClient, tenant: Tenant, action: Action,
                  link: str | None = None) -> tuple[str, Response]:
    """Send one action; returns (request summary, answer) or raises Retryable/Permanent."""
    body = build(tenant, action, link)
    url = f"{tenant.crm.api_url}/api/v1/voip/integration"
    summary = f"POST {url} {body['command']}/{body['type']}" + (
        f" call_id={body['call_id']}" if "call_id" in body else "")
    resp = await http.request("POST", url, json=body, headers={
        "Accept": ACCEPT,
        "Authorization": f"Bearer {tenant.crm.partner_token}",
    })
    if 200 <= resp.status < 300:
        return summary, resp
    if resp.status == 429 or resp.status >= 500 or resp.status == 408:
        raise Retryable(f"{summary}: HTTP {resp.status}", resp.status, resp.excerpt(),
                        retry_after(resp))
    raise Permanent(f"{summary}: HTTP {resp.status}", resp.status, resp.excerpt())
