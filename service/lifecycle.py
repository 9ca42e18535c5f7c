"""Deleting what a tenant stored: exemplars, datasets, and jobs with every object they wrote.

The record goes first, in one atomic step with the check that no queued or running job reads it
(`in_use` otherwise), then the objects under its prefixes. So a record never points at a deleted
object, and a job submitted meanwhile is refused (records.create_job checks its inputs exist)
rather than started on a missing one. Used by the API's DELETE routes, by a worker purging a job
that was running when its purge was asked for, and by the RETENTION_DAYS sweep.
"""

from service.records import Records, now


def job_prefixes(job_id: str) -> tuple[str, ...]:
    """Where a job's objects live, in key order: a fine-tune job's adapter, and everything else."""
    return (f"adapters/{job_id}/", f"jobs/{job_id}/")


def record_prefix(kind: str, record_id: str) -> str:
    return f"{kind}s/{record_id}/"


def delete_record(records: Records, storage, kind: str, record: dict) -> str | None:
    """Delete an exemplar or a dataset and its files; or, if a queued or running job reads it,
    nothing, and return that job's id."""
    blocking = records.delete_if_unused(kind, record)
    if blocking is None:
        storage.delete_prefix(record_prefix(kind, record["id"]))
    return blocking


def purge_job(records: Records, storage, job: dict) -> str | None:
    """Delete a job that is no longer running, its record and its objects; or, if a queued or
    running job reads its outputs (its adapter, its pairs), nothing, and return that job's id."""
    blocking = records.delete_if_unused("job", job)
    if blocking is None:
        for prefix in job_prefixes(job["id"]):
            storage.delete_prefix(prefix)
    return blocking


def expire_jobs(records: Records, storage, retention_days: float) -> list[str]:
    """Purge the jobs that finished more than `retention_days` ago (a batch of them); ids purged."""
    purged = []
    for job_id in records.finished_before(now() - retention_days * 86400):
        job = records.get_job(job_id)
        if job is None:
            records.forget_finished(job_id)
        elif purge_job(records, storage, job) is None:
            purged.append(job_id)
    return purged
