"""GroundingAnomaly through the API with a real worker: fine-tune on one product's normal images and
exemplars of two defect types, then generate pairs of each type (exemplar and learned masks).

The models are the tiny random-weight SD and ConvNextModel of tests/conftest.py, loaded by the
worker's production loaders."""

import io

import numpy as np
from PIL import Image, ImageFilter

from tests.conftest import client_for, defect_mask, png_bytes, product_image, upload, wait_for_job
from tests.processes import start_api

TINY = {"resolution": 64, "num_inference_steps": 4, "guidance_scale": 3.0}


def exemplar_of(client, defect: str, seed: int, box: tuple[int, int, int, int]) -> dict:
    mask = np.zeros((64, 64), np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    return upload(client, png_bytes(product_image(64, 64, rgb=True, seed=seed)), png_bytes(mask),
                  product="tile", defect=defect).json()


def test_finetune_on_two_defect_types_and_normals_then_generate_each(acme):
    methods = {m["name"]: m for m in acme.get("/v1/methods").json()["items"]}
    spec = methods["groundinganomaly"]
    assert spec["available"] and spec["family"] == "fine-tune" and "learned" in spec["mask_sources"]

    cracks = [exemplar_of(acme, "crack", 1, (14, 20, 40, 26)), exemplar_of(acme, "crack", 2, (20, 30, 44, 36))]
    holes = [exemplar_of(acme, "hole", 3, (24, 24, 36, 36))]
    no_normals = acme.post("/v1/jobs", json={"kind": "finetune", "method": "groundinganomaly",
                                             "exemplars": [e["id"] for e in cracks + holes]})
    assert no_normals.status_code == 422 and no_normals.json()["error"]["code"] == "normals_required"
    without_mnt = acme.post("/v1/jobs", json={  # normal mixing ablated: no normal image is needed
        "kind": "finetune", "method": "groundinganomaly", "exemplars": [e["id"] for e in cracks + holes],
        "params": {**TINY, "train_steps": 2, "mask_train_steps": 1, "batch_size": 2, "ablate": ["mnt"]}})
    assert without_mnt.status_code == 202, without_mnt.text
    assert wait_for_job(acme, without_mnt.json()["id"], timeout=120)["status"] == "succeeded"

    sources = {s: product_image(64, 72, rgb=True, seed=s) for s in (21, 22)}
    normals = {upload(acme, png_bytes(image), product="tile").json()["id"]: image for image in sources.values()}
    finetune = acme.post("/v1/jobs", json={
        "kind": "finetune", "method": "groundinganomaly", "seed": 3, "normals": list(normals),
        "exemplars": [e["id"] for e in cracks + holes],
        "params": {**TINY, "train_steps": 3, "mask_train_steps": 2, "batch_size": 2},
    })
    assert finetune.status_code == 202, finetune.text
    job = wait_for_job(acme, finetune.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    assert job["result"]["defects"] == ["crack", "hole"] and job["result"]["normals"] == 2
    assert job["result"]["ablated"] == [] and set(job["result"]["diagnostics"]) == {"losses", "gates"}
    assert set(job["result"]["diagnostics"]["gates"]) == {"mean_abs_tanh", "max_abs_tanh"}
    keys = {a["key"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    prefix = f"adapters/{job['id']}/"
    assert {prefix + name for name in ("adapter_config.json", "learned_embeds.safetensors", "scm.safetensors",
                                       "gsm.safetensors", "mask_embeds.safetensors", "lora/adapter_model.safetensors",
                                       "lora/adapter_config.json")} <= keys

    jobs = {
        "crack": {"exemplars": [e["id"] for e in cracks]},
        "hole": {"defect": "hole", "masks": {"source": "learned"}, "params": {**TINY, "ablate": ["ndi"]}},
    }
    for defect, fields in jobs.items():
        response = acme.post("/v1/jobs", json={"kind": "generate", "method": "groundinganomaly", "adapter": job["id"],
                                               "normals": list(normals), "count": 4, "seed": 5, "params": TINY}
                             | fields)
        assert response.status_code == 202, response.text
        generated = wait_for_job(acme, response.json()["id"], timeout=120)
        assert generated["status"] == "succeeded", generated
        out = f"jobs/{generated['id']}/"
        items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{generated['id']}/artifacts").json()["items"]}
        manifest = acme.get(items[out + "manifest.json"]).json()
        assert sorted(p["index"] for p in manifest["pairs"]) == [0, 1, 2, 3]
        for pair in manifest["pairs"]:
            assert pair["defect"] == defect and pair["image"].startswith(f"images/{defect}/")
            assert pair["ablated"] == fields.get("params", {}).get("ablate", [])
            image = np.asarray(Image.open(io.BytesIO(acme.get(items[out + pair["image"]]).content)))
            mask = np.asarray(Image.open(io.BytesIO(acme.get(items[out + pair["mask"]]).content))) > 0
            source = normals[pair["normal"]]
            assert image.shape == source.shape and mask.any()
            assert not np.array_equal(image[mask], source[mask])
            # outside the mask dilated by the 3 px blend band the pixels are the normal image's
            far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(7)))
            assert np.array_equal(image[far], source[far])

    # A component that acts only in training, named on a generate job: refused at submit, and why.
    refused = acme.post("/v1/jobs", json={"kind": "generate", "method": "groundinganomaly", "adapter": job["id"],
                                          "normals": list(normals), "count": 1, "params": {**TINY, "ablate": ["mnt"]},
                                          "exemplars": [e["id"] for e in cracks]})
    assert refused.status_code == 422 and "mnt act only in training" in refused.text, refused.text

    # A defect type the adapter did not learn, or none named with learned masks: refused at submit.
    jobs_before = acme.get("/v1/jobs", params={"limit": 1000}).json()["items"]
    for defect, code in (("scratch", "unknown_defect"), (None, "defect_required")):
        body = {"kind": "generate", "method": "groundinganomaly", "adapter": job["id"], "normals": list(normals),
                "count": 1, "masks": {"source": "learned"}, "params": TINY}
        response = acme.post("/v1/jobs", json=body | ({"defect": defect} if defect else {}))
        assert response.status_code == 422 and response.json()["error"]["code"] == code, response.text
    assert "crack, hole" in acme.post("/v1/jobs", json=body | {"defect": "scratch"}).json()["error"]["message"]
    assert acme.get("/v1/jobs", params={"limit": 1000}).json()["items"] == jobs_before


def test_other_methods_refuse_the_learned_mask_source(acme):
    normal = upload(acme, png_bytes(product_image(64, 64, seed=8))).json()
    exemplar = upload(acme, png_bytes(product_image(64, 64, seed=9)), png_bytes(defect_mask(64, 64)),
                      defect="chip").json()
    for method in ("cutpaste", "anomalycontrol"):
        response = acme.post("/v1/jobs", json={"kind": "generate", "method": method, "normals": [normal["id"]],
                                               "exemplars": [exemplar["id"]], "masks": {"source": "learned"},
                                               **({"adapter": "x"} if method == "anomalycontrol" else {})})
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "unsupported_mask_source" and "not 'learned'" in error["message"]


def test_without_convnext_the_method_is_unavailable_and_its_jobs_are_refused(acme, service_env, tmp_path):
    exemplar = upload(acme, png_bytes(product_image(64, 64, seed=2)), png_bytes(defect_mask(64, 64)),
                      defect="chip").json()
    normal = upload(acme, png_bytes(product_image(64, 64, seed=3))).json()
    env = {key: value for key, value in service_env.items() if key != "CONVNEXT_MODEL_DIR"}
    proc, base = start_api(env, tmp_path / "api.log")
    try:
        client = client_for(base, "acme")
        method = next(m for m in client.get("/v1/methods").json()["items"] if m["name"] == "groundinganomaly")
        assert method["available"] is False and "CONVNEXT_MODEL_DIR is not set" in method["reason"]
        for body in ({"kind": "finetune", "exemplars": [exemplar["id"]], "normals": [normal["id"]]},
                     {"kind": "generate", "adapter": "x", "exemplars": [exemplar["id"]], "normals": [normal["id"]]}):
            response = client.post("/v1/jobs", json={"method": "groundinganomaly", **body})
            assert response.status_code == 409 and response.json()["error"]["code"] == "method_unavailable"
            assert "CONVNEXT_MODEL_DIR" in response.json()["error"]["message"]
        anogen = next(m for m in client.get("/v1/methods").json()["items"] if m["name"] == "anogen")
        assert anogen["available"]  # SD alone is there: only the method that needs ConvNeXt is off
        client.close()
    finally:
        proc.stop()
