"""Faults on real processes: Redis paused or gone, and a job whose worker died being cancelled."""

import os
import signal
import time

import httpx
import pytest

from tests.conftest import client_for, make_env, png_bytes, product_image, upload
from tests.processes import start_api, start_redis, start_worker, wait_until
from tests.test_job_lifecycle import _inputs, _long_job, _running_with_progress


@pytest.fixture()
def own_service(tmp_path):
    """A Redis and API of this test's own (the test pauses and kills that Redis). Heartbeats every
    second, so a killed worker's job is an orphan after 4 s."""
    redis_proc, redis_url = start_redis(tmp_path / "redis")
    env = make_env(redis_url, f"file://{tmp_path / 'storage'}", WORKER_HEARTBEAT="1")
    api, base = start_api(env, tmp_path / "api.log")
    yield env, base, redis_proc
    api.stop()
    redis_proc.stop()


def _timed(call):
    start = time.perf_counter()
    response = call()
    return response, time.perf_counter() - start


def _data_routes(client, job_id, normal_id):
    body = {"kind": "generate", "method": "draem", "normals": [normal_id], "count": 1}
    return {
        "poll": lambda: client.get(f"/v1/jobs/{job_id}"),
        "list jobs": lambda: client.get("/v1/jobs"),
        "submit": lambda: client.post("/v1/jobs", json=body),
        "cancel": lambda: client.delete(f"/v1/jobs/{job_id}"),
        "list exemplars": lambda: client.get("/v1/exemplars"),
        "upload": lambda: upload(client, png_bytes(product_image(32, 32))),
        "artifacts": lambda: client.get(f"/v1/jobs/{job_id}/artifacts"),
    }


@pytest.mark.parametrize("fault", ["paused", "stopped"])
def test_with_redis_unreachable_data_routes_are_503_within_2_s_and_health_stays_fast(own_service, fault):
    env, base, redis_proc = own_service
    client = client_for(base, "acme")
    normal = upload(client, png_bytes(product_image(32, 32))).json()["id"]
    job_id = client.post(
        "/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normal], "count": 1}
    ).json()["id"]
    before = len(client.get("/v1/jobs").json()["items"])

    if fault == "paused":  # up but answering nothing: the case a timeout must catch
        os.killpg(redis_proc.popen.pid, signal.SIGSTOP)
    else:
        redis_proc.stop()
    try:
        for name, call in _data_routes(client, job_id, normal).items():
            response, seconds = _timed(call)
            assert response.status_code == 503, (name, response.text)
            assert response.json()["error"]["code"] == "store_unavailable", name
            assert seconds < 2.0, (name, seconds)
            health, health_seconds = _timed(lambda: httpx.get(base + "/healthz", timeout=5))
            assert health.status_code == 200 and health_seconds < 0.5, health_seconds
        ready = httpx.get(base + "/readyz", timeout=10)
        assert ready.status_code == 503
        assert ready.json()["error"]["checks"]["redis"].startswith("down")
        assert ready.json()["error"]["checks"]["storage"] == "ok"
    finally:
        if fault == "paused":
            os.killpg(redis_proc.popen.pid, signal.SIGCONT)
    if fault == "paused":  # back as soon as Redis answers again, and the failed submit created nothing
        wait_until(lambda: client.get("/v1/jobs").status_code == 200, 10, "the API to reach Redis again")
        assert len(client.get("/v1/jobs").json()["items"]) == before
        assert httpx.get(base + "/readyz", timeout=5).status_code == 200


def test_cancelling_a_job_whose_worker_died_cancels_it_at_once(own_service, tmp_path):
    env, base, _ = own_service
    client = client_for(base, "acme")
    inputs = _inputs(client)
    worker = start_worker(dict(env, WORKER_HEARTBEAT="1"), tmp_path / "worker.log", queues="gpu", name="doomed")
    job_id = _long_job(client, inputs, count=5000)
    wait_until(lambda: _running_with_progress(client, job_id), 30, "the job to run")
    worker.kill()  # SIGKILL: no live worker is left to see the cancel request
    # Its heartbeat is still fresh: it might be alive, so it is only asked to stop at its next step.
    response = client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 202 and response.json()["status"] == "running"
    time.sleep(5)  # 4 heartbeats without a beat: the worker is taken for dead
    response, seconds = _timed(lambda: client.delete(f"/v1/jobs/{job_id}"))
    assert response.status_code == 202 and response.json()["status"] == "cancelled", response.text
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 409
    # a live worker's orphan sweep leaves it cancelled: it is no longer in the running set
    rescuer = start_worker(dict(env, WORKER_HEARTBEAT="1"), tmp_path / "worker2.log", queues="gpu", name="rescuer")
    try:
        time.sleep(3)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"
    finally:
        rescuer.stop()
