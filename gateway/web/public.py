"""The public site: PBX webhooks, call-interactive, the CRMs' click-to-call, and the health check."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gateway import logs
from gateway.errors import BadRequest, Permanent, Retryable
from gateway.model import Inbound, Tenant
from gateway.web import answer, json_response, loggable_uri

log = Logger()

# /healthz answers within this many seconds, even when the disk hangs.
HEALTH_TIMEOUT = 2.0
# With no commit for this long, /healthz tries a small write to see the store can commit.
HEALTH_QUIET = 5.0


def _inbound(request: IRequest, name: str, max_body: int) -> Inbound:
    """The request as a module sees it: the body read up to ``max_body`` (the site refused
    a longer Content-Length before reading; this catches a chunked one)."""
    query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    body = request.content.read(max_body + 1) if request.content is not None else b""
    if len(body) > max_body:
        raise BadRequest("body", f"larger than {max_body} bytes", status=413)
    ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
    return Inbound(method=request.method.decode("ascii", "replace"), name=name, query=query,
                   body=body, content_type=ctype.decode("latin-1"))


def _json_answer(request: IRequest, status: int, body: Any) -> None:
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.write(json_response(request, body, status))
    request.finish()


class _Root(Resource):
    """The PBX webhooks (``/{prefix}/{tenant}/{event}/{login}``, each PBX module's prefix:
    the hot path), call-interactive (``/cid/…``) and the CRMs' requests (``/crm/…``) are
    plain twisted.web handlers; anything else goes to the Klein app.  Klein's routing
    (werkzeug) cost about a tenth of the CPU of each webhook, and its async handler another
    share (``make bench``)."""

    isLeaf = True

    def __init__(self, site: "PublicSite") -> None:
        super().__init__()
        self.site = site
        self.klein = site.app.resource()
        self.handlers = {prefix.encode(): site.webhook
                         for prefix in site.gateway.pbx_prefixes()}
        self.handlers[b"cid"] = site.interactive
        self.handlers[b"crm"] = site.crm_request
        # CRM modules' own pages (gateway.crm.ICrm.site_prefix), e.g. a marketplace's.
        for module in site.gateway.crms.values():
            prefix = getattr(module, "site_prefix", None)
            if prefix and prefix.encode() not in self.handlers:
                self.handlers[prefix.encode()] = module.site(site.gateway).render

    def render(self, request: IRequest) -> Any:
        handler = self.handlers.get(request.postpath[0] if request.postpath else b"")
        if handler is not None:
            return handler(request)
        return self.klein.render(request)


class PublicSite:
    """Routes PBXs call.  A tenant is named by id in the URL and proven by its ``key``."""

    app = Klein()

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def resource(self) -> Any:
        return _Root(self)

    def _route(self, request: IRequest, shape: str) -> tuple[Tenant, str, str]:
        """(tenant, name, login) of ``/{prefix}/{tenant}/{name}/{login}``; the tenant must
        exist with that PBX login (404 otherwise: nothing tells an unknown id from a wrong
        login)."""
        if len(request.postpath) != 4:
            raise BadRequest("path", f"expected {shape}", status=404)
        tenant_id, name, login = (unquote(p.decode("latin-1")) for p in request.postpath[1:])
        # ASCII digits only (int() refuses some Unicode digits, "²", that isdigit() allows),
        # and not so many that int() refuses them either.
        number = (int(tenant_id) if tenant_id.isascii() and tenant_id.isdigit()
                  and len(tenant_id) <= 20 else None)
        tenant = self.gateway.tenants.get(number)
        if tenant is None or tenant.deleted or tenant.pbx.login != login:
            raise BadRequest("tenant", f"no tenant {tenant_id[:20]} with PBX login "
                             f"{login[:40]}", status=404)
        return tenant, name, login

    @staticmethod
    def _enabled(tenant: Tenant) -> None:
        if not tenant.enabled:
            raise BadRequest("tenant", f"tenant {tenant.id} is disabled", status=403)

    def reject(self, request: IRequest, error: BadRequest, pbx: Any = None) -> bytes:
        """The refusal of a request: in the tenant's PBX's format once the PBX is known
        (some PBXs expect JSON errors), else plain text."""
        ctype, body = (pbx.refusal(error) if pbx is not None
                       else (b"text/plain; charset=utf-8", f"{error}\n".encode()))
        request.setResponseCode(error.status)
        request.setHeader(b"Content-Type", ctype)
        # Never the raw URI: its query holds the tenant's key (loggable_uri masks it).
        log.info("rejected {method} {uri}: {status} {error}",
                 method=request.method.decode("ascii", "backslashreplace"),
                 uri=loggable_uri(request), status=error.status, error=str(error))
        return body

    @staticmethod
    def _methods(request: IRequest, allowed: tuple[bytes, ...]) -> bytes | None:
        """The 405 answer's body for a method not in ``allowed``, else None."""
        if request.method in allowed:
            return None
        request.setResponseCode(405)
        request.setHeader(b"Allow", b", ".join(allowed))
        # No body for HEAD: twisted.web would log a warning (with the request) for one.
        if request.method == b"HEAD":
            return b""
        return f"method not allowed: use {' or '.join(m.decode() for m in allowed)}\n".encode()

    def webhook(self, request: IRequest) -> bytes | int:
        """``/<prefix>/<tenant>/<event>/<login>``: the tenant's PBX module parses it into
        events; they are stored, then answered "OK"."""
        refused = self._methods(request, (b"GET", b"POST"))
        if refused is not None:
            self.gateway.metrics.webhook(request.postpath[0], 405)
            return refused
        prefix = request.postpath[0].decode()
        pbx = None
        try:
            tenant, event, login = self._route(request, f"/{prefix}/<tenant>/<event>/<login>")
            pbx = self.gateway.pbxs[tenant.pbx.kind]
            if pbx.prefix != prefix:
                raise BadRequest("path", f"tenant {tenant.id} is a {tenant.pbx.kind} tenant: "
                                 f"its webhooks go to /{pbx.prefix}/", status=404)
            inbound = _inbound(request, event, self.gateway.max_body)
            pbx.authenticate(inbound, tenant)
            self._enabled(tenant)
            if pbx.is_lookup(inbound):
                return self._lookup(request, pbx, tenant, login, inbound)
            now = self.gateway.reactor.seconds()
            events = pbx.parse(inbound, tenant, now)
        except BadRequest as error:
            self.gateway.metrics.webhook(request.postpath[0], error.status)
            return self.reject(request, error, pbx)
        call = events[0].call if events else ""
        self.gateway.store.append(events).addCallbacks(
            self._stored, self._not_stored, callbackArgs=(request, events, now),
            errbackArgs=(request, tenant, login, call)).addErrback(
            lambda f: log.failure("{about}: answering failed", f,
                                  **logs.about(tenant.id, login, call)))
        return NOT_DONE_YET

    def _stored(self, seqs: list[int | None], request: IRequest, events: list,
                appended: float) -> None:
        metrics = self.gateway.metrics
        metrics.append_seconds.observe(self.gateway.reactor.seconds() - appended)
        metrics.webhook(request.postpath[0], 200)
        self.gateway.engine.poke(zip(seqs, events))
        answer(request, 200, b"text/plain", b"OK")

    def _not_stored(self, failure: Any, request: IRequest, tenant: Tenant, login: str,
                    call: str) -> None:
        # Not stored, so not "200": the PBX may try again.
        log.failure("{about}: append failed", failure, **logs.about(tenant.id, login, call))
        self.gateway.metrics.webhook(request.postpath[0], 503)
        answer(request, 503, b"text/plain", b"store unavailable, not stored\n")

    def interactive(self, request: IRequest) -> bytes | int:
        """``/cid/<tenant>/getmanager/<login>``: the IVR asks who the caller's manager is
        and waits; the answer comes within the tenant's deadline, whatever the CRM does."""
        refused = self._methods(request, (b"GET", b"POST"))
        if refused is not None:
            return refused
        pbx = None
        try:
            tenant, name, login = self._route(request, "/cid/<tenant>/getmanager/<login>")
            if name != "getmanager":
                raise BadRequest("path", f"unknown call-interactive request {name[:40]!r}; "
                                 "expected getmanager", status=404)
            pbx = self.gateway.pbxs[tenant.pbx.kind]
            inbound = _inbound(request, name, self.gateway.max_body)
            pbx.authenticate(inbound, tenant)
            self._enabled(tenant)
            return self._lookup(request, pbx, tenant, login, inbound)
        except BadRequest as error:
            return self.reject(request, error, pbx)

    def _lookup(self, request: IRequest, pbx: Any, tenant: Tenant, login: str,
                inbound: Inbound) -> int:
        """Answer a synchronous lookup (call-interactive, or a PBX's webhook that asks who
        the caller's manager is) with the manager's extension, in the PBX's format."""
        number = pbx.interactive_number(inbound)
        metrics = self.gateway.metrics
        asked = self.gateway.reactor.seconds()

        def answered(extension: str | None) -> None:
            ctype, body = pbx.interactive_answer(tenant, extension)
            metrics.interactive_seconds.observe(self.gateway.reactor.seconds() - asked)
            if request.postpath[0] != b"cid":  # a PBX's webhook that asks (is_lookup)
                metrics.webhook(request.postpath[0], 200)
            answer(request, 200, ctype, body)

        self.gateway.responsible(tenant, number).addCallback(answered).addErrback(
            lambda f: log.failure("tenant {tenant} ({login}): call-interactive failed", f,
                                  tenant=tenant.id, login=login))
        return NOT_DONE_YET

    def crm_request(self, request: IRequest) -> bytes | int:
        """``POST /crm/<tenant>/<action>/<login>``: a CRM asks the PBX to place a call
        (``makecall``) or end one (``hangup``), authenticated as its CRM module says.
        Answers JSON: ``{"ok": true, "call": id}``, or ``{"error"}`` saying what to fix: 422
        for what the tenant's config or the PBX cannot do, 502 when the PBX did not answer."""
        refused = self._methods(request, (b"POST",))
        if refused is not None:
            return refused
        try:
            tenant, action, login = self._route(request, "/crm/<tenant>/<action>/<login>")
            inbound = _inbound(request, action, self.gateway.max_body)
            command = self.gateway.crms[tenant.crm.kind].command(inbound, tenant, action)
            if command.action != "setup":  # a CRM's setup is what switches a tenant on
                self._enabled(tenant)
        except BadRequest as error:
            self.reject(request, error)
            return json_response(request, {"error": str(error), "field": error.field},
                                 error.status)

        def done(call: Any) -> None:
            log.info("tenant {tenant} ({login}): {command} {employee} → {number}: call {call}",
                     tenant=tenant.id, login=login, command=command.action,
                     employee=command.employee, number=command.number, call=call)
            _json_answer(request, 200, {"ok": True, "call": call})

        def failed(f: Any) -> None:
            error = f.value
            if isinstance(error, BadRequest):  # a CRM's setup the tenant's schema refused
                status, text = error.status, str(error)
            elif isinstance(error, (NotImplementedError, Permanent)):
                status, text = 422, str(error)
            elif isinstance(error, Retryable):
                status, text = 502, f"the PBX did not take it, try again: {error}"
            else:
                log.failure("tenant {tenant} ({login}): {command} failed", f,
                            tenant=tenant.id, login=login, command=command.action)
                status, text = 500, "internal error (logged)"
            log.info("tenant {tenant} ({login}): {command} refused: {status} {error}",
                     tenant=tenant.id, login=login, command=command.action, status=status,
                     error=text)
            _json_answer(request, status, {"error": text})

        defer.maybeDeferred(self.gateway.command, tenant, command).addCallbacks(
            done, failed).addErrback(
            lambda f: log.failure("answering failed", f))
        return NOT_DONE_YET

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        """Whether webhooks are stored (503 when not) and whether anything needs an
        operator (``ok`` false, with ``problems``), answered within ``HEALTH_TIMEOUT``."""
        status, body = await health(self.gateway)
        return json_response(request, body, status)


