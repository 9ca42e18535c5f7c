"""Thumbnails (`?thumb=<side>`) of artifacts and exemplars, for the web page's grids."""

import io
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from service.errors import ApiError
from service.thumbnails import make_thumbnail
from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_an_image_becomes_a_small_jpeg_of_the_same_aspect():
    data, media_type = make_thumbnail(png_bytes(product_image(384, 512, rgb=True)), 128)
    assert media_type == "image/jpeg"
    thumb = _open(data)
    assert thumb.format == "JPEG" and thumb.size == (128, 96) and thumb.mode == "RGB"
    small, _ = make_thumbnail(png_bytes(product_image(30, 40)), 256)
    assert _open(small).size == (40, 30)  # never enlarged


def test_a_mask_stays_a_binary_png_and_keeps_a_one_pixel_defect():
    mask = np.zeros((512, 512), np.uint8)
    mask[100:400, 257] = 255  # a 1-px scratch: plain downscaling to 64 px would fade it below 128
    data, media_type = make_thumbnail(png_bytes(mask), 64)
    thumb = np.asarray(_open(data))
    assert media_type == "image/png" and thumb.shape == (64, 64)
    assert set(np.unique(thumb)) == {0, 255}
    assert thumb[:, 32].max() == 255 and thumb[13:50, 32].min() == 255
    assert thumb[:, :30].max() == 0 and thumb[:, 34:].max() == 0


def test_rgba_plots_are_flattened_on_white():
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: white once flattened
    data, media_type = make_thumbnail(png_bytes(rgba), 50)
    assert media_type == "image/jpeg"
    assert np.asarray(_open(data)).min() > 240


def test_anything_else_is_refused():
    with pytest.raises(ApiError) as raised:
        make_thumbnail(b'{"not": "an image"}', 64)
    assert raised.value.status == 415 and raised.value.code == "not_an_image"


@pytest.fixture(scope="module")
def small_job(acme):
    anomaly = upload(acme, png_bytes(product_image(96, 128)), png_bytes(defect_mask(96, 128)), defect="dent").json()
    normal = upload(acme, png_bytes(product_image(96, 128, seed=5))).json()
    job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "draem", "count": 2,
                                         "exemplars": [anomaly["id"]], "normals": [normal["id"]],
                                         "masks": {"source": "exemplar"}}).json()["id"]
    assert wait_for_job(acme, job_id)["status"] == "succeeded"
    return job_id, anomaly, normal


def test_artifact_thumbnails_through_the_api(acme, globex, small_job):
    job_id, _, _ = small_job
    base = f"/v1/jobs/{job_id}/artifacts/jobs/{job_id}"
    image = acme.get(f"{base}/images/dent/0.png", params={"thumb": 64})
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert _open(image.content).size == (64, 48)
    assert "max-age" in image.headers["cache-control"] and image.headers["cache-control"].startswith("private")
    full = acme.get(f"{base}/images/dent/0.png")
    assert full.headers["content-type"] == "image/png" and _open(full.content).size == (128, 96)
    assert len(image.content) < len(full.content)

    mask = acme.get(f"{base}/masks/dent/0_mask.png", params={"thumb": 64})
    assert mask.headers["content-type"] == "image/png"
    assert set(np.unique(np.asarray(_open(mask.content)))) <= {0, 255}

    cached = {"if-none-match": image.headers["etag"]}
    again = acme.get(f"{base}/images/dent/0.png", params={"thumb": 64}, headers=cached)
    assert again.status_code == 304 and not again.content
    other_size = acme.get(f"{base}/images/dent/0.png", params={"thumb": 32})
    assert other_size.headers["etag"] != image.headers["etag"]

    for thumb, status, code in ((8, 422, "invalid_request"), (5000, 422, "invalid_request")):
        response = acme.get(f"{base}/images/dent/0.png", params={"thumb": thumb})
        assert response.status_code == status and response.json()["error"]["code"] == code
    response = acme.get(f"{base}/manifest.json", params={"thumb": 64})
    assert response.status_code == 415 and response.json()["error"]["code"] == "not_an_image"
    response = globex.get(f"{base}/images/dent/0.png", params={"thumb": 64})
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"


def test_exemplar_images_and_masks(acme, globex, small_job):
    _, anomaly, normal = small_job
    image = acme.get(f"/v1/exemplars/{anomaly['id']}/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert np.array_equal(np.asarray(_open(image.content)), product_image(96, 128))
    mask = acme.get(f"/v1/exemplars/{anomaly['id']}/mask")
    assert np.array_equal(np.asarray(_open(mask.content)), defect_mask(96, 128))
    thumb = acme.get(f"/v1/exemplars/{normal['id']}/image", params={"thumb": 32})
    assert thumb.headers["content-type"] == "image/jpeg" and _open(thumb.content).size == (32, 24)
    mask_thumb = acme.get(f"/v1/exemplars/{anomaly['id']}/mask", params={"thumb": 32})
    assert np.asarray(_open(mask_thumb.content)).max() == 255

    response = acme.get(f"/v1/exemplars/{normal['id']}/mask")
    assert response.status_code == 404 and response.json()["error"]["code"] == "no_mask"
    for path in (f"/v1/exemplars/{anomaly['id']}/image", f"/v1/exemplars/{anomaly['id']}/mask", "/v1/exemplars/0/mask"):
        response = globex.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "exemplar_not_found", path


def test_generate_jobs_write_a_thumbnail_of_every_pair(acme, small_job):
    job_id, _, _ = small_job
    job = acme.get(f"/v1/jobs/{job_id}").json()
    assert job["result"]["thumbnail_side"] == 256 and job["result"]["thumbnails"] == f"jobs/{job_id}/thumbs/"
    base = f"/v1/jobs/{job_id}/artifacts/jobs/{job_id}"
    for index in range(2):
        image = acme.get(f"{base}/thumbs/dent/{index}.jpg")
        assert image.headers["content-type"] == "image/jpeg"
        thumb = _open(image.content)
        full = _open(acme.get(f"{base}/images/dent/{index}.png").content)
        assert thumb.format == "JPEG" and thumb.size == full.size == (128, 96)  # smaller than 256: as it is
        assert np.abs(np.asarray(thumb, np.int16) - np.asarray(full, np.int16)).mean() < 8  # JPEG of a noisy image
        mask = np.asarray(_open(acme.get(f"{base}/thumbs/dent/{index}_mask.png").content))
        assert np.array_equal(mask, np.asarray(_open(acme.get(f"{base}/masks/dent/{index}_mask.png").content)))
    # The MVTec export holds the pairs, not their thumbnails.
    with zipfile.ZipFile(io.BytesIO(acme.get(f"/v1/jobs/{job_id}/export").content)) as archive:
        names = archive.namelist()
    assert "test/dent/0.png" in names and not [n for n in names if "thumbs" in n or n.endswith(".jpg")]


def test_an_exemplar_lost_from_storage_is_a_404_with_or_without_thumb(acme, service_env):
    anomaly = upload(acme, png_bytes(product_image(40, 40)), png_bytes(defect_mask(40, 40)), defect="pit").json()
    storage = Path(urlparse(service_env["STORAGE_URL"]).path)
    (storage / "exemplars" / anomaly["id"] / "image.png").unlink()
    for params in ({}, {"thumb": 64}):
        response = acme.get(f"/v1/exemplars/{anomaly['id']}/image", params=params)
        assert response.status_code == 404 and response.json()["error"]["code"] == "object_not_found", params
    assert acme.get(f"/v1/exemplars/{anomaly['id']}/mask", params={"thumb": 64}).status_code == 200
