"""The two synchronous paths, through the real public site: call-interactive (the IVR asks
who the caller's manager is and waits) and click-to-call (a CRM asks the PBX to place a call).

Call-interactive is tested with a CRM whose lookup the test controls (registered for these
tests only), so the deadline, the cache and the fallbacks are exercised whatever a real CRM
module does; Megaplan's own lookup has its tests beside the module.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from gateway import crm, protocols
from gateway.crm import Command, ICrm
from gateway.crm.altegio import Altegio, AltegioConfig
from gateway.errors import Retryable
from gateway.httpclient import HttpClient
from gateway.model import Tenant
from gateway.protocols import IPbx
from gateway.protocols.telphin import Telphin
from tests.fakes.telphin import FakeTelphin
from tests.test_public import KEY, LOGIN, Harness, tenant

CALLER = "+79161234567"
TELPHIN = "http://apiproxy.telphin.ru"
APP, SECRET = "app1", "s3cret-of-the-app"


@implementer(ICrm)
class LookupCrm(Altegio):
    """Altegio in everything but the lookup, which the test answers through ``pending``."""

    kind = "lookupcrm"
    has_responsible = True
    asked: list[str] = []
    answer: Any = None

    @staticmethod
    def parse_config(section: dict[str, Any]) -> AltegioConfig:
        return attrs.evolve(Altegio.parse_config({**section, "kind": "altegio"}),
                            kind="lookupcrm")

    def responsible(self, tenant: Tenant, number: str) -> Deferred:
        LookupCrm.asked.append(number)
        answer = LookupCrm.answer
        return answer() if callable(answer) else succeed(answer)


def with_crm(kind: str, **options: Any) -> Tenant:
    data = tenant(807).to_json(secrets=True)
    data["crm"]["kind"] = kind
    data["options"] = {"interactive_deadline": 0.3, **options}
    return Tenant.from_json(data)


@pytest.fixture
def lookup_crm(monkeypatch: Any) -> Any:
    monkeypatch.setitem(crm.KINDS, "lookupcrm", f"{__name__}:LookupCrm")
    LookupCrm.asked = []
    LookupCrm.answer = None
    return LookupCrm


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any, lookup_crm: Any) -> Any:
    harness = Harness(tmp_path)
    await harness.start()
    harness.gw.tenants[807] = with_crm("lookupcrm")
    yield harness
    await harness.stop()


async def ask(gateway: Harness, number: str = CALLER, key: str = KEY, method: str = "POST",
              name: str = "getmanager") -> Any:
    fields = {"EventType": "call_interactive", "CallID": "c1", "CallerIDNum": number,
              "CallFlow": "IN", "CallStatus": "ANSWER"}
    path = f"/cid/807/{name}/{LOGIN}?{urlencode({'key': key})}"
    if method == "GET":
        return await gateway.request("GET", f"{path}&{urlencode(fields)}", content_type=None)
    return await gateway.request(method, path, urlencode(fields).encode())


def set_var(extension: str, name: str = "number") -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><SetVar name="'
            + name.encode() + b'">' + extension.encode() + b"</SetVar></Response>\n")


EMPTY = b'<?xml version="1.0" encoding="UTF-8"?>\n<Response/>\n'


# Call-interactive


@pytest_twisted.ensureDeferred
async def test_the_managers_extension_is_set_in_the_ivr_variable(gateway: Harness) -> None:
    LookupCrm.answer = "101"
    reply = await ask(gateway)
    assert (reply.status, reply.body) == (200, set_var("101"))
    assert reply.header("Content-Type").startswith("text/xml")
    assert LookupCrm.asked == [CALLER]


@pytest_twisted.ensureDeferred
async def test_a_warm_cache_answers_without_asking_the_crm(gateway: Harness) -> None:
    LookupCrm.answer = "101"
    await ask(gateway)
    LookupCrm.answer = "999"  # the CRM changed its mind: not asked while the answer is fresh
    reply = await ask(gateway, method="GET")
    assert reply.body == set_var("101") and LookupCrm.asked == [CALLER]


@pytest_twisted.ensureDeferred
async def test_a_crm_slower_than_the_deadline_gets_the_empty_answer_and_fills_the_cache(
        gateway: Harness) -> None:
    late: Deferred = Deferred()
    LookupCrm.answer = lambda: late
    reply = await ask(gateway)  # answered at the tenant's deadline, the lookup still going
    assert (reply.status, reply.body) == (200, EMPTY)
    late.callback("102")
    reply = await ask(gateway)
    assert reply.body == set_var("102") and LookupCrm.asked == [CALLER]


@pytest_twisted.ensureDeferred
async def test_a_crm_that_is_down_gets_the_empty_answer(gateway: Harness) -> None:
    LookupCrm.answer = lambda: fail(Retryable("GET /callRoute: HTTP 503", 503))
    reply = await ask(gateway)
    assert (reply.status, reply.body) == (200, EMPTY)


@pytest_twisted.ensureDeferred
async def test_nobody_responsible_is_the_empty_answer(gateway: Harness) -> None:
    LookupCrm.answer = None
    assert (await ask(gateway)).body == EMPTY


@pytest_twisted.ensureDeferred
async def test_the_variable_name_is_the_tenants(gateway: Harness) -> None:
    t = gateway.gw.tenants[807]
    gateway.gw.tenants[807] = attrs.evolve(t, pbx=attrs.evolve(t.pbx, variable="manager"))
    LookupCrm.answer = "101"
    assert (await ask(gateway)).body == set_var("101", "manager")


@pytest_twisted.ensureDeferred
async def test_an_altegio_tenant_always_gets_the_empty_answer(gateway: Harness) -> None:
    gateway.gw.tenants[807] = tenant(807)
    assert (await ask(gateway)).body == EMPTY
    assert LookupCrm.asked == []


@pytest_twisted.ensureDeferred
async def test_bad_call_interactive_requests_are_refused_naming_what(gateway: Harness) -> None:
    assert (await ask(gateway, key="wrong-key-0123456789")).status == 403
    reply = await ask(gateway, number="")
    assert reply.status == 400 and b"CallerIDNum" in reply.body
    assert (await ask(gateway, name="getboss")).status == 404
    assert (await ask(gateway, method="PUT")).status == 405
    assert LookupCrm.asked == []


# Click-to-call


@pytest_twisted.async_yield_fixture
async def telphin_gateway(tmp_path: Any) -> Any:
    fake = FakeTelphin({APP: SECRET}, clock=reactor)
    fake.setup({"extensions": {"200501": "7001*101"}})
    harness = Harness(tmp_path, http=HttpClient(reactor, client=StubTreq(fake.resource())))
    await harness.start()
    data = tenant(807).to_json(secrets=True)
    data["pbx"].update(api_url=TELPHIN, client_id=APP, client_secret=SECRET,
                       extension_ids={"101": "200501"})
    data["employees"] = {"101": "1000005"}
    harness.gw.tenants[807] = Tenant.from_json(data)
    harness.fake = fake
    yield harness
    await harness.stop()


async def click(gateway: Harness, body: Any, action: str = "makecall",
                key: str = KEY) -> tuple[int, Any]:
    reply = await gateway.request(
        "POST", f"/crm/807/{action}/{LOGIN}?{urlencode({'key': key})}",
        json.dumps(body).encode(), content_type="application/json")
    return reply.status, json.loads(reply.body)


@pytest_twisted.ensureDeferred
async def test_makecall_rings_the_employee_then_dials_the_number(telphin_gateway: Any) -> None:
    status, body = await click(telphin_gateway, {"employee": "101", "number": "+7 916 123-45-67"})
    assert status == 200 and body["ok"] is True
    [callback] = telphin_gateway.fake.state()["callbacks"]
    assert body["call"] == callback["call_id"]
    # Seed 002: the employee's phone first; the dialled number as the caller id shown to the
    # employee, so they can redial it.
    assert (callback["extension_id"], callback["src_num"], callback["dst_num"]) == (
        200501, ["101"], "+79161234567")
    assert callback["caller_id_name"] == callback["caller_id_number"] == "+79161234567"


@pytest_twisted.ensureDeferred
async def test_makecall_names_the_employee_by_the_crms_user_id(telphin_gateway: Any) -> None:
    status, _ = await click(telphin_gateway, {"employee": "1000005", "number": "89161234567"})
    assert status == 200
    assert telphin_gateway.fake.state()["callbacks"][0]["src_num"] == ["101"]


@pytest_twisted.ensureDeferred
async def test_click_to_call_errors_say_what_to_fix(telphin_gateway: Any) -> None:
    status, body = await click(telphin_gateway, {"employee": "102", "number": "89161234567"})
    assert status == 422 and "pbx.extension_ids" in body["error"]
    status, body = await click(telphin_gateway, {"employee": "Ivan", "number": "89161234567"})
    assert status == 422 and "employees" in body["error"]
    status, body = await click(telphin_gateway, {"employee": "101", "number": "call me"})
    assert status == 400 and body["field"] == "number"
    status, body = await click(telphin_gateway, {"employee": "101"})
    assert status == 400 and body["field"] == "number"
    status, body = await click(telphin_gateway, ["101"])
    assert status == 400 and body["field"] == "body"
    status, body = await click(telphin_gateway, {"employee": "101", "number": "1"},
                               key="wrong-key-0123456789")
    assert status == 403 and body["field"] == "key"
    status, body = await click(telphin_gateway, {"call": "c1"}, action="transfer")
    assert status == 404 and body["field"] == "action"
    assert telphin_gateway.fake.state()["callbacks"] == []


@pytest_twisted.ensureDeferred
async def test_hangup_says_telphin_cannot(telphin_gateway: Any) -> None:
    status, body = await click(telphin_gateway, {"call": "c1"}, action="hangup")
    assert status == 422 and "no way to end a call" in body["error"]


@pytest_twisted.ensureDeferred
async def test_makecall_without_a_rest_application_says_which_fields(telphin_gateway: Any) -> None:
    telphin_gateway.gw.tenants[807] = tenant(807)
    status, body = await click(telphin_gateway, {"employee": "101", "number": "89161234567"})
    assert status == 422 and "pbx.api_url" in body["error"]


@pytest_twisted.ensureDeferred
async def test_click_to_call_takes_post_only(telphin_gateway: Any) -> None:
    reply = await telphin_gateway.request("GET", f"/crm/807/makecall/{LOGIN}?key={KEY}")
    assert reply.status == 405 and reply.header("Allow") == "POST"


# A PBX that posts every command to one URL (as MegaFon does): its lookups arrive as
# webhooks, and it wants its refusals in its own form.


@implementer(IPbx)
class OneUrlPbx(Telphin):
    """Telphin's parsing, under its own prefix: ``cmd=contact`` is a lookup, refusals JSON."""

    kind = "oneurl"
    prefix = "oneurl"

    @staticmethod
    def parse_config(section: dict[str, Any]) -> Any:
        return attrs.evolve(Telphin.parse_config({**section, "kind": "telphin"}),
                            kind="oneurl")

    @staticmethod
    def is_lookup(request: Any) -> bool:
        return request.form().get("cmd") == "contact"

    @staticmethod
    def refusal(error: Any) -> tuple[bytes, bytes]:
        return b"application/json", json.dumps({"error": str(error)}).encode()


