"""A real headless Chromium (Debian's chromium and chromium-driver, through Selenium) for the
dashboard's tests and its README screenshot (`scripts/dashboard_screenshot.py`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

CHROMIUM = os.environ.get("FLOTILLA_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("FLOTILLA_CHROMEDRIVER", "/usr/bin/chromedriver")


def missing() -> str:
    """Why no browser can be started here ('' when one can)."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} not found: install Debian's chromium and chromium-driver (scripts/setup-browser)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return ""


@contextlib.contextmanager
def chrome(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium driven by Selenium, with a fresh profile and no network of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="flotilla-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def on_dashboard(page: Any, css: str, test: str, timeout: float = 10.0) -> Any:
    """Open this cluster's dashboard in `page` and wait until the element `css` matches the
    JavaScript condition `test` (on `e`); returns `test`'s value."""
    import flotilla
    from tests.conftest import wait_for

    page.set_page_load_timeout(20)
    page.get(str(flotilla.dashboard_url()) + "/")
    return wait_for(lambda: page.execute_script(f"const e = document.querySelector({css!r}); return e && {test};"),
                    timeout=timeout, interval=0.1, what=f"{css} on the dashboard")
