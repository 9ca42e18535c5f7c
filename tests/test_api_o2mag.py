"""O2MAG through the API with a real worker: reference anomalies, three normals, no fine-tune job.

The model is the tiny random-weight SD of tests/conftest.py, loaded by the worker's production loader."""

import io
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image, ImageFilter

from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job
from tests.processes import wait_until

TINY = {"resolution": 64, "num_inference_steps": 4, "guidance_scale": 3.0, "ago_steps": 3, "mask_dilation": 2}


def _inputs(client, seed=0):
    reference = upload(client, png_bytes(product_image(64, 72, rgb=True, seed=seed)), png_bytes(defect_mask(64, 72)),
                       defect="chip").json()
    normals = [upload(client, png_bytes(product_image(64, 72, rgb=True, seed=s))).json()["id"] for s in (11, 12, 13)]
    return reference["id"], normals


def _cached_embeddings(service_env) -> dict[Path, tuple[int, int]]:
    """Each cached AGO embedding with its inode and modification time: storage writes a new file
    (then renames it) on every put, so a re-optimised embedding would change both."""
    root = Path(urlparse(service_env["STORAGE_URL"]).path) / "cache" / "o2mag"
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.safetensors")}


def test_generate_from_one_reference_and_three_normals(acme, service_env):
    reference, normals = _inputs(acme)
    body = {"kind": "generate", "method": "o2mag", "exemplars": [reference], "normals": normals, "count": 5,
            "seed": 4, "params": TINY}
    response = acme.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(acme, response.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    prefix = f"jobs/{job['id']}/"
    manifest = acme.get(items[prefix + "manifest.json"]).json()
    assert sorted(p["index"] for p in manifest["pairs"]) == list(range(5))
    assert {p["normal"] for p in manifest["pairs"]} == set(normals)
    for pair in manifest["pairs"]:
        image = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["image"]]).content)))
        mask = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["mask"]]).content))) > 0
        source = product_image(64, 72, rgb=True, seed=(11, 12, 13)[normals.index(pair["normal"])])
        assert image.shape == source.shape and mask.any()
        # outside the mask dilated by mask_dilation (2 px) the pixels are the normal image's
        far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(5)))
        assert np.array_equal(image[far], source[far])

    # The AGO embedding of this reference was cached; a second job on it reads it and writes nothing.
    cached = _cached_embeddings(service_env)
    assert len(cached) >= 1
    again = wait_for_job(acme, acme.post("/v1/jobs", json=body | {"count": 1}).json()["id"], timeout=120)
    assert again["status"] == "succeeded" and _cached_embeddings(service_env) == cached


def test_progress_moves_and_cancel_works(acme):
    reference, normals = _inputs(acme, seed=1)
    job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "o2mag", "exemplars": [reference],
                                         "normals": normals, "count": 300,
                                         "params": TINY | {"num_inference_steps": 10}}).json()["id"]
    seen = set()

    def moved():
        job = acme.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running":
            seen.add((job["progress"]["stage"], job["progress"]["done"]))
        return len(seen) >= 2

    wait_until(moved, 90, "progress to move")
    assert acme.delete(f"/v1/jobs/{job_id}").status_code == 202
    assert wait_for_job(acme, job_id, timeout=15)["status"] == "cancelled"


def test_outputs_are_spread_over_several_references_and_none_is_refused(acme):
    reference, normals = _inputs(acme, seed=2)
    other, _ = _inputs(acme, seed=3)
    body = {"kind": "generate", "method": "o2mag", "normals": normals[:1], "count": 4, "seed": 1, "params": TINY}
    response = acme.post("/v1/jobs", json=body | {"exemplars": []})
    assert response.status_code == 422 and response.json()["error"]["code"] == "references_required"

    job = wait_for_job(acme, acme.post("/v1/jobs", json=body | {"exemplars": [reference, other]}).json()["id"],
                       timeout=180)
    assert job["status"] == "succeeded", job
    manifest = acme.get(f"/v1/jobs/{job['id']}/artifacts/jobs/{job['id']}/manifest.json").json()
    assert [p["reference"] for p in manifest["pairs"]] == [reference, other, reference, other]
