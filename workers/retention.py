"""RETENTION_DAYS: in each worker's main process, finished jobs older than that are removed with
every object they stored (service.lifecycle), a batch at a time, at the orphan-recovery cadence.
A job whose outputs a queued or running job reads is kept until that one ends."""

import logging
import threading

from service.lifecycle import expire_jobs
from service.records import Records, connect
from service.settings import Settings
from service.storage import open_storage
from workers.metrics import JOBS_PURGED

log = logging.getLogger(__name__)


def start_retention(settings: Settings) -> threading.Thread | None:
    if settings.retention_days is None:
        return None
    records, storage = Records(connect(settings.redis_url)), open_storage(settings.storage_url)

    def sweep_forever():
        while True:
            try:
                purged = expire_jobs(records, storage, settings.retention_days)
                if purged:
                    JOBS_PURGED.labels("retention").inc(len(purged))
                    log.info("retention: removed %d jobs over %s days old", len(purged), settings.retention_days)
                    continue  # there may be more
            except Exception as exc:  # Redis or storage away for a moment: the next sweep tries again
                log.warning("retention sweep failed: %s", exc)
            threading.Event().wait(settings.worker_heartbeat)

    thread = threading.Thread(target=sweep_forever, name="retention", daemon=True)
    thread.start()
    return thread
