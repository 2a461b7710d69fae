"""The operator's web UI on the admin site, under ``/ui/``: sign-in with the admin token,
gateway health, integrations (tenants) with forms built from the modules' config schemas,
what to paste into the PBX and the CRM, the latest calls with every delivery attempt, and
re-drives of failed and dead actions.

Pages are escaped HTML strings built server-side, as the Altegio Marketplace page is
(``gateway.crm.altegio_marketplace``): no build step, no third-party assets, a strict CSP
whose only script and style are inline ones carrying the response's nonce.

Sessions: the admin token, once, buys a random session id (an ``HttpOnly``,
``SameSite=Strict`` cookie on ``/ui/``, ``Secure`` over TLS), kept in memory with an idle
expiry; every form carries the session's CSRF token, checked on every POST, and a browser's
``Origin``, when sent, must be this site's.  Secrets are never rendered: a secret field
says only whether it is set, and an empty input keeps the stored value.

Everything that changes state goes through what the JSON API uses: ``parse_tenant`` under
``gateway.writes``, then ``gateway.save_tenant``; the API's credential checks; its
re-drive.
"""

from __future__ import annotations

import hmac
import html
import json
import secrets
import time
from typing import Any
from urllib.parse import parse_qsl

import attrs
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gateway import crm, protocols
from gateway.errors import BadRequest
from gateway.model import DEFAULT_OPTIONS, PENDING, ROUTINGS, Tenant, parse_tenant
from gateway.web import answer, same_origin
from gateway.web.public import health

log = Logger()

PREFIX = "/ui/"
COOKIE = b"gateway_ui"
# A session ends after this long without a request, and after MAX_AGE in any case.
IDLE = 3600.0
MAX_AGE = 12 * 3600.0
MAX_SESSIONS = 1000
CALLS_SHOWN = 20

# What each option does (README, "Tenant fields").
OPTION_HELP = {
    "timezone": "Time zone of the dates sent to the CRM (an IANA name, e.g. Europe/Moscow).",
    "internal_calls": "Also log calls between the integration's own extensions.",
    "grace": "Seconds a call waits for late queue/IVR hang-ups before it is final.",
    "default_number": "Company number sent for calls without a DID (outgoing); empty: the "
                      "first virtual number.",
    "interactive_deadline": "Seconds the IVR waits for call-interactive (the responsible "
                            "manager); at most 10.",
    "interactive_fresh": "Seconds a manager found is reused before the CRM is asked again.",
}
ROUTING_HELP = {"extension": "Extension (101)", "sip": "SIP account (7001*101)"}
SIDES = (("pbx", protocols.KINDS, protocols.pbx_type),
         ("crm", crm.KINDS, crm.crm_type))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _when(seconds: float | None) -> str:
    if not seconds:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))


def mount(api: Any, klein: Any) -> Resource:
    """The admin site's root: ``/ui/…`` to the UI, everything else to the JSON API."""
    return _Root(UI(api), klein)


class _Root(Resource):
    """A plain dispatch on the first path segment (like the public site's ``_Root``): the
    UI answers HTML with its own headers and errors, never Klein's JSON error handlers."""

    isLeaf = True

    def __init__(self, ui: "UI", klein: Any) -> None:
        super().__init__()
        self.ui = ui
        self.klein = klein

    def render(self, request: Any) -> Any:
        if request.postpath and request.postpath[0] == b"ui":
            return self.ui.render(request)
        return self.klein.render(request)


@attrs.define
class Session:
    """One signed-in browser."""

    csrf: str
    created: float
    seen: float


def field_kind(field: Any) -> str:
    """How a config field is asked for: text, int, bool, lines, map or credential."""
    default = field.default
    if field.name == "credential":
        return "credential"
    if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
        return "map" if default.factory is dict else "lines"
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, tuple):
        return "lines"
    return "text"


def config_fields(module: Any) -> list[Any]:
    """The fields of a module's config schema the form asks for (all but ``kind``)."""
    return [f for f in attrs.fields(module.config_type) if f.name != "kind"]


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _pairs(text: str, field: str) -> dict[str, str]:
    out = {}
    for line in _lines(text):
        name, eq, value = line.partition("=")
        if not eq or not name.strip():
            raise BadRequest(field, f"one 'name=value' a line; not {line[:40]!r}")
        out[name.strip()] = value.strip()
    return out


def _shown_value(kind: str, value: Any) -> str:
    """A config value as its form input holds it."""
    if value is None:
        return ""
    if kind == "lines":
        return "\n".join(value)
    if kind == "map":
        return "\n".join(f"{k}={v}" for k, v in value.items())
    return str(value)


