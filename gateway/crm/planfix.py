"""Planfix ("Planfix API for telephony"): the gateway plays the PBX of a Planfix account.

Out (to the account's ``planfix_url``, form-encoded, ``planfix_token`` on every request):
``cmd=event`` INCOMING / OUTGOING / ACCEPTED / COMPLETED per extension, ``cmd=record`` for a
recording ready after its call, ``cmd=contact`` for the responsible employee's extension,
``cmd=ping`` at setup.  In (``POST /crm/{tenant}/pbx/{login}``, ``token`` in the body):
``cmd=makeCall`` (click-to-call) and ``cmd=setup`` (Planfix switched the integration on and
sends its URL and token).  ../shared/protocols/planfix.md is the reference; [C] confirmed
there, [I] inferred (a choice made here, easy to change), [?] unknown.

A tenant may be created without ``planfix_url`` / ``planfix_token`` only disabled: Planfix's
``setup`` fills them and enables it (the customer enters the gateway's URL and the PBX token
in Planfix, then switches the integration on, and nothing else is asked of them).
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from zope.interface import implementer

from gateway.crm import LOOPBACK_ENV, Command, CrmConfig, ICrm, loopback_allowed
from gateway.errors import BadRequest, Permanent
from gateway.httpclient import HttpClient, Response, raise_for
from gateway.model import (ATTACH, BUSY, CANCELLED, CLOSE_POPUP, FAILED_CALL, NO_ANSWER, POPUP,
                           POPUP_UPDATE, RECORD, SETUP, Action, Inbound, Tenant, digits, e164,
                           field_only, field_text)

# [?] /tel/api documents no rate limit (planfix.md §6).  [I] 10 requests/s per Planfix
# account host with a burst of 20: a ring group of a dozen phones goes out at once.
RATE, BURST = 10.0, 20
# The inbound route's action segment: the one the README tells customers to use, and the
# one planfix.md's example URL shows.
ACTIONS = ("pbx", "planfix")

# Planfix's own error bodies for the inbound commands [C §2.1].
def invalid_token() -> BadRequest:
    return BadRequest("", "Invalid token", status=401)


def invalid_parameters() -> BadRequest:
    return BadRequest("", "Invalid parameters", status=400)

# [I] Planfix accounts live on NAME.planfix.ru or NAME.planfix.com.
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.planfix\.(?:ru|com)")
_LOOPBACK = re.compile(r"(?:127\.0\.0\.1|localhost)")
# [I] The PBX token the customer enters in Planfix: 16-128 URL-safe characters (Planfix's
# example is 32 hex digits), so a guessable one is refused.
_PBX_TOKEN = re.compile(r"[A-Za-z0-9_\-.~]{16,128}")
_TOKEN = re.compile(r"[!-~]{1,256}")  # Planfix's token: printable ASCII, no spaces [I]
_EXTENSION = re.compile(r"[0-9A-Za-z*#_.\-]{1,32}")
_DIALLABLE = re.compile(r"\+?[0-9][0-9 ()\-]{0,30}")

# Statuses of a final COMPLETED by the outcome of the leg [I planfix.md §4 table].
IN_STATUS = {BUSY: "Missed", FAILED_CALL: "Missed", NO_ANSWER: "Missed", CANCELLED: "Missed"}
OUT_STATUS = {NO_ANSWER: "NoAnswer", BUSY: "Busy", FAILED_CALL: "NotAvailable",
              CANCELLED: "NoAnswer"}
# [I] Recording links the PBXs give may expire: Planfix downloads the file once.
IS_TEMP = "1"


# --- config ------------------------------------------------------------------------------


@attrs.frozen
class PlanfixConfig(CrmConfig):
    """A Planfix account's telephony API: its URL and token (both filled by Planfix's
    ``setup`` when left empty), the PBX token Planfix sends us, and the extension a
    missed call with no extension of its own is reported under."""

    planfix_url: str = ""  # https://NAME.planfix.ru/tel/api
    planfix_token: str = attrs.field(default="", repr=False)  # we send it
    token: str = attrs.field(default="", repr=False)  # Planfix sends it to us
    default_ext: str = ""  # [I] for a missed call no phone rang (a queue with no extension)


def field_planfix_url(section: dict[str, Any]) -> str:
    """``https://NAME.planfix.ru/...`` (or ``.com``); ``http://127.0.0.1:PORT/...`` only
    with the tests' switch (gateway.crm.LOOPBACK_ENV); "" until setup."""
    value = field_text(section, "crm.planfix_url")
    if not value:
        return ""
    try:
        problem = url_problem(value)
    except ValueError:
        problem = "not a URL"
    if problem:
        raise BadRequest("crm.planfix_url", problem)
    return value


