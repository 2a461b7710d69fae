"""Value types shared by every stage: tenants, normalised events, actions and attempts."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, parse_qsl
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import hyperlink

from gateway import crm as crms
from gateway import protocols as pbxs
from gateway.errors import BadRequest

ROUTINGS = ("extension", "sip")
MAX_ID = 2**63 - 1  # the store keeps ids as 64-bit integers

# What a tenant's ``options`` may hold, with defaults.  Everything here changes how calls
# are folded or delivered for that tenant only.
DEFAULT_OPTIONS: dict[str, Any] = {
    "timezone": "UTC",  # offset of the dates sent to the CRM
    "internal_calls": False,  # log calls between the tenant's own extensions
    "grace": 3.0,  # seconds a call waits for late queue/IVR hangups before it is final
    # the company number sent when a call has no DID (outgoing); "" means the first of
    # ``numbers``
    "default_number": "",
    # call-interactive: the PBX waits this long (seconds) for the responsible manager, and
    # a CRM's answer is reused for this long before it is asked again
    "interactive_deadline": 1.5,
    "interactive_fresh": 300.0,
}


@attrs.frozen
class Tenant:
    """One integration: a PBX account joined to a CRM account.

    ``pbx`` and ``crm`` are the config values their modules' schemas built (a
    ``gateway.protocols.PbxConfig`` and a ``gateway.crm.CrmConfig`` subclass)."""

    id: int
    name: str
    enabled: bool
    key: str = attrs.field(repr=False)
    pbx: Any
    crm: Any
    numbers: tuple[str, ...] = ()
    routing: str = "extension"
    employees: dict[str, str] = attrs.field(factory=dict)
    options: dict[str, Any] = attrs.field(factory=dict)
    deleted: bool = False

    def option(self, name: str) -> Any:
        return self.options.get(name, DEFAULT_OPTIONS[name])

    @property
    def company_number(self) -> str:
        """The number a call with no DID of its own went through (an outgoing call)."""
        return self.option("default_number") or (self.numbers[0] if self.numbers else "")

    def secret_fields(self) -> tuple[str, ...]:
        """Fields an operator may write but that are never returned or logged."""
        return ("key", *(f"pbx.{name}" for name in pbxs.pbx_type(self.pbx.kind).secrets),
                *(f"crm.{name}" for name in crms.crm_type(self.crm.kind).secrets))

    def to_json(self, secrets: bool = False) -> dict[str, Any]:
        """The tenant as the admin API and the store see it; secrets only when asked."""
        data = attrs.asdict(self, recurse=True)
        if not secrets:
            hidden = self.secret_fields()
            data["secrets_set"] = {name: bool(_dig(data, name)) for name in hidden}
            for name in hidden:
                *path, last = name.split(".")
                section = data
                for part in path:
                    section = section[part]
                del section[last]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Tenant":
        """Rebuild a stored tenant (trusted input, secrets included)."""
        return cls(
            id=data["id"],
            name=data["name"],
            enabled=data["enabled"],
            key=data["key"],
            pbx=pbxs.load_config(data["pbx"]),
            crm=crms.load_config(data["crm"]),
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


def parse_tenant(body: Any, current: Tenant | None = None,
                 credentials: dict[int, dict[str, Any]] | None = None) -> Tenant:
    """Validate an admin API body (a whole tenant, or a patch of ``current``).

    A ``pbx`` or ``crm`` section may name stored credentials (``"credential": id``, see
    ``credentials``: id → {"kind", "name", "fields"}): their fields are the section's."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    # The current tenant as a body would spell it (lists, not tuples), so a patch is checked
    # by the same rules as a whole tenant.
    base = json.loads(json.dumps(current.to_json(secrets=True))) if current else {}
    base.pop("deleted", None)
    merged = _merge(base, body)
    for side in ("pbx", "crm"):
        section = merged.get(side)
        if isinstance(section, dict) and section.get("credential") is not None:
            merged[side] = with_credential(section, side, credentials or {})
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
    name = field_text(merged, "name", required=True)
    enabled = merged.get("enabled", True)
    if not isinstance(enabled, bool):
        raise BadRequest("enabled", "must be true or false")
    key = merged.get("key") or secrets.token_urlsafe(24)
    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_\-.~]{16,128}", key):
        raise BadRequest("key", "must be 16-128 URL-safe characters")
    pbx_cfg = pbxs.parse_config(merged.get("pbx"))
    crm_cfg = crms.parse_config(merged.get("crm"))
    numbers = field_numbers(merged, "numbers")
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
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and 0 <= value <= OPTION_BOUNDS.get(opt, 600))
        else:
            ok = isinstance(value, str)
        if not ok:
            raise BadRequest(f"options.{opt}", f"must be like {default!r}")
    try:
        ZoneInfo(options.get("timezone", "UTC"))
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest("options.timezone", "unknown time zone") from None
    tenant = Tenant(id=tid, name=name, enabled=enabled, key=key, pbx=pbx_cfg, crm=crm_cfg,
                    numbers=numbers, routing=routing, employees=dict(employees),
                    options=dict(options))
    crms.crm_type(crm_cfg.kind).check_tenant(tenant)
    return tenant


