"""The headless browser of the browser tests: Debian's ``chromium`` driven by Playwright
for Python, and the ``browser`` fixture (a fresh profile per test).

What is missing is installed when possible (pip for Playwright, apt-get for chromium when
running as root); otherwise the tests skip, loudly, except with ``CI=true``, where a missing
browser fails.  A test module uses the fixtures by importing them::

    from tests.integration.browser import browser, playwright_api  # noqa: F401
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.integration.harness import REPO

CHROMIUM = "/usr/bin/chromium"
SHOTS = REPO / "var" / "screenshots"
PHONE = {"width": 390, "height": 844}
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _missing(reason: str) -> None:
    message = f"BROWSER TESTS NOT RUN: {reason}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI=true: a missing browser is a failure)")
    print("\n" + "!" * 78 + f"\n{message}\n" + "!" * 78, file=sys.stderr)
    pytest.skip(message)


def _ensure_browser() -> Any:
    """The Playwright sync API, with chromium present; installs what it can."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright>=1.40"],
                             capture_output=True, text=True, timeout=600)
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            _missing(f"Playwright is not installed and pip could not: {pip.stderr[-500:]}")
    if not os.path.exists(CHROMIUM):
        if os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env,
                           timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"],
                           capture_output=True, env=env, timeout=900)
        if not os.path.exists(CHROMIUM):
            _missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def playwright_api() -> Any:
    return _ensure_browser()


@pytest.fixture
def browser(playwright_api: Any, tmp_path: Path) -> Iterator[Any]:
    with playwright_api() as p:
        # A fresh profile (--user-data-dir) per test: Playwright takes it as the
        # persistent context's directory.
        b = p.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True,
            args=ARGS, viewport=PHONE)
        try:
            yield b
        finally:
            b.close()


def shot(page: Any, name: str) -> None:
    """A full-page screenshot to var/screenshots/{name}.png."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
