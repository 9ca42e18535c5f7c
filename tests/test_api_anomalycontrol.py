"""AnomalyControl through the API with a real worker: fine-tune on one product's exemplars, then
generate on another product's normal images with that product's defect as the reference.

The models are the tiny random-weight SD and BLIP-2 of tests/conftest.py, loaded by the worker's
production loaders."""

import io

import numpy as np
from PIL import Image, ImageFilter

from tests.conftest import client_for, defect_mask, png_bytes, product_image, upload, wait_for_job
from tests.processes import start_api

TINY = {"resolution": 64, "num_inference_steps": 4, "guidance_scale": 3.0}


def test_finetune_on_one_product_then_generate_on_another(acme):
    methods = {m["name"]: m for m in acme.get("/v1/methods").json()["items"]}
    assert methods["anomalycontrol"]["available"] and methods["anomalycontrol"]["family"] == "fine-tune"

    exemplar = upload(acme, png_bytes(product_image(64, 80, rgb=True, seed=1)), png_bytes(defect_mask(64, 80)),
                      product="tile", defect="crack").json()
    finetune = acme.post("/v1/jobs", json={"kind": "finetune", "method": "anomalycontrol", "seed": 3,
                                           "exemplars": [exemplar["id"]],
                                           "params": {**TINY, "train_steps": 4, "batch_size": 1}})
    assert finetune.status_code == 202, finetune.text
    job = wait_for_job(acme, finetune.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["ablated"] == []
    assert {"losses", "sga_branch_share", "sga_weight_change", "asea_energy"} <= set(job["result"]["diagnostics"])
    keys = {a["key"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    assert {f"adapters/{job['id']}/sga.safetensors", f"adapters/{job['id']}/adapter_config.json"} <= keys

    sources = {s: product_image(72, 64, rgb=True, seed=s) for s in (21, 22)}
    normals = {upload(acme, png_bytes(image), product="screw").json()["id"]: image for image in sources.values()}
    generate = {"kind": "generate", "method": "anomalycontrol", "adapter": job["id"], "product": "screw",
                "exemplars": [exemplar["id"]], "normals": list(normals), "count": 4, "seed": 5,
                "params": {**TINY, "ablate": ["asea"]}}
    unknown = acme.post("/v1/jobs", json={**generate, "params": {**TINY, "ablate": ["csm"]}})
    assert unknown.status_code == 422 and "'asea' or 'sga'" in unknown.text, unknown.text
    response = acme.post("/v1/jobs", json=generate)
    assert response.status_code == 202, response.text
    generated = wait_for_job(acme, response.json()["id"], timeout=120)
    assert generated["status"] == "succeeded", generated
    prefix = f"jobs/{generated['id']}/"
    items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{generated['id']}/artifacts").json()["items"]}
    manifest = acme.get(items[prefix + "manifest.json"]).json()
    assert sorted(p["index"] for p in manifest["pairs"]) == [0, 1, 2, 3]
    for pair in manifest["pairs"]:
        assert pair["reference"] == exemplar["id"] and pair["prompt"] == "a photo of a screw with crack"
        assert pair["ablated"] == ["asea"] and pair["asea_energy"][0] == pair["asea_energy"][1]  # no guidance steps
        image = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["image"]]).content)))
        mask = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["mask"]]).content))) > 0
        source = normals[pair["normal"]]
        assert image.shape == source.shape and mask.any()
        assert not np.array_equal(image[mask], source[mask])
        # outside the mask dilated by the 3 px blend band the pixels are the normal image's
        far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(7)))
        assert np.array_equal(image[far], source[far])


def test_without_blip2_the_method_is_unavailable_and_its_jobs_are_refused(acme, service_env, tmp_path):
    exemplar = upload(acme, png_bytes(product_image(64, 64, seed=2)), png_bytes(defect_mask(64, 64)),
                      defect="chip").json()
    normal = upload(acme, png_bytes(product_image(64, 64, seed=3))).json()
    env = {key: value for key, value in service_env.items() if key != "BLIP2_MODEL_DIR"}
    proc, base = start_api(env, tmp_path / "api.log")
    try:
        client = client_for(base, "acme")
        method = next(m for m in client.get("/v1/methods").json()["items"] if m["name"] == "anomalycontrol")
        assert method["available"] is False and "BLIP2_MODEL_DIR is not set" in method["reason"]
        response = client.post("/v1/jobs", json={"kind": "finetune", "method": "anomalycontrol",
                                                 "exemplars": [exemplar["id"]]})
        assert response.status_code == 409 and response.json()["error"]["code"] == "method_unavailable"
        assert "BLIP2_MODEL_DIR" in response.json()["error"]["message"]
        response = client.post("/v1/jobs", json={"kind": "generate", "method": "anomalycontrol", "adapter": "x",
                                                 "exemplars": [exemplar["id"]], "normals": [normal["id"]]})
        assert response.status_code == 409 and response.json()["error"]["code"] == "method_unavailable"
        anogen = next(m for m in client.get("/v1/methods").json()["items"] if m["name"] == "anogen")
        assert anogen["available"]  # SD alone is there: only the method that needs BLIP-2 is off
        client.close()
    finally:
        proc.stop()
