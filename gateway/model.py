"""Value types shared by every stage: tenants, normalised events, actions and attempts."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import hyperlink

from gateway.errors import BadRequest

PBX_KINDS = ("telphin",)
CRM_KINDS = ("altegio",)
ROUTINGS = ("extension", "sip")
MAX_ID = 2**63 - 1  # the store keeps ids as 64-bit integers

# Fields an operator may write but that are never returned or logged.
SECRET_FIELDS = ("key", "pbx.client_secret", "crm.partner_token")

# What a tenant's ``options`` may hold, with defaults.  Everything here changes how calls
# are folded or delivered for that tenant only.
DEFAULT_OPTIONS: dict[str, Any] = {
    "timezone": "UTC",  # offset of the dates sent to the CRM
    "internal_calls": False,  # log calls between the tenant's own extensions
    "grace": 3.0,  # seconds a call waits for late queue/IVR hangups before it is final
    "default_number": "",  # the company number sent when a call has no DID (outgoing)
}


@attrs.frozen
class PbxConfig:
    """How to reach and read the tenant's PBX account."""

    kind: str
    login: str
    api_url: str = ""
    client_id: str = ""
    client_secret: str = attrs.field(default="", repr=False)
    # Short numbers of the account's queue and IVR extensions.  Telphin marks their events
    # with ``Bridged`` but does not say which is which, and a queue beats an IVR.
    queues: tuple[str, ...] = ()
    ivrs: tuple[str, ...] = ()


@attrs.frozen
class CrmConfig:
    """How to reach the tenant's CRM account."""

    kind: str
    api_url: str
    partner_token: str = attrs.field(default="", repr=False)
    crm_token: str = ""


