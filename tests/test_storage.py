"""Both storage backends behind the one interface, and a whole job on Redis + S3.

There is no MinIO binary here. moto's server mode is a real HTTP server that speaks the S3
protocol, and boto3 talks to it over HTTP exactly as it would to MinIO: an honest stand-in for an
S3 server, which is outside our control. Nothing of our own is faked.
"""

import re
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
import yaml

from service.storage import S3Storage, StorageError, check_key, open_storage
from tests.conftest import S3_BUCKET, client_for, defect_mask, png_bytes, product_image, upload, wait_for_job
from tests.processes import start_api

ROOT = Path(__file__).resolve().parent.parent


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


def test_presigned_urls(storage, tmp_path):
    storage.put("jobs/p/file.bin", b"payload")
    url = storage.presigned_url("jobs/p/file.bin", 60)
    assert url is None  # local storage, or S3 behind a private endpoint: downloads go through the API
    assert b"".join(storage.stream("jobs/p/file.bin")) == b"payload"
    if isinstance(storage, S3Storage):
        port = urlparse(storage.client.meta.endpoint_url).port
        public = open_storage(f"s3://{S3_BUCKET}/unit-{tmp_path.name}", public_endpoint=f"http://localhost:{port}")
        url = public.presigned_url("jobs/p/file.bin", 60)
        assert url.startswith(f"http://localhost:{port}/") and "Signature" in url
        assert httpx.get(url).content == b"payload"


def test_unsupported_storage_url():
    with pytest.raises(StorageError):
        open_storage("ftp://host/dir")
    assert check_key("jobs/x/y.png") == "jobs/x/y.png"


def test_generate_job_on_redis_and_s3(s3_server, s3_api_url, s3_service_env, tmp_path):
    """As under docker compose: the services reach S3 at one address (AWS_ENDPOINT_URL_S3, compose's
    http://minio:9000; 127.0.0.1 here), callers at another (S3_PUBLIC_ENDPOINT_URL, the port compose
    publishes on the host; `localhost` here). Presigned URLs are signed for the callers' address;
    an API without one (S3 behind a private endpoint) streams the downloads itself."""
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
    # Presigned for the public address, fetched by a client with no key.
    assert image["url"].startswith(s3_service_env["S3_PUBLIC_ENDPOINT_URL"] + "/")
    direct = httpx.get(image["url"])
    assert direct.status_code == 200 and direct.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(direct.content) == image["size"]
    # the API also serves it (same bytes) for callers that cannot reach S3
    assert client.get(f"/v1/jobs/{job_id}/artifacts/{image['key']}").content == direct.content
    exemplar_image = client.get(f"/v1/exemplars/{anomaly['id']}/image")
    assert exemplar_image.status_code == 200 and exemplar_image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert httpx.get(s3_api_url + "/readyz").json()["checks"]["storage"] == "ok"

    # The same records and bucket behind a private endpoint: the listed URLs go through the API.
    private_env = {k: v for k, v in s3_service_env.items() if k != "S3_PUBLIC_ENDPOINT_URL"}
    api, base = start_api(private_env, tmp_path / "private-api.log")
    try:
        private = client_for(base, "acme")
        image = next(a for a in private.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
                     if a["key"].endswith("images/stain/0.png"))
        assert image["url"].startswith(base + "/v1/jobs/")
        assert private.get(image["url"]).content == direct.content  # streamed from S3 by the API
    finally:
        api.stop()


def test_compose_presigns_for_the_port_it_publishes_minio_on():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    default = lambda value: re.sub(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", r"\1", value)  # noqa: E731
    public = urlparse(default(compose["x-app-env"]["S3_PUBLIC_ENDPOINT_URL"]))
    published = [default(p).rsplit(":", 2) for p in compose["services"]["minio"]["ports"]]
    assert [str(public.port), "9000"] in [p[-2:] for p in published]
    assert urlparse(compose["x-app-env"]["AWS_ENDPOINT_URL_S3"]).port == 9000


def test_put_file_and_get_file(storage, tmp_path):
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x00\x01" * 300_000)
    storage.put_file("datasets/d/archive", source)
    target = tmp_path / "copy.bin"
    storage.get_file("datasets/d/archive", target)
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(KeyError):
        storage.get_file("datasets/d/missing", tmp_path / "none")
