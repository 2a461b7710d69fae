"""The operator's web UI in a real headless Chromium, against a real ``twistd gateway`` and
the fake Altegio: a wrong token is refused, the admin token signs in, integrations of two
different kinds are created through the generated forms, a Telphin call posted through the
gateway shows its trail (legs, actions, every attempt), a failed action is re-driven, a
forged form (no CSRF token) is refused, and no page breaks its CSP.  Screenshots go to
var/screenshots/ui-*.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.integration.browser import browser, playwright_api, shot  # noqa: F401
from tests.integration.harness import (CRM_TOKEN, HOST, LOGIN, PARTNER_TOKEN, TENANT_ID,
                                       Gateway, Processes, TelphinCall, new_key, start_fake,
                                       wait_for)

DESKTOP = {"width": 1280, "height": 900}


class Stack:
    """The fake Altegio and a gateway whose admin site serves the UI."""

    def __init__(self, procs: Processes, tmp: Path) -> None:
        self.altegio = start_fake(procs, "altegio", "--partner-token", PARTNER_TOKEN,
                                  "--rate-limit", "0")
        gwdir = tmp / "gw"
        gwdir.mkdir()
        self.gw = Gateway(procs, gwdir, env={"GATEWAY_ALLOW_LOOPBACK_CRM": "1"})
        self.gw.extra += ["--public-url", f"http://{HOST}:{self.gw.port}"]
        self.gw.start()
        self.ui = f"http://{HOST}:{self.gw.admin_port}/ui/"


def _page(browser: Any) -> tuple[Any, list[str]]:
    page = browser.new_page()
    page.set_viewport_size(DESKTOP)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text)
            if m.type == "error" else None)
    return page, problems


def _sign_in(page: Any, ui: str, token: str) -> None:
    page.goto(ui)
    page.wait_for_selector("#login")
    page.fill("#token", token)
    page.click("#signin")
    page.wait_for_load_state()


def test_the_ui_signs_in_creates_shows_a_call_and_redrives(
        procs: Processes, tmp_path: Path, browser: Any) -> None:
    stack = Stack(procs, tmp_path)
    page, console = _page(browser)

    # A wrong token is refused; the admin token signs in.
    _sign_in(page, stack.ui, "not-the-token")
    assert "Wrong token" in page.inner_text("#login-error")
    shot(page, "ui-wrong-token")
    _sign_in(page, stack.ui, stack.gw.token)
    page.wait_for_selector("#health")
    assert "Health: OK" in page.inner_text("#health h2")

    # Telphin + Altegio, with Altegio refusing everything (422): the setup and the call's
    # pop-up fail, to be re-driven below.
    stack.altegio.faults(fail_status=422)
    key = new_key()
    page.click("#new-tenant")
    page.wait_for_selector("#tenant-form")
    page.fill("#id", str(TENANT_ID))
    page.fill("#name", "ACME <Telphin>")
    page.fill("#key", key)
    page.select_option("#pbx_kind", "telphin")
    # only the chosen kind's fields are shown (the script runs under the CSP nonce)
    assert page.is_visible("[id='pbx.telphin.login']")
    assert not page.is_visible("[id='pbx.callgear.api_login']")
    page.fill("[id='pbx.telphin.login']", LOGIN)
    page.select_option("#crm_kind", "altegio")
    page.fill("[id='crm.altegio.api_url']", stack.altegio.url)
    page.fill("[id='crm.altegio.partner_token']", PARTNER_TOKEN)
    page.fill("[id='crm.altegio.crm_token']", "")  # a field error first
    page.fill("#numbers", "74951234567")
    page.click("#save")
    page.wait_for_selector("#errors")
    assert page.is_visible("[id='error-crm.altegio.crm_token']")
    assert page.input_value("#name") == "ACME <Telphin>"
    shot(page, "ui-field-error")
    page.fill("[id='crm.altegio.partner_token']", PARTNER_TOKEN)  # secrets are not kept
    page.fill("[id='crm.altegio.crm_token']", CRM_TOKEN)
    page.fill("#key", key)
    page.click("#save")
    page.wait_for_selector("#pbx-guide")
    assert page.inner_text("h1") == f"ACME <Telphin> ({TENANT_ID})"
    guide = page.inner_text("#pbx-guide")
    assert f"http://{HOST}:{stack.gw.port}/events/{TENANT_ID}/" in guide
    page.click("#pbx-guide button.copy >> nth=0")
    page.wait_for_selector("#pbx-guide button.copy:text('Copied')")
    content = page.content()
    assert CRM_TOKEN not in content, content[max(0, content.find(CRM_TOKEN) - 300):content.find(CRM_TOKEN) + 100]

    # A second integration, of two other kinds: MegaFon + Planfix.
    page.click("text=New integration")
    page.wait_for_selector("#tenant-form")
    page.fill("#id", "901")
    page.fill("#name", "Second")
    page.select_option("#pbx_kind", "megafon")
    page.fill("[id='pbx.megafon.login']", "acme")
    page.fill("[id='pbx.megafon.crm_token']", "megafon-secret-0123456789")
    page.select_option("#crm_kind", "planfix")
    page.fill("[id='crm.planfix.planfix_url']", "https://acme.planfix.ru")
    page.fill("[id='crm.planfix.planfix_token']", "planfix-secret-0123")
    page.fill("[id='crm.planfix.token']", "gateway-token-0123456789")
    page.uncheck("#enabled")  # off: nothing to send to a Planfix that is not there
    page.click("#save")
    page.wait_for_selector("#pbx-guide")
    assert "megafon-secret" not in page.content()
    page.click("nav >> text=Gateway")
    page.wait_for_selector("#tenants")
    rows = page.locator("#tenants tbody tr").all_inner_texts()
    assert [r.split("\t")[:5] for r in rows] == [
        [str(TENANT_ID), "ACME <Telphin>", "telphin", "altegio", "on"],
        ["901", "Second", "megafon", "planfix", "off"]], rows
    shot(page, "ui-home")

    # A call through the gateway: its trail, with the failed attempts.
    call = TelphinCall()
    assert stack.gw.event(*call.dial_in(), key=key) == 200
    wait_for(lambda: stack.gw.admin("GET", "/api/v1/actions?state=failed")[1].__len__() >= 2,
             20, "the setup and the pop-up failed")
    page.goto(f"{stack.ui}tenants/{TENANT_ID}")
    page.wait_for_selector(f"section.call[data-call='{call.call_id}']")
    trail = page.locator(f"section.call[data-call='{call.call_id}']")
    assert call.sub_call_id in trail.inner_text()
    assert "popup" in trail.inner_text() and "422" in trail.inner_text()
    assert trail.locator("tr.attempts li").count() >= 1
    shot(page, "ui-call-trail")

    # Re-drive: Altegio accepts again; the setup first, then the pop-up.
    stack.altegio.clear_faults()
    setup_id = page.locator("#stuck tr[data-action] >> nth=0").get_attribute("data-action")
    page.click(f"#retry-{setup_id}")
    page.wait_for_selector("#redriven")
    popup_row = trail.locator("tr[data-state='failed']")
    popup_id = popup_row.get_attribute("id").split("-")[1]
    page.click(f"#retry-{popup_id}")
    page.wait_for_selector("#redriven")

    def delivered() -> bool:
        page.reload()
        return page.locator(f"#action-{popup_id}[data-state='done']").count() == 1

    wait_for(delivered, 20, "the re-driven pop-up delivered")
    assert page.locator("#stuck-none").count() == 1
    assert [r["command"] for r in stack.altegio.received()][:2] == ["setup", "event"]
    shot(page, "ui-redriven")

    # A forged form (its CSRF token removed) is refused, and changes nothing.
    page.goto(f"{stack.ui}tenants/{TENANT_ID}/edit")
    page.fill("#name", "Mallory")
    page.evaluate("document.querySelector('#tenant-form input[name=csrf]').remove()")
    page.click("#save")
    page.wait_for_selector("#refused")
    assert "CSRF" in page.inner_text("#refused")
    shot(page, "ui-forged-refused")
    assert stack.gw.admin("GET", f"/api/v1/tenants/{TENANT_ID}")[1]["name"] == "ACME <Telphin>"

    csp = [m for m in console if "Content Security Policy" in m]
    assert csp == [], csp