@attrs.frozen
class Tenant:
    """One integration: a PBX account joined to a CRM account."""

    id: int
    name: str
    enabled: bool
    key: str = attrs.field(repr=False)
    pbx: PbxConfig
    crm: CrmConfig
    numbers: tuple[str, ...] = ()
    routing: str = "extension"
    employees: dict[str, str] = attrs.field(factory=dict)
    options: dict[str, Any] = attrs.field(factory=dict)
    deleted: bool = False

    def option(self, name: str) -> Any:
        return self.options.get(name, DEFAULT_OPTIONS[name])

    def to_json(self, secrets: bool = False) -> dict[str, Any]:
        """The tenant as the admin API and the store see it; secrets only when asked."""
        data = attrs.asdict(self, recurse=True)
        if not secrets:
            data["secrets_set"] = {name: bool(_dig(data, name)) for name in SECRET_FIELDS}
            del data["key"]
            del data["pbx"]["client_secret"]
            del data["crm"]["partner_token"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Tenant":
        """Rebuild a stored tenant (trusted input, secrets included)."""
        return cls(
            id=data["id"],
            name=data["name"],
            enabled=data["enabled"],
            key=data["key"],
            pbx=PbxConfig(**{**data["pbx"], "queues": tuple(data["pbx"].get("queues", ())),
                             "ivrs": tuple(data["pbx"].get("ivrs", ()))}),
            crm=CrmConfig(**data["crm"]),
            numbers=tuple(data.get("numbers", ())),
            routing=data.get("routing", "extension"),
            employees=dict(data.get("employees", {})),
            options=dict(data.get("options", {})),
            deleted=data.get("deleted", False),
        )


def _dig(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def parse_tenant(body: Any, current: Tenant | None = None) -> Tenant:
    """Validate an admin API body (a whole tenant, or a patch of ``current``)."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    # The current tenant as a body would spell it (lists, not tuples), so a patch is checked
    # by the same rules as a whole tenant.
    base = json.loads(json.dumps(current.to_json(secrets=True))) if current else {}
    base.pop("deleted", None)
    merged = _merge(base, body)
    known = {"id", "name", "enabled", "key", "pbx", "crm", "numbers", "routing", "employees",
             "options"}
    for name in merged:
        if name not in known:
            raise BadRequest(name, "unknown field")
    tid = merged.get("id")
    if current is not None and tid != current.id:
        raise BadRequest("id", "cannot be changed")
    if not isinstance(tid, int) or isinstance(tid, bool) or not 0 < tid <= MAX_ID:
        raise BadRequest("id", "required: the application serial number, a positive integer")
    name = _text(merged, "name", required=True)
    enabled = merged.get("enabled", True)
    if not isinstance(enabled, bool):
        raise BadRequest("enabled", "must be true or false")
    key = merged.get("key") or secrets.token_urlsafe(24)
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_\-.~]{16,128}", key):
        raise BadRequest("key", "must be 16-128 URL-safe characters")
    pbx = _section(merged, "pbx")
    pbx_kind = _choice(pbx, "pbx.kind", PBX_KINDS)
    login = _text(pbx, "pbx.login", required=True)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", login):
        raise BadRequest("pbx.login", "letters, digits, '.', '_' and '-' only")
    pbx_cfg = PbxConfig(
        kind=pbx_kind,
        login=login,
        api_url=_url(pbx, "pbx.api_url", required=False),
        client_id=_text(pbx, "pbx.client_id"),
        client_secret=_text(pbx, "pbx.client_secret"),
        queues=_numbers(pbx, "pbx.queues"),
        ivrs=_numbers(pbx, "pbx.ivrs"),
    )
    _only(pbx, "pbx", {f.name for f in attrs.fields(PbxConfig)})
    crm = _section(merged, "crm")
    crm_cfg = CrmConfig(
        kind=_choice(crm, "crm.kind", CRM_KINDS),
        api_url=_url(crm, "crm.api_url", required=True),
        partner_token=_text(crm, "crm.partner_token", required=True),
        crm_token=_text(crm, "crm.crm_token", required=True),
    )
    _only(crm, "crm", {f.name for f in attrs.fields(CrmConfig)})
    numbers = _numbers(merged, "numbers")
    routing = merged.get("routing", "extension")
    if routing not in ROUTINGS:
        raise BadRequest("routing", f"must be one of {', '.join(ROUTINGS)}")
    employees = merged.get("employees", {})
    if not isinstance(employees, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in employees.items()
    ):
        raise BadRequest("employees", "must map extension strings to CRM user strings")
    options = merged.get("options", {})
    if not isinstance(options, dict):
        raise BadRequest("options", "must be an object")
    for opt, value in options.items():
        if opt not in DEFAULT_OPTIONS:
            raise BadRequest(f"options.{opt}", "unknown option")
        default = DEFAULT_OPTIONS[opt]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 600
        else:
            ok = isinstance(value, str)
        if not ok:
            raise BadRequest(f"options.{opt}", f"must be like {default!r}")
    try:
        ZoneInfo(options.get("timezone", "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest("options.timezone", "unknown time zone") from None
    return Tenant(id=tid, name=name, enabled=enabled, key=key, pbx=pbx_cfg, crm=crm_cfg,
                  numbers=numbers, routing=routing, employees=dict(employees),
                  options=dict(options))


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict) and name != "employees":
            out[name] = _merge(out[name], value)
        else:
            out[name] = value
    return out


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name)
    if not isinstance(value, dict):
        raise BadRequest(name, "required: an object")
    return value


def _only(data: dict[str, Any], prefix: str, allowed: set[str]) -> None:
    for name in data:
        if name not in allowed:
            raise BadRequest(f"{prefix}.{name}", "unknown field")


def _text(data: dict[str, Any], dotted: str, required: bool = False) -> str:
    value = data.get(dotted.rsplit(".", 1)[-1], "")
    if not isinstance(value, str):
        raise BadRequest(dotted, "must be a string")
    if required and not value.strip():
        raise BadRequest(dotted, "required")
    return value.strip()


def _choice(data: dict[str, Any], dotted: str, choices: tuple[str, ...]) -> str:
    value = data.get(dotted.rsplit(".", 1)[-1])
    if value not in choices:
        raise BadRequest(dotted, f"must be one of {', '.join(choices)}")
    return value


def _url(data: dict[str, Any], dotted: str, required: bool) -> str:
    value = _text(data, dotted, required)
    if value:
        try:
            url = hyperlink.URL.from_text(value)
        except Exception:
            raise BadRequest(dotted, "not a URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise BadRequest(dotted, "must be an http(s) URL")
    return value.rstrip("/")


def _numbers(data: dict[str, Any], dotted: str) -> tuple[str, ...]:
    value = data.get(dotted.rsplit(".", 1)[-1], [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(dotted, "must be a list of strings")
    out = tuple(e164(v) for v in value)
    if not all(out):
        raise BadRequest(dotted, "every entry must contain digits")
    return out


def digits(number: str) -> str:
    """A phone number as bare digits, the form numbers are compared in."""
    return "".join(ch for ch in number if ch.isdigit())


def e164(number: str) -> str:
    """Digits-only E.164: Russian trunk-prefixed ``8 916 …`` (11 digits) becomes ``7916…``. [I]"""
    bare = digits(number)
    if len(bare) == 11 and bare.startswith("8"):
        return "7" + bare[1:]
    return bare


@attrs.frozen
class Event:
    """One thing that happened to one leg of one call, whatever PBX reported it."""

    tenant: int
    call: str  # the PBX's call key (Telphin CallID)
    leg: str  # the PBX's leg key (Telphin SubCallID)
    kind: str  # ring | answer | hangup
    flow: str  # in | out
    at: int  # PBX time, microseconds since the epoch
    received: float  # gateway time, seconds since the epoch (drives grace timers)
    extension: str = ""  # the leg's own extension, short form ("101")
    sip: str = ""  # the same as the PBX account names it ("7001*101")
    peer: str = ""  # the other party: caller on incoming legs, dialled number on outgoing
    did: str = ""  # the company number the call came through
    status: str = ""  # PBX leg status (ANSWER, BUSY, NOANSWER, CANCEL, ...)
    duration: int = 0  # talk time, microseconds (hangup only)
    recording: str = ""  # PBX recording id (hangup only)
    bridged: bool | None = None  # set on queue/IVR events: answered after entering it
    transferred: bool = False  # an outgoing leg created by a forward
    callback: str = ""  # click-to-call correlation id

    @property
    def natural_key(self) -> str:
        """What makes two deliveries the same PBX event: they are stored once."""
        return f"{self.leg}|{self.kind}|{self.at}"

    def to_row(self) -> dict[str, Any]:
        # Not attrs.asdict: its generality cost a tenth of the store thread per event.
        return {name: getattr(self, name) for name in _EVENT_FIELDS}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Event":
        return cls(**row)


_EVENT_FIELDS = tuple(a.name for a in attrs.fields(Event))

# Actions: what to tell a CRM.  Lower priority numbers go first.
POPUP, CLOSE_POPUP, RECORD, SETUP = "popup", "close_popup", "record", "setup"
PRIORITY = {POPUP: 0, CLOSE_POPUP: 1, RECORD: 2, SETUP: 2}

PENDING, DONE, DROPPED, FAILED, DEAD = "pending", "done", "dropped", "failed", "dead"
ACTION_STATES = (PENDING, DONE, DROPPED, FAILED, DEAD)


@attrs.define
class Action:
    """One thing to tell a tenant's CRM, kept in the outbox until it is delivered."""

    tenant: int
    call: str  # "" for tenant-level actions (setup)
    kind: str
    key: str  # idempotency key, unique within (tenant, call)
    payload: dict[str, Any]
    created: float
    leg: str = ""  # the leg a pop-up belongs to: its end makes the pop-up stale
    id: int | None = None
    state: str = PENDING
    attempts: int = 0
    next_at: float = 0.0
    last_error: str = ""

    @property
    def priority(self) -> int:
        return PRIORITY[self.kind]

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id, "tenant": self.tenant, "call": self.call, "leg": self.leg,
            "kind": self.kind,
            "key": self.key, "state": self.state, "attempts": self.attempts,
            "created": self.created, "next_at": self.next_at, "last_error": self.last_error,
            "payload": self.payload,
        }


@attrs.frozen
class Attempt:
    """One try at delivering an action, for the operator's "why is this not in the CRM?"."""

    action: int
    at: float
    outcome: str  # done | retry | failed | dead | dropped
    status: int | None
    request: str
    answer: str
