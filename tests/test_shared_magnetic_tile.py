"""Opt-in (RUN_SHARED_DATA=1): the real magnetic-tile photos of ../shared/datasets through the
dataset reader and a generate job. The default suite must not need ../shared, so it skips there."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from models.downstream.mvtec import few_shot_split, validate_layout
from tests.conftest import upload, wait_for_job
from tests.processes import ROOT

DATASET = ROOT.parent / "shared" / "datasets" / "magnetic_tile"
pytestmark = [
    pytest.mark.shared_data,
    pytest.mark.skipif(
        os.environ.get("RUN_SHARED_DATA") != "1" or not DATASET.is_dir(),
        reason="opt-in: set RUN_SHARED_DATA=1 with ../shared/datasets/magnetic_tile present",
    ),
]


def test_layout_and_few_shot_split_match_the_readme():
    counts = validate_layout(DATASET)
    assert counts == {"train/good": 700, "test/good": 100, "test/blowhole": 115, "test/break": 85, "test/crack": 57}
    split = few_shot_split(DATASET)
    assert {d: len(e) for d, e in split.exemplars.items()} == {"blowhole": 38, "break": 28, "crack": 19}
    assert len(split.test) == 100 + (115 - 38) + (85 - 28) + (57 - 19)


@pytest.mark.parametrize("method", ["draem", "cutpaste"])
def test_generate_on_real_tiles(acme, method):
    split = few_shot_split(DATASET)
    exemplar = split.exemplars["crack"][0]
    anomaly = upload(acme, exemplar.path.read_bytes(), exemplar.mask.read_bytes(), product="tile", defect="crack",
                     name=exemplar.path.name)
    assert anomaly.status_code == 201, anomaly.text
    assert anomaly.json()["mode"] == "L"
    normal_paths = split.normals[:3]
    normals = [upload(acme, p.read_bytes(), product="tile", name=p.name).json()["id"] for p in normal_paths]
    job = wait_for_job(acme, acme.post("/v1/jobs", json={
        "kind": "generate", "method": method, "count": 6, "exemplars": [anomaly.json()["id"]], "normals": normals,
        "masks": {"source": "exemplar"}}).json()["id"])
    assert job["status"] == "succeeded", job
    prefix = f"jobs/{job['id']}/"
    items = {a["key"]: a["url"] for a in acme.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    for pair in acme.get(items[prefix + "manifest.json"]).json()["pairs"]:
        image = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["image"]]).content)))
        mask = np.asarray(Image.open(io.BytesIO(acme.get(items[prefix + pair["mask"]]).content))) > 0
        source = np.asarray(Image.open(normal_paths[normals.index(pair["normal"])]).convert("L"))
        assert image.shape == source.shape and mask.any()
        assert np.array_equal(image[~mask], source[~mask])
