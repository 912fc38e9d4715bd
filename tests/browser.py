"""Headless Chromium (Debian's chromium + chromedriver) for checking HTML reports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def open_in_browser(html_path: Path, screenshot: Path, script: str | None = None) -> tuple:
    """Load ``html_path``; return ([complete, naturalWidth] per image, browser console entries),
    plus the value of ``script`` (JavaScript with a ``return``, run after loading) when given.

    Skips the calling test with a reason when chromium/chromedriver/selenium are unavailable.
    """
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian chromium/chromedriver not installed (scripts/ensure_browser.sh installs them as root)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e .[dev])")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,2400"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    try:
        driver.get(html_path.resolve().as_uri())
        images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        value = driver.execute_script(script) if script is not None else None
        logs = driver.get_log("browser")
        driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    return (images, logs) if script is None else (images, logs, value)
