"""The PBX seam: what every PBX module provides (``IPbx``), and the registry by ``kind``.

A PBX module is one file here plus its fake and its tests.  The core (web, engine, calls,
outbox, store) reaches a PBX only through this interface and the registry, so it never names
one.  Stored tenants keep each side's config as plain JSON; ``load_config`` turns it back into
the value the module's schema built.
"""

from __future__ import annotations

import importlib
from typing import Any

import attrs
from zope.interface import Attribute, Interface

from gateway.errors import BadRequest


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


# kind → "module:class".  Modules are imported when first asked for, so importing the
# registry (model.py does) imports no PBX module.
KINDS = {
    "telphin": "gateway.protocols.telphin:Telphin",
}


def pbx_type(kind: str) -> Any:
    """The class registered for ``kind`` (KeyError if none)."""
    module, name = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def parse_config(section: Any) -> PbxConfig:
    """A ``pbx`` section validated by its kind's module."""
    if not isinstance(section, dict):
        raise BadRequest("pbx", "required: an object")
    kind = section.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise BadRequest("pbx.kind", f"must be one of {', '.join(KINDS)}")
    return pbx_type(kind).parse_config(section)


def load_config(data: dict[str, Any]) -> PbxConfig:
    """A stored ``pbx`` section (trusted: it was validated when written)."""
    return load(pbx_type(data["kind"]).config_type, data)


def load(cls: Any, data: dict[str, Any]) -> Any:
    """An attrs config value from its JSON form: lists become tuples where the class says
    tuple, and fields the class no longer has are ignored."""
    fields = {f.name: f for f in attrs.fields(cls)}
    values = {}
    for name, value in data.items():
        if name in fields:
            if isinstance(value, list) and fields[name].default is not attrs.NOTHING \
                    and isinstance(fields[name].default, tuple):
                value = tuple(value)
            values[name] = value
    return cls(**values)
