"""AnoGen through the API with a real worker: fine-tune -> adapter -> generate -> pairs.

The model is a tiny random-weight SD of the real architecture (models.diffusion.tiny), saved in
diffusers format and loaded by the worker through the production loader."""

import io

import numpy as np
from PIL import Image

from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job
from tests.processes import wait_until

TINY = {"resolution": 64, "num_inference_steps": 4, "guidance_scale": 3.0}


def _finetune(client, steps=6):
    exemplar = upload(
        client, png_bytes(product_image(64, 80, rgb=True)), png_bytes(defect_mask(64, 80)), defect="burr"
    ).json()
    response = client.post(
        "/v1/jobs",
        json={
            "kind": "finetune",
            "method": "anogen",
            "exemplars": [exemplar["id"]],
            "seed": 3,
            "params": {**TINY, "train_steps": steps, "batch_size": 1},
        },
    )
    assert response.status_code == 202, response.text
    return exemplar, response.json()["id"]


def test_finetune_then_generate(acme):
    methods = {m["name"]: m for m in acme.get("/v1/methods").json()["items"]}
    assert methods["anogen"]["available"] and methods["anogen"]["family"] == "fine-tune"

    exemplar, finetune_id = _finetune(acme)
    job = wait_for_job(acme, finetune_id)
    assert job["status"] == "succeeded", job
    assert job["progress"]["done"] == job["progress"]["total"] == 6
    assert job["result"]["ablated"] == [] and job["result"]["diagnostics"]["relative_distance"] > 0
    keys = {a["key"] for a in acme.get(f"/v1/jobs/{finetune_id}/artifacts").json()["items"]}
    assert any(k.startswith(f"adapters/{finetune_id}/") and k.endswith(".safetensors") for k in keys)
    assert any(k.startswith(f"adapters/{finetune_id}/") and k.endswith(".json") for k in keys)
    assert not any("/checkpoint/" in k for k in keys)  # checkpoints are dropped once training is done

    normals = [upload(acme, png_bytes(product_image(64, 80, rgb=True, seed=s))).json()["id"] for s in (5, 6)]
    response = acme.post(
        "/v1/jobs",
        json={
            "kind": "generate",
            "method": "anogen",
            "adapter": finetune_id,
            "exemplars": [exemplar["id"]],
            "normals": normals,
            "count": 3,
            "seed": 9,
            "params": {**TINY, "refined_mask": True},
        },
    )
    assert response.status_code == 202, response.text
    job = wait_for_job(acme, response.json()["id"])
    assert job["status"] == "succeeded", job
    prefix = f"jobs/{job['id']}/"
    items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    manifest = acme.get(items[prefix + "manifest.json"]).json()
    assert len(manifest["pairs"]) == 3 and all(p["weak_label"] and p["ablated"] == [] for p in manifest["pairs"])
    for pair in manifest["pairs"]:
        image = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["image"]]).content)))
        box = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["mask"]]).content))) > 0
        refined = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["refined_mask"]]).content))) > 0
        source = product_image(64, 80, rgb=True, seed=(5, 6)[normals.index(pair["normal"])])
        assert image.shape == source.shape
        assert np.array_equal(image[~box], source[~box]), "pixels outside the box must be the normal image's"
        rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
        assert box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all(), "the weak label is a box"
        assert not (refined & ~box).any()


def test_generate_progress_moves_and_cancel_stops_it(acme):
    exemplar, finetune_id = _finetune(acme, steps=2)
    assert wait_for_job(acme, finetune_id)["status"] == "succeeded"
    normal = upload(acme, png_bytes(product_image(64, 64, rgb=True, seed=8))).json()["id"]
    job_id = acme.post(
        "/v1/jobs",
        json={
            "kind": "generate",
            "method": "anogen",
            "adapter": finetune_id,
            "exemplars": [exemplar["id"]],
            "normals": [normal],
            "count": 400,
            "params": {**TINY, "num_inference_steps": 20},
        },
    ).json()["id"]
    seen = set()

    def two_progress_points():
        job = acme.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running":
            seen.add(job["progress"]["done"])
        return len(seen) >= 2

    wait_until(two_progress_points, 60, "progress to move")
    assert acme.delete(f"/v1/jobs/{job_id}").status_code == 202
    job = wait_for_job(acme, job_id, timeout=10)
    assert job["status"] == "cancelled"


def test_generate_needs_a_finished_adapter_of_the_same_method(acme):
    exemplar, finetune_id = _finetune(acme, steps=400)
    normal = upload(acme, png_bytes(product_image(64, 64, seed=8))).json()["id"]
    body = {"kind": "generate", "method": "anogen", "exemplars": [exemplar["id"]], "normals": [normal], "count": 1}
    response = acme.post("/v1/jobs", json=body)
    assert response.status_code == 422 and response.json()["error"]["code"] == "adapter_required"
    response = acme.post("/v1/jobs", json=body | {"adapter": finetune_id})
    assert response.status_code == 409 and response.json()["error"]["code"] == "adapter_not_ready"
    response = acme.post("/v1/jobs", json=body | {"masks": {"source": "native"}, "adapter": finetune_id})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unsupported_mask_source"
    acme.delete(f"/v1/jobs/{finetune_id}")
    assert wait_for_job(acme, finetune_id, timeout=20)["status"] == "cancelled"


def test_the_masked_loss_is_a_fine_tune_component_whichever_knob_names_it(acme):
    normal = upload(acme, png_bytes(product_image(64, 64, seed=8))).json()["id"]
    body = {"kind": "generate", "method": "anogen", "normals": [normal], "count": 1, "masks": {"source": "box"}}
    for params in ({"ablate": ["masked_loss"]}, {"masked_loss": False}):  # the earlier knob means the same
        response = acme.post("/v1/jobs", json=body | {"params": params})
        assert response.status_code == 422 and "act only in training" in response.json()["error"]["message"]
    response = acme.post("/v1/jobs", json=body | {"params": {"masked_loss": True, "ablate": ["masked_loss"]}})
    assert response.status_code == 422 and "say one or the other" in response.text