def url_problem(url: str) -> str:
    """Why ``url`` is not a Planfix telephony URL the gateway may post to; "" if it is."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.username or parts.password or parts.query or parts.fragment:
        return "must be the URL Planfix shows, without user, query or fragment"
    if _LOOPBACK.fullmatch(host) and parts.port:
        if not loopback_allowed():
            return (f"a loopback address is for tests only ({LOOPBACK_ENV}=1 in the "
                    "gateway's environment)")
        return "" if parts.scheme == "http" else "a loopback fake is plain http"
    if parts.scheme != "https" or not _HOST.fullmatch(host) or parts.port is not None \
            or parts.netloc.lower() != host:
        return ("must be the account's https://NAME.planfix.ru/tel/api (as Planfix shows "
                "it under Integrations → Virtual PBX → Planfix API for telephony)")
    return ""


def parse_config(section: dict[str, Any]) -> PlanfixConfig:
    field_only(section, "crm", {f.name for f in attrs.fields(PlanfixConfig)})
    token = field_text(section, "crm.token", required=True)
    if not _PBX_TOKEN.fullmatch(token):
        raise BadRequest("crm.token", "must be 16-128 letters, digits, '-', '_', '.' or "
                         "'~': the PBX token the customer enters in Planfix")
    planfix_token = field_text(section, "crm.planfix_token")
    if planfix_token and not _TOKEN.fullmatch(planfix_token):
        raise BadRequest("crm.planfix_token", "must be the token Planfix shows (printable, "
                         "no spaces, at most 256 characters)")
    default_ext = field_text(section, "crm.default_ext")
    if default_ext and not _EXTENSION.fullmatch(default_ext):
        raise BadRequest("crm.default_ext", "must be an extension (short number)")
    credential = section.get("credential")
    return PlanfixConfig(
        kind="planfix", planfix_url=field_planfix_url(section),
        planfix_token=planfix_token, token=token, default_ext=default_ext,
        credential=credential if isinstance(credential, int) else None)


def check_tenant(tenant: Tenant) -> None:
    """An enabled tenant must know where and how to reach Planfix; a disabled one waits for
    Planfix's ``setup`` to fill them."""
    if tenant.enabled and not tenant.deleted:
        for name in ("planfix_url", "planfix_token"):
            if not getattr(tenant.crm, name):
                raise BadRequest(f"crm.{name}", "required while the tenant is enabled: "
                                 "create it with enabled false and Planfix's setup fills it "
                                 "(or copy it from Planfix's integration dialog)")


def account(tenant: Tenant) -> str:
    """The Planfix account host ("" before setup)."""
    return (urlsplit(tenant.crm.planfix_url).hostname or "").lower()


# --- what each action sends (pure: the body tables compare these) ------------------------


def callid(action: Action) -> str:
    """One ``callid`` for every event of one call, on every extension [C §3.2, §4].  A
    transferred call's second talk is sent under the same ``callid`` [? §8 q5]."""
    return f"{action.tenant}-{action.call}"


def ext(tenant: Tenant, payload: dict[str, Any]) -> str:
    """The leg's short number: ``extension``, else the short form of ``sip``
    (``7001*101`` → ``101``), else the tenant's ``default_ext``."""
    extension = (payload.get("extension") or "").strip()
    if not extension:
        sip = (payload.get("sip") or "").strip()
        if sip[:4].lower() == "sip:":
            sip = sip[4:]
        extension = sip.split("@", 1)[0].rsplit("*", 1)[-1].strip()
    return extension or tenant.crm.default_ext


