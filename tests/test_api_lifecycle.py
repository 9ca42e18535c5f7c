"""Reading and deleting what a tenant stored, through the real API and worker: exemplar records and
downloads, DELETE of exemplars and datasets (409 `in_use` while a job reads them), purging jobs,
and RETENTION_DAYS. After each delete the storage is listed: it holds exactly the objects of the
records that remain."""

import io
import json
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from service.records import Records, connect, new_id, now
from tests.archive_mutations import zip_bytes
from tests.conftest import client_for, defect_mask, make_env, png_bytes, product_image, upload, wait_for_job
from tests.processes import start_api, start_redis, start_worker, wait_until
from tests.test_api_datasets import good_layout

BIG = 256


@pytest.fixture(scope="module")
def storage_root(service_env) -> Path:
    return Path(urlparse(service_env["STORAGE_URL"]).path)


@pytest.fixture(scope="module")
def records(redis_url) -> Records:
    return Records(connect(redis_url))


def stored_keys(root: Path, kind: str, record_id: str) -> set[str]:
    folder = root / kind / record_id
    return {p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def assert_storage_agrees(root: Path, records: Records, exemplars=(), datasets=(), jobs=()):
    """Every record left has all its objects; every deleted one has none (nor does its job's adapter)."""
    for kind, ids in (("exemplar", exemplars), ("dataset", datasets)):
        for record_id in ids:
            raw = records.redis.get(f"{kind}:{record_id}")
            keys = stored_keys(root, f"{kind}s", record_id)
            if raw is None:
                assert keys == set(), f"{kind} {record_id} is deleted but its objects remain: {keys}"
            else:
                record = json.loads(raw)
                expected = {record.get("image_key"), record.get("mask_key"), record.get("archive_key")} - {None}
                assert keys == expected, f"{kind} {record_id}: stored {keys}, record names {expected}"
    for job_id in jobs:
        keys = stored_keys(root, "jobs", job_id) | stored_keys(root, "adapters", job_id)
        if records.get_job(job_id) is None:
            assert keys == set(), f"job {job_id} is purged but its objects remain: {keys}"
        elif records.get_job_field(job_id, "status") == "succeeded":
            assert f"jobs/{job_id}/manifest.json" in keys


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _exemplar_pair(client, size=48, product="life"):
    image, mask = product_image(size, size, seed=7), defect_mask(size, size)
    anomaly = upload(client, png_bytes(image), png_bytes(mask), product=product, defect="dent").json()
    normal = upload(client, png_bytes(product_image(size, size, seed=8)), product=product).json()
    return anomaly, normal, image, mask


def _generate(client, anomaly, normal, count=3):
    body = {"kind": "generate", "method": "draem", "exemplars": [anomaly["id"]], "normals": [normal["id"]],
            "count": count, "masks": {"source": "exemplar"}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def _running(client, job_id):
    return wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running", 30, "the job to run")


def test_exemplar_record_and_downloads(acme, globex):
    anomaly, normal, image, mask = _exemplar_pair(acme)
    assert acme.get(f"/v1/exemplars/{anomaly['id']}").json() == anomaly
    downloaded = acme.get(f"/v1/exemplars/{anomaly['id']}/image")
    assert downloaded.status_code == 200 and downloaded.headers["content-type"] == "image/png"
    assert np.array_equal(_decode(downloaded.content), image)
    assert np.array_equal(_decode(acme.get(f"/v1/exemplars/{anomaly['id']}/mask").content), mask)
    response = acme.get(f"/v1/exemplars/{normal['id']}/mask")
    assert response.status_code == 404 and response.json()["error"]["code"] == "no_mask"
    for path in ("", "/image", "/mask"):
        response = globex.get(f"/v1/exemplars/{anomaly['id']}{path}")
        assert response.status_code == 404 and response.json()["error"]["code"] == "exemplar_not_found"
    assert globex.delete(f"/v1/exemplars/{anomaly['id']}").status_code == 404


def test_deleting_exemplars_and_datasets(acme, storage_root, records):
    anomaly, normal, _, _ = _exemplar_pair(acme)
    dataset = acme.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(good_layout()))},
                        data={"product": "life"}).json()
    ids = {"exemplars": [anomaly["id"], normal["id"]], "datasets": [dataset["id"]]}
    assert_storage_agrees(storage_root, records, **ids)
    assert acme.delete(f"/v1/exemplars/{anomaly['id']}").status_code == 204
    assert acme.get(f"/v1/exemplars/{anomaly['id']}").status_code == 404
    assert anomaly["id"] not in [e["id"] for e in acme.get("/v1/exemplars", params={"product": "life"}).json()["items"]]
    assert_storage_agrees(storage_root, records, **ids)
    assert acme.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert dataset["id"] not in [d["id"] for d in acme.get("/v1/datasets", params={"limit": 1000}).json()["items"]]
    assert_storage_agrees(storage_root, records, **ids)
    response = acme.delete(f"/v1/datasets/{dataset['id']}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "dataset_not_found"
    # A job may no longer name the deleted exemplar.
    response = acme.post("/v1/jobs", json={"kind": "generate", "method": "draem", "exemplars": [anomaly["id"]],
                                           "normals": [normal["id"]], "count": 1})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_exemplar"


def test_inputs_of_queued_or_running_jobs_are_in_use(acme, storage_root, records):
    anomaly, normal, _, _ = _exemplar_pair(acme, size=BIG)
    running = _generate(acme, anomaly, normal, count=5000)
    _running(acme, running)
    finished_inputs = _exemplar_pair(acme)
    done = _generate(acme, *finished_inputs[:2])  # queued behind the running one
    dataset = acme.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(good_layout()))},
                        data={"product": "life"}).json()
    evaluate = acme.post("/v1/jobs", json={"kind": "evaluate", "dataset": dataset["id"], "generated": []})
    assert evaluate.status_code == 202, evaluate.text
    for path in (f"/v1/exemplars/{anomaly['id']}", f"/v1/exemplars/{normal['id']}", f"/v1/datasets/{dataset['id']}"):
        response = acme.delete(path)
        assert response.status_code == 409 and response.json()["error"]["code"] == "in_use", path
    ids = {"exemplars": [anomaly["id"], normal["id"]], "datasets": [dataset["id"]], "jobs": [running, done]}
    assert_storage_agrees(storage_root, records, **ids)
    acme.delete(f"/v1/jobs/{evaluate.json()['id']}")
    acme.delete(f"/v1/jobs/{running}")
    assert wait_for_job(acme, running)["status"] == "cancelled"
    assert acme.delete(f"/v1/exemplars/{normal['id']}").status_code == 204  # no longer in use
    assert acme.delete(f"/v1/datasets/{dataset['id']}").status_code == 204
    assert_storage_agrees(storage_root, records, **ids)
    assert wait_for_job(acme, done)["status"] == "succeeded"


