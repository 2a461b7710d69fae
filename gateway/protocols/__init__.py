"""The PBX seam: what every PBX module provides (``IPbx``), and the registry by ``kind``.

A PBX module is one file here plus its fake and its tests.  The core (web, engine, calls,
outbox, store) reaches a PBX only through this interface and the registry, so it never names
one.
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import Attribute, Interface

from gateway.kinds import Registry


@attrs.frozen
class PbxConfig:
    """What every PBX config has; a module's config class adds its own fields."""

    kind: str
    # The PBX account login: the last segment of the tenant's URLs, so one customer can be
    # followed with ngrep / grep.
    login: str
    # Short numbers of the account's queue and IVR extensions (where the PBX's events do not
    # say which is which; a queue beats an IVR in the missed-call rules).
    queues: tuple[str, ...] = ()
    ivrs: tuple[str, ...] = ()
    credential: int | None = None  # the named credentials it was built from, if any


class IPbx(Interface):
    """One PBX family.  An instance lives as long as the gateway (it may cache tokens):
    the class is called with (HttpClient, clock).

    Inbound requests reach a module as ``gateway.model.Inbound`` values, already bounded in
    size by the web layer; the module parses and checks everything in them and raises
    ``BadRequest`` (HTTP status and the field's name) for anything it cannot take.
    """

    kind = Attribute("The registry key: a tenant's ``pbx.kind``.")
    prefix = Attribute("First path segment of its webhook URLs: "
                       "``/{prefix}/{tenant}/{name}/{login}``.")
    secrets = Attribute("Config fields that are write-only: never returned, never logged.")
    config_type = Attribute("The attrs class of its config (a PbxConfig subclass).")
    credential_fields = Attribute("Config fields a named credential may hold (the REST "
                                  "application): one account, several tenants.")

    def parse_config(section: dict) -> PbxConfig:
        """A tenant's ``pbx`` section (an admin API body) validated into a config value;
        ``BadRequest`` naming ``pbx.<field>`` otherwise."""

    def authenticate(request: Any, tenant: Any) -> None:
        """Check the request is from the tenant's PBX (the URL key, a token in the body, a
        header); ``BadRequest`` with status 403 otherwise."""

    def parse(request: Any, tenant: Any, received: float) -> list:
        """The events one webhook carries (one notification may name several legs).

        Each event's ``natural_key`` must be the same for two deliveries of one PBX event
        and differ between two events: a module whose payload has no event time sets
        ``Event.dedup`` from what identifies the notification instead (see Event)."""

    def setup_guide(tenant: Any, base: str) -> list:
        """What the customer pastes into the PBX's cabinet for this tenant: a list of
        ``{"what", "url"}`` (plus ``"method"``, ``"body"`` where the PBX asks for them),
        the URLs under ``base`` (the gateway's public URL) with the tenant's key."""

    def is_lookup(request: Any) -> bool:
        """Whether a webhook (after ``authenticate``) is a synchronous lookup, answered like
        call-interactive (``interactive_number``, then ``interactive_answer``), rather than
        events to store: for a PBX that posts every command to one URL (MegaFon's
        ``cmd=contact``)."""

    def refusal(error: Any) -> tuple:
        """(content type, body) of the answer to a request refused with ``error`` (a
        ``BadRequest``; the status is its own), in the form the PBX expects."""

    def recording_url(tenant: Any, recording: str) -> Any:
        """Deferred: a link to a recording id the PBX's events named; ``Retryable`` or
        ``Permanent`` on failure.  None when the tenant's config cannot look it up."""

    def interactive_number(request: Any) -> str:
        """The caller's number of a call-interactive request (BadRequest if absent)."""

    def interactive_answer(tenant: Any, extension: str | None) -> tuple:
        """(content type, body) telling the IVR to route to ``extension``, or to go on to
        its next rule when None."""

    def call(tenant: Any, extension: str, number: str) -> Any:
        """Deferred: start a click-to-call (the employee's phone first, then ``number``);
        fires with the PBX's id of the call, ``Permanent`` saying what to fix otherwise."""

    def hangup(tenant: Any, call: str) -> Any:
        """Deferred: end a call the PBX reported; ``NotImplementedError`` when its API
        cannot."""


REGISTRY = Registry("pbx", {
    "telphin": "gateway.protocols.telphin:Telphin",
    "callgear": "gateway.protocols.callgear:CallGear",
    "megafon": "gateway.protocols.megafon:MegaFon",
})
KINDS = REGISTRY.kinds
pbx_type = REGISTRY.type
parse_config = REGISTRY.parse_config
load_config = REGISTRY.load_config
