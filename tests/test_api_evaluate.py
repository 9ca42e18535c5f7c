"""Evaluate jobs through the API, on the metrics queue of a real worker: a dataset made here, a
generate job, and the downstream U-Net trained and scored on the dataset's real test set."""

import numpy as np

from tests.archive_mutations import zip_bytes
from tests.conftest import png_bytes, upload, wait_for_job

SIZE = 48


def _image(seed: int, square: tuple[int, int] | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.clip(120 + rng.normal(0, 8, (SIZE, SIZE)), 0, 255).astype(np.uint8)
    if square:
        y, x = square
        image[y:y + 10, x:x + 10] = 250
    return image


def _mask(square: tuple[int, int]) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    y, x = square
    mask[y:y + 10, x:x + 10] = 255
    return mask


def _dataset() -> bytes:
    members = {f"train/good/{i:02d}.png": png_bytes(_image(i)) for i in range(8)}
    members |= {f"test/good/{i:02d}.png": png_bytes(_image(100 + i)) for i in range(4)}
    for i in range(6):
        square = (5 + 5 * i, 30 - 4 * i)
        members[f"test/spot/{i:02d}.png"] = png_bytes(_image(200 + i, square))
        members[f"ground_truth/spot/{i:02d}_mask.png"] = png_bytes(_mask(square))
    return zip_bytes(members)


def run_evaluate_job(client) -> tuple[dict, str]:
    """A dataset made here, a cutpaste generate job, and an evaluate job of both: (the finished
    evaluate job, the generate job's id). The slowest job of the suite, so tests share one (the
    `evaluated` fixture)."""
    dataset = client.post("/v1/datasets", files={"file": ("d.zip", _dataset())}, data={"product": "plate"}).json()
    exemplar = upload(client, png_bytes(_image(300, (20, 20))), png_bytes(_mask((20, 20))), product="plate",
                      defect="spot").json()
    normals = [upload(client, png_bytes(_image(400 + i)), product="plate").json()["id"] for i in range(2)]
    generate = client.post("/v1/jobs", json={"kind": "generate", "method": "cutpaste", "count": 8,
                                             "exemplars": [exemplar["id"]], "normals": normals,
                                             "masks": {"source": "exemplar"}}).json()["id"]
    assert wait_for_job(client, generate)["status"] == "succeeded"

    params = {"train_steps": 15, "resolution": 32, "batch_size": 4, "baseline_pairs": 8, "unet_width": 8}
    response = client.post("/v1/jobs", json={"kind": "evaluate", "dataset": dataset["id"], "generated": [generate],
                                             "params": params})
    assert response.status_code == 202, response.text
    return wait_for_job(client, response.json()["id"], timeout=240), generate


def test_evaluate_job_reports_metrics_for_every_arm(acme, evaluated):
    job, generate = evaluated
    assert job["status"] == "succeeded", job
    assert job["progress"]["fraction"] == 1.0

    items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    prefix = f"jobs/{job['id']}/"
    assert {prefix + name for name in ("metrics.json", "report.html", "pixel_roc.png", "image_pr.png")} <= set(items)
    metrics = acme.get(items[prefix + "metrics.json"]).json()
    arms = metrics["arms"]
    assert set(arms) == {f"cutpaste-{generate[:8]}", "baseline_draem", "baseline_exemplars"}
    for arm in arms.values():
        overall = arm["segmentation"]["overall"]
        for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "image_auroc", "image_ap", "image_f1_max", "aupro"):
            assert overall[name] is None or 0.0 <= overall[name] <= 1.0, (name, overall[name])
    generated = arms[f"cutpaste-{generate[:8]}"]
    fidelity = generated["mask_fidelity"]  # cutpaste never paints outside its mask
    assert fidelity["leakage"] == 0.0 and 0.0 < fidelity["fill"] <= 1.0
    assert generated["generation"]["inception_score"] is None  # no weights configured here
    assert "not configured" in generated["generation"]["inception_score_reason"]
    report = acme.get(items[prefix + "report.html"]).text
    assert "<table" in report and 'src="data:image/png;base64,' in report
    assert "src=\"pixel_roc.png\"" not in report  # self-contained: no link to a neighbouring file


def test_evaluate_requests_are_checked(acme, globex):
    dataset = acme.post("/v1/datasets", files={"file": ("d.zip", _dataset())}, data={"product": "plate"}).json()
    cases = [
        ({"kind": "evaluate"}, 422, "dataset_required"),
        ({"kind": "evaluate", "dataset": "0" * 32}, 422, "unknown_dataset"),
        ({"kind": "evaluate", "dataset": dataset["id"], "generated": ["0" * 32]}, 422, "unknown_job"),
        ({"kind": "evaluate", "dataset": dataset["id"], "params": {"epochs": 3}}, 422, "invalid_params"),
        ({"kind": "evaluate", "dataset": dataset["id"], "params": {"baselines": False}}, 422, "nothing_to_evaluate"),
        ({"kind": "evaluate", "dataset": dataset["id"], "method": "draem"}, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        response = acme.post("/v1/jobs", json=body)
        assert response.status_code == status and response.json()["error"]["code"] == code, (body, response.text)
    # another tenant's dataset does not exist for it
    response = globex.post("/v1/jobs", json={"kind": "evaluate", "dataset": dataset["id"]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_dataset"