def test_purging_finished_queued_and_running_jobs(acme, storage_root, records):
    anomaly, normal, _, _ = _exemplar_pair(acme, size=BIG)
    finished = _generate(acme, anomaly, normal)
    assert wait_for_job(acme, finished)["status"] == "succeeded"
    running = _generate(acme, anomaly, normal, count=5000)
    _running(acme, running)
    queued = _generate(acme, anomaly, normal)
    jobs = [finished, running, queued]
    assert_storage_agrees(storage_root, records, jobs=jobs)

    response = acme.delete(f"/v1/jobs/{finished}", params={"purge": "true"})
    assert response.status_code == 202 and response.json() == {"id": finished, "status": "succeeded", "purged": True}
    assert acme.get(f"/v1/jobs/{finished}").status_code == 404
    assert_storage_agrees(storage_root, records, jobs=jobs)

    response = acme.delete(f"/v1/jobs/{queued}", params={"purge": "true"})
    assert response.json() == {"id": queued, "status": "cancelled", "purged": True}
    assert acme.get(f"/v1/jobs/{queued}").status_code == 404

    response = acme.delete(f"/v1/jobs/{running}", params={"purge": "true"})
    assert response.status_code == 202 and response.json() == {"id": running, "status": "running", "purged": False}
    wait_until(lambda: acme.get(f"/v1/jobs/{running}").status_code == 404, 15, "the worker to purge the job")
    assert_storage_agrees(storage_root, records, jobs=jobs)
    assert running not in [j["id"] for j in acme.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]]
    # The exemplars the jobs read are the tenant's to keep.
    assert acme.get(f"/v1/exemplars/{anomaly['id']}/image").status_code == 200


