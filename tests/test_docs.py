"""docs/api.md and the code agree.

- Routes: every (method, path) of the app's OpenAPI schema is a row of a route table in the doc
  ("| `GET /v1/jobs/{job_id}` | ..."), and every route the doc names anywhere in backticks exists:
  in the schema with exactly that path, or, for the routes kept out of the schema (/docs, /ui,
  /metrics, ...), as a route the app answers.
- Errors: every code the API can answer is a row of the doc's error table ("| `in_use` | 409 |
  ...") with the status the code raises it with, and every row there is such a code. The codes are
  collected from the source: `ApiError(<status>, "<code>"` in service/, the `error_body("<code>"`
  calls of the exception handlers and routes, the framework-error codes of service/errors.py, and
  the dataset codes (`DatasetError("<code>"`) that the dataset route forwards as 400s.
- Job failure codes: every code `workers/runner.py` fails a job with is a row of the doc's job
  failure table, and every row there is one.

The app is built in-process; building it and its OpenAPI document connects to nothing.
"""

import re
from pathlib import Path

import pytest
from starlette.routing import Match

from service.app import create_app
from service.errors import _HTTP_CODES
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "api.md"

METHODS = "GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS"
ROUTE_ROW = re.compile(rf"^\| `({METHODS}) (/[^`\s]*)` \|", re.MULTILINE)
ROUTE_NAMED = re.compile(rf"`({METHODS}) (/[^`\s?]*)(?:\?[^`]*)?`")
ERROR_ROW = re.compile(r"^\| `([a-z0-9_]+)` \| (\d{3}|other) \|", re.MULTILINE)
CODE_ROW = re.compile(r"^\| `([a-z0-9_]+)` \|", re.MULTILINE)

API_ERROR = re.compile(r'ApiError\(\s*(\d{3})\s*,\s*"([a-z0-9_]+)"')
ERROR_BODY = re.compile(r'error_body\(\s*"([a-z0-9_]+)"')
DATASET_ERROR = re.compile(r'DatasetError\(\s*"([a-z0-9_]+)"')
FALLBACK_HTTP_CODE = re.compile(r'_HTTP_CODES\.get\([^,]+,\s*"([a-z0-9_]+)"\)')
JOB_FAILURE = re.compile(r'_fail\(\s*records\s*,\s*job_id\s*,\s*"([a-z0-9_]+)"')

# Codes that error_body builds outside ApiError, with the status each is sent with.
ERROR_BODY_STATUS = {"invalid_request": 422, "internal_error": 500, "store_unavailable": 503, "not_ready": 503}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    # A Redis URL nothing listens on: the client connects lazily, and no request is made here.
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0", storage_url=f"file://{tmp_path_factory.mktemp('storage')}", api_keys={}
    )
    return create_app(settings)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def section(doc: str, title: str) -> str:
    """The text under the heading `title`, up to the next heading of the same or a higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\s*$", doc, re.MULTILINE)
    assert match, f"docs/api.md has no heading {title!r}"
    level = len(match.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(doc, match.end())
    return doc[match.end() : end.start() if end else len(doc)]


def schema_routes(app) -> set[tuple[str, str]]:
    paths = app.openapi()["paths"]
    return {(method.upper(), path) for path, operations in paths.items() for method in operations}


def template(path: str) -> str:
    """/v1/jobs/{job_id} -> /v1/jobs/{}: a path with its parameter names left out."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def answered(app, method: str, path: str) -> bool:
    """Whether some route of the app takes `method` on `path` (parameters filled with 'x')."""
    scope = {"type": "http", "method": method, "path": re.sub(r"\{[^}]*\}", "x", path), "root_path": "",
             "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app.routes)


def test_every_schema_route_is_a_row_of_the_doc(app, doc):
    rows = set(ROUTE_ROW.findall(doc))
    missing = sorted(schema_routes(app) - rows)
    assert not missing, f"routes of the OpenAPI schema without a row in docs/api.md: {missing}"


def test_every_route_the_doc_names_exists(app, doc):
    schema = schema_routes(app)
    schema_templates = {(method, template(path)) for method, path in schema}
    named = set(ROUTE_NAMED.findall(doc))
    assert len(named) >= len(schema), "docs/api.md names fewer routes than the schema has"
    wrong = []
    for method, path in sorted(named):
        if (method, path) in schema:
            continue
        if (method, template(path)) in schema_templates:  # a schema route under other parameter names
            wrong.append(f"{method} {path}")
        elif not answered(app, method, path):
            wrong.append(f"{method} {path}")
    assert not wrong, f"docs/api.md names routes the app does not have (or names them unlike the schema): {wrong}"


def raised_codes() -> dict[str, set[str]]:
    """Every error code the API answers with -> the statuses it is sent with ('other' for the
    framework fallback)."""
    codes: dict[str, set[str]] = {}

    def add(code: str, status) -> None:
        codes.setdefault(code, set()).add(str(status))

    for source in sorted((ROOT / "service").rglob("*.py")):
        text = source.read_text()
        for status, code in API_ERROR.findall(text):
            add(code, status)
        for code in ERROR_BODY.findall(text):
            assert code in ERROR_BODY_STATUS, f"{source.name}: error_body({code!r}) has no status in this test"
            add(code, ERROR_BODY_STATUS[code])
    for status, code in _HTTP_CODES.items():
        add(code, status)
    errors_source = (ROOT / "service" / "errors.py").read_text()
    for code in FALLBACK_HTTP_CODE.findall(errors_source):
        add(code, "other")
    # The dataset route answers a DatasetError with its code as a 400.
    datasets_route = (ROOT / "service" / "routers" / "datasets.py").read_text()
    assert "ApiError(400, exc.code, exc.message)" in datasets_route, "the dataset route forwards its codes otherwise"
    for code in DATASET_ERROR.findall((ROOT / "models" / "downstream" / "mvtec.py").read_text()):
        add(code, 400)
    return codes


def test_the_scan_finds_the_codes():
    codes = raised_codes()
    assert len(codes) >= 70, sorted(codes)
    for code in ("in_use", "invalid_cursor", "store_unavailable", "not_mvtec_layout", "method_not_allowed",
                 "http_error", "box_outside_image", "unsupported_image_type"):
        assert code in codes, code


def test_every_error_code_is_in_the_error_table_with_its_status(doc):
    table: dict[str, set[str]] = {}
    for code, status in ERROR_ROW.findall(section(doc, "Errors")):
        table.setdefault(code, set()).add(status)
    codes = raised_codes()
    missing = sorted(set(codes) - set(table))
    assert not missing, f"error codes missing from the error table of docs/api.md: {missing}"
    stale = sorted(set(table) - set(codes))
    assert not stale, f"the error table of docs/api.md lists codes the code never answers: {stale}"
    wrong = {code: (sorted(table[code]), sorted(statuses)) for code, statuses in codes.items()
             if statuses != table[code]}
    assert not wrong, f"error codes whose status in docs/api.md is not the code's (doc, code): {wrong}"


def test_every_job_failure_code_is_in_the_job_failure_table(doc):
    failures = set(JOB_FAILURE.findall((ROOT / "workers" / "runner.py").read_text()))
    assert {"job_failed", "time_limit", "worker_lost", "internal_error"} <= failures, failures
    table = set(CODE_ROW.findall(section(doc, "Job failure codes")))
    assert failures == table, f"job failure codes: workers/runner.py {sorted(failures)}, docs/api.md {sorted(table)}"
