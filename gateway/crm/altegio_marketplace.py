"""The Altegio Marketplace: the owner's registration page, activation of each location, and
the lifecycle webhook (altegio.md §4).

Routes (served under the Altegio module's ``site_prefix``, see ``gateway.crm.ICrm``):

* ``GET /altegio/register?salon_id=…&salon_group_id=…&salon_ids[]=…&crm_token=…`` — where
  Altegio sends the owner after "Connect": the registration is stored (so nothing is lost
  if the form is abandoned or the gateway restarts) and the form is shown;
* ``POST /altegio/register`` — the form: the chain's tenant is created or updated, every
  location of the redirect gets an activation action in the outbox (status first, then
  ``POST /marketplace/partner/callback``: retried on 5xx until the hour is over), then the
  tenant is saved enabled, which queues ``setup``/``enable`` (``Gateway.save_tenant``); the
  answer shows the activation state and what is left to do;
* ``POST /altegio/webhook`` — ``uninstall`` / ``freeze`` / ``payment``: checked against the
  partner token, recorded, acknowledged, then processed from the outbox.

State lives in the store's token table (``altegio-mp:…`` keys): registrations, chains
(tenant, connected and frozen locations) and the location → chain index.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import secrets
import uuid
from typing import Any
from urllib.parse import parse_qsl

import attrs
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import raise_for
from gateway.model import DONE, PENDING, SETUP, Action, Tenant, parse_tenant
from gateway.web import answer, same_origin

log = Logger()

# Activation must reach Altegio within this many seconds of the redirect (altegio.md §4.1).
WINDOW = 3600.0
ACCEPT = "application/vnd.api.v2+json"
# SETUP actions whose payload ``type`` is one of these are the Marketplace's, not ``setup``.
ACTIVATE, LIFECYCLE = "activate", "lifecycle"
TYPES = (ACTIVATE, LIFECYCLE)
EVENTS = ("uninstall", "freeze", "payment", "active")
MAX_LOCATIONS = 200
REG, CHAIN, SALON = "altegio-mp:reg:", "altegio-mp:chain:", "altegio-mp:salon:"
# What the owner sees as "connect again": the Marketplace (the app card's own address is not
# documented) [I].
MARKETPLACE_PAGE = "https://alteg.io/en/marketplace/"
# The PBX config fields the form never asks for: lists, maps and ids an operator sets.
_NOT_ASKED = {"kind", "login", "queues", "ivrs", "credential"}


@attrs.frozen
class Settings:
    """The gateway's one Marketplace application (not a tenant's)."""

    partner_token: str = attrs.field(default="", repr=False)
    application_id: int = 0
    api_url: str = "https://api.alteg.io"  # the tenants' crm.api_url (POST /voip/integration)
    marketplace_url: str = "https://app.alteg.io"  # /marketplace/partner/callback, status
    frame_ancestors: str = "https://alteg.io https://*.alteg.io"
    marketplace_page: str = MARKETPLACE_PAGE
    # Altegio's contract is one hour (§4.1); shorter only for tests of a late submission.
    window: float = WINDOW

    @property
    def configured(self) -> bool:
        return bool(self.partner_token and self.application_id)


def verify_user_data(user_data: str, sign: str, partner_token: str) -> dict | None:
    """``user_data`` (base64 JSON) when ``user_data_sign`` checks out, else None.

    The algorithm is an open question (altegio.md §4.1): the most plausible one, used by
    third-party integrations, is HMAC-SHA256 keyed with the partner token over the
    ``user_data`` string as received, hex-encoded.  This is the one place to change it."""
    if not user_data or not sign or not partner_token:
        return None
    expected = hmac.new(partner_token.encode(), user_data.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), sign.strip().lower().encode()):
        return None
    try:
        padded = user_data + "=" * (-len(user_data) % 4)
        data = json.loads(base64.b64decode(padded, altchars=b"-_" if "-" in user_data
                                           or "_" in user_data else None))
    except Exception:
        return None
    return data if isinstance(data, dict) else None


def _ids(values: list[str]) -> list[int]:
    out: list[int] = []
    for value in values:
        value = value.strip()
        if not (value.isascii() and value.isdigit() and 0 < len(value) <= 18):
            raise BadRequest("salon_id", "location ids are positive integers")
        if int(value) not in out:
            out.append(int(value))
    return out


def pbx_fields(module: Any) -> list[tuple[str, bool]]:
    """(field, secret) the form asks for a PBX kind: its login, then the string fields of
    its config schema (its ``credential_fields`` first)."""
    names = ["login", *module.credential_fields]
    for f in attrs.fields(module.config_type):
        if f.name not in _NOT_ASKED and f.name not in names and isinstance(f.default, str):
            names.append(f.name)
    return [(name, name in module.secrets) for name in names]


class Marketplace:
    """The Marketplace side of the Altegio module, for one gateway."""

    def __init__(self, module: Any, gateway: Any) -> None:
        self.module = module
        self.gw = gateway
        self.lock = DeferredLock()  # lifecycle bookkeeping, one webhook at a time
        self._waiting: dict[int, list[Deferred]] = {}  # tenant → held freeze actions

    @property
    def settings(self) -> Settings:
        return self.module.settings

    def now(self) -> float:
        return self.gw.reactor.seconds()

    # Stored state

    async def _get(self, key: str) -> dict | None:
        return await self.gw.store.token(key)

    async def _put(self, key: str, data: dict) -> None:
        await self.gw.store.put_token(key, data)

    # Outbound: performed from the outbox (Altegio.perform hands SETUP actions of TYPES here)

    async def perform(self, tenant: Tenant, action: Action) -> tuple[str, Any]:
        if action.payload["type"] == ACTIVATE:
            return await self._activate(tenant, action)
        return await self._lifecycle(tenant, action)

    def _headers(self) -> dict[str, str]:
        return {"Accept": ACCEPT, "Authorization": f"Bearer {self.settings.partner_token}",
                "Content-Type": "application/json"}

    async def status(self, salon: int) -> str | None:
        """The location's link status (pending / active / freezed), None when unknown."""
        s = self.settings
        url = f"{s.marketplace_url}/marketplace/salon/{salon}/application/{s.application_id}"
        resp = await self.gw.http.request("GET", url, headers=self._headers())
        if resp.status == 404:
            return None
        raise_for(resp, f"GET {url}")
        try:
            return json.loads(resp.body)["data"]["connection_status"]["status"]
        except Exception:
            raise Retryable(f"GET {url}: unreadable status", resp.status,
                            resp.excerpt()) from None

    async def _activate(self, tenant: Tenant, action: Action) -> tuple[str, Any]:
        p = action.payload
        salon = p["salon_id"]
        if self.now() > p["deadline"]:
            raise Permanent(f"location {salon}: the hour to activate after the owner's "
                            "Connect has passed; the owner must connect again from the "
                            "Marketplace")
        if not self.settings.configured:
            raise Retryable("the Marketplace partner token or application id is not set")
        if await self.status(salon) == "active":
            return f"location {salon} already active: not activated again", _Done(200)
        s = self.settings
        url = f"{s.marketplace_url}/marketplace/partner/callback"
        body = {"salon_id": salon, "application_id": s.application_id,
                "api_key": p["api_key"], "webhook_urls": p["webhook_urls"]}
        summary = f"POST {url} activate location {salon}"
        resp = await self.gw.http.request("POST", url, json=body, headers=self._headers())
        return summary, raise_for(resp, summary)

    async def _lifecycle(self, tenant: Tenant, action: Action) -> tuple[str, Any]:
        event, salon = action.payload["event"], action.payload["salon_id"]
        summary = f"lifecycle {event} of location {salon}"
        if event == "freeze":
            # Held here, in flight, while the chain stays frozen: the tenant's actions
            # queued meanwhile wait behind this one (the dispatcher parks a tenant's call
            # actions behind its tenant-level ones) and go in order once it is done.
            while (await self._chain_of(tenant.id) or {}).get("frozen"):
                waiting: Deferred = Deferred()
                self._waiting.setdefault(tenant.id, []).append(waiting)
                await waiting
            return summary + ": delivery resumed", _Done(200)
        if event == "uninstall":
            chain = await self._chain_of(tenant.id)
            if chain is None or not chain.get("salons"):
                async with self.gw.writes:
                    current = self.gw.tenants.get(tenant.id)
                    if current is not None and current.enabled:
                        # save_tenant sends setup/disable unless another tenant still
                        # uses the chain's account.
                        await self.gw.save_tenant(attrs.evolve(current, enabled=False),
                                                  current)
                return summary + ": no location uses the app any more, tenant disabled", \
                    _Done(200)
            return summary + f": locations {chain['salons']} still use the app", _Done(200)
        return summary + ": delivery goes on", _Done(200)

    async def _chain_of(self, tenant_id: int) -> dict | None:
        index = await self._get(f"{CHAIN}tenant:{tenant_id}")
        return await self._get(f"{CHAIN}{index['group']}") if index else None

    def _wake(self, tenant_id: int) -> None:
        for waiting in self._waiting.pop(tenant_id, []):
            waiting.callback(None)

    # Inbound: the site

    def resource(self) -> Resource:
        return _Site(self)

    async def webhook(self, body: bytes) -> tuple[int, dict]:
        """A lifecycle webhook: (status, answer)."""
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return 400, {"error": "not JSON"}
        if not isinstance(data, dict):
            return 400, {"error": "must be a JSON object"}
        if "event" not in data and "resource" in data:
            # An entity webhook (§4.6) to the webhook_urls given at activation: not needed
            # for telephony, taken and dropped (Altegio never retries them).
            return 202, {"ok": True, "ignored": "entity webhook"}
        token = data.get("partner_token")
        mine = self.settings.partner_token
        if not mine or not isinstance(token, str) or not hmac.compare_digest(
                token.encode(), mine.encode()):
            log.warn("Altegio lifecycle webhook refused: wrong partner token")
            return 403, {"error": "wrong partner token"}
        event, salon = data.get("event"), data.get("salon_id")
        if isinstance(salon, str) and salon.isdigit():
            salon = int(salon)
        if str(data.get("application_id")) != str(self.settings.application_id):
            return 403, {"error": "not this gateway's application"}
        if event not in EVENTS or not isinstance(salon, int) or isinstance(salon, bool):
            return 400, {"error": f"event must be one of {', '.join(EVENTS)} with salon_id"}
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:32]
        async with self.lock:
            index = await self._get(f"{SALON}{salon}")
            if index is None:
                log.info("Altegio {event} for location {salon}: not registered here, ignored",
                         event=event, salon=salon)
                return 200, {"ok": True, "ignored": "unknown location"}
            if index.get("last") == digest:
                return 200, {"ok": True, "duplicate": True}
            chain = await self._get(f"{CHAIN}{index['group']}") or {}
            tenant = self.gw.tenants.get(chain.get("tenant"))
            if tenant is None:
                return 200, {"ok": True, "ignored": "no tenant"}
            frozen = set(chain.get("frozen", []))
            salons = list(chain.get("salons", []))
            if event == "freeze":
                frozen.add(salon)
            else:
                frozen.discard(salon)
            if event == "uninstall" and salon in salons:
                salons.remove(salon)
            chain.update(frozen=sorted(frozen), salons=salons)
            now = self.now()
            action = Action(tenant=tenant.id, call="", kind=SETUP,
                            key=f"altegio-lifecycle:{digest}:{int(now * 1e6)}",
                            payload={"type": LIFECYCLE, "event": event, "salon_id": salon},
                            created=now)
            # The chain's state first: a payment wakes a held freeze at once; the action
            # (written before the answer) does the rest from the outbox.
            await self._put(f"{CHAIN}{index['group']}", chain)
            await self._put(f"{SALON}{salon}", {**index, "last": digest})
            async with self.gw.writes:
                stored = await self.gw.store.put_tenant_with_action(
                    self.gw.tenants[tenant.id], action, now)
            self.gw.dispatcher.add([stored])
            if not frozen:
                self._wake(tenant.id)
        log.info("Altegio {event} for location {salon} (tenant {tenant}) accepted",
                 event=event, salon=salon, tenant=tenant.id)
        return 200, {"ok": True}

    async def start(self, query: dict[str, list[str]]) -> dict:
        """The redirect: a registration, stored."""
        group = _ids(query.get("salon_group_id", []))
        salons = _ids(query.get("salon_ids[]", []) + query.get("salon_id", []))
        if not salons:
            raise BadRequest("salon_id", "the redirect names no location")
        if len(salons) > MAX_LOCATIONS:
            raise BadRequest("salon_ids", f"more than {MAX_LOCATIONS} locations")
        token = (query.get("crm_token") or [""])[0].strip()
        if not token or len(token) > 200:
            raise BadRequest("crm_token", "the redirect has no crm_token")
        user = verify_user_data((query.get("user_data") or [""])[0],
                                (query.get("user_data_sign") or [""])[0],
                                self.settings.partner_token)
        rid = secrets.token_urlsafe(24)
        reg = {"id": rid, "received": self.now(), "group": group[0] if group else salons[0],
               "salons": salons, "crm_token": token, "user": user, "actions": {},
               "tenant": None}
        await self._put(REG + rid, reg)
        log.info("Altegio registration started for chain {group}, locations {salons}",
                 group=reg["group"], salons=salons)
        return reg

    async def registration(self, rid: str) -> dict | None:
        if not rid or len(rid) > 64:
            return None
        return await self._get(REG + rid)

    def left(self, reg: dict) -> float:
        return reg["received"] + self.settings.window - self.now()

    def tenant_of(self, reg: dict, chain: dict | None) -> Tenant | None:
        tid = (chain or {}).get("tenant")
        tenant = self.gw.tenants.get(tid) if tid is not None else None
        return tenant if tenant is not None and not tenant.deleted else None

    async def chain(self, reg: dict) -> dict | None:
        return await self._get(f"{CHAIN}{reg['group']}")

    async def submit(self, reg: dict, form: dict[str, str]) -> Tenant:
        """The form: the tenant saved, activations queued; BadRequest naming a form field."""
        now = self.now()
        async with self.gw.writes:
            # Read again under the lock: a double submit's second request waits here and
            # then sees the first one's tenant and actions.
            reg.update(await self._get(REG + reg["id"]) or {})
            chain = await self.chain(reg) or {"salons": [], "frozen": []}
            current = self.tenant_of(reg, chain)
            body = self._body(reg, form, current)
            if current is None:
                tid = max([0, *self.gw.tenants]) + 1
                new = parse_tenant({**body, "id": tid, "enabled": False}, None,
                                   self.gw.credentials)
                await self.gw.save_tenant(new, None)
                previous = new
            else:
                new = parse_tenant(body, current, self.gw.credentials)
                previous = current
            # Activations first, then the tenant saved enabled (setup/enable after them,
            # on the same tenant-level chain of the outbox).
            queued = dict(reg.get("actions", {}))
            for salon in reg["salons"]:
                if str(salon) in queued:
                    continue  # a second submit of the same registration
                action = Action(
                    tenant=previous.id, call="", kind=SETUP,
                    key=f"altegio-activate:{reg['id']}:{salon}", created=now,
                    payload={"type": ACTIVATE, "salon_id": salon,
                             "deadline": reg["received"] + self.settings.window,
                             "api_key": str(uuid.uuid4()),
                             "webhook_urls": [f"{self.gw.public_url}/altegio/webhook"]})
                stored = await self.gw.store.put_tenant_with_action(previous, action, now)
                self.gw.dispatcher.add([stored])
                queued[str(salon)] = stored.id
            await self.gw.save_tenant(attrs.evolve(new, enabled=True), previous)
            chain["tenant"] = new.id
            chain["salons"] = sorted(set(chain.get("salons", [])) | set(reg["salons"]))
            await self._put(f"{CHAIN}{reg['group']}", chain)
            await self._put(f"{CHAIN}tenant:{new.id}", {"group": reg["group"]})
            for salon in reg["salons"]:
                old = await self._get(f"{SALON}{salon}") or {}
                await self._put(f"{SALON}{salon}", {**old, "group": reg["group"]})
            reg.update(actions=queued, tenant=new.id)
            await self._put(REG + reg["id"], reg)
        log.info("Altegio chain {group}: tenant {tenant} saved, locations {salons} queued "
                 "for activation", group=reg["group"], tenant=new.id, salons=reg["salons"])
        return self.gw.tenants[new.id]

    def _body(self, reg: dict, form: dict[str, str], current: Tenant | None) -> dict:
        kind = form.get("pbx_kind", "")
        if kind not in self.gw.pbxs:
            raise BadRequest("pbx_kind", "choose your PBX")
        pbx: dict[str, Any] = {"kind": kind}
        same = current is not None and current.pbx.kind == kind
        for name, secret in pbx_fields(self.gw.pbxs[kind]):
            value = form.get(f"pbx.{kind}.{name}", "").strip()
            if value or not same:
                if value or not secret:
                    pbx[name] = value
        numbers = [n.strip() for n in form.get("numbers", "").replace(",", "\n").splitlines()
                   if n.strip()]
        if not numbers:
            raise BadRequest("numbers", "at least one virtual number")
        s = self.settings
        body: dict[str, Any] = {
            "name": (form.get("name") or "").strip()[:100]
            or f"Altegio chain {reg['group']}",
            "pbx": pbx, "numbers": numbers, "routing": form.get("routing", ""),
            "crm": {"kind": "altegio", "api_url": s.api_url,
                    "partner_token": s.partner_token, "crm_token": reg["crm_token"]},
        }
        if not same:
            # Another PBX: its whole section, not a patch of the old one.
            body["pbx"] = {**pbx, "queues": [], "ivrs": []}
        return body

    async def activations(self, reg: dict) -> list[dict]:
        """Each location of the registration with its activation's state."""
        out = []
        for salon in reg["salons"]:
            aid = reg.get("actions", {}).get(str(salon))
            row = await self.gw.store.action(aid) if aid is not None else None
            state = row["state"] if row else "not queued"
            out.append({"salon": salon, "state": state,
                        "attempts": row["attempts"] if row else 0,
                        "error": (row.get("last_error") or "") if row else ""})
        return out


