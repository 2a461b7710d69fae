"""Call-interactive for a Megaplan tenant, end to end in one process: the IVR's request to the
real public site, the gateway's lookup cache and deadline, the real Megaplan module, and the
strict fake Megaplan served over loopback TCP (so its per-path delays and faults are real
time, as a slow or failing account would be).

What the IVR gets is asserted, and whether the CRM was asked (the fake's ``callRoute``
requests); never how long anything took.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import attrs
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.server import Site

from gateway.crm import LOOPBACK_ENV
from gateway.httpclient import HttpClient
from gateway.model import Tenant, parse_tenant
from tests.fakes.megaplan import FakeMegaplan
from tests.test_public import KEY, LOGIN, Harness

USER, PASSWORD = "robot@acme.ru", "S3cret"
API = "/api/v3"
ROUTE = f"{API}/callRoute"
CALLER = "+79161234567"  # responsible: 1000005 (internalNumber 101 in Megaplan)
SECOND = "+79035550000"  # responsible: 1000006 (no internal number; the tenant maps it)
STRANGER = "+79990000000"  # no route
DEADLINE = 5.0
EMPTY = b'<?xml version="1.0" encoding="UTF-8"?>\n<Response/>\n'

SETUP_FAKE = {
    "employees": [
        {"id": "1000005", "name": "Иван Петров", "internalNumber": "101"},
        {"id": "1000006", "name": "Мария Сидорова"},
        {"id": "1000007", "name": "Пётр Иванов", "internalNumber": "sip:103@pbx.example.net"},
    ],
    "routes": {CALLER: ["1000005"], SECOND: ["1000006"], "+79035550001": ["1000007"]},
}


def set_var(extension: str, name: str = "number") -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><SetVar name="'
            + name.encode() + b'">' + extension.encode() + b"</SetVar></Response>\n")


def megaplan_tenant(port: int, employees: dict[str, str] | None = None,
                    **options: Any) -> Tenant:
    return parse_tenant({
        "id": 807, "name": "ACME", "key": KEY,
        "pbx": {"kind": "telphin", "login": LOGIN},
        "crm": {"kind": "megaplan", "domain": f"127.0.0.1:{port}", "login": USER,
                "password": PASSWORD},
        "employees": employees or {},
        "options": {"timezone": "Europe/Moscow", **options},
    })


class World:
    """The gateway's public site with tenant 807 on Megaplan, and the fake it asks."""

    def __init__(self, harness: Harness, fake: FakeMegaplan, port: int) -> None:
        self.harness = harness
        self.fake = fake
        self.port = port

    def use(self, employees: dict[str, str] | None = None, **options: Any) -> None:
        tenant = megaplan_tenant(self.port, employees, **options)
        tenant = Tenant.from_json({**tenant.to_json(secrets=True), "enabled": True})
        self.harness.gw.tenants[807] = tenant

    async def ask(self, number: str = CALLER, method: str = "POST") -> Any:
        fields = {"EventType": "call_interactive", "CallID": "c1", "CallerIDNum": number,
                  "CallFlow": "IN", "CallStatus": "ANSWER"}
        path = f"/cid/807/getmanager/{LOGIN}?{urlencode({'key': KEY})}"
        if method == "GET":
            return await self.harness.request("GET", f"{path}&{urlencode(fields)}",
                                              content_type=None)
        return await self.harness.request("POST", path, urlencode(fields).encode())

    def routes(self, number: str | None = None) -> int:
        """callRoute requests the fake received (for ``number``'s digits, if given)."""
        wanted = None if number is None else "".join(c for c in number if c.isdigit())
        return sum(1 for r in self.fake.requests if r["path"] == ROUTE
                   and (wanted is None or f'"{wanted}"' in (r["query"] or "")))


@pytest_twisted.async_yield_fixture
async def world(tmp_path: Any, monkeypatch: Any) -> Any:
    monkeypatch.setenv(LOOPBACK_ENV, "1")
    fake = FakeMegaplan(USER, PASSWORD, clock=reactor)
    fake.setup(SETUP_FAKE)
    listening = reactor.listenTCP(0, Site(fake.resource()), interface="127.0.0.1")
    http = HttpClient(reactor, timeout=5)
    harness = Harness(tmp_path, http=http)
    await harness.start()
    w = World(harness, fake, listening.getHost().port)
    # A deadline no loaded machine misses; the slow-Megaplan test sets a short one.
    w.use(interactive_deadline=DEADLINE)
    try:
        yield w
    finally:
        await harness.stop()
        await http.close()
        await listening.stopListening()


@pytest_twisted.ensureDeferred
async def test_cold_cache_asks_megaplan_and_sets_the_extension(world: World) -> None:
    reply = await world.ask()
    assert (reply.status, reply.body) == (200, set_var("101"))
    assert reply.header("Content-Type").startswith("text/xml")
    assert world.routes(CALLER) == 1


