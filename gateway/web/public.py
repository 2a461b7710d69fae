"""The public site: PBX webhooks (Telphin events) and the health check."""

from __future__ import annotations

import hmac
from typing import Any
from urllib.parse import parse_qs, parse_qsl

from klein import Klein
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from gateway.errors import BadRequest
from gateway.model import Tenant
from gateway.protocols import telphin
from gateway.web import json_response

log = Logger()


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


class PublicSite:
    """Routes PBXs call.  A tenant is named by id in the URL and proven by its ``key``."""

    app = Klein()

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def resource(self) -> Any:
        return self.app.resource()

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
        query = request.uri.split(b"?", 1)[1] if b"?" in request.uri else b""
        keys = parse_qs(query.decode("latin-1"), errors="replace").get("key") or [""]
        if not hmac.compare_digest(keys[0].encode(), tenant.key.encode()):
            raise BadRequest("key", "wrong or missing key", status=403)
        if not tenant.enabled:
            raise BadRequest("tenant", f"tenant {tenant.id} is disabled", status=403)
        return tenant

    @app.handle_errors(BadRequest)
    def bad_request(self, request: IRequest, failure: Any) -> bytes:
        error = failure.value
        request.setResponseCode(error.status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        log.info("rejected {method} {path}: {status} {error}", method=request.method,
                 path=request.path, status=error.status, error=str(error))
        return f"{error}\n".encode()

    @app.route("/events/<tenant_id>/<event>/<login>", methods=["GET", "POST"])
    async def telphin_event(self, request: IRequest, tenant_id: str, event: str,
                            login: str) -> bytes:
        tenant = self._tenant(request, tenant_id, login)
        fields = _form(request, self.gateway.max_body)
        ev = telphin.parse_event(fields, event, tenant.id, self.gateway.reactor.seconds())
        try:
            await self.gateway.store.append([ev])
        except Exception:
            # Not stored, so not "200": the PBX may try again.
            log.failure("tenant {tenant} ({login}) call {call}: append failed",
                        tenant=tenant.id, login=login, call=ev.call)
            request.setResponseCode(503)
            return b"store unavailable, not stored\n"
        self.gateway.engine.poke()
        request.setHeader(b"Content-Type", b"text/plain")
        return b"OK"

    @app.route("/healthz", methods=["GET"])
    async def healthz(self, request: IRequest) -> bytes:
        if not self.gateway.ready:
            return json_response(request, {"ok": False, "error": "starting"}, 503)
        try:
            stats = await self.gateway.store.stats()
        except Exception as e:
            return json_response(request, {"ok": False, "error": f"store: {e}"}, 503)
        return json_response(request, {
            "ok": True,
            "fold_lag_events": stats["log_head"] - self.gateway.engine.cursor,
            "open_calls": len(self.gateway.engine.calls),
            "outbox_depth": self.gateway.dispatcher.depth,
            "oldest_pending_seconds": self.gateway.dispatcher.oldest_age(),
            "in_flight": self.gateway.dispatcher.in_flight,
            "actions": stats["actions"],
        })
