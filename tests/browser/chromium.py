"""Headless Chromium (Debian's) driven by Playwright, signed in through Airflow's own login form."""

from __future__ import annotations

import re

import pytest

from pipelines.launch.airflow import ADMIN_USER, LocalAirflow

playwright = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module", name="browser")
def chromium_browser():
    """Headless Chromium for the module's tests (import it into a test module to use ``browser``)."""
    with playwright.sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


def logged_in_page(browser, airflow: LocalAirflow, user: str = ADMIN_USER, password: str | None = None):
    """A new browser session signed in as ``user`` (the admin by default) through Airflow's own
    login form, on the home page."""
    # The UI's links and cookies are for [api] base_url, which names localhost.
    base = f"http://localhost:{airflow.port}"
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(f"{base}/")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password or airflow.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(rf"^{re.escape(base)}/?$"))
    return page