@pytest_twisted.async_yield_fixture
async def one_url(tmp_path: Any, lookup_crm: Any, monkeypatch: Any) -> Any:
    monkeypatch.setitem(protocols.KINDS, "oneurl", f"{__name__}:OneUrlPbx")
    harness = Harness(tmp_path)
    await harness.start()
    data = with_crm("lookupcrm").to_json(secrets=True)
    data["pbx"]["kind"] = "oneurl"
    harness.gw.tenants[807] = Tenant.from_json(data)
    yield harness
    await harness.stop()


@pytest_twisted.ensureDeferred
async def test_a_webhook_the_pbx_calls_a_lookup_is_answered_like_call_interactive(
        one_url: Harness) -> None:
    LookupCrm.answer = "101"
    fields = {"cmd": "contact", "CallerIDNum": CALLER}
    reply = await one_url.request("POST", f"/oneurl/807/crm/{LOGIN}?key={KEY}",
                                  urlencode(fields).encode())
    assert (reply.status, reply.body) == (200, set_var("101"))
    assert LookupCrm.asked == [CALLER]
    # Nothing was stored: a lookup is not an event.
    assert await one_url.store.events_after(0, 10) == []


@pytest_twisted.ensureDeferred
async def test_a_pbxs_refusals_are_in_its_own_form(one_url: Harness) -> None:
    reply = await one_url.request("POST", f"/oneurl/807/crm/{LOGIN}?key=wrong",
                                  urlencode({"cmd": "contact"}).encode())
    assert reply.status == 403
    assert reply.header("Content-Type") == "application/json"
    assert json.loads(reply.body) == {"error": "key: wrong or missing key"}
    # Before the tenant (so its PBX) is known: plain text.
    reply = await one_url.request("POST", f"/oneurl/999/crm/{LOGIN}?key={KEY}", b"")
    assert reply.status == 404 and reply.header("Content-Type").startswith("text/plain")
    # The lookup's own errors too.
    reply = await one_url.request("POST", f"/oneurl/807/crm/{LOGIN}?key={KEY}",
                                  urlencode({"cmd": "contact"}).encode())
    assert (reply.status, json.loads(reply.body)) == (400, {"error": "CallerIDNum: required"})


