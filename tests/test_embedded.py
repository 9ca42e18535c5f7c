"""`make run`'s service: python -m service.embedded with no Redis or S3 configured."""

import os
import signal
import subprocess
import sys

import httpx

from tests.conftest import defect_mask, png_bytes, product_image, wait_for_job
from tests.processes import ROOT, free_port, wait_until


def _start(data_dir, port):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "STORAGE_URL", "API_KEYS", "SD_MODEL_DIR")}
    env.update(DATA_DIR=str(data_dir), PORT=str(port), WORKER_METRICS_PORT=str(free_port()), PYTHONUNBUFFERED="1")
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
