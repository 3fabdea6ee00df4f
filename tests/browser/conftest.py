"""Fixtures of the browser tests: the real app served by uvicorn, and headless Chromium."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db import connections

from tests.processes import ROOT, start_app_server, stop_process, wait_for_http

SCREENSHOTS = ROOT / "var" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture
def app_url(transactional_db: None, tmp_path: Path) -> Iterator[str]:
    """`uvicorn config.asgi:application` on a free port, on this test's database.

    The same ASGI app production runs: the edge in front, Django behind it, static files
    served by the edge, so the browser gets the vendored htmx and Chart.js from the app.
    """
    server, url = start_app_server(log=tmp_path / "uvicorn.log", env={"ANALYSIS_INTERVAL_S": "5"})
    try:
        wait_for_http(f"{url}/accounts/login/")
        yield url
    finally:
        stop_process(server)


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A Chromium page (1280x900) from Playwright's sync API."""
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls in
    # between browser steps are plain synchronous code, which Django would otherwise refuse.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        page.set_default_timeout(15_000)
        try:
            yield page
        finally:
            # While Playwright's loop exists, Django hands this thread a separate database
            # connection (asgiref's Local follows the event loop); close it here, or it
            # would keep the test database busy when pytest-django drops it.
            connections.close_all()
            context.close()
            browser.close()