# A CRM that switches the integration on from its side (as Planfix's ``setup`` does).


@implementer(ICrm)
class SetupCrm(Altegio):
    kind = "setupcrm"

    @staticmethod
    def parse_config(section: dict[str, Any]) -> AltegioConfig:
        return attrs.evolve(Altegio.parse_config({**section, "kind": "altegio"}),
                            kind="setupcrm")

    @staticmethod
    def command(request: Any, tenant: Tenant, action: str) -> Command:
        body = json.loads(request.body)
        return Command(action="setup", settings=body)


@pytest_twisted.async_yield_fixture
async def setup_crm(tmp_path: Any, monkeypatch: Any) -> Any:
    monkeypatch.setitem(crm.KINDS, "setupcrm", f"{__name__}:SetupCrm")
    harness = Harness(tmp_path)
    await harness.start()
    # Saved disabled: the CRM's setup is what switches it on.
    previous = harness.gw.tenants[807]
    off = attrs.evolve(with_crm("setupcrm"), enabled=False)
    await harness.gw.save_tenant(off, previous)
    yield harness
    await harness.stop()


@pytest_twisted.ensureDeferred
async def test_a_crms_setup_saves_its_settings_and_enables_the_tenant(
        setup_crm: Harness) -> None:
    gw = setup_crm.gw
    reply = await setup_crm.request("POST", f"/crm/807/setup/{LOGIN}",
                                    json.dumps({"crm_token": "new-token"}).encode(),
                                    content_type="application/json")
    assert reply.status == 200, reply.body
    assert gw.tenants[807].enabled and gw.tenants[807].crm.crm_token == "new-token"
    stored = {t.id: t for t in await setup_crm.store.tenants()}[807]
    assert stored.enabled and stored.crm.crm_token == "new-token"


@pytest_twisted.ensureDeferred
async def test_a_crms_setup_the_schema_refuses_names_the_field(setup_crm: Harness) -> None:
    gw = setup_crm.gw
    reply = await setup_crm.request("POST", f"/crm/807/setup/{LOGIN}",
                                    json.dumps({"no_such": "x"}).encode(),
                                    content_type="application/json")
    assert reply.status == 400
    assert "crm.no_such" in json.loads(reply.body)["error"]
    assert not gw.tenants[807].enabled
