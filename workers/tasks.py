from service.queue import RUN_JOB_TASK
from workers.celery_app import app
from workers.runner import run_job


@app.task(name=RUN_JOB_TASK)
def run(job_id: str) -> None:
    run_job(job_id, app.conf.task_soft_time_limit)
