"""Prometheus metrics of the API process, and the ASGI middleware that records requests."""

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

registry = CollectorRegistry()

HTTP_REQUESTS = Counter("synth_http_requests_total", "HTTP requests", ["route", "method", "status"], registry=registry)
HTTP_LATENCY = Histogram(
    "synth_http_request_duration_seconds",
    "HTTP request latency",
    ["route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=registry,
)
JOBS_SUBMITTED = Counter("synth_jobs_submitted_total", "Jobs accepted", ["kind", "method"], registry=registry)


class RequestMetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): counts and times every request
    under its route template (`/v1/jobs/{job_id}`), never the raw path, to bound label values."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_and_record(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            HTTP_REQUESTS.labels(template, method, str(status["code"])).inc()
            HTTP_LATENCY.labels(template, method).observe(time.perf_counter() - start)
