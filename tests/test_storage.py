"""Both storage backends behind the one interface, and a whole job on Redis + S3.

There is no MinIO binary here. moto's server mode is a real HTTP server that speaks the S3
protocol, and boto3 talks to it over HTTP exactly as it would to MinIO: an honest stand-in for an
S3 server, which is outside our control. Nothing of our own is faked.
"""

import httpx
import pytest

from service.storage import LocalStorage, S3Storage, StorageError, check_key, open_storage
from tests.conftest import (
    S3_BUCKET,
    client_for,
    defect_mask,
    png_bytes,
    product_image,
    upload,
    wait_for_job,
)


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(f"file://{tmp_path}")
    request.getfixturevalue("s3_server")
    return open_storage(f"s3://{S3_BUCKET}/unit-{tmp_path.name}")


def test_put_get_list_exists_delete(storage):
    storage.put("jobs/a/images/x/0.png", b"zero")
    storage.put("jobs/a/images/x/1.png", b"one!")
    storage.put("jobs/a/images/x/1.png", b"one")  # idempotent overwrite, never a duplicate
    storage.put("jobs/b/manifest.json", b"{}")
    assert storage.get("jobs/a/images/x/1.png") == b"one"
    assert storage.exists("jobs/a/images/x/0.png") and not storage.exists("jobs/a/missing.png")
    listed = storage.list("jobs/a/")
    assert [(o.key, o.size) for o in listed] == [("jobs/a/images/x/0.png", 4), ("jobs/a/images/x/1.png", 3)]
    with pytest.raises(KeyError):
        storage.get("jobs/a/missing.png")
    storage.delete_prefix("jobs/a/")
    assert storage.list("jobs/a/") == [] and storage.exists("jobs/b/manifest.json")
    storage.check()


@pytest.mark.parametrize("key", ["../escape", "/abs/path", "a//b", "a/./b", "a\\b", ""])
def test_keys_cannot_escape(storage, key):
    with pytest.raises(StorageError):
        storage.put(key, b"x")


def test_presigned_urls(storage):
    storage.put("jobs/p/file.bin", b"payload")
    url = storage.presigned_url("jobs/p/file.bin", 60)
    if isinstance(storage, LocalStorage):
        assert url is None  # local downloads go through the API
    else:
        assert isinstance(storage, S3Storage) and "Signature" in url
        assert httpx.get(url).content == b"payload"


def test_unsupported_storage_url():
    with pytest.raises(StorageError):
        open_storage("ftp://host/dir")
    assert check_key("jobs/x/y.png") == "jobs/x/y.png"


def test_generate_job_on_redis_and_s3(s3_server, s3_api_url):
    client = client_for(s3_api_url, "acme")
    anomaly = upload(
        client, png_bytes(product_image(64, 96, rgb=True)), png_bytes(defect_mask(64, 96)), defect="stain"
    ).json()
    normal = upload(client, png_bytes(product_image(64, 96, rgb=True, seed=9))).json()
    job_id = client.post(
        "/v1/jobs",
        json={
            "kind": "generate",
            "method": "cutpaste",
            "count": 4,
            "exemplars": [anomaly["id"]],
            "normals": [normal["id"]],
            "masks": {"source": "exemplar"},
        },
    ).json()["id"]
    job = wait_for_job(client, job_id)
    assert job["status"] == "succeeded", job
    items = client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    assert len(items) == 4 * 4 + 2  # images, masks, their thumbnails; manifest, preview
    image = next(a for a in items if a["key"].endswith("images/stain/0.png"))
    assert image["url"].startswith(s3_server["AWS_ENDPOINT_URL_S3"])  # presigned, straight from S3
    direct = httpx.get(image["url"])
    assert direct.status_code == 200 and direct.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(direct.content) == image["size"]
    # the API also serves it (same bytes) for callers that cannot reach S3
    assert client.get(f"/v1/jobs/{job_id}/artifacts/{image['key']}").content == direct.content
    assert httpx.get(s3_api_url + "/readyz").json()["checks"]["storage"] == "ok"


def test_put_file_and_get_file(storage, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x00\x01" * 300_000)
    storage.put_file("datasets/d/archive", source)
    target = tmp_path / "copy.bin"
    storage.get_file("datasets/d/archive", target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(KeyError):
        storage.get_file("datasets/d/missing", tmp_path / "none")
