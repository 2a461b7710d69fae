"""The admin API: tenants (secrets write-only), their calls, the outbox and re-drives."""

from __future__ import annotations

import functools
import hmac
import json
from typing import Any, Callable

import attrs
from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from gateway import crm, protocols
from gateway.errors import BadRequest
from gateway.model import ACTION_STATES, MAX_ID, Tenant, field_text, parse_tenant
from gateway.store import Conflict
from gateway.web import json_response, ui

log = Logger()


def _authorised(route: Callable) -> Callable:
    @functools.wraps(route)
    def check(self: "AdminSite", request: IRequest, *args: Any, **kwargs: Any) -> Any:
        given = request.getHeader(b"authorization") or b""
        expected = f"Bearer {self.gateway.admin_token}".encode()
        if not self.gateway.admin_token or not hmac.compare_digest(given, expected):
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="gateway"')
            return json_response(request, {"error": "a valid bearer token is required",
                                           "field": "Authorization"}, 401)
        return route(self, request, *args, **kwargs)
    return check


# An admin body is a tenant: a few levels deep and a few kilobytes.  Anything deeper or
# larger is refused before (or instead of) parsing it.
MAX_BODY = 256 * 1024
MAX_DEPTH = 8


def _body(request: IRequest) -> Any:
    raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(raw) > MAX_BODY:
        raise BadRequest("body", f"larger than {MAX_BODY} bytes", status=413)
    try:
        body = json.loads(raw or b"null")
    except RecursionError:
        raise BadRequest("body", f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:
        raise BadRequest("body", f"not JSON: {str(e)[:200]}") from None
    if _depth(body) > MAX_DEPTH:
        raise BadRequest("body", f"nested deeper than {MAX_DEPTH} levels")
    return body


def _depth(value: Any, level: int = 1) -> int:
    """How deeply a JSON value nests (stops counting past ``MAX_DEPTH``)."""
    if level > MAX_DEPTH:
        return level
    children = (value.values() if isinstance(value, dict)
                else value if isinstance(value, list) else ())
    return max((_depth(child, level + 1) for child in children), default=level)


def _id(text: str) -> int | None:
    """An id from a URL segment: ASCII digits that fit the store, else None (a 404)."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _int_arg(request: IRequest, name: str, default: int | None, top: int = 1000) -> int | None:
    raw = request.args.get(name.encode())
    if not raw:
        return default
    try:
        value = int(raw[0])
    except ValueError:
        raise BadRequest(name, "must be an integer") from None
    if not 0 < value <= top:
        raise BadRequest(name, f"must be between 1 and {top}")
    return value


class AdminSite:
    """Routes for operators; every one needs ``Authorization: Bearer <admin token>``."""

    app = Klein()

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def resource(self) -> Any:
        """The JSON API (Klein), with the operator's web UI under ``/ui/``."""
        return ui.mount(self, self.app.resource())

    @app.handle_errors(BadRequest)
    def bad_request(self, request: IRequest, failure: Any) -> bytes:
        error = failure.value
        return json_response(request, {"error": error.message, "field": error.field},
                             error.status)

    @app.handle_errors(Exception)
    def internal_error(self, request: IRequest, failure: Any) -> bytes:
        error = failure.value
        if isinstance(error, HTTPException):  # no such route, or not with this method
            if getattr(error, "valid_methods", None):
                request.setHeader(b"Allow", ", ".join(error.valid_methods).encode())
            # Werkzeug's redirects (``//`` merged, a trailing slash) are no route either.
            code = error.code if error.code and error.code >= 400 else 404
            return json_response(request, {"error": "no such route" if code == 404
                                           else error.name.lower(), "field": "path"}, code)
        # A bug, not the caller's fault: logged with its traceback, answered as JSON (not
        # Klein's HTML page) without the details.
        log.failure("admin API {method} {path} failed", failure,
                    method=request.method.decode("ascii", "backslashreplace"),
                    path=request.path.decode("ascii", "backslashreplace"))
        return json_response(request, {"error": "internal error; see the gateway's log",
                                       "field": ""}, 500)

    async def _action(self, action_id: str) -> dict:
        number = _id(action_id)
        found = await self.gateway.store.action(number) if number is not None else None
        if found is None:
            raise BadRequest("id", f"no action {action_id[:20]}", status=404)
        return found

    def _shown(self, tenant: Tenant, accounts: dict | None = None) -> dict[str, Any]:
        """A tenant as answered: no secrets, and the other tenants on its CRM account."""
        return {**tenant.to_json(), "crm_shared_with": self.gateway.sharing(tenant, accounts)}

    def _tenant(self, tenant_id: str) -> Tenant:
        tenant = self.gateway.tenants.get(_id(tenant_id))
        if tenant is None or tenant.deleted:
            raise BadRequest("id", f"no tenant {tenant_id[:20]}", status=404)
        return tenant

    @app.route("/metrics", methods=["GET"])
    @_authorised
    async def metrics(self, request: IRequest) -> bytes:
        """Prometheus' scrape (its ``authorization`` section sends the bearer token)."""
        body = await self.gateway.metrics.exposition()
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return body

    @app.route("/api/v1/tenants", methods=["POST"])
    @_authorised
    async def create(self, request: IRequest) -> bytes:
        body = _body(request)
        tenant = parse_tenant(body, credentials=self.gateway.credentials)
        async with self.gateway.writes:
            existing = self.gateway.tenants.get(tenant.id)
            if existing is not None and not existing.deleted:
                raise BadRequest("id", f"tenant {tenant.id} exists", status=409)
            await self.gateway.save_tenant(tenant, existing)
        out = self._shown(tenant)
        if not (isinstance(body, dict) and body.get("key")):
            # A generated key is shown this once, so the operator can build the PBX URLs.
            out["key"] = tenant.key
        request.setHeader(b"Location", f"/api/v1/tenants/{tenant.id}".encode())
        return json_response(request, out, 201)

    @app.route("/api/v1/tenants", methods=["GET"])
    @_authorised
    def list_tenants(self, request: IRequest) -> bytes:
        accounts = self.gateway.crm_accounts()
        return json_response(request, [self._shown(t, accounts)
                                       for t in self.gateway.tenants.values()
                                       if not t.deleted])

    @app.route("/api/v1/tenants/<tenant_id>", methods=["GET"])
    @_authorised
    def show(self, request: IRequest, tenant_id: str) -> bytes:
        return json_response(request, self._shown(self._tenant(tenant_id)))

    @app.route("/api/v1/tenants/<tenant_id>/setup", methods=["GET"])
    @_authorised
    def setup(self, request: IRequest, tenant_id: str) -> bytes:
        """What to paste into the PBX's cabinet and the CRM for this tenant: its URLs under
        the gateway's ``--public-url``, with the tenant's key (the one answer besides the
        tenant's creation that shows it: these URLs are what the PBX is given)."""
        tenant = self._tenant(tenant_id)
        base = self.gateway.public_url
        return json_response(request, {
            "pbx": self.gateway.pbxs[tenant.pbx.kind].setup_guide(tenant, base),
            "crm": self.gateway.crms[tenant.crm.kind].setup_guide(tenant, base)})

    @app.route("/api/v1/tenants/<tenant_id>", methods=["PATCH"])
    @_authorised
    async def patch(self, request: IRequest, tenant_id: str) -> bytes:
        body = _body(request)
        async with self.gateway.writes:
            current = self._tenant(tenant_id)
            tenant = parse_tenant(body, current, self.gateway.credentials)
            await self.gateway.save_tenant(tenant, current)
        out = self._shown(tenant)
        if tenant.key != current.key and not body.get("key"):
            # ``"key": null`` (or "") asks for a new generated key: shown this once, like
            # at creation, or the PBX could never be given it.
            out["key"] = tenant.key
        return json_response(request, out)

    @app.route("/api/v1/tenants/<tenant_id>", methods=["DELETE"])
    @_authorised
    async def delete(self, request: IRequest, tenant_id: str) -> bytes:
        async with self.gateway.writes:
            current = self._tenant(tenant_id)
            # Kept, marked deleted: its outbox (the CRM's setup/disable first) still drains.
            await self.gateway.save_tenant(attrs.evolve(current, deleted=True, enabled=False),
                                           current)
        request.setResponseCode(204)
        return b""

    @app.route("/api/v1/tenants/<tenant_id>/calls", methods=["GET"])
    @_authorised
    async def calls(self, request: IRequest, tenant_id: str) -> bytes:
        tenant = self._tenant(tenant_id)
        limit = _int_arg(request, "limit", 50)
        return json_response(request, await self.gateway.store.recent_calls(tenant.id, limit))

    @app.route("/api/v1/pauses", methods=["GET"])
    @_authorised
    def pauses(self, request: IRequest) -> bytes:
        """CRM hosts paused by a 429's Retry-After: bucket → seconds left."""
        return json_response(request, {bucket: round(left, 1) for bucket, left
                                       in self.gateway.dispatcher.paused().items()})

    @app.route("/api/v1/quarantine", methods=["GET"])
    @_authorised
    async def quarantine(self, request: IRequest) -> bytes:
        tenant = _int_arg(request, "tenant", None, top=MAX_ID)
        limit = _int_arg(request, "limit", 100)
        return json_response(request, await self.gateway.store.quarantine(tenant, limit))

    @app.route("/api/v1/quarantine/refold", methods=["POST"])
    @_authorised
    async def refold_all(self, request: IRequest) -> bytes:
        only = _int_arg(request, "tenant", None, top=MAX_ID)
        keys = [key for key in list(self.gateway.engine.quarantined)
                if only is None or key[0] == only]
        folded, again = [], []
        for tenant, call in keys:
            error = await self.gateway.engine.refold(tenant, call)
            if error is None:
                folded.append({"tenant": tenant, "call": call})
            elif error is not False:
                again.append({"tenant": tenant, "call": call, "error": error})
        return json_response(request, {"folded": folded, "quarantined": again})

    @app.route("/api/v1/quarantine/<tenant_id>/<call>/refold", methods=["POST"])
    @_authorised
    async def refold(self, request: IRequest, tenant_id: str, call: str) -> bytes:
        tenant = _id(tenant_id)
        error = (await self.gateway.engine.refold(tenant, call) if tenant is not None
                 else False)
        if error is False:
            raise BadRequest("call", f"no quarantined call {call[:80]!r} of tenant "
                             f"{tenant_id[:20]}", status=404)
        if error is not None:
            return json_response(request, {"folded": False, "error": error})
        return json_response(request, {"folded": True})

    @app.route("/api/v1/actions", methods=["GET"])
    @_authorised
    async def actions(self, request: IRequest) -> bytes:
        state = (request.args.get(b"state") or [b""])[0].decode("utf-8", "replace")
        if state and state not in ACTION_STATES:
            raise BadRequest("state", f"must be one of {', '.join(ACTION_STATES)}")
        tenant = _int_arg(request, "tenant", None, top=2**62)
        limit = _int_arg(request, "limit", 100)
        return json_response(request, await self.gateway.store.actions(state or None, tenant,
                                                                       limit))

    @app.route("/api/v1/actions/<action_id>", methods=["GET"])
    @_authorised
    async def action(self, request: IRequest, action_id: str) -> bytes:
        return json_response(request, await self._action(action_id))

    @app.route("/api/v1/actions/<action_id>/retry", methods=["POST"])
    @_authorised
    async def retry(self, request: IRequest, action_id: str) -> bytes:
        action = await self.redrive(action_id)
        return json_response(request, action.summary())

    async def redrive(self, action_id: str) -> Any:
        """Put a dead or failed action back in the outbox (the API's retry, the UI's
        re-drive); ``BadRequest`` 404 / 409 otherwise."""
        before = await self._action(action_id)
        if before["state"] not in ("dead", "failed"):
            raise BadRequest("state", f"action {action_id} is {before['state']}; only dead "
                             "or failed actions can be retried", status=409)
        action = await self.gateway.store.retry(before["id"], self.gateway.reactor.seconds())
        self.gateway.dispatcher.add([action])
        return action

    # Named credentials: one PBX application or CRM login, several tenants

    def _module(self, kind: Any) -> Any:
        if isinstance(kind, str) and kind in protocols.KINDS:
            return protocols.pbx_type(kind)
        if isinstance(kind, str) and kind in crm.KINDS:
            return crm.crm_type(kind)
        raise BadRequest("kind", "must be one of " + ", ".join(
            sorted(protocols.KINDS) + sorted(crm.KINDS)))

    def _credential_shown(self, credential: dict[str, Any]) -> dict[str, Any]:
        secrets = self._module(credential["kind"]).secrets
        fields = credential["fields"]
        return {"id": credential["id"], "kind": credential["kind"], "name": credential["name"],
                "fields": {k: v for k, v in fields.items() if k not in secrets},
                "secrets_set": {k: bool(fields.get(k)) for k in secrets
                                if k in self._module(credential["kind"]).credential_fields},
                "used_by": self._users(credential["id"])}

    def _users(self, cid: int) -> list[int]:
        return sorted(t.id for t in self.gateway.tenants.values() if not t.deleted
                      and cid in (t.pbx.credential, t.crm.credential))

    def _credential_body(self, body: Any, current: dict[str, Any] | None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise BadRequest("body", "must be a JSON object")
        for name in body:
            if name not in ("kind", "name", "fields"):
                raise BadRequest(name, "unknown field")
        kind = body.get("kind", current["kind"] if current else None)
        if current is not None and kind != current["kind"]:
            raise BadRequest("kind", "cannot be changed")
        module = self._module(kind)
        name = field_text({**(current or {}), **body}, "name", required=True)
        if len(name) > 200:
            raise BadRequest("name", "longer than 200 characters")
        fields = body.get("fields", {})
        if not isinstance(fields, dict):
            raise BadRequest("fields", "must be an object")
        merged = {**(current["fields"] if current else {}), **fields}
        for field, value in merged.items():
            if field not in module.credential_fields:
                raise BadRequest(f"fields.{field}", f"not a {kind} credential field; "
                                 f"expected {', '.join(module.credential_fields)}")
            if not isinstance(value, str) or len(value) > 1000:
                raise BadRequest(f"fields.{field}", "must be a string of at most 1000 "
                                 "characters")
        out = {"kind": kind, "name": name, "fields": merged}
        if current is not None:
            out["id"] = current["id"]
        return out

    async def _put_credential(self, credential: dict[str, Any]) -> dict[str, Any]:
        try:
            cid = await self.gateway.store.put_credential(credential,
                                                          self.gateway.reactor.seconds())
        except Conflict:
            raise BadRequest("name", f"{credential['kind']} credentials named "
                             f"{credential['name'][:80]!r} exist", status=409) from None
        stored = await self.gateway.store.credential(cid)
        self.gateway.credentials[cid] = stored
        return stored

    @app.route("/api/v1/credentials", methods=["POST"])
    @_authorised
    async def create_credential(self, request: IRequest) -> bytes:
        credential = self._credential_body(_body(request), None)
        async with self.gateway.writes:
            stored = await self._put_credential(credential)
        request.setHeader(b"Location", f"/api/v1/credentials/{stored['id']}".encode())
        return json_response(request, self._credential_shown(stored), 201)

    @app.route("/api/v1/credentials", methods=["GET"])
    @_authorised
    def list_credentials(self, request: IRequest) -> bytes:
        kind = (request.args.get(b"kind") or [b""])[0].decode("utf-8", "replace")
        return json_response(request, [self._credential_shown(c) for c in sorted(
            self.gateway.credentials.values(), key=lambda c: c["id"])
            if not kind or c["kind"] == kind])

    def _credential(self, credential_id: str) -> dict[str, Any]:
        found = self.gateway.credentials.get(_id(credential_id))
        if found is None:
            raise BadRequest("id", f"no credentials {credential_id[:20]}", status=404)
        return found

    @app.route("/api/v1/credentials/<credential_id>", methods=["GET"])
    @_authorised
    def show_credential(self, request: IRequest, credential_id: str) -> bytes:
        return json_response(request, self._credential_shown(self._credential(credential_id)))

    @app.route("/api/v1/credentials/<credential_id>", methods=["PATCH"])
    @_authorised
    async def patch_credential(self, request: IRequest, credential_id: str) -> bytes:
        """Change credentials; every tenant using them is checked with the new fields
        first (400 naming the tenant's field if one would be refused), then saved."""
        body = _body(request)
        async with self.gateway.writes:
            current = self._credential(credential_id)
            credential = self._credential_body(body, current)
            trial = {**self.gateway.credentials, current["id"]: {**current, **credential}}
            users = [self.gateway.tenants[i] for i in self._users(current["id"])]
            updated = []
            for tenant in users:
                try:
                    updated.append((parse_tenant({}, tenant, trial), tenant))
                except BadRequest as e:
                    raise BadRequest(e.field, f"tenant {tenant.id}: {e.message}") from None
            stored = await self._put_credential(credential)
            for tenant, previous in updated:
                await self.gateway.save_tenant(tenant, previous)
        return json_response(request, self._credential_shown(stored))

    @app.route("/api/v1/credentials/<credential_id>", methods=["DELETE"])
    @_authorised
    async def delete_credential(self, request: IRequest, credential_id: str) -> bytes:
        async with self.gateway.writes:
            current = self._credential(credential_id)
            users = self._users(current["id"])
            if users:
                raise BadRequest("id", f"credentials {current['id']} are used by tenants "
                                 f"{users}", status=409)
            await self.gateway.store.delete_credential(current["id"])
            del self.gateway.credentials[current["id"]]
        request.setResponseCode(204)
        return b""
