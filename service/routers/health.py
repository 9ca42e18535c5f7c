import time

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from service.deps import RecordsDep, StorageDep
from service.errors import error_body
from service.metrics import registry
from service.queue import QUEUES, queue_depth

router = APIRouter(tags=["health"])

QUEUE_DEPTH = Gauge("synth_queue_depth", "Jobs waiting in a Celery queue", ["queue"], registry=registry)


@router.get("/healthz")
async def healthz():
    """Liveness: the process answers. On the event loop and touching nothing else, so it stays fast
    whatever Redis, storage or the thread pool are doing."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(records: RecordsDep, storage: StorageDep):
    """Readiness: Redis (the job store and broker) and storage answer; each check says what is down."""
    checks = {}
    for name, probe in (("redis", records.redis.ping), ("storage", storage.check)):
        start = time.perf_counter()
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"down: {type(exc).__name__}: {exc} (after {time.perf_counter() - start:.1f} s)"
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks}
    failing = ", ".join(f"{k} ({v})" for k, v in checks.items() if v != "ok")
    return JSONResponse(error_body("not_ready", f"not ready: {failing}", checks=checks), status_code=503)


@router.get("/metrics", include_in_schema=False)
def metrics(records: RecordsDep):
    try:  # read at scrape time, so the number is never stale; skipped while Redis is away
        for queue in QUEUES:
            QUEUE_DEPTH.labels(queue).set(queue_depth(records.redis, queue))
    except Exception:
        pass
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