def phone(payload: dict[str, Any]) -> str:
    """The client's number as digits (Planfix's examples: ``79101234567``); a withheld one
    goes as the PBX wrote it, ``anonymous`` when empty [I] (``phone`` is always required)."""
    client = (payload.get("client") or "").strip()
    return e164(client) or client or "anonymous"


def flow(payload: dict[str, Any]) -> str:
    return "in" if payload["direction"] == "incoming" else "out"


def _event(tenant: Tenant, action: Action, event: str) -> dict[str, str]:
    p = action.payload
    extension = ext(tenant, p)
    if not extension:
        raise ValueError("no extension: Planfix requires ext (set crm.default_ext for calls "
                         "no phone rang)")
    return {"cmd": "event", "type": flow(p), "event": event, "phone": phone(p),
            "diversion": e164(p.get("did") or tenant.company_number),
            "ext": extension, "callid": callid(action)}


def final_status(payload: dict[str, Any]) -> str:
    """The ``status`` of a record's COMPLETED [C values; mapping I, planfix.md §4]."""
    outcome = payload.get("outcome") or ""
    if payload.get("status") == "success":
        return "Success"
    if payload["direction"] == "incoming":
        return IN_STATUS.get(outcome, "Missed")
    return OUT_STATUS.get(outcome, "NoAnswer")


def build(tenant: Tenant, action: Action, link: str | None = None) -> dict[str, str]:
    """The form body of one call action, without ``planfix_token`` (added when sent)."""
    p = action.payload
    if action.kind == POPUP:
        return _event(tenant, action, "INCOMING" if flow(p) == "in" else "OUTGOING")
    if action.kind == POPUP_UPDATE:
        return _event(tenant, action, "ACCEPTED")
    if action.kind == CLOSE_POPUP:
        # Rang and stopped unanswered: someone else answered, or the caller gave up; the
        # call's one missed record says Missed [I: §8 q6, a separate COMPLETED].
        return {**_event(tenant, action, "COMPLETED"), "duration": "0", "is_recorded": "0",
                "status": "Cancelled"}
    if action.kind == RECORD:
        body = {**_event(tenant, action, "COMPLETED"),
                "duration": str(int(p.get("duration") or 0)),
                "is_recorded": "1" if p.get("recording") else "0",
                "status": final_status(p)}
        if link and p.get("recording"):
            body["record_link"] = link
        return body
    if action.kind == ATTACH:
        if not link:
            raise ValueError(f"recording {p.get('recording')!r}: no URL to send")
        return {"cmd": "record", "callid": callid(action), "record_link": link,
                "is_temp": IS_TEMP}
    raise ValueError(f"Planfix has no {action.kind!r} action")


def supports(tenant: Tenant, kind: str, payload: dict[str, Any]) -> bool:
    """Pop-ups (ring, answer, close), records and late recordings of incoming and outgoing
    calls, and setup.  Internal calls are not sent [I]: Planfix's ``phone`` is a client's."""
    if kind == SETUP:
        return True
    if payload.get("direction") not in ("incoming", "outgoing"):
        return False
    return kind in (POPUP, POPUP_UPDATE, CLOSE_POPUP, RECORD, ATTACH)


def _lenient_json(body: bytes) -> Any:
    """Planfix's answers as JSON; its document writes them with bare keys
    (``{ error: "Invalid token" }``), read too [I §1]."""
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return json.loads(re.sub(r"([{,]\s*)([A-Za-z_][A-Za-z0-9_]*)\s*:", r'\1"\2":', text))
    except ValueError:
        return None


def _nothing(summary: str) -> tuple[str, Response]:
    """An action that needs no request: done, with why (no HTTP status: none was sent)."""
    return summary, Response(status=None, headers={}, body=b"")  # type: ignore[arg-type]


