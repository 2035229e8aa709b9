"""Headless Debian Chromium driven by Selenium, for the tests that look at a page as a person would.

Chromium starts with ``--headless --no-sandbox --disable-gpu`` and with background networking,
sync, extensions and component updates off, so the only requests it makes are the page's own;
those are read back from the DevTools performance log."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@contextmanager
def chromium(width: int = 1280, height: int = 800) -> Iterator[object]:
    """A Selenium WebDriver for headless Chromium; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
        "--disable-extensions", "--disable-component-update", "--disable-default-apps", "--no-first-run",
        "--disable-dev-shm-usage", "--use-gl=swiftshader", "--enable-unsafe-swiftshader", f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def requests(driver: object) -> list[str]:
    """URLs of every network request the page made since the last call (DevTools performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    return urls


def console_errors(driver: object) -> list[str]:
    """Console messages at SEVERE level since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