def test_a_job_whose_outputs_a_queued_job_reads_is_in_use(acme, storage_root, records):
    anomaly, normal, _, _ = _exemplar_pair(acme, size=BIG)
    generated = _generate(acme, *_exemplar_pair(acme)[:2])
    assert wait_for_job(acme, generated)["status"] == "succeeded"
    blocker = _generate(acme, anomaly, normal, count=5000)
    _running(acme, blocker)
    dataset = acme.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(good_layout()))},
                        data={"product": "life"}).json()
    evaluate = acme.post("/v1/jobs", json={"kind": "evaluate", "dataset": dataset["id"], "generated": [generated]})
    response = acme.delete(f"/v1/jobs/{generated}", params={"purge": "true"})
    assert response.status_code == 409 and response.json()["error"]["code"] == "in_use"
    assert evaluate.json()["id"] in response.json()["error"]["message"]
    assert_storage_agrees(storage_root, records, jobs=[generated])
    acme.delete(f"/v1/jobs/{evaluate.json()['id']}")
    acme.delete(f"/v1/jobs/{blocker}")
    assert acme.delete(f"/v1/jobs/{generated}", params={"purge": "true"}).json()["purged"] is True
    assert_storage_agrees(storage_root, records, jobs=[generated])


def test_a_job_is_not_created_on_an_input_deleted_after_its_check(records):
    """The window between a submit's checks and its write: create_job itself refuses."""
    exemplar = {"id": new_id(), "tenant": "t", "product": "p", "defect": None, "kind": "normal", "created_at": now()}
    records.put_record("exemplar", exemplar)
    job = {"id": new_id(), "tenant": "t", "kind": "generate", "status": "queued", "created_at": now(),
           "normals": [exemplar["id"]]}
    assert records.delete_if_unused("exemplar", exemplar) is None
    assert records.create_job(job, reads=[f"exemplar:{exemplar['id']}"]) == f"exemplar:{exemplar['id']}"
    assert records.get_job(job["id"]) is None and records.page("job", "t", {}, 10)[0] == []


def test_retention_removes_old_finished_jobs(tmp_path):
    redis_proc, redis_url = start_redis(tmp_path / "redis")
    retention_seconds = 3
    env = make_env(redis_url, f"file://{tmp_path / 'storage'}", RETENTION_DAYS=str(retention_seconds / 86400),
                   WORKER_HEARTBEAT="1")
    api, base = start_api(env, tmp_path / "api.log")
    worker = start_worker(env, tmp_path / "worker.log", queues="gpu")
    try:
        client = client_for(base, "acme")
        anomaly, normal, _, _ = _exemplar_pair(client)
        job_id = _generate(client, anomaly, normal)
        job = wait_for_job(client, job_id)
        assert job["status"] == "succeeded"
        assert (tmp_path / "storage" / "jobs" / job_id / "manifest.json").exists()
        wait_until(lambda: client.get(f"/v1/jobs/{job_id}").status_code == 404, 20, "retention to remove the job")
        assert now() - job["finished_at"] >= retention_seconds
        assert stored_keys(tmp_path / "storage", "jobs", job_id) == set()
        assert client.get(f"/v1/exemplars/{anomaly['id']}").status_code == 200  # inputs are kept
    finally:
        worker.stop()
        api.stop()
        redis_proc.stop()
