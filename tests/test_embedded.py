"""`make run`'s service: python -m service.embedded with no Redis or S3 configured."""

import json
import os
import re
import signal
import subprocess
import sys

import httpx

from tests.conftest import defect_mask, png_bytes, product_image, wait_for_job
from tests.long_jobs import long_job, running_with_progress
from tests.processes import ROOT, free_port, wait_until


def _start(data_dir, port, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "STORAGE_URL", "API_KEYS", "SD_MODEL_DIR")}
    env.update(DATA_DIR=str(data_dir), PORT=str(port), WORKER_METRICS_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    env.update(extra_env)
    log = open(data_dir.parent / f"embedded-{port}.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.embedded"],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, (data_dir.parent / f"embedded-{port}.log").read_text()
        try:
            return httpx.get(base + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, 60, "the embedded service")
    return proc, base


def _stop(proc):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_embedded_service_runs_jobs_and_keeps_them_across_restarts(tmp_path):
    data_dir = tmp_path / "data"
    proc, base = _start(data_dir, free_port())
    try:
        client = httpx.Client(base_url=base, timeout=30)  # no keys: loopback, no auth header
        anomaly = client.post(
            "/v1/exemplars",
            files={
                "image": ("a.png", png_bytes(product_image(64, 64))),
                "mask": ("m.png", png_bytes(defect_mask(64, 64))),
            },
            data={"product": "p", "defect": "d"},
        ).json()
        normal = client.post(
            "/v1/exemplars", files={"image": ("n.png", png_bytes(product_image(64, 64, seed=2)))}, data={"product": "p"}
        ).json()
        job_id = client.post(
            "/v1/jobs",
            json={
                "kind": "generate",
                "method": "draem",
                "count": 5,
                "exemplars": [anomaly["id"]],
                "normals": [normal["id"]],
            },
        ).json()["id"]
        assert wait_for_job(client, job_id)["status"] == "succeeded"
        # no SD_MODEL_DIR here: diffusion methods are listed as unavailable, with the reason, and refused
        anogen = next(m for m in client.get("/v1/methods").json()["items"] if m["name"] == "anogen")
        assert anogen["available"] is False and "SD_MODEL_DIR" in anogen["reason"]
        response = client.post("/v1/jobs", json={"kind": "finetune", "method": "anogen", "exemplars": [anomaly["id"]]})
        assert response.status_code == 409 and response.json()["error"]["code"] == "method_unavailable"
        assert "SD_MODEL_DIR" in response.json()["error"]["message"]
    finally:
        _stop(proc)
    assert (data_dir / "storage" / "jobs" / job_id / "manifest.json").is_file()
    assert (data_dir / "redis").is_dir()

    proc, base = _start(data_dir, free_port())  # a new Redis process reads the append-only file back
    try:
        client = httpx.Client(base_url=base, timeout=30)
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded" and job["result"]["pairs"] == 5
        assert len(client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]) == 5 * 4 + 2
        assert [e["id"] for e in client.get("/v1/exemplars").json()["items"]] == [normal["id"], anomaly["id"]]
    finally:
        _stop(proc)


def _pids(log_path, part: str) -> list[int]:
    return [int(pid) for pid in re.findall(rf"{part} started \(pid (\d+)", log_path.read_text())]


def _restarted(log_path, part: str, old_pid: int) -> int | None:
    pids = _pids(log_path, part)
    return pids[-1] if pids and pids[-1] != old_pid else None


def test_embedded_service_restarts_what_dies_and_recovers_the_running_job(tmp_path):
    """SIGKILL the gpu worker mid-job, then the API, then Redis: each is restarted and logged, the
    job finishes exactly once over, and nothing submitted is lost."""
    data_dir, port = tmp_path / "data", free_port()
    proc, base = _start(data_dir, port, WORKER_HEARTBEAT="1")
    log_path = data_dir.parent / f"embedded-{port}.log"
    try:
        client = httpx.Client(base_url=base, timeout=30)
        worker_pid, api_pid = _pids(log_path, "gpu worker")[-1], _pids(log_path, "api")[-1]
        # the workers run below the API's CPU priority
        api_niceness = os.getpriority(os.PRIO_PROCESS, api_pid)
        assert os.getpriority(os.PRIO_PROCESS, worker_pid) == min(19, api_niceness + 10)

        side = 384
        anomaly = client.post(
            "/v1/exemplars",
            files={"image": ("a.png", png_bytes(product_image(side, side))),
                   "mask": ("m.png", png_bytes(defect_mask(side, side)))},
            data={"product": "p", "defect": "d"},
        ).json()["id"]
        normal = client.post(
            "/v1/exemplars", files={"image": ("n.png", png_bytes(product_image(side, side, seed=2)))},
            data={"product": "p"},
        ).json()["id"]
        count = 150
        job_id = long_job(client, (anomaly, normal), count=count)
        wait_until(lambda: running_with_progress(client, job_id), 60, "the job to run")

        os.killpg(worker_pid, signal.SIGKILL)
        wait_until(lambda: _restarted(log_path, "gpu worker", worker_pid), 30, "the gpu worker to restart")
        assert f"gpu worker (pid {worker_pid}) exited" in log_path.read_text()
        job = wait_for_job(client, job_id, timeout=180)
        assert job["status"] == "succeeded" and job["result"]["pairs"] == count
        items = client.get(f"/v1/jobs/{job_id}/artifacts", params={"limit": 1000}).json()["items"]
        assert len([a for a in items if "/images/" in a["key"]]) == count
        manifest = json.loads(client.get(next(a["url"] for a in items if a["key"].endswith("manifest.json"))).content)
        assert sorted(p["index"] for p in manifest["pairs"]) == list(range(count))

        os.killpg(api_pid, signal.SIGKILL)
        wait_until(lambda: _restarted(log_path, "api", api_pid), 30, "the API to restart")
        wait_until(lambda: _answers(base + "/healthz"), 30, "the restarted API to answer")

        redis_pid = _pids(log_path, "redis")[-1]
        os.killpg(redis_pid, signal.SIGKILL)
        wait_until(lambda: _restarted(log_path, "redis", redis_pid), 30, "Redis to restart")
        wait_until(lambda: _answers(base + "/readyz"), 30, "the API to reach the new Redis")
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"  # read back from its file
    finally:
        _stop(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
