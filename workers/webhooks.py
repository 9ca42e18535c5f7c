"""Webhook delivery in each worker's main process, beside orphan recovery.

A sweep thread here rather than a Celery task: the workers run one job at a time with prefetch
1, so a delivery queued behind a GPU job would wait for it (hours), and a retry held as a Celery
ETA task sits unacknowledged until the broker's visibility timeout if its worker dies. The due
deliveries are a sorted set in Redis instead (service.records): every worker's sweep takes the due
ones under a lease, so they survive any restart and a dead sweep's are taken over. A job's end
rings a doorbell list the sweeps block on, so a delivery starts within milliseconds of it.
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from service.records import Records, connect
from service.settings import Settings
from service.webhooks import deliver
from workers.metrics import WEBHOOK_DELIVERIES

log = logging.getLogger(__name__)

CONCURRENT = 8  # deliveries in flight per worker: a slow receiver does not hold up the others
WAIT = 1.0  # longest block on the doorbell: with several workers only one hears each ring


def start_webhook_delivery(settings: Settings) -> threading.Thread:
    records = Records(connect(settings.redis_url))
    # No redirects (a 3xx to another host would bypass WEBHOOK_ALLOWED_HOSTS) and no proxies from
    # the environment: receivers are on the plant network, reached directly.
    client = httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False, trust_env=False)
    pool = ThreadPoolExecutor(CONCURRENT, thread_name_prefix="webhook")
    slots = threading.BoundedSemaphore(CONCURRENT)
    lease = settings.webhook_timeout + 30  # an attempt in flight is not taken by another sweep

    def attempt(job_id: str) -> None:
        try:
            outcome = deliver(records, settings, client, job_id)
            if outcome:
                WEBHOOK_DELIVERIES.labels(outcome).inc()
                log.info("job %s: webhook %s", job_id, outcome)
        except Exception as exc:  # Redis away: the lease runs out and the delivery is taken again
            log.warning("job %s: webhook attempt failed: %s", job_id, exc)
        finally:
            slots.release()

    def sweep_forever():
        while True:
            try:
                free = 0
                while slots.acquire(blocking=False):
                    free += 1
                due = records.take_due_callbacks(lease, limit=free) if free else []
                for _ in range(free - len(due)):
                    slots.release()
                for job_id in due:
                    pool.submit(attempt, job_id)
                if not due:
                    next_due = records.next_callback_due_in()
                    records.wait_for_callbacks(WAIT if next_due is None else min(WAIT, next_due))
            except Exception as exc:  # Redis away for a moment: the next sweep tries again
                log.warning("webhook sweep failed: %s", exc)
                threading.Event().wait(settings.worker_heartbeat)

    thread = threading.Thread(target=sweep_forever, name="webhook-delivery", daemon=True)
    thread.start()
    return thread
