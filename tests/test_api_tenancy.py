"""A tenant never sees another tenant's exemplars, jobs or artifacts: 404, not 403."""

from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job


def test_tenants_are_isolated(acme, globex):
    anomaly = upload(acme, png_bytes(product_image(48, 48)), png_bytes(defect_mask(48, 48)), defect="pit").json()
    normal = upload(acme, png_bytes(product_image(48, 48, seed=3))).json()
    job_id = acme.post(
        "/v1/jobs",
        json={
            "kind": "generate",
            "method": "draem",
            "exemplars": [anomaly["id"]],
            "normals": [normal["id"]],
            "count": 2,
        },
    ).json()["id"]
    job = wait_for_job(acme, job_id)
    assert job["status"] == "succeeded"
    artifact = acme.get(f"/v1/jobs/{job_id}/artifacts").json()["items"][0]

    for path in (
        f"/v1/jobs/{job_id}",
        f"/v1/jobs/{job_id}/artifacts",
        f"/v1/jobs/{job_id}/artifacts/{artifact['key']}",
    ):
        response = globex.get(path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found", path
    assert globex.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert job_id not in [j["id"] for j in globex.get("/v1/jobs", params={"limit": 1000}).json()["items"]]
    assert anomaly["id"] not in [e["id"] for e in globex.get("/v1/exemplars").json()["items"]]
    # another tenant's exemplar ids are unknown to it
    response = globex.post(
        "/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normal["id"]], "count": 1}
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_exemplar"
    # and the owner still sees everything
    assert acme.get(artifact["url"]).status_code == 200
