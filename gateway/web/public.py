"""The public site: PBX webhooks (Telphin events) and the health check."""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qs, parse_qsl, unquote

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from gateway.errors import BadRequest
from gateway.model import Tenant
from gateway.protocols import telphin
from gateway.web import json_response, loggable_uri

log = Logger()

# /healthz answers within this many seconds, even when the disk hangs.
HEALTH_TIMEOUT = 2.0
# With no commit for this long, /healthz tries a small write to see the store can commit.
HEALTH_QUIET = 5.0


def _form(request: IRequest, max_body: int) -> dict[str, str]:
    """Form fields from the query string and a form-encoded body; first value wins."""
    fields: dict[str, str] = {}
    query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
    body = request.content.read(max_body + 1) if request.content is not None else b""
    if len(body) > max_body:
        raise BadRequest("body", f"larger than {max_body} bytes", status=413)
    if body:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype not in (b"", b"application/x-www-form-urlencoded"):
            raise BadRequest("Content-Type", "must be application/x-www-form-urlencoded",
                             status=415)
    for where, part in (("query", query), ("body", body)):
        try:
            # errors="strict": percent-encoded bytes must be UTF-8 too, or a field would be
            # stored with replacement characters.
            pairs = parse_qsl(part.decode("utf-8"), keep_blank_values=True,
                              strict_parsing=False, errors="strict")
        except UnicodeDecodeError:
            raise BadRequest(where, "not UTF-8 form data") from None
        for name, value in pairs:
            fields.setdefault(name, value)
    return fields


def _answer(request: IRequest, status: int, content_type: bytes, body: bytes) -> None:
    """Finish a request answered later, unless the client has gone meanwhile."""
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    request.write(body)
    request.finish()


class _Root(Resource):
    """``/events/…`` (every PBX webhook: the hot path) is a plain twisted.web handler;
    anything else goes to the Klein app.  Klein's routing (werkzeug) cost about a tenth of
    the CPU of each webhook, and its async handler another share (``make bench``)."""

    isLeaf = True

    def __init__(self, site: "PublicSite") -> None:
        super().__init__()
        self.site = site
        self.klein = site.app.resource()

    def render(self, request: IRequest) -> Any:
        if request.postpath[:1] == [b"events"]:
            return self.site.telphin_event(request)
        return self.klein.render(request)


class PublicSite:
    """Routes PBXs call.  A tenant is named by id in the URL and proven by its ``key``."""

    app = Klein()

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def resource(self) -> Any:
        return _Root(self)

    def _tenant(self, request: IRequest, tenant_id: str, login: str) -> Tenant:
        # ASCII digits only (int() refuses some Unicode digits, "²", that isdigit() allows),
        # and not so many that int() refuses them either.
        number = (int(tenant_id) if tenant_id.isascii() and tenant_id.isdigit()
                  and len(tenant_id) <= 20 else None)
        tenant = self.gateway.tenants.get(number)
        if tenant is None or tenant.deleted or tenant.pbx.login != login:
            raise BadRequest("tenant", f"no tenant {tenant_id[:20]} with PBX login "
                             f"{login[:40]}", status=404)
        # The key is part of the URL the PBX was given; a body field cannot stand in for it.
        # Its name is read as any form parser reads it, percent-decoded: ``?%6bey=`` is the
        # key too (and is masked in the logs like ``?key=``, gateway.web.mask).
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        keys = parse_qs(query.decode("latin-1"), errors="replace").get("key") or [""]
        if not hmac.compare_digest(keys[0].encode(), tenant.key.encode()):
            raise BadRequest("key", "wrong or missing key", status=403)
        if not tenant.enabled:
            raise BadRequest("tenant", f"tenant {tenant.id} is disabled", status=403)
        return tenant

    def reject(self, request: IRequest, error: BadRequest) -> bytes:
        request.setResponseCode(error.status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        # Never the raw URI: its query holds the tenant's key (loggable_uri masks it).
        log.info("rejected {method} {uri}: {status} {error}",
                 method=request.method.decode("ascii", "backslashreplace"),
                 uri=loggable_uri(request), status=error.status, error=str(error))
        return f"{error}\n".encode()

    def telphin_event(self, request: IRequest) -> bytes | int:
        """``/events/<tenant>/<event>/<login>``: store the event, then answer "OK"."""
        if request.method not in (b"GET", b"POST"):
            request.setResponseCode(405)
            request.setHeader(b"Allow", b"GET, POST")
            # No body for HEAD: twisted.web would log a warning (with the request) for one.
            if request.method == b"HEAD":
                return b""
            return b"method not allowed: use GET or POST\n"
        try:
            if len(request.postpath) != 4:
                raise BadRequest("path", "expected /events/<tenant>/<event>/<login>",
                                 status=404)
            tenant_id, event, login = (unquote(p.decode("latin-1"))
                                       for p in request.postpath[1:])
            tenant = self._tenant(request, tenant_id, login)
            fields = _form(request, self.gateway.max_body)
            ev = telphin.parse_event(fields, event, tenant.id,
                                     self.gateway.reactor.seconds())
        except BadRequest as error:
            return self.reject(request, error)
        self.gateway.store.append([ev]).addCallbacks(
            self._stored, self._not_stored, callbackArgs=(request, ev),
            errbackArgs=(request, tenant, login, ev)).addErrback(
            lambda f: log.failure("tenant {tenant} ({login}) call {call}: answering failed",
                                  f, tenant=tenant.id, login=login, call=ev.call))
        return NOT_DONE_YET

    def _stored(self, seqs: list[int | None], request: IRequest, ev: Any) -> None:
        self.gateway.engine.poke(zip(seqs, [ev]))
        _answer(request, 200, b"text/plain", b"OK")

    def _not_stored(self, failure: Any, request: IRequest, tenant: Tenant, login: str,
                    ev: Any) -> None:
        # Not stored, so not "200": the PBX may try again.
        log.failure("tenant {tenant} ({login}) call {call}: append failed", failure,
                    tenant=tenant.id, login=login, call=ev.call)
        _answer(request, 503, b"text/plain", b"store unavailable, not stored\n")

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        """Whether webhooks are stored (503 when not) and whether anything needs an
        operator (``ok`` false, with ``problems``), answered within ``HEALTH_TIMEOUT``."""
        gw = self.gateway
        if not gw.ready:
            return json_response(request, {"ok": False, "problems": ["starting"]}, 503)
        try:
            stats = await gw.store.health(HEALTH_QUIET).addTimeout(HEALTH_TIMEOUT,
                                                                   gw.reactor)
        except Exception as e:
            error = (f"no answer within {HEALTH_TIMEOUT:g} s" if isinstance(
                e, (defer.TimeoutError, defer.CancelledError)) else repr(e))
            return json_response(request, {"ok": False, "problems": [f"store: {error}"]},
                                 503)
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
        return json_response(request, body, 503 if stats["commit_error"] else 200)
