"""Headless Chromium, driven through Selenium, for screenshots of a saved page (and its tests).

Debian ships `chromium` and `chromium-driver` as one matched pair (`apt-get install chromium
chromium-driver`), so the WebDriver protocol always fits the browser; Selenium is pure Python
and is pointed at both binaries (it never downloads a driver or a browser). The flags keep a
headless Chromium from reaching for the network on start (background networking, component
updates, sync), which a closed machine refuses; the colour profile is pinned to sRGB so that a
screenshot's pixels are the colours the page painted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # as root (CI containers) Chromium refuses to start sandboxed
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--force-color-profile=srgb",
    "--force-device-scale-factor=1",
    "--hide-scrollbars",
)
INSTALL_HINT = "Debian/Ubuntu: apt-get install chromium chromium-driver"


def find_chromium() -> tuple[str, str]:
    """Paths of Chromium and its ChromeDriver ($HOOKED_VLM_CHROMIUM / $HOOKED_VLM_CHROMEDRIVER,
    else the first of the usual names on PATH); a clear error names what is missing."""
    browser = os.environ.get("HOOKED_VLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("HOOKED_VLM_CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    if missing:
        raise RuntimeError(f"{' and '.join(missing)} not found ({INSTALL_HINT})")
    return browser, driver


@contextlib.contextmanager
def headless_chromium(width: int = 1300, height: int = 1000) -> Iterator:
    """A Selenium `webdriver.Chrome` on a fresh profile, quit (and its profile removed) on exit."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as error:
        raise RuntimeError("screenshots need selenium: pip install selenium (it is in hooked_vlm's dev extra)") from error
    browser, driver_path = find_chromium()
    with tempfile.TemporaryDirectory(prefix="hooked-vlm-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, path: str | Path, timeout: float = 30.0) -> None:
    """Load a saved page and wait until its script has drawn it (or reported an error)."""
    driver.get(Path(path).resolve().as_uri())
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, error = driver.execute_script("return [document.body.dataset.ready, document.body.dataset.error]")
        if error:
            raise RuntimeError(f"the page reported an error: {error}")
        if ready:
            return
        time.sleep(0.05)
    raise TimeoutError(f"the page {path} was not drawn within {timeout:g} s")


def screenshot(page: str | Path, png: str | Path, width: int = 1100) -> Path:
    """A PNG of the whole page as Chromium draws it (written atomically)."""
    from hooked_vlm.viewer.page import write_page

    with headless_chromium(width=width) as driver:
        open_page(driver, page)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        # the viewport, not the window: a window's size includes whatever frame the browser draws
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        return write_page(Path(png), driver.get_screenshot_as_png())