class UI(Resource):
    """The pages; one instance per admin site, holding the sessions."""

    isLeaf = True

    def __init__(self, api: Any, idle: float = IDLE, max_age: float = MAX_AGE) -> None:
        super().__init__()
        self.api = api
        self.gw = api.gateway
        self.idle = idle
        self.max_age = max_age
        self.sessions: dict[str, Session] = {}

    # Plumbing

    def render(self, request: Any) -> Any:
        d = ensureDeferred(self._dispatch(request))

        def failed(f: Any) -> None:
            log.failure("UI {method} {path} failed", f,
                        method=request.method.decode("ascii", "replace"),
                        path=request.path.decode("ascii", "backslashreplace"))
            if not request.finished and not getattr(request, "_disconnected", False):
                self._page(request, 500, "Internal error", "<p class=error>Something went "
                           "wrong; the gateway's log has the details.</p>", None)

        d.addErrback(failed)
        return NOT_DONE_YET

    def _headers(self, request: Any, nonce: str) -> None:
        request.setHeader(b"Content-Security-Policy", (
            f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
            "img-src 'self'; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'").encode())
        request.setHeader(b"X-Frame-Options", b"DENY")
        request.setHeader(b"Referrer-Policy", b"same-origin")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"X-Content-Type-Options", b"nosniff")

    def _finish(self, request: Any, status: int, body: bytes,
                ctype: bytes = b"text/html; charset=utf-8") -> None:
        answer(request, status, ctype, body)

    def _page(self, request: Any, status: int, title: str, content: str,
              session: Session | None) -> None:
        nonce = secrets.token_urlsafe(16)
        self._headers(request, nonce)
        nav = ""
        if session is not None:
            nav = (f"<nav><a href='{PREFIX}'>Gateway</a> <a href='{PREFIX}tenants/new'>"
                   f"New integration</a> <a href='{PREFIX}credentials'>Credentials</a>"
                   f"<form method=post action='{PREFIX}logout' class=inline>"
                   f"{self._csrf(session)}<button type=submit id=logout>Sign out</button>"
                   "</form></nav>")
        page = (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
                f"<meta name=viewport content='width=device-width,initial-scale=1'>"
                f"<title>{_e(title)} — gateway</title>"
                f"<style nonce='{nonce}'>{_STYLE}</style></head><body>{nav}"
                f"<h1>{_e(title)}</h1>{content}"
                f"<script nonce='{nonce}'>{_SCRIPT}</script></body></html>")
        self._finish(request, status, page.encode())

    def _redirect(self, request: Any, location: str) -> None:
        self._headers(request, secrets.token_urlsafe(16))
        request.setHeader(b"Location", location.encode())
        self._finish(request, 303, b"", b"text/plain; charset=utf-8")

    @staticmethod
    def _csrf(session: Session) -> str:
        return f"<input type=hidden name=csrf value='{_e(session.csrf)}'>"

    def _form(self, request: Any) -> dict[str, str]:
        limit = self.gw.max_body if hasattr(self.gw, "max_body") else 64 * 1024
        raw = request.content.read(limit + 1) if request.content is not None else b""
        if len(raw) > limit:
            raise BadRequest("body", f"larger than {limit} bytes", status=413)
        form: dict[str, str] = {}
        for name, value in parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True):
            form.setdefault(name, value)
        return form

    # Sessions

    def _session(self, request: Any) -> Session | None:
        sid = request.getCookie(COOKIE)
        if not sid:
            return None
        sid = sid.decode("ascii", "replace")
        session = self.sessions.get(sid)
        now = self.gw.reactor.seconds()
        if session is None:
            return None
        if now - session.seen > self.idle or now - session.created > self.max_age:
            del self.sessions[sid]
            return None
        session.seen = now
        return session

    def _start_session(self, request: Any) -> Session:
        now = self.gw.reactor.seconds()
        for sid in [s for s, v in self.sessions.items()
                    if now - v.seen > self.idle or now - v.created > self.max_age]:
            del self.sessions[sid]
        while len(self.sessions) >= MAX_SESSIONS:
            del self.sessions[min(self.sessions, key=lambda s: self.sessions[s].seen)]
        sid = secrets.token_urlsafe(32)
        session = self.sessions[sid] = Session(secrets.token_urlsafe(32), now, now)
        request.addCookie(COOKIE, sid.encode(), path=PREFIX.encode(), httpOnly=True,
                          secure=request.isSecure(), sameSite="strict")
        return session

    # Routing

    async def _dispatch(self, request: Any) -> None:
        path = [p.decode("utf-8", "replace") for p in request.postpath[1:]]
        method = request.method
        if not path:  # /ui without the slash
            return self._redirect(request, PREFIX)
        if path == ["login"]:
            if method == b"POST":
                return await self._login(request)
            return self._login_page(request, 200, "")
        session = self._session(request)
        form: dict[str, str] = {}
        if method == b"POST":
            refused = None
            if not same_origin(request):
                refused = "This form must be sent from the gateway's own page."
            elif session is None:
                refused = "Your session has ended: sign in again."
            else:
                try:
                    form = self._form(request)
                except BadRequest as e:
                    return self._page(request, e.status, "Refused",
                                      f"<p class=error>{_e(e.message)}</p>", session)
                if not hmac.compare_digest(form.get("csrf", "").encode(),
                                           session.csrf.encode()):
                    refused = ("This form was not issued by this page (its CSRF token is "
                               "missing or wrong). Reload the page and try again.")
            if refused:
                return self._page(request, 403, "Refused",
                                  f"<p class=error id=refused>{_e(refused)}</p>", None)
        elif method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, POST")
            return self._page(request, 405, "Not allowed", "", session)
        elif session is None:
            return self._redirect(request, PREFIX + "login")
        assert session is not None
        try:
            return await self._route(request, method, path, session, form)
        except BadRequest as e:
            return self._page(request, e.status, "Not done",
                              f"<p class=error id=error>{_e(e.message)}</p>", session)

    async def _route(self, request: Any, method: bytes, path: list[str], session: Session,
                     form: dict[str, str]) -> None:
        post = method == b"POST"
        if path == [""] and not post:
            return await self._home(request, session)
        if path == ["logout"] and post:
            self.sessions = {k: v for k, v in self.sessions.items() if v is not session}
            request.addCookie(COOKIE, b"", path=PREFIX.encode(), httpOnly=True,
                              secure=request.isSecure(), sameSite="strict", max_age="0")
            return self._redirect(request, PREFIX + "login")
        if path == ["tenants", "new"]:
            if post:
                return await self._save(request, session, form, None)
            return self._tenant_form(request, session, None, {}, {})
        if len(path) >= 2 and path[0] == "tenants":
            tenant = self.api._tenant(path[1])
            if len(path) == 2 and not post:
                return await self._tenant_page(request, session, tenant)
            if path[2:] == ["edit"]:
                if post:
                    return await self._save(request, session, form, tenant)
                return self._tenant_form(request, session, tenant, {}, {})
        if len(path) == 3 and path[0] == "actions" and path[2] == "retry" and post:
            action = await self.api.redrive(path[1])
            return self._redirect(request, f"{PREFIX}tenants/{action.tenant}?redriven="
                                  f"{action.id}#action-{action.id}")
        if path == ["credentials"]:
            if post:
                return await self._add_credential(request, session, form)
            return self._credentials(request, session, {}, {})
        return self._page(request, 404, "Not found", "<p>No such page.</p>", session)

    # Sign-in

    def _login_page(self, request: Any, status: int, error: str) -> None:
        err = f"<p class=error id=login-error>{_e(error)}</p>" if error else ""
        self._page(request, status, "Sign in", (
            f"{err}<form method=post action='{PREFIX}login' id=login>"
            "<label for=token>Admin token</label>"
            "<input id=token name=token type=password autocomplete=current-password required>"
            "<button type=submit id=signin>Sign in</button></form>"), None)

    async def _login(self, request: Any) -> None:
        if not same_origin(request):
            return self._login_page(request, 403, "This form must be sent from the "
                                    "gateway's own page.")
        form = self._form(request)
        expected = self.gw.admin_token
        if not expected or not hmac.compare_digest(form.get("token", "").encode(),
                                                   expected.encode()):
            log.info("UI: a sign-in with a wrong admin token")
            return self._login_page(request, 403, "Wrong token." if expected else
                                    "The gateway has no admin token: the UI is locked.")
        self._start_session(request)
        self._redirect(request, PREFIX)

    # The front page

    async def _home(self, request: Any, session: Session) -> None:
        status, figures = await health(self.gw)
        out = [f"<section id=health data-ok='{str(bool(figures.get('ok'))).lower()}'>"
               f"<h2>Health: {'OK' if figures.get('ok') else 'needs attention'}"
               f"{' (webhooks are NOT being stored)' if status != 200 else ''}</h2>"]
        if figures.get("problems"):
            out.append("<ul class=problems>" + "".join(
                f"<li>{_e(p)}</li>" for p in figures["problems"]) + "</ul>")
        rows = [("Events waiting to be folded", figures.get("fold_lag_events")),
                ("Open calls", figures.get("open_calls")),
                ("Quarantined calls", figures.get("quarantined_calls")),
                ("Actions pending", figures.get("outbox_depth")),
                ("Oldest pending (s)", figures.get("oldest_pending_seconds")),
                ("Being sent", figures.get("in_flight")),
                ("Failed actions", (figures.get("actions") or {}).get("failed", 0)),
                ("Dead actions", (figures.get("actions") or {}).get("dead", 0))]
        out.append("<table class=figures>" + "".join(
            f"<tr><th>{_e(k)}</th><td>{_e('—' if v is None else v)}</td></tr>"
            for k, v in rows) + "</table>")
        paused = figures.get("paused_hosts") or {}
        if paused:
            out.append("<p>Paused CRM hosts (a 429 asked to wait): " + ", ".join(
                f"{_e(h)} ({_e(s)} s)" for h, s in paused.items()) + "</p>")
        out.append("</section>")
        pending: dict[int, int] = {}
        for action in self.gw.dispatcher.actions.values():
            pending[action.tenant] = pending.get(action.tenant, 0) + 1
        settled: dict[str, dict[int, int]] = {}
        for state in ("failed", "dead"):
            counts = settled[state] = {}
            for row in await self.gw.store.actions(state, None, 1000):
                counts[row["tenant"]] = counts.get(row["tenant"], 0) + 1
        out.append("<h2>Integrations</h2><p><a href='tenants/new' id=new-tenant>New "
                   "integration</a></p><table id=tenants><thead><tr><th>id</th><th>name</th>"
                   "<th>PBX</th><th>CRM</th><th>on</th><th>last call activity</th>"
                   "<th>pending</th><th>failed</th><th>dead</th></tr></thead><tbody>")
        for tenant in sorted(self.gw.tenants.values(), key=lambda t: t.id):
            if tenant.deleted:
                continue
            latest = await self.gw.store.recent_calls(tenant.id, 1)
            out.append(
                f"<tr data-tenant='{tenant.id}'><td>{tenant.id}</td>"
                f"<td><a href='tenants/{tenant.id}'>{_e(tenant.name)}</a></td>"
                f"<td>{_e(tenant.pbx.kind)}</td><td>{_e(tenant.crm.kind)}</td>"
                f"<td>{'on' if tenant.enabled else 'off'}</td>"
                f"<td>{_e(_when(latest[0]['updated']) if latest else '—')}</td>"
                f"<td>{pending.get(tenant.id, 0)}</td>"
                f"<td>{settled['failed'].get(tenant.id, 0)}</td>"
                f"<td>{settled['dead'].get(tenant.id, 0)}</td></tr>")
        out.append("</tbody></table><p class=note>Last call activity: when the newest call's "
                   "latest event was folded (the store keeps no per-integration time of the "
                   "last webhook).</p>")
        self._page(request, 200, "Gateway", "".join(out), session)

    # An integration

    async def _tenant_page(self, request: Any, session: Session, tenant: Tenant) -> None:
        gw = self.gw
        out = []
        redriven = (request.args.get(b"redriven") or [b""])[0].decode("ascii", "replace")
        if redriven:
            out.append(f"<p class=ok id=redriven>Action #{_e(redriven)} is back in the "
                       "outbox.</p>")
        shown = tenant.to_json()
        out.append(f"<p><a href='{tenant.id}/edit' id=edit>Edit</a></p>"
                   "<table class=figures id=summary>"
                   f"<tr><th>id</th><td>{tenant.id}</td></tr>"
                   f"<tr><th>on</th><td>{'on' if tenant.enabled else 'off'}</td></tr>"
                   f"<tr><th>PBX</th><td>{_e(tenant.pbx.kind)} "
                   f"({_e(tenant.pbx.login)})</td></tr>"
                   f"<tr><th>CRM</th><td>{_e(tenant.crm.kind)}</td></tr>"
                   f"<tr><th>virtual numbers</th><td>{_e(', '.join(tenant.numbers) or 'all')}"
                   f"</td></tr><tr><th>routing</th><td>{_e(tenant.routing)}</td></tr>"
                   "<tr><th>secrets</th><td>" + _e(", ".join(
                       f"{k}: {'set' if v else 'not set'}"
                       for k, v in shown["secrets_set"].items())) + "</td></tr>")
        sharing = gw.sharing(tenant)
        if sharing:
            out.append(f"<tr><th>same CRM account as</th><td>{_e(sharing)}</td></tr>")
        out.append("</table>")
        out.append("<h2>What to paste</h2>")
        for side, modules in (("pbx", gw.pbxs), ("crm", gw.crms)):
            guide = modules[getattr(tenant, side).kind].setup_guide(tenant, gw.public_url)
            title = "Into the PBX" if side == "pbx" else "Into the CRM"
            out.append(f"<h3>{title}</h3>")
            if not guide:
                out.append(f"<p id={side}-guide>Nothing: this {side.upper()} needs no URL "
                           "from the gateway.</p>")
                continue
            out.append(f"<ul id={side}-guide class=guide>")
            for n, item in enumerate(guide):
                ident = f"{side}-{n}"
                method = f" ({_e(item['method'])})" if item.get("method") else ""
                out.append(f"<li>{_e(item.get('what', ''))}{method}: "
                           f"<code id='{ident}'>{_e(item.get('url', ''))}</code> "
                           f"<button type=button class=copy data-target='{ident}'>Copy"
                           "</button>")
                extra = {k: v for k, v in item.items() if k not in ("what", "url", "method")}
                for k, v in extra.items():
                    text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False,
                                                                   indent=1)
                    out.append(f"<div>{_e(k)}: <pre id='{ident}-{_e(k)}'>{_e(text)}</pre>"
                               f"<button type=button class=copy data-target='{ident}-{_e(k)}'>"
                               "Copy</button></div>")
                out.append("</li>")
            out.append("</ul>")
        queued = [a for a in await gw.store.actions(PENDING, tenant.id, 100) if not a["call"]]
        if queued:
            out.append("<h2>Pending integration actions</h2><table id=queued><tr>"
                       "<th>action</th><th>kind</th><th>attempts</th><th>why it waits</th>"
                       "</tr>")
            for action in sorted(queued, key=lambda a: a["id"]):
                out.append(f"<tr id='action-{action['id']}' data-state=pending>"
                           f"<td>#{action['id']}</td><td>{_e(action['kind'])}</td>"
                           f"<td>{action['attempts']}</td>"
                           f"<td class=why>{_e(self.waiting(action))}</td></tr>")
            out.append("</table>")
        stuck = []
        for state in ("failed", "dead"):
            stuck.extend(await gw.store.actions(state, tenant.id, 100))
        out.append("<h2>Failed and dead actions</h2>")
        if stuck:
            out.append("<table id=stuck><tr><th>action</th><th>call</th><th>kind</th>"
                       "<th>state</th><th>attempts</th><th>last error</th><th></th></tr>")
            for action in sorted(stuck, key=lambda a: a["id"]):
                out.append(f"<tr data-action='{action['id']}'><td>#{action['id']}</td>"
                           f"<td>{_e(action['call'] or '(integration)')}</td>"
                           f"<td>{_e(action['kind'])}</td><td>{_e(action['state'])}</td>"
                           f"<td>{action['attempts']}</td><td>{_e(action['last_error'])}</td>"
                           f"<td>{self._retry(session, action)}</td></tr>")
            out.append("</table>")
        else:
            out.append("<p id=stuck-none>None.</p>")
        calls = await gw.store.recent_calls(tenant.id, CALLS_SHOWN)
        out.append("<h2>Latest calls</h2>")
        if not calls:
            out.append("<p id=calls-none>No calls yet.</p>")
        out.append("<div id=calls>")
        for call in calls:
            out.append(self._call(session, tenant, call))
        out.append("</div>")
        self._page(request, 200, f"{tenant.name} ({tenant.id})", "".join(out), session)

    def _retry(self, session: Session, action: dict) -> str:
        if action["state"] not in ("failed", "dead"):
            return ""
        return (f"<form method=post action='{PREFIX}actions/{action['id']}/retry' "
                f"class=inline>{self._csrf(session)}<button type=submit class=retry "
                f"id='retry-{action['id']}'>Re-drive</button></form>")

    def _call(self, session: Session, tenant: Tenant, call: dict) -> str:
        started = (call.get("started") or 0) / 1e6
        out = [f"<section class=call data-call='{_e(call['call'])}'><h3>Call "
               f"{_e(call['call'])}</h3><p>started {_e(_when(started))}; last change "
               f"{_e(_when(call['updated']))}; "
               f"{'final' if call['final'] else 'open'}</p>"
               "<table class=legs><tr><th>leg</th><th>kind</th><th>extension</th>"
               "<th>peer</th><th>DID</th><th>state</th><th>outcome</th></tr>"]
        for leg in call["legs"]:
            out.append("<tr>" + "".join(f"<td>{_e(leg.get(k, ''))}</td>" for k in (
                "key", "kind", "extension", "peer", "did", "state", "outcome")) + "</tr>")
        out.append("</table><table class=actions><tr><th>action</th><th>kind</th>"
                   "<th>leg</th><th>state</th><th>attempts</th><th>why / last error</th>"
                   "<th></th></tr>")
        for action in call["actions"]:
            why = (self.waiting(action) if action["state"] == PENDING
                   else "" if action["state"] == "done" else action["last_error"])
            out.append(f"<tr id='action-{action['id']}' data-state='{_e(action['state'])}'>"
                       f"<td>#{action['id']}</td><td>{_e(action['kind'])}</td>"
                       f"<td>{_e(action['leg'])}</td><td>{_e(action['state'])}</td>"
                       f"<td>{action['attempts']}</td><td class=why>{_e(why)}</td>"
                       f"<td>{self._retry(session, action)}</td></tr>")
            attempts = action.get("attempt_log") or []
            if attempts:
                out.append("<tr class=attempts><td></td><td colspan=6><ol>")
                for attempt in attempts:
                    out.append(f"<li>{_e(_when(attempt['at']))}: {_e(attempt['outcome'])} "
                               f"{_e(attempt['status'] if attempt['status'] is not None else '')}"
                               f"<br><code>{_e(attempt['request'])}</code>"
                               f"<br><code>{_e(attempt['answer'])}</code></li>")
                out.append("</ol></td></tr>")
        out.append("</table></section>")
        return "".join(out)

    def waiting(self, row: dict) -> str:
        """Why a pending action has not gone yet, from what the dispatcher holds."""
        dispatcher = self.gw.dispatcher
        action = dispatcher.actions.get(row["id"])
        if action is None:
            return "pending (not loaded by the dispatcher yet)"
        # The dispatcher's own bookkeeping, read only: one chain per (tenant, call), a
        # tenant's call actions parked behind its tenant-level (setup) ones.
        if action.id in getattr(dispatcher, "_flying", ()):
            return "being sent now"
        chains = getattr(dispatcher, "_chains", {})
        chain = chains.get((action.tenant, action.call))
        if chain and chain[0] != action.id:
            return f"waits for action #{chain[0]}, ahead of it in its call"
        if action.call and (action.tenant, "") in chains:
            setup = chains[(action.tenant, "")]
            return f"waits for the integration's pending setup (action #{setup[0]})"
        now = self.gw.reactor.seconds()
        paused = dispatcher.paused()
        held = [key for key, _, _ in dispatcher.limits(action) if key in paused]
        if held:
            return "CRM host paused by a 429: " + ", ".join(
                f"{key} for {paused[key]:.0f} s more" for key in held)
        if action.next_at > now:
            after = f" after {action.attempts} attempts" if action.attempts else ""
            last = f" (last: {action.last_error})" if action.last_error else ""
            return f"next try in {action.next_at - now:.0f} s{after}{last}"
        return "due now: waiting for the CRM's rate limit"

    # Create and edit

    def _values(self, tenant: Tenant | None) -> dict[str, str]:
        """The form's values: the tenant's (no secrets), or the defaults of a new one."""
        out: dict[str, str] = {}
        for side, kinds, get in SIDES:
            for kind in kinds:
                module = get(kind)
                cfg = getattr(tenant, side) if tenant is not None else None
                same = cfg is not None and cfg.kind == kind
                for f in config_fields(module):
                    if f.name in module.secrets:
                        continue
                    fk = field_kind(f)
                    if same:
                        value = getattr(cfg, f.name)
                    elif f.default is attrs.NOTHING:
                        value = ""
                    elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
                        value = f.default.factory()
                    else:
                        value = f.default
                    if fk == "bool":
                        if value:
                            out[f"{side}.{kind}.{f.name}"] = "on"
                    else:
                        out[f"{side}.{kind}.{f.name}"] = _shown_value(fk, value)
        if tenant is None:
            out.update(enabled="on", routing="extension")
            for name, default in DEFAULT_OPTIONS.items():
                if isinstance(default, bool):
                    if default:
                        out[f"options.{name}"] = "on"
                else:
                    out[f"options.{name}"] = str(default)
            return out
        out.update(id=str(tenant.id), name=tenant.name, routing=tenant.routing,
                   pbx_kind=tenant.pbx.kind, crm_kind=tenant.crm.kind,
                   numbers="\n".join(tenant.numbers),
                   employees=_shown_value("map", tenant.employees))
        if tenant.enabled:
            out["enabled"] = "on"
        for name in DEFAULT_OPTIONS:
            value = tenant.option(name)
            if isinstance(value, bool):
                if value:
                    out[f"options.{name}"] = "on"
            else:
                out[f"options.{name}"] = str(value)
        return out

    def _tenant_form(self, request: Any, session: Session, tenant: Tenant | None,
                     form: dict[str, str], errors: dict[str, str]) -> None:
        values = form or self._values(tenant)
        action = f"{PREFIX}tenants/{tenant.id}/edit" if tenant else f"{PREFIX}tenants/new"
        out: list[str] = []

        def err(name: str) -> str:
            return (f"<div class=field-error id='error-{_e(name)}'>{_e(errors[name])}</div>"
                    if name in errors else "")

        def text(name: str, label: str, help_: str = "", kind: str = "text",
                 extra: str = "") -> str:
            hint = f"<div class=help>{_e(help_)}</div>" if help_ else ""
            shown = "" if kind == "password" else values.get(name, "")  # never echo one
            return (f"<label for='{_e(name)}'>{_e(label)}</label>"
                    f"<input id='{_e(name)}' name='{_e(name)}' type={kind} "
                    f"value='{_e(shown)}'{extra}>{hint}{err(name)}")

        def area(name: str, label: str, help_: str = "") -> str:
            hint = f"<div class=help>{_e(help_)}</div>" if help_ else ""
            return (f"<label for='{_e(name)}'>{_e(label)}</label><textarea id='{_e(name)}' "
                    f"name='{_e(name)}' rows=3>{_e(values.get(name, ''))}</textarea>"
                    f"{hint}{err(name)}")

        def check(name: str, label: str, help_: str = "") -> str:
            on = " checked" if name in values else ""
            hint = f"<div class=help>{_e(help_)}</div>" if help_ else ""
            return (f"<div class=check><input id='{_e(name)}' name='{_e(name)}' "
                    f"type=checkbox{on}><label for='{_e(name)}'>{_e(label)}</label></div>"
                    f"{hint}{err(name)}")

        def secret(name: str, label: str, is_set: bool) -> str:
            state = ("set — type a new value to replace it, leave empty to keep it"
                     if is_set else "not set")
            return (f"<label for='{_e(name)}'>{_e(label)}</label>"
                    f"<input id='{_e(name)}' name='{_e(name)}' type=password value='' "
                    f"autocomplete=off><div class=help data-secret='{_e(name)}'>{state}</div>"
                    f"{err(name)}")

        if errors:
            out.append("<p class=error id=errors>Please correct the fields marked below."
                       "</p>")
            leftover = [k for k in errors if not self._has_input(k)]
            for name in leftover:
                out.append(f"<p class=field-error id='error-{_e(name)}'>{_e(name)}: "
                           f"{_e(errors[name])}</p>")
        out.append(f"<form method=post action='{action}' id=tenant-form>{self._csrf(session)}")
        if tenant is None:
            out.append(text("id", "Id (the application serial number, used in every URL)",
                            kind="text", extra=" inputmode=numeric"))
        out.append(text("name", "Name"))
        out.append(check("enabled", "On", "An integration that is off answers its PBX's "
                         "webhooks with 403 and tells its CRM nothing."))
        out.append(secret("key", "URL key (the secret in the PBX's URLs)",
                          tenant is not None) if tenant is not None else
                   text("key", "URL key (16-128 URL-safe characters)",
                        "Leave empty to generate one.", kind="password"))
        shown = tenant.to_json()["secrets_set"] if tenant is not None else {}
        for side, kinds, get in SIDES:
            chosen = values.get(f"{side}_kind", "")
            label = "PBX" if side == "pbx" else "CRM"
            out.append(f"<h2>{label}</h2><label for={side}_kind>{label} kind</label>"
                       f"<select id={side}_kind name={side}_kind data-side={side}>"
                       "<option value=''>— choose —</option>")
            for kind in kinds:
                sel = " selected" if kind == chosen else ""
                out.append(f"<option value='{_e(kind)}'{sel}>{_e(kind)}</option>")
            out.append(f"</select>{err(f'{side}_kind')}")
            for kind in kinds:
                module = get(kind)
                current_kind = tenant is not None and getattr(tenant, side).kind == kind
                out.append(f"<fieldset data-side={side} data-kind='{_e(kind)}'>"
                           f"<legend>{_e(kind)}</legend>")
                for f in config_fields(module):
                    name = f"{side}.{kind}.{f.name}"
                    fk = field_kind(f)
                    label_ = f.name.replace("_", " ")
                    if fk == "credential":
                        out.append(self._credential_select(name, kind, values.get(name, ""),
                                                           errors))
                        out.append(text(f"{side}.{kind}.new_credential",
                                        "…or save this account's "
                                        f"{', '.join(module.credential_fields)} as new "
                                        "named credentials", "A name for them; empty: none."))
                    elif f.name in module.secrets:
                        out.append(secret(name, label_, bool(
                            current_kind and shown.get(f"{side}.{f.name}"))))
                    elif fk == "bool":
                        out.append(check(name, label_))
                    elif fk in ("lines", "map"):
                        out.append(area(name, label_, "one a line" if fk == "lines"
                                        else "one 'name=value' a line"))
                    else:
                        out.append(text(name, label_))
                out.append("</fieldset>")
        out.append("<h2>Calls</h2>")
        out.append(area("numbers", "Virtual numbers (one a line)",
                        "Only calls through these numbers are sent to the CRM; empty: all."))
        routing = values.get("routing", "")
        out.append("<label for=routing>Routing method</label><select id=routing "
                   "name=routing>")
        for option in ROUTINGS:
            sel = " selected" if option == routing else ""
            out.append(f"<option value='{option}'{sel}>{_e(ROUTING_HELP.get(option, option))}"
                       "</option>")
        out.append(f"</select>{err('routing')}")
        out.append(area("employees", "Employees (extension=CRM user, one a line)",
                        "For CRMs that need it; empty for the others."))
        out.append("<h2>Options</h2>")
        for name, default in DEFAULT_OPTIONS.items():
            key = f"options.{name}"
            if isinstance(default, bool):
                out.append(check(key, name, OPTION_HELP.get(name, "")))
            else:
                out.append(text(key, name, OPTION_HELP.get(name, "")))
        out.append("<button type=submit id=save>Save</button></form>")
        title = f"Edit {tenant.name} ({tenant.id})" if tenant else "New integration"
        self._page(request, 422 if errors else 200, title, "".join(out), session)

    @staticmethod
    def _has_input(name: str) -> bool:
        return (name in ("id", "name", "enabled", "key", "numbers", "routing", "employees",
                         "pbx_kind", "crm_kind") or name.startswith("options.")
                or name.count(".") == 2)

    def _credential_select(self, name: str, kind: str, value: str,
                           errors: dict[str, str]) -> str:
        out = [f"<label for='{_e(name)}'>credentials</label><select id='{_e(name)}' "
               f"name='{_e(name)}'><option value=''>none: the fields below</option>"]
        for cid, credential in sorted(self.gw.credentials.items()):
            if credential["kind"] != kind:
                continue
            sel = " selected" if str(cid) == value else ""
            out.append(f"<option value='{cid}'{sel}>#{cid} {_e(credential['name'])}</option>")
        out.append("</select>")
        if name in errors:
            out.append(f"<div class=field-error id='error-{_e(name)}'>{_e(errors[name])}"
                       "</div>")
        return "".join(out)

    def _section(self, form: dict[str, str], side: str, current: Any) -> dict[str, Any]:
        """A tenant's ``pbx`` or ``crm`` section from the form: the chosen kind's fields;
        an empty secret keeps the stored one, an empty text field means the default."""
        kind = form.get(f"{side}_kind", "")
        kinds = protocols.KINDS if side == "pbx" else crm.KINDS
        if kind not in kinds:
            raise BadRequest(f"{side}_kind", "choose one")
        module = (protocols.pbx_type if side == "pbx" else crm.crm_type)(kind)
        stored = (json.loads(json.dumps(attrs.asdict(current)))
                  if current is not None and current.kind == kind else {})
        section: dict[str, Any] = {"kind": kind}
        for f in config_fields(module):
            key = f"{side}.{kind}.{f.name}"
            raw = form.get(key, "")
            fk = field_kind(f)
            dotted = f"{side}.{f.name}"
            if fk == "credential":
                if raw:
                    if not (raw.isascii() and raw.isdigit()):
                        raise BadRequest(dotted, "choose from the list")
                    section["credential"] = int(raw)
            elif fk == "bool":
                section[f.name] = key in form
            elif f.name in module.secrets:
                if raw:
                    section[f.name] = raw
                elif stored.get(f.name):
                    section[f.name] = stored[f.name]
            elif fk == "int":
                if raw.strip():
                    try:
                        section[f.name] = int(raw.strip())
                    except ValueError:
                        raise BadRequest(dotted, "must be an integer") from None
            elif fk == "lines":
                section[f.name] = _lines(raw)
            elif fk == "map":
                section[f.name] = _pairs(raw, dotted)
            elif raw.strip():
                section[f.name] = raw.strip()
        return section

    def _body(self, form: dict[str, str], current: Tenant | None) -> dict[str, Any]:
        """A whole tenant body (what ``POST /api/v1/tenants`` takes) from the form."""
        body: dict[str, Any] = {}
        if current is not None:
            body["id"] = current.id
        else:
            raw = form.get("id", "").strip()
            body["id"] = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 20 else raw
        body["name"] = form.get("name", "")
        body["enabled"] = "enabled" in form
        key = form.get("key", "")
        if key:
            body["key"] = key
        elif current is not None:
            body["key"] = current.key
        for side in ("pbx", "crm"):
            body[side] = self._section(form, side, getattr(current, side, None))
        body["numbers"] = _lines(form.get("numbers", ""))
        body["routing"] = form.get("routing", "")
        body["employees"] = _pairs(form.get("employees", ""), "employees")
        options: dict[str, Any] = {}
        for name, default in DEFAULT_OPTIONS.items():
            key = f"options.{name}"
            raw = form.get(key, "").strip()
            if isinstance(default, bool):
                options[name] = key in form
            elif isinstance(default, float):
                if raw:
                    try:
                        options[name] = float(raw)
                    except ValueError:
                        raise BadRequest(key, "must be a number of seconds") from None
            elif raw:
                options[name] = raw
        body["options"] = options
        return body

    def _error_input(self, field: str, form: dict[str, str]) -> str:
        """The form input a tenant field's error belongs to."""
        for side in ("pbx", "crm"):
            if field in (side, f"{side}.kind"):
                return f"{side}_kind"
            if field.startswith(side + "."):
                return f"{side}.{form.get(f'{side}_kind', '')}.{field[4:]}"
        return field

    async def _save(self, request: Any, session: Session, form: dict[str, str],
                    current: Tenant | None) -> None:
        gw = self.gw
        made: list[int] = []
        try:
            async with gw.writes:
                if current is not None:
                    current = self.api._tenant(str(current.id))  # the latest, in the lock
                body = self._body(form, current)
                for side in ("pbx", "crm"):
                    made_id = await self._inline_credential(form, side, body[side])
                    if made_id is not None:
                        made.append(made_id)
                tenant = parse_tenant(body, None, gw.credentials)
                existing = gw.tenants.get(tenant.id)
                if current is None and existing is not None and not existing.deleted:
                    raise BadRequest("id", f"integration {tenant.id} exists", status=409)
                await gw.save_tenant(tenant, current if current is not None else existing)
        except BadRequest as e:
            for cid in made:  # a credential added for a tenant that was not saved
                await gw.store.delete_credential(cid)
                gw.credentials.pop(cid, None)
            field = self._error_input(e.field, form)
            return self._tenant_form(request, session, current, form, {field: e.message})
        self._redirect(request, f"{PREFIX}tenants/{tenant.id}")

    async def _inline_credential(self, form: dict[str, str], side: str,
                                 section: dict[str, Any]) -> int | None:
        """Named credentials made from a side's fields, when the form names them."""
        kind = section["kind"]
        name = form.get(f"{side}.{kind}.new_credential", "").strip()
        if not name:
            return None
        module = (protocols.pbx_type if side == "pbx" else crm.crm_type)(kind)
        fields = {f: section.pop(f) for f in list(section)
                  if f in module.credential_fields and isinstance(section[f], str)
                  and section[f]}
        try:
            credential = self.api._credential_body({"kind": kind, "name": name,
                                                    "fields": fields}, None)
            stored = await self.api._put_credential(credential)
        except BadRequest as e:
            raise BadRequest(f"{side}.new_credential", e.message, e.status) from None
        section["credential"] = stored["id"]
        return stored["id"]

    # Named credentials

    def _credentials(self, request: Any, session: Session, form: dict[str, str],
                     errors: dict[str, str]) -> None:
        out = ["<table id=credentials><tr><th>id</th><th>kind</th><th>name</th>"
               "<th>fields</th><th>secrets</th><th>used by</th></tr>"]
        for credential in sorted(self.gw.credentials.values(), key=lambda c: c["id"]):
            shown = self.api._credential_shown(credential)
            out.append(
                f"<tr><td>{shown['id']}</td><td>{_e(shown['kind'])}</td>"
                f"<td>{_e(shown['name'])}</td><td>" + _e(", ".join(
                    f"{k}={v}" for k, v in shown["fields"].items())) + "</td><td>" + _e(
                    ", ".join(f"{k}: {'set' if v else 'not set'}"
                              for k, v in shown["secrets_set"].items())) +
                f"</td><td>{_e(', '.join(map(str, shown['used_by'])) or '—')}</td></tr>")
        out.append("</table><h2>Add credentials</h2>")
        if errors:
            out.append("".join(f"<p class=field-error id='error-{_e(k)}'>{_e(k)}: "
                               f"{_e(v)}</p>" for k, v in errors.items()))
        out.append(f"<form method=post action='{PREFIX}credentials' id=credential-form>"
                   f"{self._csrf(session)}<label for=cred_kind>Kind</label>"
                   "<select id=cred_kind name=kind data-side=cred>")
        kinds = [(k, protocols.pbx_type(k)) for k in protocols.KINDS] + [
            (k, crm.crm_type(k)) for k in crm.KINDS]
        for kind, module in kinds:
            if module.credential_fields:
                sel = " selected" if form.get("kind") == kind else ""
                out.append(f"<option value='{_e(kind)}'{sel}>{_e(kind)}</option>")
        out.append("</select><label for=cred_name>Name</label><input id=cred_name name=name "
                   f"value='{_e(form.get('name', ''))}'>")
        for kind, module in kinds:
            if not module.credential_fields:
                continue
            out.append(f"<fieldset data-side=cred data-kind='{_e(kind)}'>"
                       f"<legend>{_e(kind)}</legend>")
            for name in module.credential_fields:
                key = f"{kind}.{name}"
                secret = name in module.secrets
                value = "" if secret else form.get(key, "")
                out.append(f"<label for='{_e(key)}'>{_e(name.replace('_', ' '))}</label>"
                           f"<input id='{_e(key)}' name='{_e(key)}' "
                           f"type={'password' if secret else 'text'} value='{_e(value)}' "
                           "autocomplete=off>")
            out.append("</fieldset>")
        out.append("<button type=submit id=add-credential>Add</button></form>")
        self._page(request, 422 if errors else 200, "Credentials", "".join(out), session)

    async def _add_credential(self, request: Any, session: Session,
                              form: dict[str, str]) -> None:
        kind = form.get("kind", "")
        fields = {k.split(".", 1)[1]: v for k, v in form.items()
                  if k.startswith(kind + ".") and v}
        try:
            credential = self.api._credential_body(
                {"kind": kind, "name": form.get("name", ""), "fields": fields}, None)
            async with self.gw.writes:
                await self.api._put_credential(credential)
        except BadRequest as e:
            return self._credentials(request, session, form, {e.field: e.message})
        self._redirect(request, f"{PREFIX}credentials")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:12px;
