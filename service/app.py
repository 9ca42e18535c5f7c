"""The FastAPI application factory."""

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import records as records_module
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
`{"error": {"code": "...", "message": "..."}}`. Authenticate with `Authorization: Bearer <key>`.
A web page for people (jobs, pair gallery, reports, forms) is at [/ui](/ui).
"""


log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
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
    app = FastAPI(title="Anomaly synthesis service", version="1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.records = records_module.Records(
        records_module.connect(settings.redis_url, timeout=records_module.API_TIMEOUT)
    )
    app.state.storage = open_storage(settings.storage_url)
    app.state.producer = make_producer(settings)
    install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware)
    for router in (exemplars.router, datasets.router, jobs.router, methods.router, health.router, ui.router):
        app.include_router(router)
    return app
