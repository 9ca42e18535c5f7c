"""Transplant through the API with a real worker: a job from three exemplars whose manifest
reproduces every pair, and one evaluate request that combines a transplant job with a draem job."""

import io

import numpy as np
from PIL import Image

from models.methods.interface import Exemplar
from models.methods.transplant import TransplantParams
from models.methods.transplant.method import reproduce
from tests.conftest import png_bytes, product_image, upload, wait_for_job
from tests.test_api_evaluate import _dataset, _image, _mask

SIZES = ((64, 80), (56, 72), (72, 64))  # (height, width) of the three exemplars
NORMAL_SEEDS = (21, 22)


def _spot_exemplar(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A product image with a dark crescent on it, and its 0/255 mask."""
    image = product_image(height, width, seed=seed)
    ys, xs = np.ogrid[0:height, 0:width]
    centre_y, centre_x = height // 2 + seed % 5, width // 2 - seed % 7
    mask = ((ys - centre_y) ** 2 + (xs - centre_x) ** 2 <= 36) & ((ys - centre_y + 3) ** 2 + (xs - centre_x) ** 2 > 9)
    image[mask] //= 3
    return image, mask.astype(np.uint8) * 255


def _decoded(client, url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.get(url).content)))


def test_a_job_from_three_exemplars_reproduces_from_its_manifest(acme):
    methods = {m["name"]: m for m in acme.get("/v1/methods").json()["items"]}
    assert methods["transplant"]["available"] and methods["transplant"]["family"] == "model-free"
    exemplars = {}
    for seed, (height, width) in enumerate(SIZES, start=1):
        image, mask = _spot_exemplar(height, width, seed)
        response = upload(acme, png_bytes(image), png_bytes(mask), product="tile", defect="crescent")
        assert response.status_code == 201, response.text
        exemplars[response.json()["id"]] = Exemplar(response.json()["id"], Image.fromarray(image), mask > 0,
                                                    "tile", "crescent")
    normals = {upload(acme, png_bytes(product_image(60, 76, seed=s)), product="tile").json()["id"]: s
               for s in NORMAL_SEEDS}
    params = {"defects_per_image": [1, 2], "gain_jitter": 0.05}
    body = {"kind": "generate", "method": "transplant", "exemplars": list(exemplars), "normals": list(normals),
            "count": 6, "seed": 7, "params": params}
    response = acme.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job = wait_for_job(acme, response.json()["id"])
    assert job["status"] == "succeeded", job

    items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    prefix = f"jobs/{job['id']}/"
    manifest = acme.get(items[prefix + "manifest.json"]).json()
    assert [entry["index"] for entry in manifest["pairs"]] == list(range(6))
    used = {t["exemplar"] for entry in manifest["pairs"] for t in entry["transplants"]}
    assert used <= set(exemplars) and len(used) >= 2
    job_params = TransplantParams.model_validate(manifest["params"])
    for entry in manifest["pairs"]:
        assert entry["blend"] == "poisson" and entry["defect"] == "crescent"
        normal = Image.fromarray(product_image(60, 76, seed=normals[entry["normal"]]))
        image, mask = reproduce(entry, normal, list(exemplars.values()), job_params,
                                manifest["masks"]["inside_foreground"])
        stored_image = _decoded(acme, items[prefix + entry["image"]])
        stored_mask = _decoded(acme, items[prefix + entry["mask"]])
        assert np.asarray(image).tobytes() == stored_image.tobytes()
        assert (mask.astype(np.uint8) * 255).tobytes() == stored_mask.tobytes() and mask.any()

    bad = acme.post("/v1/jobs", json=body | {"params": {"blend": "poisson", "blend_margin": 5}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_params"


def test_a_transplant_job_and_a_draem_job_are_one_evaluate_request(acme):
    dataset = acme.post("/v1/datasets", files={"file": ("d.zip", _dataset())}, data={"product": "plate"}).json()
    exemplar = upload(acme, png_bytes(_image(300, (20, 20))), png_bytes(_mask((20, 20))), product="plate",
                      defect="spot").json()["id"]
    normals = [upload(acme, png_bytes(_image(400 + i)), product="plate").json()["id"] for i in range(2)]
    generated = []
    for method in ("transplant", "draem"):
        body = {"kind": "generate", "method": method, "count": 6, "exemplars": [exemplar], "normals": normals}
        job = wait_for_job(acme, acme.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded", job
        generated.append(job["id"])

    params = {"train_steps": 4, "resolution": 32, "batch_size": 4, "unet_width": 8, "baselines": False,
              "classifier": False}
    response = acme.post("/v1/jobs", json={"kind": "evaluate", "dataset": dataset["id"], "generated": generated,
                                           "params": params})
    assert response.status_code == 202, response.text
    job = wait_for_job(acme, response.json()["id"], timeout=240)
    assert job["status"] == "succeeded", job
    names = [f"transplant-{generated[0][:8]}", f"draem-{generated[1][:8]}", "combined"]
    assert sorted(job["result"]["arms"]) == sorted(names)
    items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    arms = acme.get(items[f"jobs/{job['id']}/metrics.json"]).json()["arms"]
    assert arms["combined"]["pairs"] == 12 and arms[names[0]]["pairs"] == 6
    assert arms[names[0]]["mask_fidelity"]["pairs"] == 6
