"""POST /v1/datasets (MVTec layout in) and GET /v1/jobs/{id}/export (MVTec layout out)."""

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.archive_mutations import mutations, set_zip_field, tar_bytes, zip_bytes
from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job


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
    response = _post(acme, zip_bytes(good_layout("widget/")))  # a single wrapping folder is fine
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
        "zip slip": (zip_bytes(good_layout() | {"../../evil.png": b"x"}), "unsafe_path"),
        "not an archive": (b"just some bytes, not a zip", "unsupported_archive"),
        "mask missing": (zip_bytes(missing_mask), "mask_missing"),
        "mask size mismatch": (zip_bytes(wrong_size), "mask_size_mismatch"),
        "no train folder": (zip_bytes(no_train), "not_mvtec_layout"),
        "unreadable image": (zip_bytes(good_layout() | {"train/good/bad.png": b"not a png"}), "unreadable_image"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_malformed_datasets_are_rejected_and_store_nothing(acme, case):
    data, code = _bad_cases()[case]
    before = len(acme.get("/v1/datasets").json()["items"])
    response = _post(acme, data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert len(acme.get("/v1/datasets").json()["items"]) == before


def test_export_generate_job_as_zip_bytes(acme):
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


def test_mutated_archives_through_the_api_never_5xx_and_store_nothing_when_rejected(acme, service_env):
    """A seeded mutation fuzz of valid zip and tar uploads (byte flips, truncations, header edits)."""
    storage = Path(service_env["STORAGE_URL"].removeprefix("file://"))
    small = {name: data for name, data in good_layout().items() if "/002" not in name}
    valid = [zip_bytes(small), zip_bytes(small, zipfile.ZIP_STORED), tar_bytes(small), tar_bytes(small, "w:gz")]
    rejected = 0
    for what, data in mutations(valid, 200, seed=7):
        before = len(acme.get("/v1/datasets").json()["items"])
        stored_before = len(list((storage / "datasets").rglob("*"))) if (storage / "datasets").exists() else 0
        response = _post(acme, data, name="fuzz.bin")
        assert response.status_code in (201, 400), (what, response.text)
        if response.status_code == 400:
            rejected += 1
            assert response.json()["error"]["code"], what
            assert len(acme.get("/v1/datasets").json()["items"]) == before, what
            stored = len(list((storage / "datasets").rglob("*"))) if (storage / "datasets").exists() else 0
            assert stored == stored_before, what
    assert rejected > 100
    assert acme.get("/healthz").status_code == 200


@pytest.mark.parametrize("case", ["path conflict", "name too long", "unknown compression", "encrypted member"])
def test_unreadable_archives_are_400_with_a_specific_code(acme, case):
    stored = zip_bytes(good_layout(), zipfile.ZIP_STORED)
    data, code = {
        "path conflict": (zip_bytes({"train/good": b"file"} | good_layout()), "path_conflict"),
        "name too long": (zip_bytes(good_layout() | {"train/good/" + "n" * 5000 + ".png": b"x"}), "name_too_long"),
        "unknown compression": (set_zip_field(stored, "method", 98, member=1), "unsupported_compression"),
        "encrypted member": (set_zip_field(stored, "flags", 1, member=1), "encrypted_archive"),
    }[case]
    response = _post(acme, data)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    assert len(response.json()["error"]["message"]) < 400  # a 5,000-character name is not echoed whole
