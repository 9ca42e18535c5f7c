"""The web page's routes on the real API process: the page and its files need no key, deep links
answer the page, nothing outside the page's files is reachable, and every data call still needs
a key."""

import gzip
import http.client
import re
from urllib.parse import urlparse

import httpx
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


def test_page_and_deep_links_answer_the_page_without_a_key(api_url):
    page = httpx.get(f"{api_url}/ui")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta name="synth-auth" content="bearer">' in page.text  # keys configured: the page asks
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    for path in ("/ui/", "/ui/jobs", "/ui/jobs/0123456789abcdef0123456789abcdef", "/ui/jobs/abc?page=3&pair=7",
                 "/ui/methods", "/ui/new?method=draem", "/ui/no/such/page"):
        response = httpx.get(api_url + path)
        assert response.status_code == 200, path
        assert response.headers["content-type"] == "text/html; charset=utf-8", path
        assert response.text == page.text, path
    root = httpx.get(f"{api_url}/")
    assert root.status_code == 307 and root.headers["location"] == "/ui"


def _referenced_assets(api_url: str) -> set[str]:
    """Every /ui/assets/ file the page names, and every module those modules import."""
    client = httpx.Client(base_url=api_url)
    page = client.get("/ui").text
    found = set(re.findall(r'(?:href|src)="/ui/assets/([^"]+)"', page))
    modules = [name for name in found if name.endswith(".js")]
    while modules:
        source = client.get(f"/ui/assets/{modules.pop()}").text
        for imported in re.findall(r'^import [^;]*? from "\./([^"]+)";', source, re.M):
            if imported not in found:
                found.add(imported)
                modules.append(imported)
    return found


def test_assets_have_their_content_types_gzip_and_etags(api_url):
    names = _referenced_assets(api_url)
    assert {"app.js", "api.js", "gallery.js", "app.css", "icon.svg"} <= names
    client = httpx.Client(base_url=api_url)
    for name in names:
        plain = client.get(f"/ui/assets/{name}", headers={"accept-encoding": "identity"})
        assert plain.status_code == 200, name
        assert plain.headers["content-type"].split(";")[0] == MEDIA_TYPES[name[name.rindex("."):]], name
        assert "content-encoding" not in plain.headers
        assert plain.headers["cache-control"] == "no-cache"
        # httpx decodes gzip itself; read the raw bytes to see what went over the wire.
        with client.stream("GET", f"/ui/assets/{name}", headers={"accept-encoding": "gzip"}) as zipped:
            raw = b"".join(zipped.iter_raw())
            assert zipped.headers["content-encoding"] == "gzip" and zipped.headers["vary"] == "Accept-Encoding"
        assert gzip.decompress(raw) == plain.content
        again = client.get(f"/ui/assets/{name}", headers={"if-none-match": plain.headers["etag"]})
        assert again.status_code == 304 and not again.content, name


def _raw_get(api_url: str, path: str) -> tuple[int, str]:
    """A GET of `path` exactly as written: no client-side resolving of `..` or decoding."""
    parsed = urlparse(api_url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_paths_that_leave_the_page_files_are_404(api_url):
    escapes = [
        "/ui/../pyproject.toml",
        "/ui/assets/../index.html",
        "/ui/assets/../../routers/ui.py",
        "/ui/assets/../../../pyproject.toml",
        "/ui/%2e%2e/pyproject.toml",
        "/ui/assets/%2e%2e/%2e%2e/settings.py",
        "/ui/assets/..%2f..%2fsettings.py",
        "/ui/assets/%2E%2E%2Findex.html",
        "/ui/assets/..%5c..%5csettings.py",
        "/ui/assets/./app.js",
        "/ui/jobs/../../v1/jobs",
        "/ui/assets/",
        "/ui/assets/nothing.js",
        "/ui/assets/app.js.map",
    ]
    for path in escapes:
        status, body = _raw_get(api_url, path)
        assert status == 404, (path, status)
        assert '"code":"not_found"' in body.replace(" ", ""), (path, body[:200])
        assert "import" not in body and "pydantic" not in body and "<html" not in body, path


def test_every_data_call_still_needs_a_key(api_url, acme):
    job_id = acme.get("/v1/jobs", params={"limit": 1}).json()["items"]
    job_id = job_id[0]["id"] if job_id else "0" * 32
    from_the_page = {"referer": f"{api_url}/ui/jobs", "origin": api_url}
    for method, path in [
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/artifacts"),
        ("GET", f"/v1/jobs/{job_id}/artifacts/jobs/{job_id}/manifest.json?thumb=64"),
        ("GET", f"/v1/jobs/{job_id}/export"),
        ("DELETE", f"/v1/jobs/{job_id}"),
        ("GET", "/v1/exemplars"),
        ("GET", f"/v1/exemplars/{'0' * 32}/image?thumb=64"),
        ("GET", "/v1/methods"),
        ("GET", "/v1/datasets"),
        ("POST", "/v1/jobs"),
    ]:
        response = httpx.request(method, api_url + path, headers=from_the_page)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["error"]["code"] == "missing_api_key", (method, path)


def test_without_keys_the_page_knows_not_to_ask(redis_url, tmp_path):
    settings = Settings(redis_url=redis_url, storage_url=f"file://{tmp_path}", api_keys={})
    page = TestClient(create_app(settings)).get("/ui/jobs")
    assert page.status_code == 200
    assert '<meta name="synth-auth" content="loopback">' in page.text
