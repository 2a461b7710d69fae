"""Megaplan (API v3 telephony): CallInfo pop-ups and history, contractors, callRoute lookups.

Megaplan's widget in the employee's browser follows a ``CallInfo`` through ``calling →
talking → finished``; the gateway creates one per ringing leg (its ``providerId`` is the
leg's ``call_id``) and moves it by ``providerId``.  Calls that never had a pop-up go in as
history (``POST /callInfo/history``: no widget event).  ../shared/protocols/megaplan.md is
the reference; [C] confirmed there, [I] inferred (a choice made here, easy to change),
[?] unknown.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, Awaitable, Callable
from urllib.parse import quote, urlsplit
from zoneinfo import ZoneInfo

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.crm import (LOOPBACK_ENV, Command, CrmConfig, ICrm, loopback_allowed,
                         plain_command, plain_guide)
from gateway.errors import BadRequest, Permanent, Retryable
from gateway.httpclient import HttpClient, Response, raise_for
from gateway.model import (ATTACH, CLOSE_POPUP, POPUP, POPUP_UPDATE, RECORD, SETUP, Action,
                           Inbound, Tenant, e164, field_only, field_text)

log = Logger()

API = "/api/v3"
# The call types a tenant may want as communications in Megaplan (seed 003, option 5).
INCOMING_ANSWERED, INCOMING_MISSED = "incoming_answered", "incoming_missed"
OUTGOING_ANSWERED, OUTGOING_UNANSWERED = "outgoing_answered", "outgoing_unanswered"
COMMUNICATIONS = (INCOMING_ANSWERED, INCOMING_MISSED, OUTGOING_ANSWERED, OUTGOING_UNANSWERED)
# CallInfo.type of a finished call of each kind.  [I] megaplan.md §9 q2 leaves miss vs fail
# open: "miss" is an incoming call nobody answered, "fail" an outgoing call that did not
# connect (busy, no answer, unreachable alike: Megaplan's widget would show an outgoing
# "miss" as a call the employee missed).
CALL_TYPE = {INCOMING_ANSWERED: "in", INCOMING_MISSED: "miss",
             OUTGOING_ANSWERED: "out", OUTGOING_UNANSWERED: "fail"}

# [?] Megaplan documents no rate limit (megaplan.md §2.3).  [I] 5 requests/s with a burst of
# 5 per account host: a pop-up is up to 4 requests (create, search, create contact, attach
# it), so one ringing call goes out at once and a storm is spread over seconds.
RATE, BURST = 5.0, 5
TOKEN_LIFETIME = 172800  # [C megaplan-sdk] seconds, when the answer has no expires_in
TOKEN_MARGIN = 300.0  # [I] refresh this long before expiry (at most half the lifetime)
DIRECTORY_FRESH = 300.0  # [I] seconds the extension → employee map is used without re-reading
DIRECTORY_RETRY = 30.0  # [I] an unknown extension re-reads a map older than this
DIRECTORY_PAGE, DIRECTORY_PAGES = 100, 50  # [I] 5000 employees with telephony at most
# [I] Fewer digits than this is no client's number (hidden, a short service number, an
# extension): such a number is never searched for nor made a contact, since Megaplan's
# search matches any phone that contains the digits.
MIN_CONTACT_DIGITS = 7

_NAME = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"  # one DNS label
_DOMAIN = re.compile(rf"{_NAME}\.megaplan\.ru")
_LOOPBACK = re.compile(r"(?:127\.0\.0\.1|localhost):([0-9]{1,5})")
_EMPLOYEE_ID = re.compile(r"[0-9]{1,20}")


def _is_loopback(domain: str) -> bool:
    match = _LOOPBACK.fullmatch(domain)
    return match is not None and 0 < int(match.group(1)) < 65536


def base_url(domain: str) -> str:
    """The API root of an account: https for NAME.megaplan.ru, http for a loopback fake
    (only while GATEWAY_ALLOW_LOOPBACK_CRM=1: a stored config is checked again here)."""
    if _DOMAIN.fullmatch(domain):
        return f"https://{domain}{API}"
    if _is_loopback(domain) and loopback_allowed():
        return f"http://{domain}{API}"
    raise Permanent(f"crm.domain {domain[:80]!r} is not NAME.megaplan.ru")


# --- config ------------------------------------------------------------------------------


@attrs.frozen
class MegaplanConfig(CrmConfig):
    """A Megaplan account (its host), the integration user's login, and the tenant's
    options (seed 003)."""

    domain: str = ""  # NAME.megaplan.ru
    login: str = ""
    password: str = attrs.field(default="", repr=False)
    create_client: bool = False  # an incoming call from an unknown number creates a client
    create_contact: bool = False  # an outgoing call to an unknown number creates a contact
    communications: tuple[str, ...] = COMMUNICATIONS  # the call types saved as history
    default_responsible: str = ""  # employee id for calls no employee took part in
    fallback_user: str = ""  # employee id for extensions with no Megaplan employee


def field_domain(section: dict[str, Any]) -> str:
    value = field_text(section, "crm.domain", required=True).lower()
    if _DOMAIN.fullmatch(value):
        return value
    if _is_loopback(value):
        if loopback_allowed():
            return value
        raise BadRequest("crm.domain", f"a loopback address is for tests only ({LOOPBACK_ENV}"
                                       "=1 in the gateway's environment)")
    raise BadRequest("crm.domain", "must be the account's host, NAME.megaplan.ru (NAME: "
                                   "letters, digits and hyphens), without https:// or a path")


def field_bool(section: dict[str, Any], dotted: str) -> bool:
    value = section.get(dotted.rsplit(".", 1)[-1], False)
    if not isinstance(value, bool):
        raise BadRequest(dotted, "must be true or false")
    return value


def field_employee(section: dict[str, Any], dotted: str) -> str:
    """A Megaplan employee id (digits; the number in the employee's profile URL), or ""."""
    value = section.get(dotted.rsplit(".", 1)[-1], "")
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        value = str(value)
    if not isinstance(value, str) or value.strip() and not _EMPLOYEE_ID.fullmatch(
            value.strip()):
        raise BadRequest(dotted, "must be a Megaplan employee id (digits) or empty")
    return value.strip()


def field_communications(section: dict[str, Any]) -> tuple[str, ...]:
    value = section.get("communications", list(COMMUNICATIONS))
    if not isinstance(value, list) or not all(v in COMMUNICATIONS for v in value):
        raise BadRequest("crm.communications", "must be a list of call types out of "
                         + ", ".join(COMMUNICATIONS))
    return tuple(c for c in COMMUNICATIONS if c in value)


def parse_config(section: dict[str, Any]) -> MegaplanConfig:
    field_only(section, "crm", {f.name for f in attrs.fields(MegaplanConfig)})
    credential = section.get("credential")
    return MegaplanConfig(
        kind="megaplan",
        domain=field_domain(section),
        login=field_text(section, "crm.login", required=True),
        password=field_text(section, "crm.password", required=True),
        create_client=field_bool(section, "crm.create_client"),
        create_contact=field_bool(section, "crm.create_contact"),
        communications=field_communications(section),
        default_responsible=field_employee(section, "crm.default_responsible"),
        fallback_user=field_employee(section, "crm.fallback_user"),
        credential=credential if isinstance(credential, int) else None,
    )


def check_tenant(tenant: Tenant) -> None:
    # The tenant's employees map extensions to Megaplan employee ids: anything else would
    # be refused by Megaplan on every call of that extension.
    for extension, user in tenant.employees.items():
        if not _EMPLOYEE_ID.fullmatch(user):
            raise BadRequest(f"employees.{extension}", "must be a Megaplan employee id "
                             "(digits, as in the employee's profile URL)")


# --- what each action sends (pure: the body tables compare these) ------------------------


def communication(payload: dict[str, Any]) -> str | None:
    """The call type of a record (one of COMMUNICATIONS); None for an internal call."""
    answered = payload.get("status") == "success"
    direction = payload.get("direction")
    if direction == "incoming":
        return INCOMING_ANSWERED if answered else INCOMING_MISSED
    if direction == "outgoing":
        return OUTGOING_ANSWERED if answered else OUTGOING_UNANSWERED
    return None


def is_missed_record(payload: dict[str, Any]) -> bool:
    """The one missed record of an incoming call no phone answered (``…-missed``): the
    fold closes each unanswered incoming leg's pop-up and makes no record of its own, so
    this record never has a CallInfo of its own."""
    return payload.get("direction") == "incoming" and payload.get("status") == "missed"


def short_extension(number: str) -> str:
    """``sip:101@pbx.example`` and ``7001*101`` are extension ``101``."""
    text = number.strip()
    if text[:4].lower() == "sip:":
        text = text[4:]
    return text.split("@", 1)[0].rsplit("*", 1)[-1].strip()


def employee_ref(employee: str) -> dict[str, str]:
    return {"contentType": "Employee", "id": employee}


def date_time(tenant: Tenant, micros: int) -> dict[str, str]:
    """A Megaplan DateTime with the tenant's UTC offset [C megaplan.md §2.2]."""
    when = datetime.fromtimestamp(micros / 1_000_000, ZoneInfo(tenant.option("timezone")))
    return {"contentType": "DateTime", "value": when.replace(microsecond=0).isoformat()}


def _company_phone(tenant: Tenant, payload: dict[str, Any]) -> str:
    """The company side's number: the DID, else the tenant's company number, else the
    extension (an outgoing call carries no DID) [I]."""
    return e164(payload.get("did") or tenant.company_number) or payload.get("extension", "")


def _sides(tenant: Tenant, payload: dict[str, Any], employee: str | None) -> dict[str, Any]:
    """fromPhone/toPhone and the employee: the client calls the company (incoming, the
    employee is ``toUser``) or the employee calls the client (``fromUser``)."""
    client, company = e164(payload.get("client") or ""), _company_phone(tenant, payload)
    if payload["direction"] == "incoming":
        sides: dict[str, Any] = {"fromPhone": client, "toPhone": company}
        user = "toUser"
    else:
        sides = {"fromPhone": company, "toPhone": client}
        user = "fromUser"
    if employee:
        sides[user] = employee_ref(employee)
    return sides


def popup_body(tenant: Tenant, payload: dict[str, Any], employee: str) -> dict[str, Any]:
    """POPUP → ``POST /callInfo``: a ringing CallInfo of this leg for its employee."""
    return {"contentType": "CallInfo",
            "type": "in" if payload["direction"] == "incoming" else "out",
            "state": "calling", **_sides(tenant, payload, employee),
            "providerId": payload["call_id"], "timeFrom": date_time(tenant, payload["at"])}


def talking_body(payload: dict[str, Any]) -> dict[str, Any]:
    """POPUP_UPDATE → ``POST /callInfo/provider``: the leg was answered."""
    return {"contentType": "CallInfo", "providerId": payload["call_id"], "state": "talking"}


def close_body(tenant: Tenant, payload: dict[str, Any], ended: float) -> dict[str, Any]:
    """CLOSE_POPUP → ``POST /callInfo/provider``: the leg stopped ringing unanswered (a
    colleague answered, or the caller gave up); ``ended`` is when the gateway learnt it
    (the pop-up payload has no end time) [I]."""
    return {"contentType": "CallInfo", "providerId": payload["call_id"], "state": "finished",
            "type": "miss", "timeTo": date_time(tenant, int(ended * 1_000_000))}


def _end(payload: dict[str, Any]) -> int:
    return payload["started"] + payload["duration"] * 1_000_000


def finish_body(tenant: Tenant, payload: dict[str, Any], links: list[str]) -> dict[str, Any]:
    """RECORD of a leg that had a pop-up → ``POST /callInfo/provider``: finished, typed,
    with its end and recording."""
    body = {"contentType": "CallInfo", "providerId": payload["record_id"],
            "state": "finished", "type": CALL_TYPE[communication(payload) or ""],
            "timeTo": date_time(tenant, _end(payload))}
    if links:
        body["recordLinks"] = links
    return body


def history_body(tenant: Tenant, payload: dict[str, Any], employee: str | None,
                 links: list[str]) -> dict[str, Any]:
    """RECORD with no pop-up → one element of ``POST /callInfo/history``: the whole call,
    finished (no widget event)."""
    body = {"contentType": "CallInfo", "type": CALL_TYPE[communication(payload) or ""],
            "state": "finished", **_sides(tenant, payload, employee),
            "providerId": payload["record_id"],
            "timeFrom": date_time(tenant, payload["started"]),
            "timeTo": date_time(tenant, _end(payload))}
    if links:
        body["recordLinks"] = links
    return body


def attach_body(payload: dict[str, Any], link: str) -> dict[str, Any]:
    """ATTACH → ``POST /callInfo/provider``: a recording ready after the record went out."""
    return {"contentType": "CallInfo", "providerId": payload["record_id"],
            "recordLinks": [link]}


def contractor_body(number: str, incoming: bool, employee: str | None) -> dict[str, Any]:
    """``POST /contractor``: a person with the number as their main phone, the call's
    employee responsible for them (so callRoute routes their next call there).  [I] Both a
    "client" (incoming) and a "contact" (outgoing) are a ContractorHuman; only the name
    differs."""
    body: dict[str, Any] = {
        "contentType": "ContractorHuman",
        "firstName": f"{'Клиент' if incoming else 'Контакт'} {number}",
        "contactInfo": [{"contentType": "ContactInfo", "type": "phone", "value": number,
                         "isMain": True}]}
    if employee:
        body["responsibles"] = [employee_ref(employee)]
    return body


def same_number(a: str, b: str) -> bool:
    """Whether two phone numbers are one: the same E.164 digits, or (a number written
    without its country code) the same last ten digits [I]."""
    a, b = e164(a), e164(b)
    return bool(a) and (a == b or min(len(a), len(b)) >= 10 and a[-10:] == b[-10:])


def _links(link: str | None) -> list[str]:
    if link and urlsplit(link).scheme in ("http", "https"):
        return [link]
    return []


def _built(build: Callable[..., Any], *args: Any) -> Any:
    # The builders are pure: what fails now (a missing payload key, an unknown time zone, a
    # date out of range) fails on every try, so it is permanent, with its reason.
    try:
        return build(*args)
    except Exception as e:
        raise Permanent(f"cannot build the request: {type(e).__name__}: {str(e)[:200]}") \
            from e


def supports(tenant: Tenant, kind: str, payload: dict[str, Any]) -> bool:
    """Pop-ups, updates and records of incoming and outgoing calls, attachments, setup.

    Internal calls are not sent [I]: a CallInfo is a call with a client (its type has no
    "internal"), and an employee-to-employee call would show as a client's.  The missed
    record and late recordings of a call type the tenant did not pick are never queued; a
    record of a leg that had a pop-up always is (see ``Megaplan._record``)."""
    if kind == SETUP:
        return True
    if payload.get("direction") not in ("incoming", "outgoing"):
        return False
    if kind in (POPUP, POPUP_UPDATE, CLOSE_POPUP):
        return True
    if kind == RECORD:
        return not is_missed_record(payload) or INCOMING_MISSED in tenant.crm.communications
    if kind == ATTACH:
        return communication(payload) in tenant.crm.communications
    return False


# --- the client ----------------------------------------------------------------------------


@attrs.frozen
class _Token:
    """An access token, its refresh token, and when to refresh it (clock seconds)."""

    access: str = attrs.field(repr=False)
    refresh: str = attrs.field(repr=False)
    expires_at: float
    refresh_at: float

    @classmethod
    def from_answer(cls, answer: dict[str, Any], now: float) -> "_Token":
        lifetime = answer.get("expires_in")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) \
                or not 0 < lifetime < 10 * 365 * 86400:
            lifetime = TOKEN_LIFETIME
        refresh = answer.get("refresh_token")
        return cls(access=answer["access_token"],
                   refresh=refresh if isinstance(refresh, str) else "",
                   expires_at=now + lifetime,
                   refresh_at=now + lifetime - min(TOKEN_MARGIN, lifetime / 2))

    def to_json(self) -> dict[str, Any]:
        return {"access_token": self.access, "refresh_token": self.refresh,
                "expires_at": self.expires_at, "refresh_at": self.refresh_at}

    @classmethod
    def from_json(cls, data: Any) -> "_Token | None":
        try:
            token = cls(access=data["access_token"], refresh=data["refresh_token"],
                        expires_at=float(data["expires_at"]),
                        refresh_at=float(data["refresh_at"]))
        except (TypeError, KeyError, ValueError):
            return None
        if not (isinstance(token.access, str) and token.access
                and isinstance(token.refresh, str)):
            return None
        return token


