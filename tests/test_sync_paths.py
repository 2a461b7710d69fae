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

from gateway import crm
from gateway.crm import ICrm
from gateway.crm.altegio import Altegio, AltegioConfig
from gateway.errors import Retryable
from gateway.httpclient import HttpClient
from gateway.model import Tenant
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
