"""Cancel, a worker killed mid-job, and an API restart with jobs in flight, on real processes."""

import json
import shutil

import pytest
import redis

from tests.conftest import client_for, make_env, wait_for_job
from tests.long_jobs import long_job, long_job_inputs, running_with_progress
from tests.processes import start_api, start_redis, start_worker, wait_until


def test_cancel_running_and_queued_jobs(acme):
    inputs = long_job_inputs(acme)
    running = long_job(acme, inputs)
    queued = long_job(acme, inputs)
    wait_until(lambda: running_with_progress(acme, running), 30, "the first job to run")
    assert acme.get(f"/v1/jobs/{queued}").json()["status"] == "queued"

    response = acme.delete(f"/v1/jobs/{queued}")
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    response = acme.delete(f"/v1/jobs/{running}")
    assert response.status_code == 202
    job = wait_for_job(acme, running, timeout=5)  # "within a few seconds"
    assert job["status"] == "cancelled" and job["progress"]["done"] < 5000

    # the queued one never starts, even once the worker gets to its message
    job = wait_for_job(acme, queued, timeout=5)
    assert job["status"] == "cancelled" and job["started_at"] is None
    response = acme.delete(f"/v1/jobs/{running}")
    assert response.status_code == 409 and response.json()["error"]["code"] == "job_finished"


@pytest.fixture()
def isolated(tmp_path):
    """A Redis, storage and API of this test's own, with a short visibility timeout so that a job
    whose worker was killed comes back within seconds (in production it is hours)."""
    redis_proc, redis_url = start_redis(tmp_path / "redis")
    env = make_env(redis_url, f"file://{tmp_path / 'storage'}", JOB_TIME_LIMIT="30", VISIBILITY_TIMEOUT="35")
    api, base = start_api(env, tmp_path / "api.log")
    yield env, base, api
    api.stop()
    redis_proc.stop()


