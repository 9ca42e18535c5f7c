"""The Celery side of the API: the shared broker configuration and job submission by task name.

The API only *sends* tasks, by name, so it never imports the workers (or torch).
"""

from celery import Celery
from kombu import Queue

from service.settings import Settings

RUN_JOB_TASK = "workers.run_job"
QUEUES = ("gpu", "metrics")
QUEUE_BY_KIND = {"finetune": "gpu", "generate": "gpu", "evaluate": "metrics"}


def celery_config(settings: Settings) -> dict:
    """One configuration for producer and workers."""
    return {
        "broker_url": settings.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            # Longer than the longest job, so a running job is never handed to a second worker;
            # a job whose worker died comes back after this many seconds.
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
        },
        "task_queues": [Queue(name) for name in QUEUES],
        "task_default_queue": "gpu",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,  # job state lives in our own records, not Celery's backend
        "task_soft_time_limit": settings.job_time_limit,
        "task_time_limit": settings.job_time_limit + 60,
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        # Task events for Flower (compose profile `flower`): a few small messages per job.
        "worker_send_task_events": True,
    }


def make_producer(settings: Settings) -> Celery:
    """The API's Celery app. It gives up on a broker that is away within a second or two, so that a
    submit answers 503 instead of hanging (workers keep the patient defaults)."""
    config = celery_config(settings)
    config["broker_transport_options"] |= {"socket_timeout": 1.0, "socket_connect_timeout": 0.5}
    config["broker_connection_timeout"] = 0.5
    config["task_publish_retry_policy"] = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                           "interval_max": 0.2}
    app = Celery("anomaly_synth_api")
    app.conf.update(config)
    return app


def warm_producer_pool(producer: Celery) -> None:
    """Resolve Celery's lazy parts, open every pooled broker connection and declare the queues now,
    at start-up: left to the first burst of submits, that work cost each of them up to ~250 ms."""
    _ = producer.backend  # resolved (and imported) lazily by the first send_task otherwise
    held = []
    try:
        for _ in range(producer.conf.broker_pool_limit or 1):
            pooled = producer.producer_pool.acquire(block=True)
            held.append(pooled)
            for queue in producer.conf.task_queues:
                pooled.maybe_declare(queue)
    finally:
        for pooled in held:
            pooled.release()


def enqueue_job(producer: Celery, job_id: str, kind: str) -> None:
    producer.send_task(RUN_JOB_TASK, args=[job_id], queue=QUEUE_BY_KIND[kind])


def queue_depth(redis_client, queue: str) -> int:
    """Messages waiting in a queue: kombu's Redis transport keeps each queue as a list of that name."""
    return int(redis_client.llen(queue))
