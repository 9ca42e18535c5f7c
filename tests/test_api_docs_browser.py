"""/docs and /redoc in a real headless Chromium with no network beyond the service: the pages render
from the service's own copies of Swagger UI and ReDoc, and Swagger's Authorize button takes an API
key that "Try it out" then sends."""

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import console_errors, screenshot, start_chromium, stop_chromium
from tests.conftest import TENANT_KEYS

pytestmark = pytest.mark.timeout(180)
WAIT = 30
TITLE = "Anomaly synthesis service"


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    yield driver
    stop_chromium(driver)


def _wait(driver, condition, what):
    return WebDriverWait(driver, WAIT, poll_frequency=0.1).until(lambda d: condition(d), message=f"waiting for {what}")


def _visible(driver, selector):
    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0] if found and found[0].is_displayed() else None


def _text(driver, selector) -> str:
    element = _visible(driver, selector)
    return element.text if element else ""


def _loaded_from(driver) -> set[str]:
    """The origins of every script, stylesheet and resource the page loaded (a request the browser
    blocked before making it has no response status)."""
    return set(driver.execute_script(
        "return [...performance.getEntriesByType('resource').filter(e => e.responseStatus).map(e => e.name),"
        " ...[...document.querySelectorAll('script[src], link[href]')].map(e => e.src || e.href)]"
        ".map(u => new URL(u, location.href).origin)"
    ))


def test_swagger_ui_renders_offline_and_sends_the_key(browser, api_url):
    browser.get(api_url + "/docs")
    _wait(browser, lambda d: TITLE in _text(d, ".swagger-ui .info .title"), "Swagger UI")
    assert _loaded_from(browser) == {api_url}
    _visible(browser, ".swagger-ui .btn.authorize").click()
    key_field = _wait(browser, lambda d: _visible(d, ".modal-ux input[type=text], .modal-ux input"), "the key dialog")
    key_field.send_keys(TENANT_KEYS["acme"])
    _visible(browser, ".modal-ux .auth-btn-wrapper .btn.authorize").click()
    _visible(browser, ".modal-ux .btn-done").click()

    operation = "#operations-methods-list_methods_v1_methods_get"
    _visible(browser, f"{operation} .opblock-summary").click()
    _wait(browser, lambda d: _visible(d, f"{operation} .try-out__btn"), "Try it out").click()
    _wait(browser, lambda d: _visible(d, f"{operation} .execute"), "Execute").click()
    answer = f"{operation} .live-responses-table tr.response .response-col_status"
    status = _wait(browser, lambda d: _visible(d, answer), "the response")
    curl = _visible(browser, f"{operation} .curl-command").text
    screenshot(browser, "docs-swagger")
    assert status.text.strip().startswith("200"), status.text
    assert f"Authorization: Bearer {TENANT_KEYS['acme']}" in curl
    assert console_errors(browser, allowed=("favicon",)) == []


def test_redoc_renders_offline(browser, api_url):
    browser.get(api_url + "/redoc")
    _wait(browser, lambda d: TITLE in _text(d, "redoc h1, .api-info h1"), "ReDoc")
    _wait(browser, lambda d: "APIKey" in d.find_element(By.TAG_NAME, "body").text, "the security scheme")
    assert _loaded_from(browser) == {api_url}
    screenshot(browser, "docs-redoc")
    # ReDoc's bundle asks for its vendor's logo from the web: the page's Content-Security-Policy
    # blocks that before any request is made (the only console error).
    blocked = browser.execute_script(
        "return performance.getEntriesByType('resource').filter(e => !e.responseStatus).map(e => e.name)"
    )
    assert blocked in ([], ["https://cdn.redoc.ly/redoc/logo-mini.svg"])
    errors = console_errors(browser, allowed=("favicon",))
    assert all("violates the following Content Security Policy" in e and "cdn.redoc.ly" in e for e in errors)
