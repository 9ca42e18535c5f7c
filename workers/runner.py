"""The life of one job on a worker: claim it, run its kind, record how it ended.

Redeliveries are expected (a killed worker's job comes back through orphan recovery or the
broker): a job that already ended is skipped, a job whose worker still beats is left to it, and a
job whose worker died starts over, overwriting its own outputs under the same keys, so nothing is
duplicated.
"""

import logging
import time
from functools import lru_cache

from celery.exceptions import SoftTimeLimitExceeded

from models.errors import InputError
from service.queue import QUEUE_BY_KIND
from service.records import TERMINAL, Records, connect, now
from service.settings import Settings
from service.storage import open_storage
from workers.context import Heartbeat, JobCancelled, JobContext, JobFailed
from workers.evaluate import run_evaluate
from workers.finetune import run_finetune
from workers.generate import run_generate
from workers.metrics import JOB_DURATION, JOBS_FINISHED, JOBS_IN_PROGRESS

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job that kills its worker every time (out of memory, say) must not loop forever

RUNNERS = {"evaluate": run_evaluate, "finetune": run_finetune, "generate": run_generate}


@lru_cache(maxsize=1)
def resources() -> tuple[Settings, Records, object]:
    settings = Settings.from_env()
    return settings, Records(connect(settings.redis_url)), open_storage(settings.storage_url)


def _fail(records: Records, job_id: str, code: str, message: str) -> bool:
    return records.transition(
        job_id,
        ("queued", "running"),
        status="failed",
        finished_at=now(),
        error={"code": code, "message": message},
    )


def run_job(job_id: str, time_limit: int) -> None:
    settings, records, storage = resources()
    job = records.get_job(job_id)
    if job is None or job["status"] in TERMINAL:
        log.info("job %s: nothing to do (%s)", job_id, job["status"] if job else "no record")
        return
    attempts = job.get("attempts", 0) + 1
    # Exclusive: a second delivery of a job whose worker is alive (fresh heartbeat) gives way.
    if not records.claim(
        job_id, stale_before=now() - settings.orphan_after, attempts=attempts, started_at=job["started_at"] or now()
    ):
        log.info("job %s: already running on a live worker", job_id)
        return
    if attempts > MAX_ATTEMPTS:
        _fail(
            records,
            job_id,
            "worker_lost",
            f"the worker died {MAX_ATTEMPTS} times while running this job (last stage: "
            f"{job['progress']['stage']}); it may need more memory: try a smaller count or resolution",
        )
        return
    job["attempts"] = attempts
    queue = QUEUE_BY_KIND[job["kind"]]
    labels = (job["kind"], job["method"] or "")
    started = time.monotonic()
    status = "failed"
    JOBS_IN_PROGRESS.labels(queue).inc()
    try:
        context = JobContext(job, records, storage, settings)
        with Heartbeat(records, job_id, settings.worker_heartbeat):
            result = RUNNERS[job["kind"]](context)
        total = context.total or job["count"]
        done = {"fraction": 1.0, "stage": "done", "done": total, "total": total}
        if records.transition(
            job_id, ("running",), status="succeeded", result=result, progress=done, finished_at=now()
        ):
            status = "succeeded"
        else:
            status = records.get_job_field(job_id, "status") or "failed"
    except JobCancelled:
        records.transition(job_id, ("running",), status="cancelled", finished_at=now())
        status = "cancelled"
    except SoftTimeLimitExceeded:
        _fail(
            records,
            job_id,
            "time_limit",
            f"the job ran longer than JOB_TIME_LIMIT ({time_limit} s); lower count or steps, or raise the limit",
        )
    except (JobFailed, InputError) as exc:
        _fail(records, job_id, "job_failed", str(exc))
    except Exception as exc:
        log.exception("job %s failed", job_id)
        _fail(records, job_id, "internal_error", f"{type(exc).__name__}: {exc}")
    finally:
        JOBS_IN_PROGRESS.labels(queue).dec()
        JOBS_FINISHED.labels(*labels, status).inc()
        JOB_DURATION.labels(*labels).observe(time.monotonic() - started)
        log.info("job %s %s in %.1f s", job_id, status, time.monotonic() - started)
