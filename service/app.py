"""The FastAPI application factory."""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import records as records_module
from service.docs import install_docs
from service.errors import install_error_handlers
from service.metrics import RequestMetricsMiddleware
from service.queue import make_producer, warm_producer_pool
from service.routers import datasets, exemplars, health, jobs, methods, ui
from service.settings import Settings, SettingsError
from service.storage import open_storage

DESCRIPTION = """
Few-shot industrial anomaly synthesis. Upload a few defect exemplars (image + mask) and normal
images, queue **generate** jobs that paint new, pixel-labelled defects onto the normal images,
poll them, and download image/mask pairs. Errors are always
`{"error": {"code": "...", "message": "..."}}`. Authenticate with `Authorization: Bearer <key>`
(the **Authorize** button here). A web page for people (jobs, pair gallery, reports, forms) is at
[/ui](/ui).

- **Webhooks**: a job with `callback_url` is POSTed its JSON when it ends, with headers
  `X-Synth-Event: job.finished`, `X-Synth-Delivery` and `X-Synth-Signature: sha256=<HMAC-SHA256 of
  the body with WEBHOOK_SECRET>`; retried with exponential backoff; state in the job's `callback`.
- **Idempotency-Key** on every POST that creates something: a retry with the same key and request
  returns the first response (header `Idempotent-Replayed: true`); another request is a 409.
- **Pagination**: every list takes `limit` (default 100, at most 1000) and `cursor`, and returns
  `next_cursor` (null on the last page).
- **Exports**: `GET /v1/jobs/{id}/export?format=mvtec|coco|yolo`.
"""


log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    try:  # records stored before the list filters' indexes existed; once per database
        await run_in_threadpool(app.state.records.build_indexes)
    except Exception as exc:
        log.warning("could not build the list indexes (Redis unreachable?): %s", exc)
    try:
        await run_in_threadpool(warm_producer_pool, app.state.producer)
    except Exception as exc:  # the broker may come up later; /readyz says so meanwhile
        log.warning("could not warm the broker connections: %s", exc)
    yield


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    if not settings.redis_url:
        raise SettingsError(
            "REDIS_URL is not set. `make run` (python -m service.embedded) starts an embedded Redis for you."
        )
    app = FastAPI(
        title="Anomaly synthesis service",
        version="1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by install_docs, from this process rather than a CDN
        redoc_url=None,
    )
    install_docs(app)
    app.state.settings = settings
    app.state.records = records_module.Records(
        records_module.connect(settings.redis_url, timeout=records_module.API_TIMEOUT)
    )
    app.state.storage = open_storage(settings.storage_url, settings.s3_public_endpoint_url)
    app.state.producer = make_producer(settings)
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    for router in (exemplars.router, datasets.router, jobs.router, methods.router, health.router, ui.router):
        app.include_router(router)
    return app