line-height:1.4}nav{display:flex;gap:12px;align-items:center;border-bottom:1px solid #ccc;
padding-bottom:6px}nav form{margin-left:auto}
label{display:block;margin-top:10px;font-weight:600}.check label{display:inline;
font-weight:600}input,select,textarea{font-size:15px;width:100%;box-sizing:border-box;
padding:5px}input[type=checkbox]{width:auto}fieldset{margin-top:10px}
.help{color:#555;font-size:.9em}.error{color:#b00020;font-weight:600}
.field-error{color:#b00020;font-size:.9em}.ok{background:#d1e7dd;padding:6px}
.note{color:#555;font-size:.9em}table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
code,pre{word-break:break-all;white-space:pre-wrap}form.inline{display:inline}
button{font-size:15px;padding:5px 12px;margin-top:6px}.call{border-top:2px solid #888;
margin-top:14px}#health[data-ok=false] h2{color:#b00020}
"""

_SCRIPT = """
(function(){
function sync(s){function show(){var fs=document.querySelectorAll(
'fieldset[data-side="'+s.getAttribute('data-side')+'"]');for(var i=0;i<fs.length;i++){
fs[i].hidden=fs[i].getAttribute('data-kind')!==s.value;}}
s.addEventListener('change',show);show();}
var ss=document.querySelectorAll('select[data-side]');for(var i=0;i<ss.length;i++)sync(ss[i]);
function fallback(t){var a=document.createElement('textarea');a.value=t;
document.body.appendChild(a);a.select();try{document.execCommand('copy');}catch(e){}
document.body.removeChild(a);}
var bs=document.querySelectorAll('button.copy');
for(var j=0;j<bs.length;j++){bs[j].addEventListener('click',function(e){var b=e.currentTarget;
var t=document.getElementById(b.getAttribute('data-target')).textContent;
function ok(){b.textContent='Copied';}
if(navigator.clipboard){navigator.clipboard.writeText(t).then(ok,function(){fallback(t);ok();});}
else{fallback(t);ok();}});}
})();
"""
