"""Property-based fuzzing of every route from the OpenAPI schema (schemathesis), against the real
service (uvicorn, Redis, a Celery worker), with a valid key and with none: no 5xx, every response
as the schema says, and nothing created by a request that was answered 4xx. Seeded and bounded
for CI; `python -m bench.bench_fuzz` runs the same for longer."""

import os

import hypothesis
import pytest
import redis
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import TENANT_KEYS

# x 2 (with and without a key) x 31 cases: about 620 requests. bench/bench_fuzz.py asks for more.
EXAMPLES_PER_ROUTE = int(os.environ.get("FUZZ_EXAMPLES", "10"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="session")
def api_schema(api_url):
    return schemathesis.openapi.from_url(f"{api_url}/openapi.json")


@pytest.fixture(scope="session")
def store(redis_url):
    return redis.Redis.from_url(redis_url, decode_responses=True)


def created(store) -> dict[str, int]:
    """What exists, for every tenant: exemplars, datasets and jobs (the tenants' lists, not the
    filters' indexes, which a worker's status changes move jobs between)."""
    return {key: store.zcard(key) for key in sorted(store.scan_iter("tenant:*")) if key.count(":") == 2}


def operations():
    """Every operation of the schema, by name; loaded once the service is up (schemathesis' own
    pytest loader does not work with this pytest, so the cases come from its Hypothesis strategies)."""
    return ["GET /healthz", "GET /readyz", "POST /v1/exemplars", "GET /v1/exemplars", "POST /v1/datasets",
            "GET /v1/datasets", "POST /v1/jobs", "GET /v1/jobs", "POST /v1/jobs/generate", "GET /v1/jobs/{job_id}",
            "DELETE /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/artifacts", "GET /v1/jobs/{job_id}/export",
            "GET /v1/jobs/{job_id}/artifacts/{key}", "GET /v1/methods", "GET /v1/exemplars/{exemplar_id}",
            "DELETE /v1/exemplars/{exemplar_id}", "GET /v1/exemplars/{exemplar_id}/image",
            "GET /v1/exemplars/{exemplar_id}/mask", "DELETE /v1/datasets/{dataset_id}"]


# Operations whose inputs have constraints, so that requests the schema forbids exist.
CONSTRAINED = ["POST /v1/exemplars", "GET /v1/exemplars", "POST /v1/datasets", "GET /v1/datasets", "POST /v1/jobs",
               "GET /v1/jobs", "POST /v1/jobs/generate", "GET /v1/jobs/{job_id}/artifacts",
               "GET /v1/jobs/{job_id}/artifacts/{key}", "GET /v1/exemplars/{exemplar_id}/image",
               "GET /v1/exemplars/{exemplar_id}/mask"]
CASES = [(op, GenerationMode.POSITIVE) for op in operations()] + [(op, GenerationMode.NEGATIVE) for op in CONSTRAINED]


def test_the_fuzzed_operations_are_every_route(api_schema):
    found = {f"{r.ok().method.upper()} {r.ok().path}" for r in api_schema.get_all_operations()}
    assert found == set(operations())


@pytest.mark.parametrize("operation, mode", CASES, ids=[f"{op} {mode.value}" for op, mode in CASES])
def test_every_route_with_and_without_a_key(api_schema, api_url, store, operation, mode):
    """Valid requests (as the schema allows) and invalid ones (as it does not), each with and without
    a key."""
    method, path = operation.split(" ")
    strategy = api_schema[path][method].as_strategy(generation_mode=mode)

    @hypothesis.given(case=strategy)
    @hypothesis.settings(
        max_examples=EXAMPLES_PER_ROUTE,
        derandomize=True,  # seeded: the same cases every run
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    def check(case):
        for headers in ({"Authorization": f"Bearer {TENANT_KEYS['acme']}"}, {}):
            before = created(store)
            response = case.call(base_url=api_url, headers=headers, timeout=30)
            case.validate_response(response, checks=CHECKS)
            if 400 <= response.status_code < 500:
                assert created(store) == before, (operation, response.status_code, response.text[:300])
            if not headers and path.startswith("/v1/"):  # 401; 400 or 422 for a body that cannot be parsed
                assert response.status_code in (400, 401, 422), (operation, response.text[:300])

    check()
