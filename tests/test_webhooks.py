"""Webhooks on job end, against a real local HTTP receiver, through the real API and worker
processes: signed, retried with backoff, the delivery state in the job, allow-listed hosts, and
a pending delivery that outlives its worker."""

import hashlib
import hmac
import json
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from service.errors import ApiError
from service.schemas import JobCreate
from service.settings import Settings, SettingsError, parse_allowed_hosts
from service.submission import build_job
from service.webhooks import callback_refusal
from tests.conftest import (
    WEBHOOK_SECRET,
    client_for,
    defect_mask,
    make_env,
    png_bytes,
    product_image,
    upload,
    wait_for_job,
)
from tests.processes import free_port, start_api, start_redis, start_worker, wait_until
from tests.receiver import Receiver


def _inputs(client, size=48):
    anomaly = upload(client, png_bytes(product_image(size, size)), png_bytes(defect_mask(size, size)), defect="pit")
    normal = upload(client, png_bytes(product_image(size, size, seed=4)))
    return anomaly.json()["id"], normal.json()["id"]


def _submit(client, inputs, callback_url, count=2):
    anomaly, normal = inputs
    body = {"kind": "generate", "method": "draem", "exemplars": [anomaly], "normals": [normal], "count": count,
            "masks": {"source": "exemplar"}}
    if callback_url:
        body["callback_url"] = callback_url
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _callback_settled(client, job_id, timeout=30):
    def settled():
        callback = client.get(f"/v1/jobs/{job_id}").json()["callback"]
        return callback if callback["status"] != "pending" else None

    return wait_until(settled, timeout, f"job {job_id}'s webhook to be delivered or fail", interval=0.1)


def _signed(body: bytes, secret: str = WEBHOOK_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_a_finished_job_is_posted_signed_with_its_json(acme):
    with Receiver() as receiver:
        job_id = _submit(acme, _inputs(acme), receiver.url + "/hooks/synth")
        assert acme.get(f"/v1/jobs/{job_id}").json()["callback"]["status"] == "pending"
        wait_for_job(acme, job_id)
        callback = _callback_settled(acme, job_id)
        [request] = receiver.requests_to("/hooks/synth")
    assert callback["status"] == "delivered" and callback["attempts"] == 1 and callback["last_status"] == 200
    assert request.headers["x-synth-event"] == "job.finished"
    assert request.headers["x-synth-delivery"] == callback["delivery_id"]
    assert request.headers["content-type"] == "application/json"
    # The signature is the HMAC of the raw body with WEBHOOK_SECRET, and no other key's.
    assert hmac.compare_digest(request.headers["x-synth-signature"], _signed(request.body))
    assert not hmac.compare_digest(request.headers["x-synth-signature"], _signed(request.body, "another-secret"))
    # The body is the job as GET /v1/jobs/{id} returns it (but for the delivery state, which has
    # moved on since), with the attempt's time to reject replays by.
    body = json.loads(request.body)
    job = acme.get(f"/v1/jobs/{job_id}").json()
    assert {k: v for k, v in body.items() if k != "callback"} == {k: v for k, v in job.items() if k != "callback"}
    assert body["status"] == "succeeded" and body["result"]["pairs"] == 2
    assert body["callback"]["status"] == "pending" and body["callback"]["attempts"] == 1
    assert body["finished_at"] <= body["callback"]["last_attempt_at"] <= request.at + 1
    assert callback["delivered_at"] >= body["callback"]["last_attempt_at"]


def test_a_receiver_failing_twice_gets_the_third_delivery(acme):
    with Receiver([500, 503]) as receiver:
        job_id = _submit(acme, _inputs(acme), receiver.url + "/flaky")
        wait_for_job(acme, job_id)
        callback = _callback_settled(acme, job_id)
        requests = receiver.requests_to("/flaky")
    assert [r.answered for r in requests] == [500, 503, 200]
    assert callback["status"] == "delivered" and callback["attempts"] == 3 and callback["last_status"] == 200
    assert [r.headers["x-synth-attempt"] for r in requests] == ["1", "2", "3"]
    assert len({r.headers["x-synth-delivery"] for r in requests}) == 1  # one delivery, tried three times
    assert all(hmac.compare_digest(r.headers["x-synth-signature"], _signed(r.body)) for r in requests)
    # Exponential backoff: WEBHOOK_BACKOFF (0.2 s here), then twice that.
    gaps = [later.at - earlier.at for earlier, later in zip(requests, requests[1:])]
    assert gaps[0] >= 0.2 - 0.05 and gaps[1] >= 0.4 - 0.05, gaps


def test_a_receiver_down_for_good_ends_failed(acme):
    closed_port = free_port()  # nothing listens there: every attempt is refused
    job_id = _submit(acme, _inputs(acme), f"http://127.0.0.1:{closed_port}/hook")
    wait_for_job(acme, job_id)
    # 6 attempts (WEBHOOK_MAX_ATTEMPTS' default), 0.2 + 0.4 + ... + 3.2 = 6.2 s of backoff
    callback = _callback_settled(acme, job_id, timeout=60)
    assert callback["status"] == "failed" and callback["attempts"] == 6
    assert callback["last_status"] is None and "Connect" in callback["last_error"]
    assert callback["next_attempt_at"] is None
    time.sleep(1)  # no further attempt is made
    assert acme.get(f"/v1/jobs/{job_id}").json()["callback"]["attempts"] == 6


def test_failed_and_cancelled_jobs_are_posted_too(acme, service_env):
    storage = Path(urlparse(service_env["STORAGE_URL"]).path)
    big = 256
    blocker_inputs = _inputs(acme, size=big)
    with Receiver() as receiver:
        blocker = _submit(acme, blocker_inputs, None, count=5000)  # keeps the worker busy meanwhile
        wait_until(lambda: acme.get(f"/v1/jobs/{blocker}").json()["status"] == "running", 30, "the blocker to run")
        cancelled = _submit(acme, _inputs(acme), receiver.url + "/cancelled")
        anomaly, normal = _inputs(acme)
        failing = _submit(acme, (anomaly, normal), receiver.url + "/failed")
        (storage / "exemplars" / normal / "image.png").unlink()  # lost before the job runs
        assert acme.delete(f"/v1/jobs/{cancelled}").json()["status"] == "cancelled"
        acme.delete(f"/v1/jobs/{blocker}")
        assert wait_for_job(acme, failing)["status"] == "failed"
        _callback_settled(acme, failing)
        _callback_settled(acme, cancelled)
        [on_cancel], [on_failure] = receiver.requests_to("/cancelled"), receiver.requests_to("/failed")
    assert json.loads(on_cancel.body)["status"] == "cancelled"
    failure = json.loads(on_failure.body)
    assert failure["status"] == "failed" and failure["error"]["code"] == "job_failed"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",  # a private network that is not listed
        "http://169.254.169.254/latest/meta-data",  # a cloud metadata service
        "http://mes.invalid/hook",  # a name that is neither listed nor resolves into a listed network
        "ftp://127.0.0.1/hook",
        "/relative/hook",
    ],
)
def test_callback_hosts_outside_the_allow_list_are_refused(acme, url):
    before = acme.get("/v1/jobs", params={"limit": 5}).json()["items"]
    anomaly, normal = _inputs(acme)
    response = acme.post("/v1/jobs", json={"kind": "generate", "method": "draem", "exemplars": [anomaly],
                                           "normals": [normal], "count": 1, "callback_url": url})
    assert response.status_code == 422 and response.json()["error"]["code"] == "callback_not_allowed", response.text
    assert acme.get("/v1/jobs", params={"limit": 5}).json()["items"] == before  # nothing was queued


