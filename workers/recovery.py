"""Orphan recovery: a job whose worker died (killed, out of memory, host lost) is put back in its
queue once its heartbeat is `ORPHAN_AFTER` old, instead of waiting for the broker's visibility
timeout (hours: it must exceed the longest job). Every worker's main process runs the sweep; the
requeue is atomic, so two sweeps never requeue one job twice."""

import logging
import threading

from service.queue import enqueue_job
from service.records import Records, connect, now
from service.settings import Settings
from workers.metrics import LAST_SWEEP

log = logging.getLogger(__name__)


def requeue_orphans(records: Records, producer, orphan_after: float) -> list[str]:
    requeued = []
    for job in records.requeue_orphans(stale_before=now() - orphan_after):
        enqueue_job(producer, job["id"], job["kind"])
        log.warning("job %s: its worker stopped beating; queued again", job["id"])
        requeued.append(job["id"])
    return requeued


def start_orphan_recovery(settings: Settings, producer) -> threading.Thread:
    records = Records(connect(settings.redis_url))

    def sweep_forever():
        while True:
            try:
                requeue_orphans(records, producer, settings.orphan_after)
                LAST_SWEEP.set_to_current_time()
            except Exception as exc:  # Redis away for a moment: the next sweep tries again
                log.warning("orphan recovery sweep failed: %s", exc)
            threading.Event().wait(settings.worker_heartbeat)

    thread = threading.Thread(target=sweep_forever, name="orphan-recovery", daemon=True)
    thread.start()
    return thread
