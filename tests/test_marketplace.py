"""The Altegio Marketplace: an owner's registration (redirect → form → activation), late
submissions, retries, returning owners, double submits, and the lifecycle webhook
(uninstall, freeze then payment, forged) — a real gateway (SQLite store, engine,
dispatcher) against the fake Altegio, both on loopback."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any, Callable
from urllib.parse import urlencode

import attrs
import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from gateway import outbox
from gateway.crm.altegio_marketplace import verify_user_data
from gateway.service import Gateway
from gateway.store.sqlite import SQLiteStore
from gateway.web import loggable_uri
from gateway.web import site as site_for
from gateway.web.public import PublicSite
from tests.fakes.altegio import FakeAltegio

PARTNER = "8a7b6c5d4e3f-partner"
APP = 912
CRM_TOKEN = "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"
LOGIN = "TLP55522"
FORM = {"pbx_kind": "telphin", "pbx.telphin.login": LOGIN, "numbers": "74951234567",
        "routing": "extension", "name": "Salon <b>Chain</b>"}


def dial_in(call: str, at: int) -> dict[str, str]:
    return {"EventType": "dial-in", "CallID": call, "SubCallID": f"200501-{call}",
            "CallFlow": "in", "CallStatus": "CALLING", "CallerIDNum": "+79161234567",
            "CalledDID": "74951234567", "CalledExtension": "7001*101@sipproxy.telphin.ru",
            "CalledExtensionID": "200501", "EventTime": str(at)}


def hangup(call: str, at: int) -> dict[str, str]:
    return {"EventType": "hangup", "CallID": call, "SubCallID": f"200501-{call}",
            "CallFlow": "in", "CallStatus": "ANSWER", "Duration": "5000000",
            "CallerIDNum": "+79161234567", "CalledDID": "74951234567",
            "CalledExtension": "7001*101@sipproxy.telphin.ru", "CalledExtensionID": "200501",
            "EventTime": str(at)}


@attrs.define
class Page:
    status: int
    headers: Any
    text: str

    def header(self, name: str) -> str:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else ""

    @property
    def registration(self) -> str:
        found = re.search(r"name=registration value='([^']+)'", self.text)
        assert found, self.text
        return found.group(1)


class Harness:
    def __init__(self, tmp_path: Any, fake_port: Any = None) -> None:
        self.tmp = tmp_path
        self.fake_port = fake_port
        self.fake = (fake_port.factory.resource._app_instance if fake_port
                     else FakeAltegio(partner_token=PARTNER, rate_limit=None,
                                      application_id=APP))
        self.store = SQLiteStore(str(tmp_path / "g.sqlite"), reactor)
        self.gw = Gateway(self.store, reactor, public_url="https://gw.test",
                          dispatch=outbox.Policy(backoff_base=0.05, backoff_cap=0.1))
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    async def start(self) -> None:
        if self.fake_port is None:
            site = Site(self.fake.resource())
            site.resource._app_instance = self.fake  # found again by a restarted gateway
            self.fake_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        fake_url = f"http://127.0.0.1:{self.fake_port.getHost().port}"
        token_file = self.tmp / "partner-token"
        token_file.write_text(PARTNER + "\n")
        self.gw.crms["altegio"].configure({
            "altegio-partner-token-file": str(token_file), "altegio-application-id": str(APP),
            "altegio-api-url": fake_url, "altegio-marketplace-url": fake_url})
        await self.gw.start()
        site = site_for(PublicSite(self.gw).resource(), 65536)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"

    async def stop(self, keep_fake: bool = False) -> None:
        await self.port.stopListening()
        if not keep_fake:
            await self.fake_port.stopListening()
        await self.pool.closeCachedConnections()
        await self.gw._stop()

    async def request(self, method: str, path: str, data: bytes | None = None,
                      headers: dict[str, str] | None = None) -> Page:
        resp = await self.client.request(method, self.url + path, data=data,
                                         headers=headers or {})
        body = await resp.content()
        assert resp.code < 500, (method, path, resp.code, body)
        return Page(resp.code, resp.headers, body.decode())

    async def redirect(self, *salons: int, group: int = 123, **extra: str) -> Page:
        self.fake.grant(*salons)
        query = [("salon_group_id", str(group)), ("crm_token", CRM_TOKEN),
                 *(("salon_ids[]", str(s)) for s in salons), *extra.items()]
        return await self.request("GET", "/altegio/register?" + urlencode(query))

    async def submit(self, registration: str, **changes: str) -> Page:
        fields = {"registration": registration, "step": "submit", **FORM, **changes}
        return await self.request(
            "POST", "/altegio/register", urlencode(fields).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"})

    async def status(self, registration: str) -> Page:
        return await self.request(
            "POST", "/altegio/register",
            urlencode({"registration": registration, "step": "status"}).encode(),
            {"Content-Type": "application/x-www-form-urlencoded"})

    async def webhook(self, salon: int, event: str, token: str | None = None,
                      **extra: Any) -> int:
        return await self.fake.send_lifecycle(self.url + "/altegio/webhook", salon, event,
                                              token, **extra)

    async def until(self, what: Callable[[], bool], tries: int = 400) -> None:
        for _ in range(tries):
            if what():
                return
            await deferLater(reactor, 0.02, lambda: None)
        assert what(), "never happened"

    async def idle(self) -> None:
        """Until the outbox has nothing left to send (held actions aside)."""
        await self.until(lambda: self.gw.dispatcher.depth == len(
            [a for a in self.gw.dispatcher.actions.values()
             if a.payload.get("event") == "freeze"]))

    def activated(self) -> list[int]:
        return [c["body"]["salon_id"] for c in self.fake.callbacks if c.get("status") == 201]

    def setups(self) -> list[str]:
        return [e["body"]["type"] for e in self.fake.received
                if e["body"]["command"] == "setup"]

    async def pbx(self, fields: dict[str, str]) -> None:
        tenant = self.tenant()
        resp = await self.client.post(
            f"{self.url}/events/{tenant.id}/{fields['EventType']}/{LOGIN}?key={tenant.key}",
            data=urlencode(fields).encode(),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert resp.code == 200, await resp.content()
        await resp.content()

    def tenant(self) -> Any:
        [tenant] = self.gw.tenants.values()
        return tenant


@pytest_twisted.async_yield_fixture
async def mp(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


@pytest_twisted.ensureDeferred
async def test_redirect_form_then_both_locations_activated_and_telephony_enabled(
        mp: Harness) -> None:
    page = await mp.redirect(4564, 4232)
    assert page.status == 200
    assert "Location 4564" in page.text and "Location 4232" in page.text
    assert CRM_TOKEN not in page.text, "the redirect's crm_token is never shown back"
    assert "Time left to finish" in page.text and "59 min" in page.text
    for name in ("pbx.telphin.login", "pbx.telphin.client_id", "pbx.callgear.access_token",
                 "pbx.megafon.api_key"):
        assert f"name='{name}'" in page.text, name
    assert "name='pbx.telphin.client_secret' type=password" in page.text
    csp = page.header("Content-Security-Policy")
    assert "frame-ancestors https://alteg.io https://*.alteg.io" in csp
    assert page.header("Referrer-Policy") == "same-origin"
    done = await mp.submit(page.registration)
    assert done.status == 200, done.text
    assert "Salon &lt;b&gt;Chain&lt;/b&gt;" not in done.text  # not echoed at all here
    await mp.until(lambda: sorted(mp.activated()) == [4232, 4564] and mp.setups() == ["enable"])
    assert mp.fake.installs == {4564: "active", 4232: "active"}
    bodies = {c["body"]["salon_id"]: c["body"] for c in mp.fake.callbacks}
    assert bodies[4564]["application_id"] == APP
    assert bodies[4564]["webhook_urls"] == ["https://gw.test/altegio/webhook"]
    assert bodies[4564]["api_key"] != bodies[4232]["api_key"]
    # status first, then the callback, then setup/enable for the chain's crm_token
    assert sorted(mp.fake.status_requests) == [4232, 4564]
    assert mp.fake.enabled == {CRM_TOKEN}
    tenant = mp.tenant()
    assert (tenant.enabled, tenant.pbx.kind, tenant.pbx.login, tenant.numbers, tenant.routing,
            tenant.crm.crm_token, tenant.crm.partner_token, tenant.name) == (
        True, "telphin", LOGIN, ("74951234567",), "extension", CRM_TOKEN, PARTNER,
        "Salon <b>Chain</b>")
    status = await mp.status(page.registration)
    assert status.text.count("data-state='done'") == 2
    # what is left: the PBX's URLs (its setup guide under --public-url) and Altegio's steps
    assert f"https://gw.test/events/{tenant.id}/" in status.text
    assert "Routing" in status.text and "Routes" in status.text


@pytest_twisted.ensureDeferred
async def test_field_errors_are_shown_and_nothing_is_saved(mp: Harness) -> None:
    page = await mp.redirect(4564)
    bad = await mp.submit(page.registration, **{"pbx.telphin.login": "no spaces <x>",
                                                "name": "<script>alert(1)</script>"})
    assert bad.status == 422
    assert "id='error-pbx.telphin.login'" in bad.text
    assert "<script>alert(1)</script>" not in bad.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in bad.text
    no_numbers = await mp.submit(page.registration, numbers="")
    assert "id='error-numbers'" in no_numbers.text
    no_routing = await mp.submit(page.registration, routing="")
    assert "id='error-routing'" in no_routing.text
    assert mp.gw.tenants == {} and mp.fake.callbacks == []


@pytest_twisted.ensureDeferred
async def test_a_late_submission_says_connect_again_and_activates_nothing(mp: Harness) -> None:
    page = await mp.redirect(4564)
    reg = await mp.store.token(f"altegio-mp:reg:{page.registration}")
    reg["received"] -= 3601
    await mp.store.put_token(f"altegio-mp:reg:{page.registration}", reg)
    late = await mp.submit(page.registration)
    assert late.status == 410
    assert "connect again" in late.text and "href='https://alteg.io/en/marketplace/'" in late.text
    assert mp.gw.tenants == {} and mp.fake.callbacks == []


@pytest_twisted.ensureDeferred
async def test_an_activation_refused_with_a_5xx_is_retried(mp: Harness) -> None:
    mp.fake.callback_answers.extend([503, 502])
    page = await mp.redirect(4564)
    await mp.submit(page.registration)
    await mp.until(lambda: mp.activated() == [4564])
    assert [c["status"] for c in mp.fake.callbacks] == [503, 502, 201]
    await mp.idle()
    status = await mp.status(page.registration)
    assert "data-state='done'" in status.text


@pytest_twisted.ensureDeferred
async def test_an_activation_still_refused_at_a_restart_goes_out_after_it(
        tmp_path: Any) -> None:
    first = Harness(tmp_path)
    await first.start()
    try:
        first.fake.callback_answers.extend([503] * 10_000)
        page = await first.redirect(4564)
        await first.submit(page.registration)
        await first.until(lambda: len(first.fake.callbacks) >= 2)
    finally:
        await first.stop(keep_fake=True)
    first.fake.callback_answers.clear()
    second = Harness(tmp_path, first.fake_port)
    await second.start()
    try:
        await second.until(lambda: second.activated() == [4564]
                           and second.setups() == ["enable"])
        status = await second.status(page.registration)
        assert "data-state='done'" in status.text
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_activation_is_shown_on_the_page_and_in_the_outbox(
        mp: Harness) -> None:
    mp.fake.callback_answers.append(422)
    page = await mp.redirect(4564)
    await mp.submit(page.registration)
    await mp.until(lambda: mp.fake.callbacks != [])
    await mp.idle()
    status = await mp.status(page.registration)
    assert "data-state='failed'" in status.text and "connect again" in status.text
    [failed] = await mp.store.actions("failed", None, 10)
    assert failed["payload"]["type"] == "activate" and "HTTP 422" in failed["last_error"]


@pytest_twisted.ensureDeferred
async def test_a_returning_owner_activates_the_new_location_only(mp: Harness) -> None:
    first = await mp.redirect(4564)
    await mp.submit(first.registration)
    await mp.until(lambda: mp.activated() == [4564] and mp.setups() == ["enable"])
    await mp.idle()
    again = await mp.redirect(4564, 4232)
    mp.fake.installs[4564] = "active"  # Altegio keeps the old link active
    assert "Location 4564 — already connected" in again.text
    assert "This chain is already connected" in again.text
    assert f"value='{LOGIN}'" in again.text  # the saved PBX login, prefilled
    done = await mp.submit(again.registration)
    assert done.status == 200
    await mp.until(lambda: mp.activated() == [4564, 4232])
    await mp.idle()
    assert [c["body"]["salon_id"] for c in mp.fake.callbacks] == [4564, 4232], \
        "4564 was active: status checked, not activated again"
    assert mp.fake.status_requests.count(4564) == 2
    assert len(mp.gw.tenants) == 1 and mp.setups() == ["enable"]


@pytest_twisted.ensureDeferred
async def test_a_double_submit_makes_one_tenant_and_one_activation(mp: Harness) -> None:
    page = await mp.redirect(4564)
    from twisted.internet.defer import gatherResults, ensureDeferred
    pages = await gatherResults([ensureDeferred(mp.submit(page.registration)),
                                 ensureDeferred(mp.submit(page.registration))])
    assert [p.status for p in pages] == [200, 200]
    await mp.until(lambda: mp.activated() == [4564])
    await mp.idle()
    assert len(mp.gw.tenants) == 1
    assert len(mp.fake.callbacks) == 1 and mp.setups() == ["enable"]


@pytest_twisted.ensureDeferred
async def test_uninstall_of_the_last_location_disables_tenant_and_telephony(
        mp: Harness) -> None:
    page = await mp.redirect(4564, 4232)
    await mp.submit(page.registration)
    await mp.until(lambda: len(mp.activated()) == 2 and mp.setups() == ["enable"])
    await mp.idle()
    assert await mp.webhook(4564, "uninstall") == 200
    await mp.idle()
    assert mp.tenant().enabled and mp.setups() == ["enable"], "4232 still uses the app"
    assert await mp.webhook(4232, "uninstall") == 200
    await mp.until(lambda: mp.setups() == ["enable", "disable"])
    assert not mp.tenant().enabled
    assert mp.fake.enabled == set()


@pytest_twisted.ensureDeferred
async def test_a_repeated_webhook_is_processed_once(mp: Harness) -> None:
    page = await mp.redirect(4564)
    await mp.submit(page.registration)
    await mp.until(lambda: mp.setups() == ["enable"])
    await mp.idle()
    before = len(await mp.store.actions(None, None, 100))
    assert await mp.webhook(4564, "payment", period_to="2026-12-01") == 200
    assert await mp.webhook(4564, "payment", period_to="2026-12-01") == 200
    await mp.idle()
    assert len(await mp.store.actions(None, None, 100)) == before + 1


@pytest_twisted.ensureDeferred
async def test_freeze_holds_records_and_payment_delivers_them_in_order(mp: Harness) -> None:
    page = await mp.redirect(4564)
    await mp.submit(page.registration)
    await mp.until(lambda: mp.setups() == ["enable"])
    await mp.idle()
    tenant = mp.tenant()
    await mp.gw.save_tenant(attrs.evolve(tenant, options={"grace": 0.0}), tenant)
    assert await mp.webhook(4564, "freeze") == 200
    await mp.until(lambda: mp.gw.dispatcher.in_flight == 1)  # the freeze, holding
    base = 1715677267000000
    for n, call in enumerate(("c1", "c2", "c3")):
        await mp.pbx(dial_in(call, base + n * 10_000_000))
        await mp.pbx(hangup(call, base + n * 10_000_000 + 5_000_000))
    await mp.until(lambda: len([a for a in mp.gw.dispatcher.actions.values()
                                if a.kind == "record"]) == 3)
    for _ in range(20):
        await deferLater(reactor, 0.02, lambda: None)
    assert mp.fake.histories() == [] and mp.fake.events() == [], "held while frozen"
    stored = await mp.store.actions("pending", None, 100)
    assert len([a for a in stored if a["kind"] == "record"]) == 3, "kept, not lost"
    assert await mp.webhook(4564, "payment", period_to="2026-12-01") == 200
    await mp.until(lambda: len(mp.fake.histories()) == 3)
    assert [h["call_id"] for h in mp.fake.histories()] == [
        a["payload"]["record_id"] for a in sorted(stored, key=lambda a: a["id"])
        if a["kind"] == "record"]
    assert [h["date"] for h in mp.fake.histories()] == sorted(
        h["date"] for h in mp.fake.histories())


@pytest_twisted.ensureDeferred
async def test_a_forged_webhook_is_refused_and_changes_nothing(mp: Harness) -> None:
    page = await mp.redirect(4564)
    await mp.submit(page.registration)
    await mp.until(lambda: mp.setups() == ["enable"])
    await mp.idle()
    before = len(await mp.store.actions(None, None, 100))
    assert await mp.webhook(4564, "uninstall", token="guessed") == 403
    assert await mp.webhook(4564, "uninstall", token="") == 403
    resp = await mp.request("POST", "/altegio/webhook", b'{"salon_id": 4564, '
                            b'"event": "uninstall", "application_id": 912}')
    assert resp.status == 403
    entity = await mp.request("POST", "/altegio/webhook", b'{"company_id": 4564, '
                              b'"resource": "record", "resource_id": 1, "status": "create"}')
    assert entity.status == 202, "an entity webhook is taken and dropped"
    assert len(await mp.store.actions(None, None, 100)) == before
    assert mp.tenant().enabled


@pytest_twisted.ensureDeferred
async def test_a_foreign_origin_post_is_refused(mp: Harness) -> None:
    page = await mp.redirect(4564)
    fields = urlencode({"registration": page.registration, **FORM}).encode()
    resp = await mp.request("POST", "/altegio/register", fields, {
        "Content-Type": "application/x-www-form-urlencoded", "Origin": "https://evil.test"})
    assert resp.status == 403
    forged = await mp.request("POST", "/altegio/register", urlencode(
        {"registration": "made-up", **FORM}).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"})
    assert forged.status == 403
    assert mp.gw.tenants == {}


def test_the_crm_token_is_masked_in_log_lines() -> None:
    class Request:
        uri = (f"/altegio/register?salon_group_id=1&crm_token={CRM_TOKEN}&salon_ids%5B%5D=2"
               "&user_data=abc&user_data_sign=def").encode()

    text = loggable_uri(Request())
    assert CRM_TOKEN not in text and "crm_token=***" in text and "def" not in text


def test_user_data_is_used_only_when_its_signature_checks_out() -> None:
    data = base64.b64encode(json.dumps({"name": "Ann", "company": "Kitty"}).encode()).decode()
    sign = hmac.new(PARTNER.encode(), data.encode(), hashlib.sha256).hexdigest()
    assert verify_user_data(data, sign, PARTNER) == {"name": "Ann", "company": "Kitty"}
    assert verify_user_data(data, sign, "another") is None
    assert verify_user_data(data, "0" * 64, PARTNER) is None
    assert verify_user_data(data, "", PARTNER) is None


@pytest_twisted.ensureDeferred
async def test_signed_user_data_names_the_tenant(mp: Harness) -> None:
    data = base64.b64encode(json.dumps({"company": "Kitty & Co"}).encode()).decode()
    sign = hmac.new(PARTNER.encode(), data.encode(), hashlib.sha256).hexdigest()
    page = await mp.redirect(4564, user_data=data, user_data_sign=sign)
    assert "value='Kitty &amp; Co'" in page.text
    forged = await mp.redirect(4565, group=124, user_data=data, user_data_sign="00")
    assert "Kitty" not in forged.text


@pytest.mark.parametrize("query", ["", "?salon_group_id=1&crm_token=x",
                                   "?salon_id=abc&crm_token=x", "?salon_id=1"])
@pytest_twisted.ensureDeferred
async def test_an_incomplete_redirect_is_refused(mp: Harness, query: str) -> None:
    page = await mp.request("GET", "/altegio/register" + query)
    assert page.status == 400 and "Altegio Marketplace" in page.text
