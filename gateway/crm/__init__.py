"""The CRM seam: what every CRM module provides (``ICrm``), and the registry by ``kind``.

A CRM module is one file here plus its fake and its tests.  It is handed CRM-neutral actions
(gateway.model: pop-up, pop-up update, record, attach recording, contact, setup) whose payloads
carry neutral values only (directions, outcomes, numbers, extensions, microsecond times), and
maps them to its own API; an action it has no notion of is simply not supported.
"""

from __future__ import annotations

import hmac
import os
import json
import re
from typing import Any

import attrs
from zope.interface import Attribute, Interface

from gateway.errors import BadRequest
from gateway.kinds import Registry


@attrs.frozen
class CrmConfig:
    """What every CRM config has; a module's config class adds its own fields."""

    kind: str
    credential: int | None = None  # the named credentials it was built from, if any


@attrs.frozen
class Command:
    """What a CRM asked the gateway to do on its PBX (click-to-call, hang-up)."""

    action: str  # makecall | hangup | setup
    employee: str = ""  # the CRM's user id or the extension, as the CRM sent it
    number: str = ""  # the number to dial (makecall)
    call: str = ""  # the PBX's call id (hangup)
    # setup: fields of the tenant's ``crm`` section the CRM sent (its own URL and token);
    # checked by the module's schema, then the tenant is enabled.
    settings: dict = attrs.field(factory=dict, hash=False)


class ICrm(Interface):
    """One CRM.  An instance lives as long as the gateway (it may cache tokens and ids):
    the class is called with (HttpClient, clock, store)."""

    kind = Attribute("The registry key: a tenant's ``crm.kind``.")
    secrets = Attribute("Config fields that are write-only: never returned, never logged.")
    config_type = Attribute("The attrs class of its config (a CrmConfig subclass).")
    has_responsible = Attribute("Whether ``responsible`` can answer (a CRM with no notion "
                                "of a responsible manager answers every IVR with nobody).")
    credential_fields = Attribute("Config fields a named credential may hold (login, "
                                  "password, domain, tokens): one login, several tenants.")

    def parse_config(section: dict) -> CrmConfig:
        """A tenant's ``crm`` section validated into a config value; ``BadRequest`` naming
        ``crm.<field>`` otherwise."""

    def check_tenant(tenant: Any) -> None:
        """Rules across the tenant's fields (BadRequest naming the field), at creation and
        at every change."""

    def account(tenant: Any) -> str:
        """The CRM account the config names: tenants on one account share its setup."""

    def supports(tenant: Any, kind: str, payload: dict) -> bool:
        """Whether an action of this kind (with this payload) means anything to the CRM;
        unsupported actions are never queued."""

    def limits(tenant: Any) -> list:
        """[(bucket, rate per second, burst)] the tenant's actions are sent under."""

    def perform(tenant: Any, action: Any, link: str | None) -> Any:
        """Deferred (summary, Response): send one action; ``Retryable`` / ``Permanent``
        otherwise.  ``link`` is the recording's URL where the PBX gave one."""

    def responsible(tenant: Any, number: str) -> Any:
        """Deferred: the extension of the employee responsible for ``number``, or None;
        ``NotImplementedError`` when the CRM has no such lookup."""

    def setup_guide(tenant: Any, base: str) -> list:
        """What the customer enters in the CRM for this tenant (its inbound URLs), like
        ``IPbx.setup_guide``; empty when the CRM needs nothing from the gateway."""

    def command(request: Any, tenant: Any, action: str) -> Command:
        """A CRM's request to its inbound route ``/crm/{tenant}/{action}/{login}``,
        authenticated and parsed; ``BadRequest`` otherwise."""

    # Optional (a module without them has none): pages of its own on the public site, and
    # gateway-wide settings (say a marketplace application's id and token).
    #
    # site_prefix: first path segment of the module's own public pages (``/{prefix}/…``).
    # site(gateway): the twisted.web resource answering them (leaf; ``request.postpath``
    #     is the whole path).
    # gateway_options: twistd ``optParameters`` rows the gateway's options add.
    # configure(options): those options' values (a mapping by option name), at start;
    #     ``ValueError`` saying which is wrong.
    # transient_tokens: {key prefix: seconds} of state it keeps in the store's token table
    #     for a while only; older rows are pruned with the gateway's hourly pruning.


def gateway_options() -> list:
    """The twistd options every CRM module adds (``gateway_options``)."""
    return [row for kind in KINDS for row in getattr(crm_type(kind), "gateway_options", [])]


# The one switch that lets a CRM's address be a loopback one (a fake CRM in the tests); never
# set it in production.
LOOPBACK_ENV = "GATEWAY_ALLOW_LOOPBACK_CRM"


def loopback_allowed() -> bool:
    return os.environ.get(LOOPBACK_ENV) == "1"


REGISTRY = Registry("crm", {
    "altegio": "gateway.crm.altegio:Altegio",
    "megaplan": "gateway.crm.megaplan:Megaplan",
    "planfix": "gateway.crm.planfix:Planfix",
})
KINDS = REGISTRY.kinds
crm_type = REGISTRY.type
parse_config = REGISTRY.parse_config
load_config = REGISTRY.load_config


def plain_guide(tenant: Any, base: str) -> list:
    """The URLs of ``plain_command``, for a CRM button or robot."""
    return [{"what": f"{action} ({fields})", "method": "POST",
             "url": f"{base}/crm/{tenant.id}/{action}/{tenant.pbx.login}?key={tenant.key}",
             "content_type": "application/json"}
            for action, fields in (("makecall", '{"employee", "number"}'),
                                   ("hangup", '{"call"}'))]


def plain_command(request: Any, tenant: Any, action: str) -> Command:
    """The gateway's own click-to-call form, for CRMs that let an operator configure a
    plain HTTP call (a button, a robot): a JSON object ``{"employee", "number"}`` for
    ``makecall``, ``{"call"}`` for ``hangup``.  The tenant's ``?key=`` authenticates it."""
    if not hmac.compare_digest(request.query_key().encode(), tenant.key.encode()):
        raise BadRequest("key", "wrong or missing key", status=403)
    if action not in ("makecall", "hangup"):
        raise BadRequest("action", f"unknown action {action[:40]!r}; expected makecall or "
                         "hangup", status=404)
    try:
        body = json.loads(request.body or b"null")
    except ValueError:
        raise BadRequest("body", "not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    fields = {}
    for name in ("employee", "number") if action == "makecall" else ("call",):
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value.strip():
            raise BadRequest(name, "required: a string")
        if len(value) > 128:
            raise BadRequest(name, "longer than 128 characters")
        fields[name] = value.strip()
    number = fields.get("number")
    if number is not None and not _DIALLABLE.fullmatch(number):
        raise BadRequest("number", "digits, with an optional leading '+' and spaces, "
                         "dashes or brackets between them")
    return Command(action=action, **fields)


_DIALLABLE = re.compile(r"\+?[0-9][0-9 ()\-]{0,30}")
