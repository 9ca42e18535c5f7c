"""Cursor pagination: on a real Redis (Records.page and its secondary indexes) and through the API
(jobs, exemplars, datasets, artifacts)."""

import json

import pytest

from service.records import InvalidCursor, Records, connect, index_key, new_id, now
from tests.archive_mutations import zip_bytes
from tests.conftest import defect_mask, png_bytes, product_image, upload, wait_for_job
from tests.test_api_datasets import good_layout


@pytest.fixture()
def records(redis_url):
    client = connect(redis_url.rsplit("/", 1)[0] + "/3")  # a database of its own
    client.flushdb()
    return Records(client)


def _job(records, tenant="t", status="queued", kind="generate", product="tile", created_at=None):
    job = {"id": new_id(), "tenant": tenant, "kind": kind, "status": status, "product": product,
           "created_at": created_at if created_at is not None else now(), "heartbeat_at": None}
    assert records.create_job(job) is None
    return job


def _all_pages(records, kind, tenant, filters, limit, between_pages=None):
    seen, cursor, pages = [], None, 0
    while True:
        items, cursor = records.page(kind, tenant, filters, limit, cursor)
        seen += [item["id"] for item in items]
        pages += 1
        if cursor is None:
            return seen, pages
        if between_pages:
            between_pages(pages)


def test_pages_cover_every_record_once_newest_first(records):
    jobs = [_job(records, created_at=1000.0 + i) for i in range(250)]
    _job(records, tenant="other")
    seen, pages = _all_pages(records, "job", "t", {}, 100)
    assert pages == 3 and seen == [j["id"] for j in reversed(jobs)]


def test_ties_in_creation_time_are_neither_skipped_nor_repeated(records):
    jobs = [_job(records, created_at=1234.5) for _ in range(30)]
    jobs += [_job(records, created_at=1000.0 + i) for i in range(5)]
    seen, _ = _all_pages(records, "job", "t", {}, 7)
    assert sorted(seen) == sorted(j["id"] for j in jobs) and len(seen) == len(set(seen))


def test_paging_is_stable_while_records_are_added_and_removed(records):
    existing = [_job(records, created_at=1000.0 + i) for i in range(60)]
    added = []

    def meanwhile(page_number):
        added.extend(_job(records) for _ in range(10))  # newer than every page still to come
        added.append(_job(records, created_at=999.0))  # older than every one (a slow upload, say)
        gone = existing[-page_number * 10]  # one already listed: the rest must not shift
        records.delete_if_unused("job", gone)

    seen, _ = _all_pages(records, "job", "t", {}, 10, between_pages=meanwhile)
    assert len(seen) == len(set(seen))  # nothing twice
    listed_originals = [i for i in seen if i in {j["id"] for j in existing}]
    assert listed_originals == [j["id"] for j in reversed(existing)]  # nothing that existed skipped
    assert not {j["id"] for j in added if j["created_at"] > 1100} & set(seen)  # newer ones belong to page 1


def test_filters_read_their_indexes_not_the_tenants_records(records):
    failed = [_job(records, status="failed", created_at=2000.0 + i) for i in range(15)]
    for i in range(985):
        _job(records, status="succeeded", kind="generate" if i % 2 else "finetune", created_at=1000.0 + i)
    _job(records, status="failed", kind="evaluate", created_at=3000.0)
    hgetall_calls = lambda: records.redis.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0)  # noqa: E731
    before = hgetall_calls()
    items, cursor = records.page("job", "t", {"status": "failed", "kind": "generate"}, 10, None)
    assert [j["id"] for j in items] == [j["id"] for j in reversed(failed)][:10] and cursor
    assert hgetall_calls() - before == 10  # one read per listed job: no scan of the other 990
    items, cursor = records.page("job", "t", {"status": "failed", "kind": "generate"}, 10, cursor)
    assert [j["id"] for j in items] == [j["id"] for j in reversed(failed)][10:] and cursor is None


def test_status_indexes_follow_every_transition(records):
    job = _job(records)
    by_status = lambda s: [j["id"] for j in records.page("job", "t", {"status": s}, 10)[0]]  # noqa: E731
    assert by_status("queued") == [job["id"]]
    assert records.claim(job["id"], stale_before=now() - 60)
    assert by_status("queued") == [] and by_status("running") == [job["id"]]
    records.update_job(job["id"], heartbeat_at=now() - 120)
    assert records.requeue_orphans(stale_before=now() - 60)
    assert by_status("running") == [] and by_status("queued") == [job["id"]]
    assert records.transition(job["id"], ("queued",), status="cancelled", finished_at=now())
    assert by_status("queued") == [] and by_status("cancelled") == [job["id"]]
    assert records.finished_before(now() + 1) == [job["id"]]


def test_a_malformed_cursor_is_refused(records):
    for cursor in ("not-base64!", "bm90IGpzb24", "WzEsMiwzXQ"):
        with pytest.raises(InvalidCursor):
            records.page("job", "t", {}, 10, cursor)


