"""The whole path through real processes: upload, generate, poll, list and download pairs."""

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _make_inputs(client, rgb: bool, size=(96, 160), fmt="PNG"):
    height, width = size
    normal = product_image(height, width, rgb=rgb, seed=1)
    anomaly = product_image(height, width, rgb=rgb, seed=2)
    mask = defect_mask(height, width)
    exemplar = upload(client, png_bytes(anomaly, fmt), png_bytes(mask), defect="scratch", name=f"a.{fmt.lower()}")
    assert exemplar.status_code == 201, exemplar.text
    normals = [upload(client, png_bytes(product_image(height, width, rgb=rgb, seed=s), fmt)) for s in (3, 4)]
    assert all(n.status_code == 201 for n in normals)
    return exemplar.json(), [n.json() for n in normals], normal


@pytest.mark.parametrize(
    "method,rgb,fmt,masks",
    [
        ("draem", False, "PNG", {"source": "exemplar"}),
        ("draem", True, "JPEG", {"source": "native"}),
        ("cutpaste", True, "BMP", {"source": "box"}),
        ("cutpaste", False, "TIFF", {}),
    ],
)
def test_generate_job_writes_count_valid_pairs(acme, method, rgb, fmt, masks):
    exemplar, normals, _ = _make_inputs(acme, rgb, fmt=fmt)
    assert exemplar["kind"] == "anomaly" and exemplar["width"] == 160 and exemplar["height"] == 96
    assert exemplar["mode"] == ("RGB" if rgb else "L")
    response = acme.post(
        "/v1/jobs",
        json={
            "kind": "generate",
            "method": method,
            "exemplars": [exemplar["id"]],
            "normals": [n["id"] for n in normals],
            "count": 6,
            "seed": 11,
            "masks": masks,
        },
    )
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    job = wait_for_job(acme, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == {"fraction": 1.0, "stage": "done", "done": 6, "total": 6}
    assert job["started_at"] >= job["created_at"] and job["finished_at"] >= job["started_at"]

    artifacts = acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]
    keys = {a["key"] for a in artifacts}
    prefix = f"jobs/{job['id']}/"
    assert keys == {prefix + "manifest.json", prefix + "preview.png"} | {
        prefix + f"images/scratch/{n}.png" for n in range(6)
    } | {prefix + f"masks/scratch/{n}_mask.png" for n in range(6)} | {
        prefix + f"thumbs/scratch/{n}{suffix}" for n in range(6) for suffix in (".jpg", "_mask.png")
    }

    urls = {a["key"]: a["url"] for a in artifacts}
    manifest = acme.get(urls[prefix + "manifest.json"]).json()
    assert [p["index"] for p in manifest["pairs"]] == list(range(6))
    assert manifest["method"] == method and manifest["seed"] == 11
    for pair in manifest["pairs"]:
        image = _decode(acme.get(urls[prefix + pair["image"]]).content)
        mask = np.asarray(_decode(acme.get(urls[prefix + pair["mask"]]).content))
        source_index = [n["id"] for n in normals].index(pair["normal"])
        source = product_image(96, 160, rgb=rgb, seed=(3, 4)[source_index])
        if fmt == "JPEG":  # the service stores what it decoded; compare against that
            source = np.asarray(_decode(png_bytes(source, "JPEG")))
        assert image.size == (160, 96) and image.mode == ("RGB" if rgb else "L")
        assert mask.shape == (96, 160) and set(np.unique(mask)) <= {0, 255} and mask.any()
        outside = mask == 0
        assert np.array_equal(np.asarray(image)[outside], source[outside]), "pixels outside the mask changed"
        assert np.abs(np.asarray(image, float)[~outside] - source[~outside]).mean() > 0, "nothing painted"
    preview = _decode(acme.get(urls[prefix + "preview.png"]).content)
    assert preview.mode == "RGB" and preview.width > 100


