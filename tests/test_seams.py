"""The seams between the core and the PBX / CRM modules.

The core (web, engine, calls, outbox, store) names no PBX and no CRM: every module is reached
through its interface and the registry by kind, and each module checks its own config.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from gateway import crm, protocols
from gateway.crm import ICrm
from gateway.errors import BadRequest
from gateway.httpclient import HttpClient
from gateway.model import Event, Tenant, parse_tenant
from gateway.protocols import IPbx
from gateway.protocols.telphin import parse_event

ROOT = Path(__file__).resolve().parent.parent / "gateway"
NAMES = re.compile(r"telphin|altegio|megaplan|subcallid|crm_token", re.IGNORECASE)
CORE = ("web", "engine.py", "calls.py", "outbox.py", "store")


def core_files() -> list[Path]:
    return [p for p in sorted(ROOT.rglob("*.py"))
            if p.relative_to(ROOT).parts[0] not in ("protocols", "crm")]


def names_in_code(path: Path) -> list[str]:
    """Every PBX or CRM name in ``path`` outside comments and docstrings."""
    found = []
    tokens = list(tokenize.generate_tokens(io.StringIO(path.read_text()).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.COMMENT:
            continue
        if tok.type == tokenize.STRING:
            before = next((t for t in reversed(tokens[:i]) if t.type not in (
                tokenize.NL, tokenize.COMMENT)), None)
            if before is None or before.type in (tokenize.NEWLINE, tokenize.INDENT,
                                                 tokenize.DEDENT):
                continue  # a docstring (or a bare string statement): prose
        if NAMES.search(tok.string):
            found.append(f"{path.relative_to(ROOT.parent)}:{tok.start[0]}: {tok.string}")
    return found


def test_the_core_names_no_pbx_and_no_crm_outside_comments() -> None:
    assert [hit for path in core_files() for hit in names_in_code(path)] == []


@pytest.mark.parametrize("part", CORE)
def test_the_core_imports_no_module_of_a_particular_pbx_or_crm(part: str) -> None:
    paths = [ROOT / part] if part.endswith(".py") else sorted((ROOT / part).rglob("*.py"))
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for module in modules:
                assert not re.match(r"gateway\.(protocols|crm)\.", module), (path, module)
                if isinstance(node, ast.ImportFrom) and module in ("gateway.protocols",
                                                                   "gateway.crm"):
                    for alias in node.names:
                        assert alias.name not in protocols.KINDS | crm.KINDS, (path, alias)


@pytest.mark.parametrize("kind", sorted(protocols.KINDS))
def test_every_pbx_module_provides_the_interface(kind: str) -> None:
    cls = protocols.pbx_type(kind)
    pbx = cls(HttpClient(Clock()), Clock())
    verifyObject(IPbx, pbx)
    assert pbx.kind == kind and issubclass(cls.config_type, protocols.PbxConfig)


@pytest.mark.parametrize("kind", sorted(crm.KINDS))
def test_every_crm_module_provides_the_interface(kind: str) -> None:
    cls = crm.crm_type(kind)
    module = cls(HttpClient(Clock()), Clock(), None)
    verifyObject(ICrm, module)
    assert module.kind == kind and issubclass(cls.config_type, crm.CrmConfig)
    assert set(cls.credential_fields) <= {a.name for a in cls.config_type.__attrs_attrs__}


BODY = {
    "id": 807, "name": "ACME", "key": "tenant-key-0123456789abcdef",
    "pbx": {"kind": "telphin", "login": "TLP55522", "client_id": "app1",
            "client_secret": "pbx-secret-1"},
    "crm": {"kind": "altegio", "api_url": "http://altegio.test", "partner_token": "partner-2",
            "crm_token": "chain-token-3"},
    "numbers": ["74951234567"],
}


def test_each_side_is_validated_by_its_own_module() -> None:
    t = parse_tenant(BODY)
    assert type(t.pbx).__name__ == "TelphinConfig" and type(t.crm).__name__ == "AltegioConfig"
    for patch, field in (
            ({"pbx": {**BODY["pbx"], "partner_token": "x"}}, "pbx.partner_token"),
            ({"crm": {**BODY["crm"], "client_id": "x"}}, "crm.client_id"),
            ({"pbx": {**BODY["pbx"], "kind": "asterisk"}}, "pbx.kind"),
            ({"crm": {**BODY["crm"], "kind": ["altegio"]}}, "crm.kind"),
            ({"crm": "altegio"}, "crm"),
            ({"pbx": {**BODY["pbx"], "variable": "1st"}}, "pbx.variable"),
            ({"pbx": {**BODY["pbx"], "extension_ids": {"101": "abc"}}}, "pbx.extension_ids")):
        with pytest.raises(BadRequest) as raised:
            parse_tenant({**BODY, **patch})
        assert raised.value.field == field


def test_each_module_declares_its_secrets_and_they_are_never_returned() -> None:
    t = parse_tenant(BODY)
    out = t.to_json()
    assert out["secrets_set"] == {"key": True, "pbx.client_secret": True,
                                  "crm.partner_token": True, "crm.crm_token": True}
    text = repr(out) + repr(t)
    for secret in ("pbx-secret-1", "partner-2", "chain-token-3", BODY["key"]):
        assert secret not in text
    assert Tenant.from_json(t.to_json(secrets=True)) == t


def test_an_altegio_tenant_needs_a_company_number_for_outgoing_records() -> None:
    with pytest.raises(BadRequest) as raised:
        parse_tenant({**BODY, "numbers": []})
    assert raised.value.field == "options.default_number"
    t = parse_tenant({**BODY, "numbers": [], "options": {"default_number": "74950000000"}})
    assert t.company_number == "74950000000"
    assert parse_tenant(BODY).company_number == "74951234567"  # the first of numbers


# Outcomes: the gateway's own words, whatever the PBX said

@pytest.mark.parametrize("status, outcome", [
    ("ANSWER", "answered"), ("NOANSWER", "no-answer"), ("BUSY", "busy"),
    ("CANCEL", "cancelled"), ("CONGESTION", "failed"), ("CHANUNAVAIL", "failed"),
    ("answer", "answered"), ("", "")])
def test_telphin_statuses_become_outcomes(status: str, outcome: str) -> None:
    fields = {"CallID": "c", "SubCallID": "s", "CallFlow": "in", "CallStatus": status,
              "EventTime": "1715677352600000"}
    assert parse_event(fields, "hangup", 807, 1715677352.6).outcome == outcome


def test_events_stored_with_a_pbx_status_are_read_with_its_outcome() -> None:
    row = Event(tenant=1, call="c", leg="l", kind="hangup", flow="in", at=1,
                received=1.0).to_row()
    del row["outcome"]
    for status, outcome in (("ANSWER", "answered"), ("BUSY", "busy"), ("CHANUNAVAIL", "failed")):
        assert Event.from_row({**row, "status": status}).outcome == outcome


def test_an_event_without_a_time_of_its_own_is_deduplicated_by_what_its_module_gives() -> None:
    one = Event(tenant=1, call="c", leg="l", kind="hangup", flow="in", at=1, received=1.0,
                dedup="notification-42")
    again = Event(tenant=1, call="c", leg="l", kind="hangup", flow="in", at=2, received=2.0,
                  dedup="notification-42")
    assert one.natural_key == again.natural_key
    assert Event(tenant=1, call="c", leg="l", kind="hangup", flow="in", at=1,
                 received=1.0).natural_key != Event(tenant=1, call="c", leg="l",
                                                    kind="hangup", flow="in", at=2,
                                                    received=1.0).natural_key


def test_telphin_and_altegio_agree_on_what_is_worth_retrying() -> None:
    # One classification for every module (httpclient.classify): 408 is a timeout.
    from gateway.httpclient import classify

    assert [classify(s) for s in (200, 204, 408, 425, 429, 500, 503, 400, 401, 404, 422)] == [
        "done", "done", "retry", "retry", "retry", "retry", "retry",
        "permanent", "permanent", "permanent", "permanent"]

