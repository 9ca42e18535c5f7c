"""POST /v1/datasets (MVTec layout in) and GET /v1/jobs/{id}/export (MVTec layout out)."""

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job


def mvtec_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def good_layout(prefix: str = "") -> dict[str, bytes]:
    members = {f"{prefix}train/good/{i:03d}.png": png_bytes(product_image(40, 48, seed=i)) for i in range(3)}
    members |= {f"{prefix}test/good/{i:03d}.png": png_bytes(product_image(40, 48, seed=10 + i)) for i in range(2)}
    for i in range(3):
        members[f"{prefix}test/crack/{i:03d}.png"] = png_bytes(product_image(40, 48, seed=20 + i))
        members[f"{prefix}ground_truth/crack/{i:03d}_mask.png"] = png_bytes(defect_mask(40, 48))
    return members


def _post(client, data: bytes, name="ds.zip"):
    return client.post("/v1/datasets", files={"file": (name, data)}, data={"product": "widget"})


def test_upload_and_list_a_dataset(acme, globex):
    response = _post(acme, mvtec_zip(good_layout("widget/")))  # a single wrapping folder is fine
    assert response.status_code == 201, response.text
    dataset = response.json()
    assert dataset["counts"] == {"train/good": 3, "test/good": 2, "test/crack": 3}
    assert dataset["id"] in [d["id"] for d in acme.get("/v1/datasets").json()["items"]]
    assert dataset["id"] not in [d["id"] for d in globex.get("/v1/datasets").json()["items"]]


def _bad_cases():
    missing_mask = good_layout()
    del missing_mask["ground_truth/crack/001_mask.png"]
    wrong_size = good_layout() | {"ground_truth/crack/002_mask.png": png_bytes(defect_mask(8, 8))}
    no_train = {k: v for k, v in good_layout().items() if not k.startswith("train/")}
    return {
        "zip slip": (mvtec_zip(good_layout() | {"../../evil.png": b"x"}), "unsafe_path"),
        "not an archive": (b"just some bytes, not a zip", "unsupported_archive"),
        "mask missing": (mvtec_zip(missing_mask), "mask_missing"),
        "mask size mismatch": (mvtec_zip(wrong_size), "mask_size_mismatch"),
        "no train folder": (mvtec_zip(no_train), "not_mvtec_layout"),
        "unreadable image": (mvtec_zip(good_layout() | {"train/good/bad.png": b"not a png"}), "unreadable_image"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_malformed_datasets_are_rejected_and_store_nothing(acme, case):
    data, code = _bad_cases()[case]
    before = len(acme.get("/v1/datasets").json()["items"])
    response = _post(acme, data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert len(acme.get("/v1/datasets").json()["items"]) == before


def test_export_generate_job_as_mvtec_zip(acme):
    anomaly = upload(acme, png_bytes(product_image(48, 48)), png_bytes(defect_mask(48, 48)), defect="dent").json()
    normal = upload(acme, png_bytes(product_image(48, 48, seed=3))).json()
    job_id = acme.post(
        "/v1/jobs",
        json={
            "kind": "generate",
            "method": "cutpaste",
            "count": 3,
            "exemplars": [anomaly["id"]],
            "normals": [normal["id"]],
        },
    ).json()["id"]
    assert wait_for_job(acme, job_id)["status"] == "succeeded"
    response = acme.get(f"/v1/jobs/{job_id}/export")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        names = set(zf.namelist())
        assert names == {f"test/dent/{n}.png" for n in range(3)} | {
            f"ground_truth/dent/{n}_mask.png" for n in range(3)
        } | {f"train/good/{normal['id']}.png"}
        mask = np.asarray(Image.open(io.BytesIO(zf.read("ground_truth/dent/0_mask.png"))))
        assert set(np.unique(mask)) <= {0, 255} and mask.any()
    # what it exports is itself a valid dataset upload
    reimported = _post(acme, response.content)
    assert reimported.status_code == 201, reimported.text
    assert reimported.json()["counts"] == {"train/good": 1, "test/good": 0, "test/dent": 3}
