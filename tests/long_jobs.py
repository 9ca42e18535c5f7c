"""Long draem jobs on real processes, for the tests that cancel, kill or restart things mid-job."""

from tests.conftest import defect_mask, png_bytes, product_image, upload

BIG = 384  # big enough that a few hundred pairs take seconds


def long_job_inputs(client):
    """An anomaly exemplar and a normal image, large enough that a draem pair takes a while."""
    anomaly = upload(client, png_bytes(product_image(BIG, BIG)), png_bytes(defect_mask(BIG, BIG)), defect="pit").json()
    normal = upload(client, png_bytes(product_image(BIG, BIG, seed=5))).json()
    return anomaly["id"], normal["id"]


def long_job(client, inputs, count=5000):
    anomaly, normal = inputs
    response = client.post(
        "/v1/jobs",
        json={
            "kind": "generate",
            "method": "draem",
            "exemplars": [anomaly],
            "normals": [normal],
            "count": count,
            "masks": {"source": "exemplar"},
        },
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def running_with_progress(client, job_id):
    job = client.get(f"/v1/jobs/{job_id}").json()
    return job if job["status"] == "running" and job["progress"]["done"] > 0 else None