@attrs.frozen
class _Done:
    """The answer of a step performed without a request of its own."""

    status: int

    def excerpt(self) -> str:
        return ""


# The site

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:12px;max-width:640px;color:#222}
h1{font-size:1.3em}fieldset{border:1px solid #ccc;margin:0 0 12px;padding:8px}
label{display:block;margin:8px 0 2px;font-weight:600}
input,select,textarea{width:100%;box-sizing:border-box;font-size:16px;padding:6px}
.error{color:#b00020;font-weight:600}.field-error{color:#b00020;font-size:.9em}
.left{background:#fff3cd;padding:6px}.late{background:#f8d7da;padding:8px}
code{word-break:break-all}button{font-size:16px;padding:8px 16px;margin-top:8px}
li{margin:4px 0}
"""

_SCRIPT = """
(function(){var s=document.getElementById('pbx_kind');if(!s)return;
function show(){var fs=document.querySelectorAll('fieldset[data-kind]');
for(var i=0;i<fs.length;i++){fs[i].hidden=fs[i].getAttribute('data-kind')!==s.value;}}
s.addEventListener('change',show);show();
var left=document.getElementById('left');if(left){var end=Date.now()+1000*
parseInt(left.getAttribute('data-seconds'),10);setInterval(function(){var t=Math.max(0,
Math.round((end-Date.now())/1000));left.textContent=Math.floor(t/60)+' min '+(t%60)+' s';},1000);}
})();
"""

ALTEGIO_STEPS = [
    "In Altegio, open Network → Telephony: the sections Routing, Routes and Calls appear "
    "and the status says \"Integration connected\".",
    "In Routes, open the route (by default \"Route for all users\") and choose where the "
    "call is shown: \"call history of the network and all salons\" (a pop-up in every "
    "branch) or \"history of network calls and notified salons\" (the branches you pick). "
    "With the default setting there are no pop-ups, only the network's call history.",
    "In Routing, tie the route to the phone number, SIP or extension calls arrive on: "
    "the number without '+', brackets, dashes or spaces; save.",
    "Make a test call: a pop-up for an incoming call, then the call in the history.",
]


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


class _Site(Resource):
    """``/altegio/register`` and ``/altegio/webhook`` (leaf: plain dispatch)."""

    isLeaf = True

    def __init__(self, mp: Marketplace) -> None:
        super().__init__()
        self.mp = mp

    def render(self, request: Any) -> Any:
        path = [p.decode("latin-1") for p in request.postpath[1:]]
        if path == ["webhook"]:
            handler = self._webhook
        elif path == ["register"]:
            handler = self._register
        else:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found\n"
        d = ensureDeferred(handler(request))

        def failed(f: Any) -> None:
            log.failure("Altegio Marketplace: {method} {path} failed", f,
                        method=request.method.decode("ascii", "replace"), path="/".join(path))
            if not request.finished:
                request.setResponseCode(500)
                request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
                request.write(b"internal error (logged)\n")
                request.finish()

        d.addErrback(failed)
        return NOT_DONE_YET

    def _body(self, request: Any) -> bytes:
        limit = self.mp.gw.max_body
        body = request.content.read(limit + 1) if request.content is not None else b""
        if len(body) > limit:
            raise BadRequest("body", f"larger than {limit} bytes", status=413)
        return body

    @staticmethod
    def _finish(request: Any, status: int, ctype: bytes, body: bytes) -> None:
        answer(request, status, ctype, body)

    async def _webhook(self, request: Any) -> None:
        if request.method != b"POST":
            request.setHeader(b"Allow", b"POST")
            return self._finish(request, 405, b"text/plain", b"use POST\n")
        try:
            status, answer = await self.mp.webhook(self._body(request))
        except BadRequest as e:
            status, answer = e.status, {"error": str(e)}
        self._finish(request, status, b"application/json",
                     json.dumps(answer).encode() + b"\n")

    # The page

    def _headers(self, request: Any, nonce: str) -> None:
        ancestors = self.mp.settings.frame_ancestors
        request.setHeader(b"Content-Security-Policy", (
            f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
            f"img-src 'self'; form-action 'self'; base-uri 'none'; "
            f"frame-ancestors {ancestors}").encode())
        # The URL holds crm_token: never sent to another site; same-origin requests keep their
        # Origin (with no-referrer, a form post says "Origin: null").
        request.setHeader(b"Referrer-Policy", b"same-origin")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")

    def _page(self, request: Any, status: int, title: str, content: str) -> None:
        nonce = secrets.token_urlsafe(12)
        self._headers(request, nonce)
        page = (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
                f"<meta name=viewport content='width=device-width,initial-scale=1'>"
                f"<title>{_e(title)}</title><style nonce='{nonce}'>{_STYLE}</style></head>"
                f"<body><h1>{_e(title)}</h1>{content}"
                f"<script nonce='{nonce}'>{_SCRIPT}</script></body></html>")
        self._finish(request, status, b"text/html; charset=utf-8", page.encode())

    def _late(self, request: Any) -> None:
        link = self.mp.settings.marketplace_page
        self._page(request, 410, "Connect again from the Altegio Marketplace", (
            "<p class=late id=late>More than an hour has passed since you pressed Connect "
            "in the Altegio Marketplace, and Altegio no longer accepts the activation. "
            f"Please connect again from the <a href='{_e(link)}' target=_top>Altegio "
            "Marketplace</a>: nothing you saved before is lost.</p>"))

    async def _register(self, request: Any) -> None:
        if request.method == b"GET":
            query: dict[str, list[str]] = {}
            raw = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
            for name, value in parse_qsl(raw.decode("utf-8", "replace"),
                                         keep_blank_values=True):
                query.setdefault(name, []).append(value)
            if not self.mp.settings.configured:
                return self._page(request, 503, "Not available", "<p class=error>The "
                                  "gateway's Marketplace application is not configured.</p>")
            try:
                reg = await self.mp.start(query)
            except BadRequest as e:
                return self._page(request, 400, "This link is incomplete", (
                    f"<p class=error>{_e(e)}</p><p>Open the app again from the "
                    f"<a href='{_e(self.mp.settings.marketplace_page)}' target=_top>"
                    "Altegio Marketplace</a>.</p>"))
            return await self._form(request, reg, {}, {})
        if request.method != b"POST":
            request.setHeader(b"Allow", b"GET, POST")
            return self._finish(request, 405, b"text/plain", b"use GET or POST\n")
        if not same_origin(request):
            return self._page(request, 403, "Refused", "<p class=error>This form must be "
                              "sent from the gateway's own page.</p>")
        try:
            form = dict(parse_qsl(self._body(request).decode("utf-8", "replace"),
                                  keep_blank_values=True))
        except BadRequest as e:
            return self._page(request, e.status, "Refused", f"<p class=error>{_e(e)}</p>")
        # The registration id is the form's CSRF token: random, stored server-side at the
        # redirect, only ever in this page.
        reg = await self.mp.registration(form.get("registration", ""))
        if reg is None:
            return self._page(request, 403, "Refused", "<p class=error>This form has "
                              "expired or was not issued by the gateway. Open the app again "
                              "from the Altegio Marketplace.</p>")
        if form.get("step") == "status" and reg.get("tenant") is not None:
            return await self._done(request, reg)
        if self.mp.left(reg) <= 0:
            return self._late(request)
        try:
            await self.mp.submit(reg, form)
        except BadRequest as e:
            return await self._form(request, reg, form, {self._field(e.field, form): str(e)})
        return await self._done(request, reg)

    @staticmethod
    def _field(field: str, form: dict[str, str]) -> str:
        """The form input a tenant field's error belongs to."""
        if field.startswith("pbx.") and field != "pbx.kind":
            return f"pbx.{form.get('pbx_kind', '')}.{field[4:]}"
        if field in ("pbx", "pbx.kind"):
            return "pbx_kind"
        if field.startswith("options.") or field == "numbers":
            return "numbers"
        return field

    async def _form(self, request: Any, reg: dict, form: dict[str, str],
                    errors: dict[str, str]) -> None:
        mp = self.mp
        chain = await mp.chain(reg)
        current = mp.tenant_of(reg, chain)
        left = max(0, int(mp.left(reg)))
        known = set((chain or {}).get("salons", []))
        out = [f"<p>Locations being connected (chain {_e(reg['group'])}):</p><ul id=locations>"]
        for salon in reg["salons"]:
            note = " — already connected" if salon in known else ""
            out.append(f"<li>Location {_e(salon)}{_e(note)}</li>")
        out.append("</ul>")
        out.append(f"<p class=left>Time left to finish: <span id=left data-seconds={left}>"
                   f"{left // 60} min {left % 60} s</span>. After that, connect again from "
                   "the Altegio Marketplace.</p>")
        if errors:
            out.append("<p class=error id=errors>Please correct the fields marked below.</p>")
        if current is not None:
            out.append("<p>This chain is already connected: change what you need; leave a "
                       "password empty to keep the saved one.</p>")
        out.append(f"<form method=post action='register' id=register>"
                   f"<input type=hidden name=registration value='{_e(reg['id'])}'>"
                   "<input type=hidden name=step value=submit>")

        def value(name: str, default: str = "") -> str:
            return form.get(name, default)

        def err(name: str) -> str:
            return (f"<div class=field-error id='error-{_e(name)}'>{_e(errors[name])}</div>"
                    if name in errors else "")

        default_name = current.name if current else (
            str((reg.get("user") or {}).get("company") or (reg.get("user") or {}).get("name")
                or "") or f"Altegio chain {reg['group']}")
        out.append(f"<label for=name>Name of this integration</label><input id=name "
                   f"name=name value='{_e(value('name', default_name))}' maxlength=100>"
                   f"{err('name')}")
        chosen = value("pbx_kind", current.pbx.kind if current else "")
        out.append("<label for=pbx_kind>Your PBX</label><select id=pbx_kind name=pbx_kind>"
                   "<option value=''>— choose —</option>")
        for kind in sorted(mp.gw.pbxs):
            sel = " selected" if kind == chosen else ""
            out.append(f"<option value='{_e(kind)}'{sel}>{_e(kind)}</option>")
        out.append(f"</select>{err('pbx_kind')}")
        for kind in sorted(mp.gw.pbxs):
            module = mp.gw.pbxs[kind]
            out.append(f"<fieldset data-kind='{_e(kind)}'><legend>{_e(kind)} account</legend>")
            for name, secret in pbx_fields(module):
                key = f"pbx.{kind}.{name}"
                saved = ""
                if current is not None and current.pbx.kind == kind and not secret:
                    saved = str(getattr(current.pbx, name, "") or "")
                shown = "" if secret else value(key, saved)
                kind_attr = "password" if secret else "text"
                out.append(f"<label for='{_e(key)}'>{_e(name.replace('_', ' '))}</label>"
                           f"<input id='{_e(key)}' name='{_e(key)}' type={kind_attr} "
                           f"value='{_e(shown)}' autocomplete=off>{err(key)}")
            out.append("</fieldset>")
        numbers = value("numbers", "\n".join(current.numbers) if current else "")
        out.append("<label for=numbers>Virtual numbers to show in Altegio (one a line)</label>"
                   f"<textarea id=numbers name=numbers rows=3>{_e(numbers)}</textarea>"
                   f"{err('numbers')}")
        routing = value("routing", current.routing if current else "")
        out.append("<label for=routing>Routing method</label><select id=routing name=routing>"
                   "<option value=''>— choose —</option>")
        for option, label in (("sip", "SIP"), ("extension", "Extension")):
            sel = " selected" if option == routing else ""
            out.append(f"<option value={option}{sel}>{label}</option>")
        out.append(f"</select>{err('routing')}")
        leftover = {k: v for k, v in errors.items() if f"error-{k}" not in "".join(out)}
        for name, text in leftover.items():
            out.append(f"<p class=field-error>{_e(name)}: {_e(text)}</p>")
        out.append("<button type=submit id=save>Save and connect</button></form>")
        self._page(request, 422 if errors else 200, "Connect your PBX to Altegio",
                   "".join(out))

    async def _done(self, request: Any, reg: dict) -> None:
        mp = self.mp
        tenant = mp.gw.tenants.get(reg.get("tenant"))
        rows = await mp.activations(reg)
        out = ["<ul id=activations>"]
        labels = {DONE: "connected", PENDING: "being connected",
                  "failed": "not connected", "dead": "not connected"}
        for row in rows:
            text = labels.get(row["state"], row["state"])
            detail, link = "", ""
            if row["state"] == PENDING and row["attempts"]:
                detail = f" (Altegio did not take it yet; trying again: {row['error']})"
            elif row["state"] in ("failed", "dead"):
                detail = f" ({row['error']})"
                link = (f" — connect again from the <a href='{_e(mp.settings.marketplace_page)}'"
                        " target=_top>Altegio Marketplace</a>")
            out.append(f"<li data-state='{_e(row['state'])}'>Location {_e(row['salon'])}: "
                       f"{_e(text)}{_e(detail)}{link}</li>")
        out.append("</ul>")
        out.append("<form method=post action='register'><input type=hidden "
                   f"name=registration value='{_e(reg['id'])}'><input type=hidden name=step "
                   "value=status><button type=submit>Refresh</button></form>")
        if tenant is not None:
            out.append("<h2>1. In your PBX</h2><p>Paste these into your PBX's settings:</p>"
                       "<ul id=pbx-guide>")
            for item in mp.gw.pbxs[tenant.pbx.kind].setup_guide(tenant, mp.gw.public_url):
                extra = f" ({_e(item['method'])})" if item.get("method") else ""
                out.append(f"<li>{_e(item.get('what', ''))}{extra}: "
                           f"<code>{_e(item.get('url', ''))}</code></li>")
            out.append("</ul>")
        out.append("<h2>2. In Altegio</h2><ol id=altegio-steps>")
        out.extend(f"<li>{_e(step)}</li>" for step in ALTEGIO_STEPS)
        out.append("</ol>")
        self._page(request, 200, "Saved: what is left to do", "".join(out))