@attrs.frozen
class _Directory:
    """An account's telephony settings (callUserConfig): extension ↔ employee id."""

    employees: dict[str, str]  # short extension → employee id (the first one listed)
    extensions: dict[str, str]  # employee id → short extension (its first one)
    at: float  # clock seconds it was read


def token_key(config: MegaplanConfig) -> str:
    """Where a login's tokens are kept: tenants with one domain and login share them."""
    return f"megaplan:{config.domain}:{config.login}"


def _nothing(summary: str) -> tuple[str, Response]:
    """An action that needs no request: done, with why (no HTTP status: none was sent)."""
    return summary, Response(status=None, headers={}, body=b"")  # type: ignore[arg-type]


@implementer(ICrm)
class Megaplan:
    """The Megaplan CRM module: one instance for the gateway's life, holding each login's
    token (also kept in the store, so a restart does not log in again), each account's
    extension directory, and the requests in flight that concurrent actions share."""

    kind = "megaplan"
    secrets = ("password",)
    config_type = MegaplanConfig
    credential_fields = ("domain", "login", "password")
    has_responsible = True

    def __init__(self, http: HttpClient, clock: Any = None, store: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.http = http
        self.clock = clock
        self.store = store
        self._tokens: dict[str, _Token] = {}
        self._loaded: set[str] = set()  # token keys already looked up in the store
        self._directories: dict[str, _Directory] = {}  # by domain
        # One request (or chain of them) per key, whoever asks meanwhile: token grants,
        # store reads, directory reads, contractor find-or-create per number.
        self._flights: dict[tuple[str, ...], list[Deferred]] = {}

    # ICrm, synchronous parts

    @staticmethod
    def parse_config(section: dict[str, Any]) -> MegaplanConfig:
        return parse_config(section)

    @staticmethod
    def check_tenant(tenant: Tenant) -> None:
        check_tenant(tenant)

    @staticmethod
    def account(tenant: Tenant) -> str:
        return tenant.crm.domain

    @staticmethod
    def supports(tenant: Tenant, kind: str, payload: dict[str, Any]) -> bool:
        return supports(tenant, kind, payload)

    @staticmethod
    def limits(tenant: Tenant) -> list[tuple[str, float, int]]:
        """One bucket per Megaplan account host, shared by its tenants [I]."""
        return [(f"megaplan:{tenant.crm.domain}", RATE, BURST)]

    @staticmethod
    def setup_guide(tenant: Tenant, base: str) -> list[dict[str, str]]:
        return plain_guide(tenant, base)

    @staticmethod
    def command(request: Inbound, tenant: Tenant, action: str) -> Command:
        # [?] How Megaplan asks a PBX to place or end a call is undocumented (megaplan.md
        # §6: its browser widget seems to talk to the PBX itself): the gateway's plain
        # form, authenticated by the tenant's key.
        return plain_command(request, tenant, action)

    def perform(self, tenant: Tenant, action: Action, link: str | None) -> Deferred:
        return ensureDeferred(self._perform(tenant, action, link))

    def responsible(self, tenant: Tenant, number: str) -> Deferred:
        return ensureDeferred(self._responsible(tenant, number))

    # Single flight

    def _once(self, key: tuple[str, ...], start: Callable[[], Awaitable[Any]]) -> Deferred:
        """``start()``'s result; callers asking with the same key while it runs share it.
        A caller cancelling its wait does not stop it for the others."""
        mine: Deferred = Deferred()
        waiters = self._flights.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        waiters = self._flights[key] = [mine]

        def done(result: Any) -> None:
            del self._flights[key]
            for waiter in waiters:  # a cancelled waiter ignores this
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

        ensureDeferred(start()).addBoth(done)
        return mine

    # Tokens

    async def _access(self, config: MegaplanConfig, stale: str | None = None,
                      login: bool = False) -> str:
        """A valid access token: the one held unless it is due for refresh, is ``stale``
        (Megaplan just refused it) or ``login`` asks for a password login."""
        key = token_key(config)
        token = self._tokens.get(key)
        if token is None and key not in self._loaded and self.store is not None:
            token = await self._once(("load", key), lambda: self._load(key))
        if token is not None and not login and token.access != stale \
                and self.clock.seconds() < token.refresh_at:
            return token.access
        grant = "password" if login or token is None or not token.refresh else "refresh"
        return await self._once(("token", key, grant),
                                lambda: self._obtain(config, key, grant))

    async def _load(self, key: str) -> _Token | None:
        try:
            data = await self.store.token(key)
        except Exception:
            log.failure("token {key} not read from the store; logging in", key=key)
            data = None
        self._loaded.add(key)
        token = _Token.from_json(data) if data is not None else None
        if token is not None:
            self._tokens.setdefault(key, token)
        return self._tokens.get(key)

    async def _obtain(self, config: MegaplanConfig, key: str, grant: str) -> str:
        answer = None
        held = self._tokens.get(key)
        if grant == "refresh" and held is not None and held.refresh:
            try:
                answer = await self._grant(config, {"grant_type": "refresh_token",
                                                    "refresh_token": held.refresh})
            except Permanent as e:
                # Used, revoked or expired: the password gets a new pair.
                log.info("Megaplan {domain} refused the refresh token of {login} ({error});"
                         " logging in again", domain=config.domain, login=config.login,
                         error=str(e))
        if answer is None:
            answer = await self._grant(config, {"grant_type": "password",
                                                "username": config.login,
                                                "password": config.password})
        token = _Token.from_answer(answer, self.clock.seconds())
        self._tokens[key] = token
        self._loaded.add(key)
        if self.store is not None:
            try:
                await self.store.put_token(key, token.to_json())
            except Exception:
                # Held in memory; a restart before the next store costs one more login.
                log.failure("token {key} not stored", key=key)
        return token.access

    async def _grant(self, config: MegaplanConfig, form: dict[str, str]) -> dict[str, Any]:
        """``POST /auth/access_token`` (a form; the answer is flat JSON) [C]."""
        url = f"{base_url(config.domain)}/auth/access_token"
        summary = f"POST {url} ({form['grant_type']} grant for {config.login})"
        resp = await self.http.request("POST", url, data=form,
                                       headers={"Accept": "application/json"})
        if form["grant_type"] == "password" and resp.status in (400, 401, 403):
            raise Permanent(f"{summary}: HTTP {resp.status}: Megaplan refused the login; "
                            "check crm.login and crm.password", resp.status, resp.excerpt())
        raise_for(resp, summary)
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if isinstance(answer, dict) and isinstance(answer.get("access_token"), str) \
                and answer["access_token"]:
            return answer
        status = _meta_status(answer)
        if status is not None and status != 200:  # an error in the envelope, HTTP 200
            raise_for(attrs.evolve(resp, status=status), f"{summary} (meta.status)")
        raise Permanent(f"{summary}: HTTP {resp.status} without an access_token",
                        resp.status, resp.excerpt())

    # Requests

    async def _api(self, config: MegaplanConfig, method: str, path: str, *,
                   params: Any = None, body: Any = None, what: str = "",
                   missing_ok: bool = False) -> tuple[Any, Response, str]:
        """One API request: GET parameters as one JSON object after ``?`` [C §2.1], JSON
        bodies, the bearer token (refreshed once on 401, then the request sent again), the
        envelope's ``meta.status`` checked as well as the HTTP status [C §2.2].  Returns
        (data, answer, summary); with ``missing_ok`` a 404 gives data None."""
        url = base_url(config.domain) + path
        summary = f"{method} {url}" + (f" {what}" if what else "")
        if params is not None:
            url += "?" + quote(json.dumps(params, ensure_ascii=False, separators=(",", ":")),
                               safe="")
        token = await self._access(config)
        for attempt in (1, 2):
            resp = await self.http.request(method, url, json=body, headers={
                "Authorization": f"Bearer {token}", "Accept": "application/json"})
            status, data = _open(resp, summary)
            if status == 401 and attempt == 1:
                token = await self._access(config, stale=token)
                continue
            break
        if status != resp.status:  # the envelope's status is the answer's
            resp, summary = attrs.evolve(resp, status=status), f"{summary} (meta.status)"
        if status == 404 and missing_ok:
            return None, resp, summary
        raise_for(resp, summary)
        return data, resp, summary

    # Employees

    async def _directory(self, config: MegaplanConfig,
                         max_age: float = DIRECTORY_FRESH) -> _Directory:
        """The account's extension ↔ employee map, re-read when older than ``max_age``; a
        failed re-read keeps the copy held, if any."""
        held = self._directories.get(config.domain)
        if held is not None and self.clock.seconds() - held.at < max_age:
            return held
        try:
            return await self._once(("directory", config.domain),
                                    lambda: self._read_directory(config))
        except (Retryable, Permanent) as e:
            if held is None:
                raise
            log.warn("Megaplan {domain}: callUserConfig not re-read ({error}); using the "
                     "copy of {age:.0f} s ago", domain=config.domain, error=str(e),
                     age=self.clock.seconds() - held.at)
            return held

    async def _read_directory(self, config: MegaplanConfig) -> _Directory:
        items: list[Any] = []
        params: dict[str, Any] = {"limit": DIRECTORY_PAGE}
        for _ in range(DIRECTORY_PAGES):
            page, _, summary = await self._api(config, "GET", "/callUserConfig",
                                               params=params)
            if not isinstance(page, list):
                raise Permanent(f"{summary}: data is not a list of CallUserConfig")
            items.extend(page)
            last = page[-1].get("id") if page and isinstance(page[-1], dict) else None
            if len(page) < DIRECTORY_PAGE or last is None:
                break
            params = {"limit": DIRECTORY_PAGE,
                      "pageAfter": {"contentType": "CallUserConfig", "id": str(last)}}
        employees: dict[str, str] = {}
        extensions: dict[str, str] = {}
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("employee"), dict):
                continue
            employee = item["employee"].get("id")
            internal = item.get("internalNumber")
            if employee is None or not isinstance(internal, str):
                continue
            extension = short_extension(internal)
            if extension:
                employees.setdefault(extension, str(employee))
                extensions.setdefault(str(employee), extension)
        directory = _Directory(employees, extensions, self.clock.seconds())
        self._directories[config.domain] = directory
        return directory

    async def _mapped(self, tenant: Tenant, payload: dict[str, Any]) -> str | None:
        """The Megaplan employee of the leg's extension: the tenant's ``employees`` first,
        else the account's directory; None when neither knows it."""
        extension, sip = payload.get("extension") or "", payload.get("sip") or ""
        for name in (extension, sip):
            if name and name in tenant.employees:
                return tenant.employees[name]
        names = [n for n in dict.fromkeys((extension, short_extension(sip))) if n]
        if not names:
            return None
        directory = await self._directory(tenant.crm)
        if not any(n in directory.employees for n in names) \
                and self.clock.seconds() - directory.at >= DIRECTORY_RETRY:
            # Perhaps just added in Megaplan: one more look, at most every DIRECTORY_RETRY.
            directory = await self._directory(tenant.crm, DIRECTORY_RETRY)
        return next((directory.employees[n] for n in names if n in directory.employees),
                    None)

    async def _employee(self, tenant: Tenant, payload: dict[str, Any]) -> str | None:
        """Whom the call is saved for.  A call no employee took part in (the missed record
        of a call no phone answered, a leg with no extension): ``default_responsible``.
        Else the extension's employee, else ``fallback_user``.  With none of them: no
        employee for a call nobody took part in [I], and ``Permanent`` for an extension
        Megaplan does not know (the operator sees why the call is not in Megaplan)."""
        config = tenant.crm
        nobody = is_missed_record(payload) or not (payload.get("extension")
                                                  or payload.get("sip"))
        if nobody and config.default_responsible:
            return config.default_responsible
        employee = await self._mapped(tenant, payload)
        if employee:
            return employee
        if config.fallback_user:
            return config.fallback_user
        if nobody:
            return None
        raise Permanent(
            f"extension {payload.get('extension') or payload.get('sip')!r} has no Megaplan "
            "employee (not in the tenant's employees, nor an internal number in Megaplan's "
            "telephony settings); not sent.  Map it, or set crm.fallback_user to save such "
            "calls on behalf of one user")

    # Contractors

    async def _contractor(self, tenant: Tenant, payload: dict[str, Any], call: str,
                          employee: str | None) -> str | None:
        """Attach the client to a new CallInfo, found by number or created when the tenant
        asked for it (incoming: ``create_client``; outgoing: ``create_contact``).  One
        find-or-create per (account, number) at a time, and a search before every create,
        so two calls from one new number, or a retry after a crash, make one contractor."""
        config = tenant.crm
        incoming = payload["direction"] == "incoming"
        if not (config.create_client if incoming else config.create_contact):
            return None  # Megaplan's widget finds known clients by number itself [C]
        number = e164(payload.get("client") or "")
        if len(number) < MIN_CONTACT_DIGITS:
            return None
        contractor, created = await self._once(
            ("contractor", config.domain, number),
            lambda: self._find_or_create(config, number, incoming, employee))
        ref = {"contentType": contractor["contentType"], "id": str(contractor["id"])}
        await self._api(config, "POST", f"/callInfo/{quote(call, safe='')}/setContractor",
                        body=ref)
        return (f"{ref['contentType']} {ref['id']} {'created' if created else 'found'} "
                f"for +{number} and set on CallInfo {call}")

    async def _find_or_create(self, config: MegaplanConfig, number: str, incoming: bool,
                              employee: str | None) -> tuple[dict[str, Any], bool]:
        found, _, summary = await self._api(config, "GET", "/contractor",
                                            params={"q": number}, what="search")
        if not isinstance(found, list):
            raise Permanent(f"{summary}: data is not a list of contractors")
        for item in found:
            if _is_contractor(item) and _has_number(item, number):
                return item, False
        created, _, summary = await self._api(
            config, "POST", "/contractor", body=contractor_body(number, incoming, employee),
            what="create")
        if not _is_contractor(created):
            raise Permanent(f"{summary}: the answer is not a contractor with an id")
        return created, True

    # Actions

    async def _perform(self, tenant: Tenant, action: Action,
                       link: str | None) -> tuple[str, Response]:
        payload = action.payload
        if action.kind == SETUP:
            return await self._setup(tenant, payload)
        if action.kind == POPUP:
            return await self._popup(tenant, action)
        if action.kind == POPUP_UPDATE:
            return await self._update(tenant, _built(talking_body, payload), "talking")
        if action.kind == CLOSE_POPUP:
            return await self._update(tenant, _built(close_body, tenant, payload,
                                                     action.created), "finished/miss")
        if action.kind == RECORD:
            return await self._record(tenant, payload, link)
        if action.kind == ATTACH:
            return await self._attach(tenant, payload, link)
        raise Permanent(f"Megaplan has no {action.kind!r} action")

    async def _setup(self, tenant: Tenant, payload: dict[str, Any]) -> tuple[str, Response]:
        """enable: log in with the password (a wrong one fails this action, where the
        operator sees it) and read the account's telephony settings.  disable: nothing to
        switch off in Megaplan [I] (its API has no integration switch); the directory held
        is forgotten."""
        config = tenant.crm
        if payload.get("type") != "enable":
            self._directories.pop(config.domain, None)
            return _nothing(f"setup {payload.get('type')}: nothing to switch off in "
                            f"Megaplan {config.domain}; no request sent")
        await self._access(config, login=True)
        directory = await self._read_directory(config)
        return (f"setup enable: logged in to {config.domain} as {config.login}; "
                f"{len(directory.employees)} internal numbers in callUserConfig",
                Response(status=200, headers={}, body=json.dumps(
                    {"internal_numbers": directory.employees}).encode()))

    async def _popup(self, tenant: Tenant, action: Action) -> tuple[str, Response]:
        """A ringing leg: one CallInfo per leg, so every ringing employee's widget shows
        the call [I: megaplan.md §9 q3]; then the client attached to it."""
        payload = action.payload
        config = tenant.crm
        employee = await self._employee(tenant, payload)
        if employee is None:
            raise Permanent("no employee to show the pop-up to")
        body = _built(popup_body, tenant, payload, employee)
        # An earlier try may have created it and lost the answer (or the process was killed
        # before the try was recorded, so ``attempts`` cannot tell): one CallInfo per leg.
        data, resp, summary = await self._api(
                config, "GET", "/callInfo/provider", params={"providerId": body["providerId"]},
                what="(created by an earlier try?)", missing_ok=True)
        if resp.status == 404:
            data, resp, summary = await self._api(
                config, "POST", "/callInfo", body=body,
                what=f"{body['type']}/calling {body['providerId']}")
        call = _call_id(data, summary)
        steps = [f"{summary} → CallInfo {call}"]
        attached = await self._contractor(tenant, payload, call, employee)
        if attached:
            steps.append(attached)
        return "; ".join(steps), resp

    async def _update(self, tenant: Tenant, body: dict[str, Any],
                      what: str) -> tuple[str, Response]:
        """A pop-up's CallInfo moved on; none (its pop-up was dropped as stale, or never
        made) is nothing to update."""
        _, resp, summary = await self._api(tenant.crm, "POST", "/callInfo/provider",
                                           body=body, what=f"{what} {body['providerId']}",
                                           missing_ok=True)
        if resp.status == 404:
            return f"{summary}: no CallInfo (its pop-up was not shown); nothing to update", resp
        return summary, resp

    async def _record(self, tenant: Tenant, payload: dict[str, Any],
                      link: str | None) -> tuple[str, Response]:
        """A leg's (or a missed call's) record.  The CallInfo of its pop-up is finished;
        with no pop-up (the update answers 404, or the call's missed record, which never
        has one) the call goes in as history.

        A call type not in ``communications`` is not saved as history; but its pop-up's
        CallInfo, if there is one, is still finished (without the recording), or the
        employee's widget would show the call ringing or talking for ever."""
        config = tenant.crm
        kind = communication(payload)
        if kind is None:
            raise Permanent("internal calls are not sent to Megaplan")
        wanted = kind in config.communications
        links = _links(link) if wanted else []
        steps = []
        if not is_missed_record(payload):
            body = _built(finish_body, tenant, payload, links)
            data, resp, summary = await self._api(
                config, "POST", "/callInfo/provider", body=body,
                what=f"finished/{body['type']} {body['providerId']}", missing_ok=True)
            if resp.status != 404:
                if not wanted:
                    return summary + (f" ({kind} is not in crm.communications: the pop-up "
                                      "closed, no recording)"), resp
                # The pop-up's try may have created the CallInfo but not attached its client
                # (killed, or a retryable error, then dropped as stale): attach it now;
                # finding the client first makes a second attach harmless.
                steps = [summary]
                if isinstance(data, dict) and data.get("id"):
                    employee = await self._employee(tenant, payload)
                    attached = await self._contractor(tenant, payload,
                                                      _call_id(data, summary), employee)
                    if attached:
                        steps.append(attached)
                return "; ".join(steps), resp
            if not wanted:
                return (f"{summary}: no CallInfo; not sent: {kind} is not in "
                        "crm.communications", resp)
            steps.append(f"{summary}: no CallInfo (no pop-up)")
        elif not wanted:
            return _nothing(f"not sent: {kind} is not in crm.communications")
        employee = await self._employee(tenant, payload)
        body = _built(history_body, tenant, payload, employee, links)
        data, resp, summary = await self._api(config, "POST", "/callInfo/history",
                                              body=[body],
                                              what=f"{body['type']} {body['providerId']}")
        if not isinstance(data, list) or len(data) != 1:
            raise Permanent(f"{summary}: data is not a list of one CallInfo")
        call = _call_id(data[0], summary)
        steps.append(f"{summary} → CallInfo {call}")
        attached = await self._contractor(tenant, payload, call, employee)
        if attached:
            steps.append(attached)
        return "; ".join(steps), resp

    async def _attach(self, tenant: Tenant, payload: dict[str, Any],
                      link: str | None) -> tuple[str, Response]:
        kind = communication(payload)
        if kind not in tenant.crm.communications:
            return _nothing(f"not sent: {kind} is not in crm.communications")
        links = _links(link)
        if not links:
            raise Permanent(f"recording {payload.get('recording')!r}: no http(s) URL to "
                            "attach")
        body = _built(attach_body, payload, links[0])
        _, resp, summary = await self._api(tenant.crm, "POST", "/callInfo/provider",
                                           body=body, what=f"recordLinks {body['providerId']}",
                                           missing_ok=True)
        if resp.status == 404:
            raise Permanent(f"{summary}: no CallInfo {body['providerId']} to attach the "
                            "recording to (its record was not sent)", 404, resp.excerpt())
        return summary, resp

    # Responsible routing

    async def _responsible(self, tenant: Tenant, number: str) -> str | None:
        """``GET /callRoute`` → the employees responsible for the number → the extension of
        the first of them that has one (the tenant's ``employees``, else the account's
        telephony settings); None when there is no one."""
        config = tenant.crm
        phone = e164(number)
        if not phone:
            return None
        route, _, summary = await self._api(config, "GET", "/callRoute",
                                            params={"phone": phone})
        employees = route.get("employees") if isinstance(route, dict) else None
        ids = [str(e["id"]) for e in employees or ()
               if isinstance(e, dict) and e.get("id") is not None]
        if not ids:
            return None
        extensions: dict[str, str] = {}
        for extension, user in tenant.employees.items():
            extensions.setdefault(user, extension)
        directory = None
        for employee in ids:
            if employee in extensions:
                return extensions[employee]
            if directory is None:
                directory = await self._directory(config)
            if employee in directory.extensions:
                return directory.extensions[employee]
        return None


