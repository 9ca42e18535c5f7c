"""Job records on a real Redis: exclusive claims and orphan requeue."""

import pytest

from service.records import RUNNING_SET, Records, connect, new_id, now


@pytest.fixture()
def records(redis_url):
    client = connect(redis_url.rsplit("/", 1)[0] + "/2")  # a database of its own
    client.flushdb()
    return Records(client)


def _job(records, status="queued"):
    job = {"id": new_id(), "tenant": "t", "kind": "generate", "status": status, "created_at": now(),
           "heartbeat_at": None}
    records.create_job(job)
    return job["id"]


def test_claim_is_exclusive_while_the_worker_beats(records):
    job_id = _job(records)
    assert records.claim(job_id, stale_before=now() - 60, attempts=1)
    assert records.get_job(job_id)["status"] == "running"
    assert job_id in records.redis.smembers(RUNNING_SET)
    # a second delivery while the first worker's heartbeat is fresh gives way
    assert not records.claim(job_id, stale_before=now() - 60, attempts=2)
    # once the heartbeat is older than the limit, the job can be taken over
    assert records.claim(job_id, stale_before=now() + 1, attempts=2)
    assert records.get_job(job_id)["attempts"] == 2


def test_finished_jobs_cannot_be_claimed_and_leave_the_running_set(records):
    job_id = _job(records)
    assert records.claim(job_id, stale_before=now() - 60)
    assert records.transition(job_id, ("running",), status="succeeded")
    assert job_id not in records.redis.smembers(RUNNING_SET)
    assert not records.claim(job_id, stale_before=now() + 1)


def test_only_orphans_are_requeued(records):
    orphan, alive = _job(records), _job(records)
    records.claim(orphan, stale_before=now() - 60)
    records.claim(alive, stale_before=now() - 60)
    records.update_job(orphan, heartbeat_at=now() - 120)
    requeued = records.requeue_orphans(stale_before=now() - 60)
    assert [j["id"] for j in requeued] == [orphan] and requeued[0]["status"] == "queued"
    assert records.get_job(alive)["status"] == "running"
    assert records.requeue_orphans(stale_before=now() - 60) == []  # requeued once, not twice