def test_records_stored_before_the_indexes_are_filed_once(records):
    old = {"id": new_id(), "tenant": "t", "kind": "finetune", "status": "failed", "product": "tile",
           "created_at": 5.0, "finished_at": 6.0}
    records.redis.hset(f"job:{old['id']}", mapping={k: json.dumps(v) for k, v in old.items()})
    exemplar = {"id": new_id(), "tenant": "t", "product": "tile", "defect": "crack", "kind": "anomaly",
                "created_at": 5.0}
    records.redis.set(f"exemplar:{exemplar['id']}", json.dumps(exemplar))
    assert records.page("job", "t", {"status": "failed"}, 10)[0] == []
    records.build_indexes()
    assert [j["id"] for j in records.page("job", "t", {"status": "failed", "kind": "finetune"}, 10)[0]] == [old["id"]]
    assert [e["id"] for e in records.page("exemplar", "t", {"defect": "crack"}, 10)[0]] == [exemplar["id"]]
    assert records.finished_before(10) == [old["id"]]
    records.redis.delete(index_key("job", "t", "status", "failed"))
    records.build_indexes()  # done once: not again
    assert records.page("job", "t", {"status": "failed"}, 10)[0] == []


# -- through the API ----------------------------------------------------------------------------
def _pages(client, path, **params):
    seen, cursor, sizes = [], None, []
    while True:
        response = client.get(path, params={**params, **({"cursor": cursor} if cursor else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        seen += body["items"]
        sizes.append(len(body["items"]))
        cursor = body["next_cursor"]
        if cursor is None:
            return seen, sizes


def test_exemplar_pages_with_filters_and_inserts_between_pages(acme):
    product = f"paging-{new_id()[:8]}"
    image = png_bytes(product_image(16, 16))
    ids = [upload(acme, image, product=product).json()["id"] for _ in range(11)]
    anomaly = upload(acme, image, png_bytes(defect_mask(16, 16)), product=product, defect="dent").json()["id"]
    first = acme.get("/v1/exemplars", params={"product": product, "kind": "normal", "limit": 4}).json()
    assert [e["id"] for e in first["items"]] == ids[::-1][:4] and first["next_cursor"]
    upload(acme, image, product=product)  # a new one between pages: on no later page
    rest, sizes = _pages(acme, "/v1/exemplars", product=product, kind="normal", limit=4, cursor=first["next_cursor"])
    assert [e["id"] for e in first["items"] + rest] == ids[::-1] and sizes == [4, 3]
    dents = acme.get("/v1/exemplars", params={"product": product, "defect": "dent"}).json()
    assert [e["id"] for e in dents["items"]] == [anomaly] and dents["next_cursor"] is None


def test_job_and_dataset_lists_page(acme, globex):
    datasets = [acme.post("/v1/datasets", files={"file": ("d.zip", zip_bytes(good_layout()))},
                          data={"product": "paged"}).json()["id"] for _ in range(3)]
    seen, sizes = _pages(acme, "/v1/datasets", product="paged", limit=2)
    assert [d["id"] for d in seen][:3] == datasets[::-1] and sizes[0] == 2
    assert _pages(globex, "/v1/datasets", product="paged")[0] == []  # another tenant's
    jobs, _ = _pages(acme, "/v1/jobs", limit=3)
    assert len(jobs) == len({j["id"] for j in jobs})
    assert [j["created_at"] for j in jobs] == sorted((j["created_at"] for j in jobs), reverse=True)
    default = acme.get("/v1/jobs").json()
    assert len(default["items"]) == min(100, len(jobs))


@pytest.mark.parametrize(
    "params, code",
    [
        ({"limit": 1001}, "invalid_request"),
        ({"limit": 0}, "invalid_request"),
        ({"cursor": "garbage"}, "invalid_cursor"),
    ],
)
def test_bad_page_parameters_are_422(acme, params, code):
    for path in ("/v1/jobs", "/v1/exemplars", "/v1/datasets"):
        response = acme.get(path, params=params)
        assert response.status_code == 422 and response.json()["error"]["code"] == code, (path, response.text)


def test_artifacts_page_in_key_order(acme):
    anomaly = upload(acme, png_bytes(product_image(32, 32)), png_bytes(defect_mask(32, 32)), defect="pit").json()
    normal = upload(acme, png_bytes(product_image(32, 32, seed=2))).json()
    job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "cutpaste", "exemplars": [anomaly["id"]],
                                         "normals": [normal["id"]], "count": 6}).json()["id"]
    assert wait_for_job(acme, job_id)["status"] == "succeeded"
    whole = acme.get(f"/v1/jobs/{job_id}/artifacts").json()
    # Per pair its image, mask and their two thumbnails; then the manifest and the job's result.
    assert len(whole["items"]) == 6 * 4 + 2 and whole["next_cursor"] is None
    assert sum("/thumbs/" in a["key"] for a in whole["items"]) == 6 * 2
    paged, sizes = _pages(acme, f"/v1/jobs/{job_id}/artifacts", limit=5)
    assert paged == whole["items"] and sizes == [5, 5, 5, 5, 5, 1]
    assert [a["key"] for a in paged] == sorted(a["key"] for a in paged)