def _form(request: Inbound) -> dict[str, str]:
    try:
        return request.form()
    except BadRequest:  # not a form, or not UTF-8: Planfix's own answer
        raise invalid_parameters() from None


def _text(form: dict[str, str], name: str, limit: int = 256) -> str:
    value = form.get(name, "").strip()
    if not value or len(value) > limit:
        raise invalid_parameters()
    return value


@implementer(ICrm)
class Planfix:
    """The Planfix CRM module: stateless (every request carries the token)."""

    kind = "planfix"
    secrets = ("planfix_token", "token")
    config_type = PlanfixConfig
    # None: Planfix's setup rewrites planfix_url/planfix_token in the tenant's own section,
    # which fields of a named credential would override; one Planfix account has one PBX.
    credential_fields: tuple[str, ...] = ()
    has_responsible = True

    def __init__(self, http: HttpClient, clock: Any = None, store: Any = None) -> None:
        self.http = http

    # ICrm, synchronous parts

    @staticmethod
    def parse_config(section: dict[str, Any]) -> PlanfixConfig:
        return parse_config(section)

    @staticmethod
    def check_tenant(tenant: Tenant) -> None:
        check_tenant(tenant)

    @staticmethod
    def account(tenant: Tenant) -> str:
        return account(tenant)

    @staticmethod
    def supports(tenant: Tenant, kind: str, payload: dict[str, Any]) -> bool:
        return supports(tenant, kind, payload)

    @staticmethod
    def limits(tenant: Tenant) -> list[tuple[str, float, int]]:
        """One bucket per Planfix account host [I]."""
        return [(f"planfix:{account(tenant)}", RATE, BURST)]

    @staticmethod
    def setup_guide(tenant: Tenant, base: str) -> list[dict[str, str]]:
        """What the customer enters in Planfix's "Planfix API for telephony" dialog: the PBX
        URL and the PBX token (``crm.token``, shown here as the tenant's key is in the PBX
        URLs: the guide is for pasting)."""
        return [{"what": "Planfix → Integrations → Virtual PBX → Planfix API for telephony: "
                         "PBX URL", "method": "POST",
                 "url": f"{base}/crm/{tenant.id}/pbx/{tenant.pbx.login}",
                 "content_type": "application/x-www-form-urlencoded"},
                {"what": "the same dialog: PBX token", "value": tenant.crm.token}]

    @staticmethod
    def command(request: Inbound, tenant: Tenant, action: str) -> Command:
        """Planfix's ``makeCall`` and ``setup`` [C §2], its ``token`` compared in constant
        time with the tenant's PBX token; refusals in Planfix's words."""
        if action not in ACTIONS:
            raise BadRequest("action", f"unknown action {action[:40]!r}: Planfix posts to "
                             "/crm/{tenant}/pbx/{login}", status=404)
        form = _form(request)
        given = form.get("token", "")
        if not tenant.crm.token or not hmac.compare_digest(given.encode(),
                                                           tenant.crm.token.encode()):
            raise invalid_token()
        cmd = form.get("cmd", "")
        if cmd == "makeCall":
            employee = _text(form, "from", 64)
            number = _text(form, "to", 64)
            if not _DIALLABLE.fullmatch(number):
                raise invalid_parameters()
            return Command(action="makecall", employee=employee, number=number)
        if cmd == "setup":
            settings = {"planfix_token": _text(form, "planfix_token"),
                        "planfix_url": _text(form, "planfix_url", 2048)}
            return Command(action="setup", settings=settings)
        raise invalid_parameters()

    def perform(self, tenant: Tenant, action: Action, link: str | None) -> Deferred:
        return ensureDeferred(self._perform(tenant, action, link))

    def responsible(self, tenant: Tenant, number: str) -> Deferred:
        return ensureDeferred(self._responsible(tenant, number))

    # Requests

    async def _post(self, tenant: Tenant, form: dict[str, str],
                    what: str) -> tuple[str, Response, Any]:
        """One command to the account's telephony URL; (summary, answer, parsed body).
        400/401 are permanent, 5xx and timeouts retryable [C answers; classify]."""
        config = tenant.crm
        if not config.planfix_url or not config.planfix_token:
            raise Permanent("no crm.planfix_url / crm.planfix_token yet: Planfix's setup "
                            "sends them when the integration is switched on there")
        problem = url_problem(config.planfix_url)
        if problem:  # a stored URL is checked again (the test switch may be off now)
            raise Permanent(f"crm.planfix_url {config.planfix_url[:80]!r}: {problem}")
        url = config.planfix_url
        summary = f"POST {url} {what}"
        resp = await self.http.request(
            "POST", url, data={**form, "planfix_token": config.planfix_token},
            headers={"Accept": "application/json"})
        answer = _lenient_json(resp.body)
        if resp.status in (400, 401) and isinstance(answer, dict) and answer.get("error"):
            summary += f" ({str(answer['error'])[:80]})"
        raise_for(resp, summary)
        if isinstance(answer, dict) and answer.get("error"):
            # [I] An error in a 200 is still a refusal: retrying sends the same again.
            raise Permanent(f"{summary}: HTTP {resp.status} with error "
                            f"{str(answer['error'])[:80]!r}", resp.status, resp.excerpt())
        return summary, resp, answer

    async def _perform(self, tenant: Tenant, action: Action,
                       link: str | None) -> tuple[str, Response]:
        if action.kind == SETUP:
            return await self._setup(tenant, action.payload)
        try:
            form = build(tenant, action, link)
        except Exception as e:
            # build() is pure: what fails now fails on every try.
            raise Permanent(f"cannot build the request: {type(e).__name__}: "
                            f"{str(e)[:200]}") from e
        if form["cmd"] == "record":
            what = f"record callid={form['callid']}"
        else:
            what = (f"event {form['type']}/{form['event']}"
                    + (f"/{form['status']}" if "status" in form else "")
                    + f" ext={form['ext']} callid={form['callid']}")
        summary, resp, _ = await self._post(tenant, form, what)
        return summary, resp

    async def _setup(self, tenant: Tenant, payload: dict[str, Any]) -> tuple[str, Response]:
        """enable: ``cmd=ping`` checks the URL and our token, and that Planfix holds the
        tenant's PBX token (else its ``makeCall`` would be refused 401) [I §3.4].  disable:
        Planfix has no switch for the PBX side [I]; nothing is sent."""
        if payload.get("type") != "enable":
            return _nothing(f"setup {payload.get('type')}: Planfix has nothing to switch "
                            "off from the PBX side; no request sent")
        summary, resp, answer = await self._post(tenant, {"cmd": "ping"}, "ping")
        held = answer.get("pbxToken") if isinstance(answer, dict) else None
        if isinstance(held, str) and held and not hmac.compare_digest(
                held.encode(), tenant.crm.token.encode()):
            raise Permanent(f"{summary}: Planfix holds another PBX token than crm.token: "
                            "its makeCall would be refused; enter crm.token in Planfix's "
                            "integration dialog", resp.status)
        url = answer.get("pbxUrl") if isinstance(answer, dict) else None
        return summary + (f": Planfix posts to {url}" if isinstance(url, str) else ""), resp

    async def _responsible(self, tenant: Tenant, number: str) -> str | None:
        """``cmd=contact`` → the ``responsible`` short number, or None [C §3.1]; an unknown
        number answers without it [I §8 q3]."""
        bare = e164(number) or digits(number)
        if not bare:
            return None
        summary, resp, answer = await self._post(tenant, {"cmd": "contact", "phone": bare},
                                                 f"contact {bare}")
        if answer is None and resp.body.strip():
            raise Permanent(f"{summary}: HTTP {resp.status}, not JSON", resp.status,
                            resp.excerpt())
        found = answer.get("responsible") if isinstance(answer, dict) else None
        if isinstance(found, bool) or found is None:
            return None
        if isinstance(found, int):
            found = str(found)
        if not isinstance(found, str) or not _EXTENSION.fullmatch(found.strip()):
            return None
        return found.strip()
