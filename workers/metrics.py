"""Prometheus metrics of a worker. Celery's prefork children write them to PROMETHEUS_MULTIPROC_DIR
(set up in workers.celery_app before prometheus_client is imported); the main process serves the
sum on WORKER_METRICS_PORT."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

JOBS_FINISHED = Counter("synth_jobs_finished_total", "Jobs finished", ["kind", "method", "status"])
JOB_DURATION = Histogram(
    "synth_job_duration_seconds",
    "Wall time of a job on a worker",
    ["kind", "method"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600),
)
JOBS_FAILED = Counter("synth_jobs_failed_total", "Jobs failed, by error code", ["code"])
WEBHOOK_DELIVERIES = Counter(
    "synth_webhook_deliveries_total", "Webhook delivery attempts by outcome (delivered, retrying, failed)", ["outcome"]
)
JOBS_PURGED = Counter("synth_jobs_purged_total", "Jobs removed with their outputs, by reason", ["reason"])
PAIRS_GENERATED = Counter("synth_pairs_generated_total", "Image/mask pairs written", ["method"])
LAST_SWEEP = Gauge(
    "synth_worker_last_sweep_timestamp_seconds",
    "When this worker's main process last completed its orphan-recovery sweep: its heartbeat",
    multiprocess_mode="max",
)
JOBS_IN_PROGRESS = Gauge("synth_jobs_in_progress", "Jobs running now", ["queue"], multiprocess_mode="livesum")


def serve(port: int) -> None:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    start_http_server(port, addr="0.0.0.0", registry=registry)
