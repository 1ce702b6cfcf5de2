"""What the browser tests share: headless Debian chromium driven by playwright, and an app served
on a loopback port in a thread of the test process.

Needs /usr/bin/chromium (scripts/browser.sh installs it); a module calling `require_chromium()`
is skipped, saying why, without it.
"""

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

CHROMIUM = os.environ.get("INFD_CHROMIUM", "/usr/bin/chromium")


def require_chromium():
    """playwright's sync API; skips the calling test module when chromium or playwright is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: run scripts/browser.sh (apt-get install chromium) for the browser tests", allow_module_level=True)
    return pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app, startup_s: float = 20) -> Iterator[str]:
    """An ASGI app under uvicorn on a free loopback port, in a thread of this process: yields its URL."""
    import uvicorn

    port = free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not web.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        web.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def browser_page(url: str, viewport: tuple[int, int], timeout_ms: int, watch: Callable | None = None) -> Iterator:
    """A chromium page at `url` (page.errors collects the page's script errors); `watch(page)` runs before it loads."""
    sync_api = require_chromium()
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        page.set_default_timeout(timeout_ms)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        if watch is not None:
            watch(page)
        page.goto(url)
        try:
            yield page
        finally:
            browser.close()
