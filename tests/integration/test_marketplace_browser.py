"""The Altegio Marketplace registration page in a real headless Chromium, against a real
``twistd gateway`` and the fake Altegio: it renders on a phone-sized screen, shows field
errors, submits and activates, says "connect again" to a late submission, and works inside
an iframe on another origin (and only on the allowed one).  Screenshots go to
var/screenshots/.

The browser is Debian's ``chromium`` driven by Playwright for Python.  What is missing is
installed when possible (pip for Playwright, apt-get for chromium when running as root);
otherwise the tests skip, loudly, except with ``CI=true``, where a missing browser fails.
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from tests.integration.browser import browser, playwright_api, shot  # noqa: F401
from tests.integration.harness import HOST, Gateway, Processes, start_fake, wait_for

PARTNER = "partner-token-for-the-browser"
APP = 912
CRM_TOKEN = "7cf262d6-1b2a-4c3d-9e8f-0a1b2c3d4ec2"


class _Parent(http.server.BaseHTTPRequestHandler):
    """A page on another origin that frames the registration page (Altegio's iframe)."""

    frame_url = ""

    def do_GET(self) -> None:  # noqa: N802
        body = (f"<!doctype html><title>Altegio</title><h1>Marketplace</h1>"
                f"<iframe id=app src='{self.frame_url}' width=380 height=800></iframe>").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _parent(url: str) -> tuple[http.server.ThreadingHTTPServer, int]:
    # Threads, and a read timeout: Chromium's speculative connections, left open without
    # a request, would hold a one-connection server (and its shutdown) for a minute.
    handler = type("Parent", (_Parent,), {"frame_url": url, "timeout": 5})
    server = http.server.ThreadingHTTPServer((HOST, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


class Stack:
    """The fake Altegio and a gateway configured for the Marketplace."""

    def __init__(self, procs: Processes, tmp: Path, window: float = 3600,
                 ancestors: str = "https://alteg.io") -> None:
        self.fake = start_fake(procs, "altegio", "--partner-token", PARTNER,
                               "--rate-limit", "0", name=f"fake-altegio-{tmp.name}")
        fake_url = f"http://{HOST}:{self.fake.port}"
        token = tmp / "partner-token"
        token.write_text(PARTNER + "\n")
        gwdir = tmp / "gw"
        gwdir.mkdir()
        self.gw = Gateway(procs, gwdir, extra=[
            "--altegio-partner-token-file", str(token), "--altegio-application-id", str(APP),
            "--altegio-api-url", fake_url, "--altegio-marketplace-url", fake_url,
            "--altegio-frame-ancestors", ancestors,
            "--altegio-activation-window", str(window)])
        self.gw.extra += ["--public-url", f"http://{HOST}:{self.gw.port}"]
        self.gw.start()
        self.base = f"http://{HOST}:{self.gw.port}"

    def redirect_url(self, *salons: int) -> str:
        self.fake.setup(grant=list(salons))
        query = [("salon_group_id", "123"), ("crm_token", CRM_TOKEN),
                 *(("salon_ids[]", str(s)) for s in salons)]
        return f"{self.base}/altegio/register?{urlencode(query)}"


def _shot(page: Any, name: str) -> None:
    shot(page, f"marketplace-{name}")


def _fill(scope: Any, login: str = "TLP55522", numbers: str = "74951234567") -> None:
    """The form, on a page or inside a frame (locators work on both)."""
    scope.locator("#pbx_kind").select_option("telphin")
    scope.locator("[id='pbx.telphin.login']").fill(login)
    scope.locator("#numbers").fill(numbers)
    scope.locator("#routing").select_option("sip")


def test_the_page_renders_shows_errors_submits_and_activates(
        procs: Processes, tmp_path: Path, browser: Any) -> None:
    stack = Stack(procs, tmp_path)
    page = browser.new_page()
    page.goto(stack.redirect_url(4564, 4232))
    assert page.locator("#locations li").all_inner_texts() == ["Location 4564",
                                                             "Location 4232"]
    assert "min" in page.inner_text("#left")
    assert CRM_TOKEN not in page.content()
    # phone-sized: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # only the chosen PBX's fields are shown (the script honours the CSP nonce)
    page.select_option("#pbx_kind", "telphin")
    assert page.is_visible("[id='pbx.telphin.login']")
    assert not page.is_visible("[id='pbx.callgear.api_login']")
    _shot(page, "form")
    _fill(page, login="not a login!", numbers="")
    page.click("#save")
    page.wait_for_selector("#errors")
    assert "at least one virtual number" in page.inner_text("[id='error-numbers']")
    page.fill("#numbers", "74951234567")
    page.click("#save")
    page.wait_for_selector("[id='error-pbx.telphin.login']")
    assert page.input_value("[id='pbx.telphin.login']") == "not a login!"
    _shot(page, "field-errors")
    page.fill("[id='pbx.telphin.login']", "TLP55522")
    page.click("#save")
    page.wait_for_selector("#activations")
    assert page.inner_text("h1") == "Saved: what is left to do"
    assert CRM_TOKEN not in page.content()
    guide = page.inner_text("#pbx-guide")
    assert f"{stack.base}/events/" in guide
    assert "Routing" in page.inner_text("#altegio-steps")

    def activated() -> bool:
        state = stack.fake.state()
        return state["installs"] == {"4564": "active", "4232": "active"}

    wait_for(activated, 20, "both locations active in the fake Altegio")
    for _ in range(50):
        page.click("text=Refresh")
        page.wait_for_load_state()
        if page.locator("#activations li[data-state='done']").count() == 2:
            break
    assert page.locator("#activations li[data-state='done']").count() == 2
    _shot(page, "done")


def test_a_late_submission_says_connect_again(procs: Processes, tmp_path: Path,
                                             browser: Any) -> None:
    stack = Stack(procs, tmp_path, window=1)
    page = browser.new_page()
    page.goto(stack.redirect_url(4564))
    _fill(page)
    page.wait_for_timeout(1500)  # past the (one-second) window
    assert page.inner_text("#left") == "0 min 0 s"
    page.click("#save")
    page.wait_for_selector("#late")
    assert "connect again" in page.inner_text("#late")
    assert page.get_attribute("#late a", "href") == "https://alteg.io/en/marketplace/"
    _shot(page, "late")
    assert stack.fake.state()["callbacks"] == []


def test_the_page_works_framed_by_the_allowed_origin_only(procs: Processes, tmp_path: Path,
                                                          browser: Any) -> None:
    # The parent is on another origin (localhost, its own port): the frame-ancestors the
    # gateway is given; a second parent, not listed, cannot frame the page.
    allowed, allowed_port = _parent("about:blank")
    other, other_port = _parent("about:blank")
    try:
        stack = Stack(procs, tmp_path, ancestors=f"http://localhost:{allowed_port}")
        url = stack.redirect_url(4564)
        allowed.RequestHandlerClass.frame_url = url  # type: ignore[attr-defined]
        other.RequestHandlerClass.frame_url = url  # type: ignore[attr-defined]
        page = browser.new_page()
        page.goto(f"http://localhost:{allowed_port}/")
        frame = page.frame_locator("#app")
        frame.locator("#locations").wait_for()
        assert frame.locator("#locations li").all_inner_texts() == ["Location 4564"]
        _fill(frame)
        frame.locator("#save").click()
        frame.locator("#activations").wait_for()
        _shot(page, "iframe-done")
        wait_for(lambda: stack.fake.state()["installs"] == {"4564": "active"}, 20,
                 "the location activated from the framed page")

        blocked = browser.new_page()
        blocked.goto(f"http://localhost:{other_port}/")
        blocked.wait_for_timeout(500)
        inner = [f for f in blocked.frames if f != blocked.main_frame]
        assert inner and not inner[0].query_selector("#locations"), \
            "another origin must not frame the page"
        # refused by the browser (CSP frame-ancestors), not merely slow to load
        assert inner[0].url.startswith("chrome-error://"), inner[0].url
        _shot(blocked, "iframe-refused")
    finally:
        allowed.shutdown()
        other.shutdown()
