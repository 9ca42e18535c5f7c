"""Idempotency-Key on every POST that creates something, through the real API: a retry returns the
first response and creates nothing; another request under the key is a 409; keys are per tenant."""

import threading
import uuid

import pytest

from service.records import new_id
from tests.archive_mutations import zip_bytes
from tests.conftest import defect_mask, png_bytes, product_image, upload
from tests.test_api_datasets import good_layout


def _key() -> dict:
    return {"Idempotency-Key": str(uuid.uuid4())}


def _normal(client, seed=1, product="idem"):
    return upload(client, png_bytes(product_image(24, 24, seed=seed)), product=product).json()["id"]


def _ids(client, path, **params):
    return [item["id"] for item in client.get(path, params={"limit": 1000, **params}).json()["items"]]


def _job_body(normal):
    return {"kind": "generate", "method": "draem", "normals": [normal], "count": 1}


def test_a_retried_job_submit_returns_the_first_response_and_queues_nothing(acme):
    normal, key = _normal(acme), _key()
    first = acme.post("/v1/jobs", json=_job_body(normal), headers=key)
    assert first.status_code == 202, first.text
    jobs_after_first = _ids(acme, "/v1/jobs")
    again = acme.post("/v1/jobs", json=_job_body(normal), headers=key)
    assert again.status_code == 202 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert _ids(acme, "/v1/jobs") == jobs_after_first  # nothing new
    # The same content with its keys in another order is the same request.
    reordered = dict(reversed(list(_job_body(normal).items())))
    assert acme.post("/v1/jobs", json=reordered, headers=key).json() == first.json()


def test_another_request_under_a_used_key_is_409(acme):
    normal, key = _normal(acme), _key()
    first = acme.post("/v1/jobs", json=_job_body(normal), headers=key).json()
    other = acme.post("/v1/jobs", json=_job_body(normal) | {"count": 2}, headers=key)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
    elsewhere = upload(acme, png_bytes(product_image(24, 24)), product="idem")  # no key: unaffected
    assert elsewhere.status_code == 201
    on_another_route = acme.post(
        "/v1/exemplars", files={"image": ("a.png", png_bytes(product_image(24, 24)))}, data={"product": "idem"},
        headers=key,
    )
    assert on_another_route.status_code == 409 and on_another_route.json()["error"]["code"] == "idempotency_key_reused"
    assert first["id"] in _ids(acme, "/v1/jobs")


def test_keys_are_per_tenant(acme, globex):
    key = _key()
    a = acme.post("/v1/jobs", json=_job_body(_normal(acme)), headers=key)
    b = globex.post("/v1/jobs", json=_job_body(_normal(globex)), headers=key)
    assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
    assert globex.get(f"/v1/jobs/{a.json()['id']}").status_code == 404


def test_a_failed_request_releases_its_key(acme):
    key = _key()
    refused = acme.post("/v1/jobs", json=_job_body("no-such-exemplar"), headers=key)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unknown_exemplar"
    # The client fixes its request and retries under the same key: it goes through.
    fixed = acme.post("/v1/jobs", json=_job_body(_normal(acme)), headers=key)
    assert fixed.status_code == 202, fixed.text


def test_exemplar_uploads_are_idempotent(acme):
    product = f"idem-{new_id()[:8]}"
    image, mask = png_bytes(product_image(24, 24)), png_bytes(defect_mask(24, 24))
    key = _key()
    responses = [
        acme.post("/v1/exemplars", files={"image": ("i.png", image), "mask": ("m.png", mask)},
                  data={"product": product, "defect": "dent"}, headers=key)
        for _ in range(3)  # each with its own multipart boundary
    ]
    assert [r.status_code for r in responses] == [201, 201, 201]
    assert responses[1].json() == responses[2].json() == responses[0].json()
    assert _ids(acme, "/v1/exemplars", product=product) == [responses[0].json()["id"]]
    other_mask = png_bytes(255 - defect_mask(24, 24))
    changed = acme.post("/v1/exemplars", files={"image": ("i.png", image), "mask": ("m.png", other_mask)},
                        data={"product": product, "defect": "dent"}, headers=key)
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "idempotency_key_reused"


def test_dataset_uploads_are_idempotent(acme):
    archive, key = zip_bytes(good_layout()), _key()
    product = f"idem-{new_id()[:8]}"
    first, again = (
        acme.post("/v1/datasets", files={"file": ("d.zip", archive)}, data={"product": product}, headers=key)
        for _ in range(2)
    )
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert _ids(acme, "/v1/datasets", product=product) == [first.json()["id"]]


def test_generate_from_files_is_idempotent(acme):
    image, mask = png_bytes(product_image(24, 24)), png_bytes(defect_mask(24, 24))
    product = f"idem-{new_id()[:8]}"
    files = [("image", ("a.png", image)), ("mask", ("m.png", mask)), ("normal", ("n.png", image))]
    form = {"method": "cutpaste", "count": "1", "product": product}
    key = _key()
    first = acme.post("/v1/jobs/generate", files=files, data=form, headers=key)
    again = acme.post("/v1/jobs/generate", files=files, data=form, headers=key)
    assert first.status_code == again.status_code == 202 and first.json() == again.json()
    assert len(_ids(acme, "/v1/exemplars", product=product)) == 2  # one anomaly, one normal: stored once
    other = acme.post("/v1/jobs/generate", files=files, data=form | {"count": "2"}, headers=key)
    assert other.status_code == 409


def test_concurrent_requests_under_one_key_create_one_job(acme):
    normal, key = _normal(acme), _key()
    before = set(_ids(acme, "/v1/jobs"))
    responses = []

    def post():
        responses.append(acme.post("/v1/jobs", json=_job_body(normal), headers=key))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    created = set(_ids(acme, "/v1/jobs")) - before
    assert len(created) == 1
    for response in responses:  # the first answer, or "still running, retry"
        assert (response.status_code == 202 and response.json()["id"] in created) or (
            response.status_code == 409 and response.json()["error"]["code"] == "idempotency_key_in_use"
        ), response.text


@pytest.mark.parametrize("value", ["", "x" * 256])
def test_malformed_keys_are_422(acme, value):
    response = acme.post("/v1/jobs", json=_job_body("x"), headers={"Idempotency-Key": value})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