def test_same_seed_gives_the_same_pairs(acme):
    exemplar, normals, _ = _make_inputs(acme, rgb=False)
    body = {
        "kind": "generate",
        "method": "draem",
        "exemplars": [exemplar["id"]],
        "normals": [normals[0]["id"]],
        "count": 2,
        "seed": 5,
        "masks": {"source": "exemplar"},
    }
    first, second = (wait_for_job(acme, acme.post("/v1/jobs", json=body).json()["id"]) for _ in range(2))
    key = "images/scratch/1.png"
    a = acme.get(f"/v1/jobs/{first['id']}/artifacts/jobs/{first['id']}/{key}").content
    b = acme.get(f"/v1/jobs/{second['id']}/artifacts/jobs/{second['id']}/{key}").content
    assert a == b


def test_multipart_shortcut_and_listing(acme):
    files = [
        ("image", ("a.png", png_bytes(product_image(64, 64, seed=7)))),
        ("mask", ("m.png", png_bytes(defect_mask(64, 64)))),
        ("normal", ("n1.png", png_bytes(product_image(64, 64, seed=8)))),
        ("normal", ("n2.png", png_bytes(product_image(64, 64, seed=9)))),
    ]
    data = {"method": "cutpaste", "count": "3", "params": json.dumps({"variant": "scar"}), "defect": "dent"}
    response = acme.post("/v1/jobs/generate", files=files, data=data)
    assert response.status_code == 202, response.text
    job = wait_for_job(acme, response.json()["id"])
    assert job["status"] == "succeeded" and job["result"]["pairs"] == 3
    assert len(job["normals"]) == 2 and job["params"]["variant"] == "scar"
    listed = acme.get("/v1/jobs", params={"status": "succeeded", "kind": "generate", "limit": 500}).json()["items"]
    assert job["id"] in [j["id"] for j in listed]
    assert all(j["status"] == "succeeded" for j in listed)
    exemplars = acme.get("/v1/exemplars", params={"product": "adhoc", "defect": "dent"}).json()["items"]
    assert job["exemplars"][0] in [e["id"] for e in exemplars]


def test_methods_health_and_docs(acme, api_url):
    methods = {m["name"]: m for m in acme.get("/v1/methods").json()["items"]}
    assert methods["draem"]["available"] and methods["draem"]["family"] == "model-free"
    assert "opacity" in methods["draem"]["params_schema"]["properties"]
    assert httpx.get(api_url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(api_url + "/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "storage": "ok"}
    spec = httpx.get(api_url + "/openapi.json").json()
    assert "/v1/jobs/{job_id}/artifacts" in spec["paths"] and "/v1/jobs/generate" in spec["paths"]
    assert httpx.get(api_url + "/docs").status_code == 200


def test_prometheus_metrics_from_api_and_worker(acme, api_url, service_env):
    exemplar, normals, _ = _make_inputs(acme, rgb=False)
    job_id = acme.post(
        "/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normals[0]["id"]], "count": 2}
    ).json()["id"]
    assert wait_for_job(acme, job_id)["status"] == "succeeded"
    api_metrics = httpx.get(api_url + "/metrics").text
    assert 'synth_http_requests_total{method="GET",route="/v1/jobs/{job_id}",status="200"}' in api_metrics
    assert 'synth_jobs_submitted_total{kind="generate",method="draem"}' in api_metrics
    assert 'synth_queue_depth{queue="gpu"}' in api_metrics
    assert "synth_http_request_duration_seconds_bucket" in api_metrics
    worker_metrics = httpx.get(f"http://127.0.0.1:{service_env['WORKER_METRICS_PORT']}/metrics").text
    assert 'synth_jobs_finished_total{kind="generate",method="draem",status="succeeded"}' in worker_metrics
    assert 'synth_pairs_generated_total{method="draem"}' in worker_metrics
    assert "synth_job_duration_seconds_bucket" in worker_metrics