# Upper bounds of the numeric options (seconds); 600 for the others.
OPTION_BOUNDS = {"interactive_deadline": 10.0, "interactive_fresh": 86400.0}


def field_login(data: dict[str, Any], dotted: str) -> str:
    """A PBX login: the last segment of the tenant's URLs."""
    value = field_text(data, dotted, required=True)
    if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", value):
        raise BadRequest(dotted, "1-64 letters, digits, '.', '_' and '-' only")
    return value


def with_credential(section: dict[str, Any], side: str,
                    credentials: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A config section with the fields of the named credentials it refers to."""
    cid = section["credential"]
    found = credentials.get(cid) if isinstance(cid, int) and not isinstance(cid, bool) else None
    if found is None:
        raise BadRequest(f"{side}.credential", f"no credentials {str(cid)[:20]}")
    kind = section.get("kind", found["kind"])
    if kind != found["kind"]:
        raise BadRequest(f"{side}.credential", f"credentials {cid} are for {found['kind']}, "
                         f"not {str(kind)[:40]}")
    return {**section, "kind": kind, **found["fields"]}


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for name, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(name), dict) and name != "employees":
            out[name] = _merge(out[name], value)
        else:
            out[name] = value
    return out


def field_only(data: dict[str, Any], prefix: str, allowed: set[str]) -> None:
    for name in data:
        if name not in allowed:
            raise BadRequest(f"{prefix}.{name}", "unknown field")


def field_text(data: dict[str, Any], dotted: str, required: bool = False) -> str:
    value = data.get(dotted.rsplit(".", 1)[-1], "")
    if not isinstance(value, str):
        raise BadRequest(dotted, "must be a string")
    if required and not value.strip():
        raise BadRequest(dotted, "required")
    return value.strip()


def field_choice(data: dict[str, Any], dotted: str, choices: tuple[str, ...]) -> str:
    value = data.get(dotted.rsplit(".", 1)[-1])
    if value not in choices:
        raise BadRequest(dotted, f"must be one of {', '.join(choices)}")
    return value


def field_url(data: dict[str, Any], dotted: str, required: bool) -> str:
    value = field_text(data, dotted, required)
    if value:
        try:
            url = hyperlink.URL.from_text(value)
        except Exception:
            raise BadRequest(dotted, "not a URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise BadRequest(dotted, "must be an http(s) URL")
    return value.rstrip("/")


def field_numbers(data: dict[str, Any], dotted: str) -> tuple[str, ...]:
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
class Inbound:
    """An HTTP request to a PBX or CRM route, as the web layer hands it to a module: the
    path's ``name`` segment, and the query and body bytes (the body already bounded)."""

    method: str
    name: str
    query: bytes
    body: bytes
    content_type: str  # lower case, without parameters
    headers: dict[str, str] = attrs.field(factory=dict)  # lower-case names, last value

    def form(self) -> dict[str, str]:
        """Form fields from the query string and a form-encoded body; first value wins."""
        if self.body and self.content_type not in ("", "application/x-www-form-urlencoded"):
            raise BadRequest("Content-Type", "must be application/x-www-form-urlencoded",
                             status=415)
        fields: dict[str, str] = {}
        for where, part in (("query", self.query), ("body", self.body)):
            try:
                # errors="strict": percent-encoded bytes must be UTF-8 too, or a field would
                # be stored with replacement characters.
                pairs = parse_qsl(part.decode("utf-8"), keep_blank_values=True,
                                  strict_parsing=False, errors="strict")
            except UnicodeDecodeError:
                raise BadRequest(where, "not UTF-8 form data") from None
            for name, value in pairs:
                fields.setdefault(name, value)
        return fields

    def query_key(self) -> str:
        """The ``key`` query parameter, read as any form parser reads it (percent-decoded:
        ``?%6bey=`` is the key too, and is masked in the logs like ``?key=``)."""
        keys = parse_qs(self.query.decode("latin-1"), errors="replace").get("key") or [""]
        return keys[0]


# Outcomes of a leg: the gateway's own words, each PBX module maps its statuses to them.
ANSWERED, NO_ANSWER, BUSY, CANCELLED, FAILED_CALL = (
    "answered", "no-answer", "busy", "cancelled", "failed")
OUTCOMES = (ANSWERED, NO_ANSWER, BUSY, CANCELLED, FAILED_CALL)
# Events stored before outcomes were neutral carry the PBX's own status (all of them from
# the one PBX there was then, Telphin): read as the outcome it meant.
_LEGACY_STATUS = {"ANSWER": ANSWERED, "NOANSWER": NO_ANSWER, "BUSY": BUSY,
                  "CANCEL": CANCELLED, "": "", "CALLING": ""}

# Event kinds: the three of a leg, and the call-level facts (leg and fields as known).
RING, ANSWER, HANGUP = "ring", "answer", "hangup"
RECORDING, FINISHED = "recording", "finished"  # a recording ready after the call; call over
# The PBX's own record says the call is over, but its last leg events may still be on the way
# (a PBX that sends the record separately, unordered): decided after the tenant's grace.
CLOSING = "closing"
EVENT_KINDS = (RING, ANSWER, HANGUP, RECORDING, FINISHED, CLOSING)


def legacy_outcome(status: str) -> str:
    return _LEGACY_STATUS.get(status, FAILED_CALL)


@attrs.frozen
class Event:
    """One thing that happened to one leg of one call, whatever PBX reported it."""

    tenant: int
    call: str  # the PBX's call key (Telphin CallID)
    leg: str  # the PBX's leg key (Telphin SubCallID)
    kind: str  # ring | answer | hangup | recording | finished | closing
    flow: str  # in | out
    at: int  # PBX time, microseconds since the epoch
    received: float  # gateway time, seconds since the epoch (drives grace timers)
    extension: str = ""  # the leg's own extension, short form ("101")
    sip: str = ""  # the same as the PBX account names it ("7001*101")
    peer: str = ""  # the other party: caller on incoming legs, dialled number on outgoing
    did: str = ""  # the company number the call came through
    outcome: str = ""  # hangup: one of OUTCOMES, mapped by the PBX module; "" unknown
    duration: int = 0  # talk time, microseconds (hangup only)
    recording: str = ""  # PBX recording id (hangup only)
    bridged: bool | None = None  # set on queue/IVR events: answered after entering it
    transferred: bool = False  # an outgoing leg created by a forward
    callback: str = ""  # click-to-call correlation id
    rating: int = 0  # a call-quality score the caller gave this leg's talk (0: none)
    # What identifies the PBX's notification when its payload has no event time (set by
    # its module; then ``at`` is the gateway's clock and differs between deliveries).
    dedup: str = ""

    @property
    def natural_key(self) -> str:
        """What makes two deliveries the same PBX event: they are stored once."""
        return f"{self.leg}|{self.kind}|{self.dedup or self.at}"

    def to_row(self) -> dict[str, Any]:
        # Not attrs.asdict: its generality cost a tenth of the store thread per event.
        return {name: getattr(self, name) for name in _EVENT_FIELDS}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Event":
        if "status" in row:  # stored before outcomes were neutral
            row = dict(row)
            row["outcome"] = legacy_outcome(row.pop("status"))
        return cls(**row)


_EVENT_FIELDS = tuple(a.name for a in attrs.fields(Event))

# Actions: what to tell a CRM.  Lower priority numbers go first.  A pop-up update tells a
# CRM that keeps one card per call that the leg was answered (``state`` talking) or ended
# (finished); an attach is a recording that arrived after its record went out.
POPUP, CLOSE_POPUP, RECORD, SETUP = "popup", "close_popup", "record", "setup"
POPUP_UPDATE, ATTACH = "popup_update", "attach"
PRIORITY = {POPUP: 0, POPUP_UPDATE: 1, CLOSE_POPUP: 1, RECORD: 2, ATTACH: 2, SETUP: 2}

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
