from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from service.errors import error_body
from service.metrics import registry
from service.queue import QUEUES, queue_depth

router = APIRouter(tags=["health"])

QUEUE_DEPTH = Gauge("synth_queue_depth", "Jobs waiting in a Celery queue", ["queue"], registry=registry)


@router.get("/healthz")
def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request):
    """Readiness: Redis and storage answer."""
    state = request.app.state
    checks = {}
    for name, probe in (("redis", state.records.redis.ping), ("storage", state.storage.check)):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {exc}"
    if all(v == "ok" for v in checks.values()):
        return {"status": "ready", "checks": checks}
    failing = ", ".join(f"{k} ({v})" for k, v in checks.items() if v != "ok")
    return JSONResponse(error_body("not_ready", f"not ready: {failing}", checks=checks), status_code=503)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request):
    redis_client = request.app.state.records.redis
    for queue in QUEUES:
        try:  # read at scrape time, so the number is never stale
            QUEUE_DEPTH.labels(queue).set(queue_depth(redis_client, queue))
        except Exception:
            pass
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
