"""The operator's web UI (``/ui/`` on the admin site), in process: sign-in and sessions,
CSRF on every form, the headers of every answer, escaping, secrets never rendered, forms
generated from the modules' schemas and checked like the admin API, calls with their
attempts and why an action waits, and re-drives.

A real gateway (SQLite store, engine, dispatcher) on loopback with the fake CRM of
tests/test_admin.py; the browser's part is a cookie jar and the forms' fields.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlencode

import pytest_twisted
import treq
from http.cookiejar import CookieJar, DefaultCookiePolicy
from twisted.internet import reactor
from twisted.web.client import Agent

from gateway import outbox
from tests.test_admin import (CRM_TOKEN, KEY, PARTNER, PBX_SECRET, SECRETS, TOKEN, Harness,
                              Reply, eventually, tenant_body)
from tests.test_public import DIAL_IN

import pytest


class Browser:
    """A browser's view of the UI: a session cookie and the CSRF token of the last page."""

    def __init__(self, harness: Harness) -> None:
        self.h = harness
        # Its own client: the harness's keeps cookies for every caller; this one none (the
        # session cookie is sent by hand, so a test sees exactly what a browser would).
        self.client = treq.client.HTTPClient(
            Agent(reactor, pool=harness.pool),
            cookiejar=CookieJar(DefaultCookiePolicy(allowed_domains=[])))
        self.cookie = ""
        self.csrf = ""

    async def request(self, method: str, path: str, form: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> Reply:
        sent = {"Content-Type": "application/x-www-form-urlencoded", **(headers or {})}
        if self.cookie:
            sent["Cookie"] = self.cookie
        data = urlencode(form).encode() if form is not None else None
        resp = await self.client.request(method, self.h._url(1, path), data=data,
                                           headers=sent, allow_redirects=False)
        reply = Reply(resp.code, resp.headers, await resp.content())
        assert reply.status < 500, (method, path, reply.body)
        for value in reply.headers.getRawHeaders("set-cookie") or []:
            name_value = value.split(";", 1)[0]
            if name_value.startswith("gateway_ui="):
                self.cookie = name_value if name_value != "gateway_ui=" else ""
        found = re.search(rb"name=csrf value='([^']+)'", reply.body)
        if found:
            self.csrf = found.group(1).decode()
        return reply

    async def get(self, path: str) -> Reply:
        return await self.request("GET", path)

    async def post(self, path: str, form: dict[str, str], csrf: bool = True,
                   **kwargs: Any) -> Reply:
        return await self.request("POST", path, {**form, **({"csrf": self.csrf} if csrf
                                                             else {})}, **kwargs)

    async def sign_in(self, token: str = TOKEN) -> Reply:
        return await self.request("POST", "/ui/login", {"token": token})


def telphin_form(tenant_id: int = 807, **extra: str) -> dict[str, str]:
    """The new-integration form as an operator fills it: Telphin + Altegio."""
    form = {
        "id": str(tenant_id), "name": "ACME", "enabled": "on", "key": KEY,
        "pbx_kind": "telphin", "pbx.telphin.login": "TLP55522",
        "pbx.telphin.client_id": "app1", "pbx.telphin.client_secret": PBX_SECRET,
        "pbx.telphin.variable": "number",
        "crm_kind": "altegio", "crm.altegio.api_url": "http://altegio.test",
        "crm.altegio.partner_token": PARTNER, "crm.altegio.crm_token": CRM_TOKEN,
        "numbers": "74951234567", "routing": "extension",
        "options.timezone": "Europe/Moscow", "options.grace": "3.0",
    }
    form.update(extra)
    return form


@pytest_twisted.async_yield_fixture
async def gateway(tmp_path: Any) -> Any:
    harness = Harness(tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


@pytest_twisted.async_yield_fixture
async def signed_in(gateway: Harness) -> Any:
    browser = Browser(gateway)
    assert (await browser.sign_in()).status == 303
    await browser.get("/ui/")
    yield browser


def assert_strict_headers(reply: Reply) -> None:
    csp = reply.header("Content-Security-Policy") or ""
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, csp
    assert "unsafe-inline" not in csp
    assert reply.header("X-Frame-Options") == "DENY"
    assert reply.header("Referrer-Policy") == "same-origin"
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp)
    if reply.body:
        assert nonce, csp
        scripts = re.findall(rb"<script([^>]*)>", reply.body)
        assert scripts and all(f"nonce='{nonce.group(1)}'".encode() in s for s in scripts)


# Sign-in and sessions

@pytest_twisted.ensureDeferred
async def test_pages_want_a_session_and_a_wrong_token_gets_none(gateway: Harness) -> None:
    browser = Browser(gateway)
    for path in ("/ui/", "/ui/tenants/new", "/ui/credentials", "/ui/tenants/807"):
        reply = await browser.get(path)
        assert reply.status == 303 and reply.header("Location") == "/ui/login", path
        assert_strict_headers(reply)
    for token in ("wrong", TOKEN + "x", "", TOKEN[:-1]):
        reply = await browser.sign_in(token)
        assert reply.status == 403 and b"Wrong token" in reply.body
        assert browser.cookie == ""
        assert_strict_headers(reply)
    assert (await browser.get("/ui/")).status == 303


@pytest_twisted.ensureDeferred
async def test_signing_in_sets_a_strict_session_cookie(gateway: Harness) -> None:
    browser = Browser(gateway)
    reply = await browser.sign_in()
    assert reply.status == 303 and reply.header("Location") == "/ui/"
    [cookie] = reply.headers.getRawHeaders("set-cookie")
    parts = [p.strip().lower() for p in cookie.split(";")]
    assert "httponly" in parts and "samesite=strict" in parts and "path=/ui/" in parts
    assert "secure" not in parts  # plain HTTP here; Secure over TLS (request.isSecure())
    assert TOKEN not in cookie
    home = await browser.get("/ui/")
    assert home.status == 200 and b"Integrations" in home.body
    assert_strict_headers(home)


@pytest_twisted.ensureDeferred
async def test_an_empty_admin_token_locks_the_ui(tmp_path: Any) -> None:
    harness = Harness(tmp_path)
    harness.gw.admin_token = ""
    await harness.start()
    try:
        reply = await Browser(harness).sign_in("")
        assert reply.status == 403 and b"locked" in reply.body
    finally:
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_a_session_expires_when_idle_and_sign_out_ends_it(
        gateway: Harness, signed_in: Browser) -> None:
    assert (await signed_in.get("/ui/")).status == 200
    old_cookie = signed_in.cookie
    reply = await signed_in.post("/ui/logout", {})
    assert reply.status == 303 and reply.header("Location") == "/ui/login"
    signed_in.cookie = old_cookie  # the old id, replayed, is no session
    assert (await signed_in.get("/ui/")).status == 303

    browser = Browser(gateway)
    await browser.sign_in()
    assert (await browser.get("/ui/")).status == 200
    ui = next(iter(_ui(gateway).sessions.values()))
    ui.seen -= 3601  # an hour without a request
    assert (await browser.get("/ui/")).status == 303


def _ui(gateway: Harness) -> Any:
    site = gateway.ports[1].factory.resource
    return site.ui


# CSRF and origin

@pytest_twisted.ensureDeferred
async def test_every_form_wants_the_sessions_csrf_token(gateway: Harness,
                                                        signed_in: Browser) -> None:
    await gateway.create()
    forms = [("/ui/tenants/new", telphin_form(808, key=KEY[::-1])),
             ("/ui/tenants/807/edit", {**telphin_form(), "name": "Mallory"}),
             ("/ui/actions/1/retry", {}),
             ("/ui/credentials", {"kind": "telphin", "name": "x"}),
             ("/ui/logout", {})]
    for path, form in forms:
        for csrf in (None, "", "forged", signed_in.csrf + "x"):
            sent = dict(form) if csrf is None else {**form, "csrf": csrf}
            reply = await signed_in.request("POST", path, sent)
            assert reply.status == 403, (path, csrf, reply.body)
            assert b"CSRF" in reply.body
            assert_strict_headers(reply)
        # The right token from another origin is refused too.
        reply = await signed_in.post(path, form, headers={"Origin": "http://evil.test"})
        assert reply.status == 403, path
    # Without a session, a form with a token is refused.
    stranger = Browser(gateway)
    stranger.csrf = signed_in.csrf
    assert (await stranger.post("/ui/tenants/new", telphin_form(809))).status == 403
    # Nothing happened.
    assert set(gateway.gw.tenants) == {807}
    assert gateway.gw.tenants[807].name == "ACME"
    assert gateway.gw.credentials == {}
    assert (await signed_in.get("/ui/")).status == 200  # still signed in


# Creating and editing integrations

@pytest_twisted.ensureDeferred
async def test_create_through_the_form_then_secrets_are_only_set(
        gateway: Harness, signed_in: Browser) -> None:
    form = await signed_in.get("/ui/tenants/new")
    assert form.status == 200
    # Every kind's schema is in the form; the options say what they do.
    for name in ("pbx.telphin.login", "pbx.callgear.api_login", "pbx.megafon.api",
                 "crm.megaplan.domain", "crm.planfix.planfix_url", "crm.altegio.crm_token",
                 "options.interactive_deadline"):
        assert f"name='{name}'".encode() in form.body, name
    assert b"Seconds a call waits for late queue/IVR hang-ups" in form.body
    reply = await signed_in.post("/ui/tenants/new", telphin_form())
    assert reply.status == 303, reply.body
    assert reply.header("Location") == "/ui/tenants/807"
    tenant = gateway.gw.tenants[807]
    assert (tenant.pbx.client_secret, tenant.crm.crm_token) == (PBX_SECRET, CRM_TOKEN)
    # (an option left empty is its default)
    assert tenant.options == {"timezone": "Europe/Moscow", "internal_calls": False,
                              "grace": 3.0}
    for path in ("/ui/", "/ui/tenants/807", "/ui/tenants/807/edit", "/ui/credentials"):
        page = await signed_in.get(path)
        assert page.status == 200, path
        for secret in SECRETS:
            if path == "/ui/tenants/807" and secret == KEY:
                continue  # the setup guide's URLs carry the key: they are what the PBX gets
            assert secret.encode() not in page.body, (path, secret)
    edit = await signed_in.get("/ui/tenants/807/edit")
    assert b"data-secret='crm.altegio.crm_token'>set" in edit.body
    assert b"data-secret='key'>set" in edit.body


@pytest_twisted.ensureDeferred
async def test_an_empty_secret_keeps_the_stored_one_and_a_new_one_replaces_it(
        gateway: Harness, signed_in: Browser) -> None:
    await gateway.create()
    await signed_in.get("/ui/tenants/807/edit")
    form = {**telphin_form(), "name": "ACME 2", "key": "", "pbx.telphin.client_secret": "",
            "crm.altegio.partner_token": "", "crm.altegio.crm_token": ""}
    reply = await signed_in.post("/ui/tenants/807/edit", form)
    assert reply.status == 303, reply.body
    tenant = gateway.gw.tenants[807]
    assert tenant.name == "ACME 2" and tenant.key == KEY
    assert (tenant.pbx.client_secret, tenant.crm.partner_token, tenant.crm.crm_token) == (
        PBX_SECRET, PARTNER, CRM_TOKEN)
    await signed_in.get("/ui/tenants/807/edit")
    form["pbx.telphin.client_secret"] = "a-new-secret"
    assert (await signed_in.post("/ui/tenants/807/edit", form)).status == 303
    assert gateway.gw.tenants[807].pbx.client_secret == "a-new-secret"


@pytest.mark.parametrize("change, error_id", [
    ({"pbx.telphin.login": "not a login!"}, "pbx.telphin.login"),
    ({"options.timezone": "Mars/Olympus"}, "options.timezone"),
    ({"options.grace": "soon"}, "options.grace"),
    ({"id": "acme"}, "id"),
    ({"pbx_kind": ""}, "pbx_kind"),
    ({"name": ""}, "name"),
    ({"employees": "no equals sign"}, "employees"),
])
@pytest_twisted.ensureDeferred
async def test_a_bad_field_is_shown_next_to_it_and_nothing_is_saved(
        gateway: Harness, signed_in: Browser, change: dict, error_id: str) -> None:
    await signed_in.get("/ui/tenants/new")
    reply = await signed_in.post("/ui/tenants/new", telphin_form(**change))
    assert reply.status == 422, reply.body
    assert f"id='error-{error_id}'".encode() in reply.body, reply.body
    assert gateway.gw.tenants == {}
    # What was typed stays, except secrets.
    assert b"value='ACME'" in reply.body or error_id == "name"
    for secret in SECRETS:  # typed secrets (the URL key too) are never sent back
        assert secret.encode() not in reply.body, secret


@pytest_twisted.ensureDeferred
async def test_a_duplicate_id_is_refused(gateway: Harness, signed_in: Browser) -> None:
    await gateway.create()
    reply = await signed_in.post("/ui/tenants/new", telphin_form(name="Other"))
    assert reply.status == 422 and b"id='error-id'" in reply.body
    assert gateway.gw.tenants[807].name == "ACME"


@pytest_twisted.ensureDeferred
async def test_credentials_chosen_from_the_list_or_added_inline(
        gateway: Harness, signed_in: Browser) -> None:
    reply = await signed_in.post("/ui/credentials", {
        "kind": "telphin", "name": "Main app", "telphin.client_id": "app9",
        "telphin.client_secret": "cred-secret-123", "telphin.api_url": ""})
    assert reply.status == 303, reply.body
    [(cid, stored)] = gateway.gw.credentials.items()
    page = await signed_in.get("/ui/credentials")
    assert b"Main app" in page.body and b"cred-secret-123" not in page.body
    assert b"client_secret: set" in page.body
    form = await signed_in.get("/ui/tenants/new")
    assert f"<option value='{cid}'>#{cid} Main app</option>".encode() in form.body
    reply = await signed_in.post("/ui/tenants/new", telphin_form(**{
        "pbx.telphin.credential": str(cid), "pbx.telphin.client_id": "",
        "pbx.telphin.client_secret": ""}))
    assert reply.status == 303, reply.body
    assert gateway.gw.tenants[807].pbx.credential == cid
    assert gateway.gw.tenants[807].pbx.client_secret == "cred-secret-123"
    # Inline: the account's fields saved as new named credentials with the integration.
    reply = await signed_in.post("/ui/tenants/new", telphin_form(808, key=KEY[::-1], **{
        "pbx.telphin.login": "TLP1", "pbx.telphin.new_credential": "Second app"}))
    assert reply.status == 303, reply.body
    second = gateway.gw.tenants[808].pbx.credential
    assert gateway.gw.credentials[second]["name"] == "Second app"
    assert gateway.gw.credentials[second]["fields"]["client_secret"] == PBX_SECRET


# Escaping

@pytest_twisted.ensureDeferred
async def test_everything_an_operator_or_a_pbx_wrote_is_escaped(
        gateway: Harness, signed_in: Browser) -> None:
    evil = "<script>alert(1)</script>'\"&"
    await gateway.create(tenant_body(name=evil, employees={"101": evil}))
    hook = await gateway.hook({**DIAL_IN, "CallerIDNum": evil, "CallerIDName": evil})
    assert hook.status in (200, 400)
    for path in ("/ui/", "/ui/tenants/807", "/ui/tenants/807/edit"):
        page = await signed_in.get(path)
        assert b"<script>alert" not in page.body, path
        assert b"&lt;script&gt;alert(1)&lt;/script&gt;&#x27;&quot;&amp;" in page.body, path
    # A page of a path that is not there does not echo it unescaped either.
    page = await signed_in.get("/ui/tenants/%3Cscript%3E")
    assert page.status == 404 and b"<script>" not in page.body.split(b"<script nonce")[0]


# Health, calls, waiting, re-drive

@pytest_twisted.ensureDeferred
async def test_the_front_page_shows_the_healthz_figures_and_the_integrations(
        gateway: Harness, signed_in: Browser) -> None:
    await gateway.create()
    await gateway.delivered(1)
    page = await signed_in.get("/ui/")
    assert b"Health: OK" in page.body
    assert b"<th>Actions pending</th><td>0</td>" in page.body
    assert re.search(rb"<tr data-tenant='807'><td>807</td>.*?<td>telphin</td>"
                     rb"<td>altegio</td><td>on</td>", page.body)


@pytest_twisted.ensureDeferred
async def test_a_calls_trail_shows_legs_actions_and_attempts(
        gateway: Harness, signed_in: Browser) -> None:
    await gateway.create()
    assert (await gateway.hook(DIAL_IN)).status == 200
    await gateway.delivered(2)

    async def settled() -> Any:
        page = await signed_in.get("/ui/tenants/807")
        return page if b"event/incoming" in page.body else None

    page = await eventually(settled)
    assert DIAL_IN["CallID"].encode() in page.body
    assert b"<td>popup</td>" in page.body and b"data-state='done'" in page.body
    assert b"+79161234567" in page.body
    # what to paste, with copy buttons
    assert b"id=pbx-guide" in page.body and b"class=copy" in page.body


@pytest_twisted.ensureDeferred
async def test_a_waiting_action_says_what_it_waits_for(gateway: Harness,
                                                        signed_in: Browser) -> None:
    gateway.crm.status = 503  # the setup is retried: the call's pop-up waits behind it
    await gateway.create()
    assert (await gateway.hook(DIAL_IN)).status == 200

    async def waiting() -> Any:
        page = await signed_in.get("/ui/tenants/807")
        return page if b"waits for the integration&#x27;s pending setup (action #" in page.body else None

    page = await eventually(waiting)
    # The setup itself, with its next try.
    assert re.search(rb"<table id=queued>.*?<td>setup</td>.*?next try in \d+ s after \d+ "
                     rb"attempts", page.body, re.S), page.body
    gateway.crm.status = 202


def test_the_session_cookie_is_secure_over_tls() -> None:
    from twisted.internet.task import Clock
    from twisted.web.server import Request
    from twisted.web.test.requesthelper import DummyChannel

    from gateway.web.ui import UI

    class Api:
        gateway = type("Gw", (), {"reactor": Clock(), "admin_token": TOKEN})()

    ui = UI(Api())
    for secure in (True, False):
        request = Request(DummyChannel())
        request.isSecure = lambda: secure  # type: ignore[method-assign]
        ui._start_session(request)
        [cookie] = request.cookies
        assert (b"; Secure" in cookie) is secure
        assert b"; HttpOnly" in cookie and b"SameSite=strict" in cookie
    ui.gw.reactor.advance(3601)
    request = Request(DummyChannel())
    request.received_cookies = {b"gateway_ui": next(iter(ui.sessions)).encode()}
    assert ui._session(request) is None and len(ui.sessions) == 1


@pytest_twisted.ensureDeferred
async def test_a_dead_action_is_redriven_from_its_page(tmp_path: Any) -> None:
    harness = Harness(tmp_path, dispatch=outbox.Policy(max_age=0.0))
    await harness.start()
    try:
        browser = Browser(harness)
        await browser.sign_in()
        harness.crm.status = 503
        await harness.create()

        async def dead() -> Any:
            page = await browser.get("/ui/tenants/807")
            return page if b"class=retry" in page.body else None

        page = await eventually(dead)
        [action_id] = re.findall(rb"id='retry-(\d+)'", page.body)
        harness.crm.status = 202
        reply = await browser.post(f"/ui/actions/{action_id.decode()}/retry", {})
        assert reply.status == 303
        assert reply.header("Location").startswith("/ui/tenants/807?redriven=")
        await harness.delivered(2)
        assert harness.crm.commands() == [("setup", "enable"), ("setup", "enable")]
        again = await browser.post(f"/ui/actions/{action_id.decode()}/retry", {})
        assert again.status == 409 and b"only dead or failed" in again.body
    finally:
        await harness.stop()


@pytest_twisted.ensureDeferred
async def test_the_json_api_is_unchanged_beside_the_ui(gateway: Harness) -> None:
    reply = await gateway.admin("GET", "/api/v1/tenants")
    assert reply.status == 200 and reply.json() == []
    ui = await gateway.admin("GET", "/ui/", token=None)  # (treq follows the redirect)
    assert ui.status == 200 and b"Admin token" in ui.body
    assert (await gateway.admin("GET", "/nothing")).json()["field"] == "path"