def test_allowed_hosts_are_names_and_networks(monkeypatch):
    allowed = parse_allowed_hosts("mes.plant.example.com, *.line4.example.com, 10.20.0.0/16, 127.0.0.0/8")
    assert callback_refusal("https://mes.plant.example.com/hook", allowed) is None
    assert callback_refusal("http://press-2.line4.example.com:8080/hook", allowed) is None
    assert callback_refusal("http://line4.example.com.evil.test/hook", allowed) is not None
    assert callback_refusal("http://10.20.3.4/hook", allowed) is None
    assert callback_refusal("http://10.21.0.1/hook", allowed) is not None
    assert callback_refusal("http://localhost:9000/hook", allowed) is None  # resolves into 127.0.0.0/8
    assert callback_refusal("http://localhost/hook", parse_allowed_hosts("10.0.0.0/8")) is not None
    monkeypatch.setenv("WEBHOOK_ALLOWED_HOSTS", "mes.example.com,not a host!")
    with pytest.raises(SettingsError, match="WEBHOOK_ALLOWED_HOSTS"):
        Settings.from_env()


def test_callbacks_need_a_webhook_secret():
    settings = Settings(webhook_secret=None)
    body = JobCreate(kind="generate", method="draem", normals=["n"], callback_url="http://127.0.0.1/hook")
    with pytest.raises(ApiError) as refused:
        build_job(settings, "t", body, lambda i: {"id": i, "kind": "normal", "product": "p"}, lambda i: None)
    assert refused.value.status == 409 and refused.value.code == "webhooks_unavailable"


def test_a_pending_delivery_survives_its_workers_death(tmp_path):
    """The receiver is down when the job ends; the worker that ran the job dies before the retry.
    Another worker, started later, makes the delivery: its state lives in Redis, not in a process."""
    redis_proc, redis_url = start_redis(tmp_path / "redis")
    env = make_env(redis_url, f"file://{tmp_path / 'storage'}", WEBHOOK_BACKOFF="4")
    api, base = start_api(env, tmp_path / "api.log")
    client = client_for(base, "acme")
    port = free_port()
    first = start_worker(env, tmp_path / "worker1.log", queues="gpu", name="first")
    second = None
    try:
        job_id = _submit(client, _inputs(client), f"http://127.0.0.1:{port}/hook")
        wait_for_job(client, job_id)
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["callback"]["attempts"] == 1, 30, "attempt 1")
        first.kill()
        with Receiver(port=port) as receiver:
            second = start_worker(env, tmp_path / "worker2.log", queues="gpu", name="second")
            callback = _callback_settled(client, job_id)
            [request] = receiver.requests_to("/hook")
        assert callback["status"] == "delivered" and callback["attempts"] == 2
        assert json.loads(request.body)["id"] == job_id
    finally:
        for proc in (second, api, redis_proc):
            if proc is not None:
                proc.stop()
