"""The Celery application of both worker kinds (queues `gpu` and `metrics`).

celery -A workers.celery_app worker -Q gpu --concurrency 1      # one per GPU
celery -A workers.celery_app worker -Q metrics --concurrency 2
"""

import atexit
import os
import shutil
import tempfile

# Each worker's prefork children share one metrics directory; it must exist before
# prometheus_client is first imported (it picks its storage then).
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="synth-worker-metrics-")
atexit.register(shutil.rmtree, os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)

from celery import Celery, signals  # noqa: E402
from prometheus_client import multiprocess  # noqa: E402

from service.queue import celery_config  # noqa: E402
from service.settings import Settings  # noqa: E402

settings = Settings.from_env()
if not settings.redis_url:
    raise SystemExit("REDIS_URL is not set: workers need the broker (make run starts one for you)")

app = Celery("anomaly_synth", include=["workers.tasks"])
app.conf.update(celery_config(settings))


@signals.worker_ready.connect
def _start_main_process_services(**_):
    from workers.recovery import start_orphan_recovery
    from workers.retention import start_retention
    from workers.webhooks import start_webhook_delivery

    start_orphan_recovery(settings, app)
    start_webhook_delivery(settings)
    start_retention(settings)
    if settings.worker_metrics_port:
        from workers.metrics import serve

        serve(settings.worker_metrics_port)


@signals.worker_process_shutdown.connect
def _forget_dead_child(pid=None, **_):
    multiprocess.mark_process_dead(pid or os.getpid())