def _meta_status(answer: Any) -> int | None:
    meta = answer.get("meta") if isinstance(answer, dict) else None
    status = meta.get("status") if isinstance(meta, dict) else None
    return status if isinstance(status, int) and not isinstance(status, bool) else None


def _open(resp: Response, summary: str) -> tuple[int, Any]:
    """(status, data): a 2xx answer's status is its envelope's ``meta.status`` (an HTTP 200
    may carry an error [C]); a 2xx answer without the envelope is no Megaplan answer."""
    if not 200 <= resp.status < 300:
        return resp.status, None
    try:
        answer = resp.json()
    except ValueError:
        answer = None
    status = _meta_status(answer)
    if status is None:
        raise Permanent(f"{summary}: HTTP {resp.status} without Megaplan's {{meta, data}} "
                        "envelope", resp.status, resp.excerpt())
    return status, answer.get("data")


def _call_id(data: Any, summary: str) -> str:
    call = data.get("id") if isinstance(data, dict) else None
    if not isinstance(call, (str, int)) or isinstance(call, bool) or not str(call):
        raise Permanent(f"{summary}: the answer has no CallInfo id")
    return str(call)


def _is_contractor(item: Any) -> bool:
    return isinstance(item, dict) and item.get("contentType") in (
        "ContractorHuman", "ContractorCompany") and item.get("id") not in (None, "")


def _has_number(contractor: dict[str, Any], number: str) -> bool:
    """Whether a search hit has the number: Megaplan's ``q`` matches any phone containing
    the digits (and names, e-mails); a hit listed without its contactInfo is trusted [I]."""
    contacts = contractor.get("contactInfo")
    if not isinstance(contacts, list):
        return True
    return any(isinstance(c, dict) and c.get("type") == "phone"
               and isinstance(c.get("value"), str) and same_number(c["value"], number)
               for c in contacts)