async def health(gw: Any) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) of ``/healthz``: the figures the operator's UI shows too."""
    if not gw.ready:
        return 503, {"ok": False, "problems": ["starting"]}
    try:
        stats = await gw.store.health(HEALTH_QUIET).addTimeout(HEALTH_TIMEOUT, gw.reactor)
    except Exception as e:
        error = (f"no answer within {HEALTH_TIMEOUT:g} s" if isinstance(
            e, (defer.TimeoutError, defer.CancelledError)) else repr(e))
        return 503, {"ok": False, "problems": [f"store: {error}"]}
    problems = []
    if stats["commit_error"]:
        problems.append(f"store cannot commit: {stats['commit_error']}")
    engine = gw.engine
    if engine.failing_since is not None:
        problems.append(f"fold failing for {gw.reactor.seconds() - engine.failing_since:.0f}"
                        f" s: {engine.last_error}")
    if stats["quarantined"]:
        problems.append(f"{stats['quarantined']} calls quarantined")
    paused = gw.dispatcher.paused()
    body = {
        "ok": not problems,
        "fold_lag_events": stats["log_head"] - engine.cursor,
        "open_calls": len(engine.calls),
        "quarantined_calls": stats["quarantined"],
        "outbox_depth": gw.dispatcher.depth,
        "oldest_pending_seconds": gw.dispatcher.oldest_age(),
        "in_flight": gw.dispatcher.in_flight,
        "actions": {"pending": gw.dispatcher.depth, **stats["actions"]},
        "paused_hosts": {host: round(left, 1) for host, left in paused.items()},
    }
    if problems:
        body["problems"] = problems
    # 503 only when webhooks are not being stored: a load balancer should keep sending
    # to a gateway that stores them, even while a call waits in the quarantine.
    return (503 if stats["commit_error"] else 200), body