def test_a_killed_generate_job_resumes_where_it_stopped_without_duplicates(isolated, tmp_path):
    """The killed worker's job comes back through orphan recovery (its heartbeat stops), long before
    the broker's visibility timeout (600 s here) would have redelivered it. The new delivery keeps
    the pairs already stored and makes only the rest, byte-identical to an uninterrupted run."""
    env, base, _ = isolated
    env = dict(env, JOB_TIME_LIMIT="300", VISIBILITY_TIMEOUT="600", WORKER_HEARTBEAT="1")
    client = client_for(base, "acme")
    inputs = long_job_inputs(client)
    count = 200
    first = start_worker(env, tmp_path / "worker1.log", queues="gpu", name="doomed")
    job_id = long_job(client, inputs, count=count)
    at_kill = wait_until(lambda: (job := running_with_progress(client, job_id)) and job["progress"]["done"] >= 40
                         and job, 60, "the job to pass 40 pairs")
    first.kill()  # SIGKILL to the worker and its pool child: no chance to ack, requeue or clean up
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    images = tmp_path / "storage" / "jobs" / job_id / "images" / "pit"
    # A pair is complete once its manifest entry is written (last); the one the kill interrupted may
    # have its image without an entry, and is made again.
    entries = tmp_path / "storage" / "jobs" / job_id / "checkpoint" / "pairs"
    complete = [f"{entry.stem}.png" for entry in entries.glob("*.json")]
    kept = {name: images.joinpath(name).stat().st_mtime_ns for name in complete}
    assert len(kept) >= at_kill["progress"]["done"]

    second = start_worker(env, tmp_path / "worker2.log", queues="gpu", name="rescuer")
    lowest_done = count

    def finished():
        nonlocal lowest_done
        job = client.get(f"/v1/jobs/{job_id}").json()
        lowest_done = min(lowest_done, job["progress"]["done"])
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    try:
        job = wait_until(finished, 90, "the resumed job", interval=0.05)
        # An uninterrupted run of the same seed, over the pairs on both sides of the kill (a draem
        # pair depends on its index and seed alone, not on the job's count).
        compared = at_kill["progress"]["done"] + 20
        again = client.post("/v1/jobs", json={"kind": "generate", "method": "draem", "exemplars": [inputs[0]],
                                              "normals": [inputs[1]], "count": compared, "seed": job["seed"],
                                              "masks": {"source": "exemplar"}}).json()["id"]
        uninterrupted = wait_for_job(client, again, timeout=90)
    finally:
        second.stop()
    assert job["status"] == "succeeded" and uninterrupted["status"] == "succeeded", (job, uninterrupted)
    assert lowest_done >= at_kill["progress"]["done"]  # progress never went back
    # The pairs stored before the kill were kept, not made again.
    assert all(images.joinpath(name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    items = client.get(f"/v1/jobs/{job_id}/artifacts", params={"limit": 1000}).json()["items"]
    assert len([a for a in items if "/images/" in a["key"]]) == count
    assert len([a for a in items if "/masks/" in a["key"]]) == count
    assert not any("/checkpoint/" in a["key"] for a in items)
    manifest = json.loads(client.get(next(a["url"] for a in items if a["key"].endswith("manifest.json"))).content)
    assert sorted(p["index"] for p in manifest["pairs"]) == list(range(count))
    attempts = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True).hget(f"job:{job_id}", "attempts")
    assert json.loads(attempts) == 2
    reference = tmp_path / "storage" / "jobs" / again
    for folder, name in (("images", "{}.png"), ("masks", "{}_mask.png")):
        for index in range(compared):
            resumed_bytes = (tmp_path / "storage" / "jobs" / job_id / folder / "pit" / name.format(index)).read_bytes()
            assert resumed_bytes == (reference / folder / "pit" / name.format(index)).read_bytes()


def test_api_restart_keeps_jobs_in_flight(isolated, tmp_path):
    env, base, api = isolated
    client = client_for(base, "acme")
    inputs = long_job_inputs(client)
    job_id = long_job(client, inputs, count=40)
    api.kill()  # the API dies while the job is queued: no worker is running yet
    worker = start_worker(env, tmp_path / "worker.log", queues="gpu")
    new_api, new_base = start_api(env, tmp_path / "api2.log")
    try:
        restarted = client_for(new_base, "acme")
        job = wait_for_job(restarted, job_id, timeout=60)
        assert job["status"] == "succeeded" and job["result"]["pairs"] == 40
        assert job_id in [j["id"] for j in restarted.get("/v1/jobs").json()["items"]]
    finally:
        new_api.stop()
        worker.stop()


def test_open_service_refuses_public_bind(tmp_path):
    import subprocess
    import sys

    env = make_env("redis://127.0.0.1:1/0", f"file://{tmp_path}", HOST="0.0.0.0")
    env.pop("API_KEYS")
    result = subprocess.run(
        [sys.executable, "-m", "service.serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "API_KEYS" in result.stderr


def test_failing_job_is_marked_failed_with_an_actionable_message(isolated, tmp_path):
    env, base, _ = isolated
    client = client_for(base, "acme")
    anomaly, normal = long_job_inputs(client)
    job_id = long_job(client, (anomaly, normal), count=3)
    shutil.rmtree(tmp_path / "storage" / "exemplars" / normal)  # lost before any worker ran the job
    worker = start_worker(env, tmp_path / "worker.log", queues="gpu")
    try:
        job = wait_for_job(client, job_id, timeout=60)
    finally:
        worker.stop()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "job_failed"
    assert normal in job["error"]["message"] and "upload" in job["error"]["message"]


def test_job_over_the_time_limit_fails_with_a_message(isolated, tmp_path):
    env, base, _ = isolated
    client = client_for(base, "acme")
    job_id = long_job(client, long_job_inputs(client), count=5000)
    worker = start_worker(dict(env, JOB_TIME_LIMIT="2", VISIBILITY_TIMEOUT="35"), tmp_path / "worker.log", queues="gpu")
    try:
        job = wait_for_job(client, job_id, timeout=60)
    finally:
        worker.stop()
    assert job["status"] == "failed" and job["error"]["code"] == "time_limit"
    assert "JOB_TIME_LIMIT" in job["error"]["message"]