@pytest_twisted.ensureDeferred
async def test_warm_cache_answers_without_a_megaplan_request(world: World) -> None:
    assert (await world.ask()).body == set_var("101")
    assert world.routes() == 1
    seen = len(world.fake.requests)
    # Megaplan now routes the caller elsewhere: not asked while the answer is fresh.
    world.fake.setup({"routes": {CALLER: ["1000007"]}})
    reply = await world.ask(method="GET")
    assert (reply.status, reply.body) == (200, set_var("101"))
    assert world.routes() == 1 and len(world.fake.requests) == seen
    # Another number is a cold cache of its own.
    assert (await world.ask("+79035550001")).body == set_var("103")
    assert world.routes() == 2


@pytest_twisted.ensureDeferred
async def test_nobody_responsible_is_the_empty_answer_and_is_cached(world: World) -> None:
    assert (await world.ask(STRANGER)).body == EMPTY
    assert (await world.ask(STRANGER)).body == EMPTY
    assert world.routes(STRANGER) == 1


@pytest_twisted.ensureDeferred
async def test_megaplan_answering_after_the_deadline(world: World) -> None:
    delay = 0.6
    # Log in and read the directory first (with the default deadline), so that only
    # callRoute is slow.
    assert (await world.ask("+79035550001")).body == set_var("103")
    world.use(interactive_deadline=0.2)
    world.fake.setup({"delays": {ROUTE: delay}})
    reply = await world.ask()
    # In time, empty: the IVR goes on to its next rule.
    assert (reply.status, reply.body) == (200, EMPTY)
    assert world.routes(CALLER) == 1
    # The slow answer still lands, and fills the cache for the next call.
    await deferLater(reactor, delay + 0.2, lambda: None)
    lookup = world.harness.gw.lookups[807][1]
    for _ in range(200):  # a loaded machine: up to 10 s more
        if not lookup.in_flight:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert lookup.in_flight == 0
    assert [r["status"] for r in world.fake.requests if r["path"] == ROUTE][-1] == 200
    reply = await world.ask()
    assert (reply.status, reply.body) == (200, set_var("101"))
    assert world.routes(CALLER) == 1


@pytest_twisted.ensureDeferred
async def test_megaplan_down_is_the_empty_answer(world: World) -> None:
    # Logged in already (another caller), then every request answers 503.
    assert (await world.ask("+79035550001")).body == set_var("103")
    world.fake.faults.update({"fail_status": 503})
    reply = await world.ask()
    assert (reply.status, reply.body) == (200, EMPTY)
    assert [r["status"] for r in world.fake.requests if r["path"] == ROUTE][-1] == 503
    # A failure is not an answer: once Megaplan is back the next call asks again.
    world.fake.faults.clear()
    assert (await world.ask()).body == set_var("101")
    assert world.routes(CALLER) >= 1


@pytest_twisted.ensureDeferred
async def test_the_extension_comes_from_the_tenants_employees_first(world: World) -> None:
    # 1000006 has no internal number in Megaplan: only the tenant's map knows it.
    assert (await world.ask(SECOND)).body == EMPTY
    world.harness.gw.lookups.clear()
    world.use({"7001*102": "1000006", "201": "1000005"}, interactive_deadline=DEADLINE)
    assert (await world.ask(SECOND)).body == set_var("7001*102")
    # The tenant's map wins over Megaplan's internalNumber (101) for 1000005.
    assert (await world.ask(CALLER)).body == set_var("201")


@pytest_twisted.ensureDeferred
async def test_the_extension_comes_from_call_user_config(world: World) -> None:
    assert (await world.ask(CALLER)).body == set_var("101")
    # sip:103@pbx.example.net in callUserConfig is extension 103.
    assert (await world.ask("+79035550001")).body == set_var("103")
    configs = [r for r in world.fake.requests if r["path"] == f"{API}/callUserConfig"]
    assert len(configs) == 1  # the directory is read once for both


@pytest_twisted.ensureDeferred
async def test_the_variable_name_is_the_tenants(world: World) -> None:
    tenant = megaplan_tenant(world.port, interactive_deadline=DEADLINE)
    data = tenant.to_json(secrets=True)
    data["pbx"]["variable"] = "manager"
    world.harness.gw.tenants[807] = Tenant.from_json(data)
    assert (await world.ask()).body == set_var("101", "manager")


@pytest_twisted.ensureDeferred
async def test_saving_the_tenant_forgets_its_cached_managers(world: World) -> None:
    gw = world.harness.gw
    assert (await world.ask(CALLER)).body == set_var("101")
    before = gw.tenants[807]
    # The employee map changed: the cached 101 is no longer the extension to give.
    await gw.save_tenant(attrs.evolve(before, employees={"201": "1000005"}), before)
    assert 807 not in gw.lookups
    assert (await world.ask(CALLER)).body == set_var("201")
    assert world.routes(CALLER) == 2
    # Saving it unchanged keeps the cache.
    await gw.save_tenant(gw.tenants[807], gw.tenants[807])
    assert (await world.ask(CALLER)).body == set_var("201")
    assert world.routes(CALLER) == 2
    # A deleted tenant's cache goes with it.
    await gw.save_tenant(attrs.evolve(gw.tenants[807], deleted=True, enabled=False),
                         gw.tenants[807])
    assert 807 not in gw.lookups
