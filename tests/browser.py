"""A real headless Chromium for the web page's tests, driven by Selenium through chromedriver.

Debian's `chromium` and `chromium-driver` packages (.ci/run installs them). On a developer machine
without them the browser tests skip and say why; with REQUIRE_BROWSER=1 (set by .ci/run) they
fail instead, so CI can never skip them quietly.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SCREENSHOTS = Path(__file__).resolve().parent.parent / ".pytest_cache" / "ui"
# Flags that work in containers (no sandbox, no GPU) and keep the browser off the network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_binaries() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def skip_or_fail(reason: str):
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (REQUIRE_BROWSER=1: the browser tests must run here)")
    pytest.skip(reason)


def start_chromium(width: int = 1366, height: int = 900):
    """A fresh headless Chromium with its own profile, the browser console log readable, and
    downloads saved to `driver.download_dir`."""
    binaries = chromium_binaries()
    if binaries is None:
        skip_or_fail("chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        skip_or_fail("selenium is not installed (pip install -e '.[dev]')")
    browser, driver_path = binaries
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    downloads = Path(profile) / "downloads"
    options = webdriver.ChromeOptions()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    driver.profile_dir = profile
    driver.download_dir = downloads
    return driver


def stop_chromium(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def console_errors(driver, allowed: tuple[str, ...] = ()) -> list[str]:
    """SEVERE console entries since the last call, less those containing an allowed fragment."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and not any(fragment in entry["message"] for fragment in allowed)
    ]


def screenshot(driver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path
