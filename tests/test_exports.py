"""COCO and YOLO exports of a generate job, read back the way detector tooling reads them: COCO with
pycocotools (the reference reader), YOLO by parsing its files, both compared with the job's masks."""

import io
import json
import zipfile

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from models.downstream.exports import instances, polygons, rle_encode
from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job

SIZE = (72, 96)


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def finished_job(acme):
    height, width = SIZE
    mask = defect_mask(height, width)
    mask[5:12, 5:15] = 255  # a second, separate defect region
    anomaly = upload(acme, png_bytes(product_image(height, width, seed=1)), png_bytes(mask), defect="dent").json()
    normals = [upload(acme, png_bytes(product_image(height, width, seed=s))).json()["id"] for s in (2, 3)]
    job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "cutpaste", "exemplars": [anomaly["id"]],
                                         "normals": normals, "count": 5, "masks": {"source": "exemplar"}}).json()["id"]
    job = wait_for_job(acme, job_id)
    assert job["status"] == "succeeded", job
    artifacts = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
    manifest = acme.get(artifacts[f"jobs/{job_id}/manifest.json"]).json()
    pairs = {e["image"]: (acme.get(artifacts[f"jobs/{job_id}/{e['image']}"]).content,
                          _decode(acme.get(artifacts[f"jobs/{job_id}/{e['mask']}"]).content) >= 128)
             for e in manifest["pairs"]}
    return job_id, pairs, normals


def _export(client, job_id, export_format) -> zipfile.ZipFile:
    response = client.get(f"/v1/jobs/{job_id}/export", params={"format": export_format})
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip", response.text
    return zipfile.ZipFile(io.BytesIO(response.content))


def test_coco_export_reads_back_with_pycocotools(acme, finished_job, tmp_path):
    job_id, pairs, normals = finished_job
    archive = _export(acme, job_id, "coco")
    (tmp_path / "annotations.json").write_bytes(archive.read("annotations.json"))
    coco = COCO(str(tmp_path / "annotations.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["dent"]
    by_name = {image["file_name"]: image for image in coco.loadImgs(coco.getImgIds())}
    assert set(by_name) == set(pairs) | {f"images/good/{n}.png" for n in normals}
    regions = 0
    for name, (image_png, mask) in pairs.items():
        image = by_name[name]
        assert archive.read(name) == image_png and (image["height"], image["width"]) == mask.shape
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        decoded = [coco.annToMask(a).astype(bool) for a in annotations]
        assert np.array_equal(np.logical_or.reduce(decoded), mask)  # exactly the job's mask
        for annotation, region in zip(annotations, decoded):
            assert cv2.connectedComponents(region.astype(np.uint8), connectivity=8)[0] == 2  # one region each
            assert annotation["area"] == region.sum() and annotation["iscrowd"] == 0
            x, y, w, h = annotation["bbox"]
            ys, xs = np.nonzero(region)
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
        regions += len(annotations)
    assert regions > len(pairs)  # the second defect region is an instance of its own
    for normal in normals:
        assert coco.getAnnIds(imgIds=[by_name[f"images/good/{normal}.png"]["id"]]) == []


def test_yolo_export_polygons_match_the_masks(acme, finished_job):
    job_id, pairs, normals = finished_job
    archive = _export(acme, job_id, "yolo")
    data = yaml.safe_load(archive.read("data.yaml"))
    assert data["names"] == {0: "dent"} and data["train"] == "images/train"
    for name, (image_png, mask) in pairs.items():
        stem = name.replace("images/", "").replace("/", "_").removesuffix(".png")
        assert archive.read(f"images/train/{stem}.png") == image_png
        height, width = mask.shape
        drawn = np.zeros((height, width), np.uint8)
        lines = archive.read(f"labels/train/{stem}.txt").decode().splitlines()
        assert len(lines) == len(instances(mask))
        for line in lines:
            label, *coords = line.split()
            points = np.array(coords, float).reshape(-1, 2)
            assert label == "0" and ((points >= 0) & (points <= 1)).all()
            cv2.fillPoly(drawn, [np.round(points * [width, height]).astype(np.int32)], 1)
        # The polygons trace the regions' outlines: any pixel they disagree on is on a boundary.
        as_u8, kernel = mask.astype(np.uint8), np.ones((3, 3), np.uint8)
        boundary = cv2.dilate(as_u8, kernel) != cv2.erode(as_u8, kernel)
        disagree = drawn.astype(bool) != mask
        assert not (disagree & ~boundary).any()
        assert (drawn.astype(bool) & mask).sum() / (drawn.astype(bool) | mask).sum() > 0.9
    for normal in normals:
        assert archive.read(f"labels/train/good_{normal}.txt") == b""


def test_export_format_is_checked(acme, finished_job):
    response = acme.get(f"/v1/jobs/{finished_job[0]}/export", params={"format": "voc"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"


def test_rle_is_what_pycocotools_writes():
    rng = np.random.default_rng(0)
    for _ in range(100):
        height, width = rng.integers(1, 50, 2)
        mask = rng.random((height, width)) < rng.random()
        ours = rle_encode(mask)
        reference = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours == {"size": [int(height), int(width)], "counts": reference["counts"].decode()}
        assert json.loads(json.dumps(ours)) == ours


def test_polygons_of_a_ring_fill_its_hole():
    ring = np.zeros((20, 20), bool)
    ring[4:16, 4:16] = True
    ring[8:12, 8:12] = False
    [outline] = polygons(ring)
    filled = cv2.fillPoly(np.zeros((20, 20), np.uint8), [outline.astype(np.int32)], 1).astype(bool)
    assert filled[4:16, 4:16].all() and filled.sum() == 144
