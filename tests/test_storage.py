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
from tests.conftest import client_for, defect_mask, make_env, png_bytes, product_image, upload, wait_for_job
from tests.processes import free_port, start_api, start_worker

BUCKET = "anomaly-test"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    if request.param == "local":
        return open_storage(f"file://{tmp_path}")
    request.getfixturevalue("s3_server")
    return open_storage(f"s3://{BUCKET}/unit-{tmp_path.name}")


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
        public = open_storage(f"s3://{BUCKET}/unit-{tmp_path.name}", public_endpoint=f"http://localhost:{port}")
        url = public.presigned_url("jobs/p/file.bin", 60)
        assert url.startswith(f"http://localhost:{port}/") and "Signature" in url
        assert httpx.get(url).content == b"payload"


def test_unsupported_storage_url():
    with pytest.raises(StorageError):
        open_storage("ftp://host/dir")
    assert check_key("jobs/x/y.png") == "jobs/x/y.png"


@pytest.mark.parametrize("reach", ["public endpoint", "private endpoint"])
def test_generate_job_on_redis_and_s3(s3_server, redis_url, tmp_path, reach):
    """As under docker compose: the services reach S3 at one address (AWS_ENDPOINT_URL_S3, compose's
    http://minio:9000; 127.0.0.1 here), callers at another (S3_PUBLIC_ENDPOINT_URL, the port compose
    publishes on the host; `localhost` here). Presigned URLs must be signed for the callers'
    address; without one, the API streams the downloads itself."""
    port = urlparse(s3_server["AWS_ENDPOINT_URL_S3"]).port
    public = {"S3_PUBLIC_ENDPOINT_URL": f"http://localhost:{port}"} if reach == "public endpoint" else {}
    # A Redis database of its own, so the session's worker (on local storage) cannot take this job.
    env = make_env(redis_url.rsplit("/", 1)[0] + "/1", f"s3://{BUCKET}/e2e", **s3_server, **public)
    worker = start_worker(env, tmp_path / "worker.log", queues="gpu", name="s3")
    api, base = start_api(env, tmp_path / "api.log")
    try:
        client = client_for(base, "acme")
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
        assert len(items) == 4 + 4 + 2
        image = next(a for a in items if a["key"].endswith("images/stain/0.png"))
        if public:  # presigned for the public address, fetched by a client with no key
            assert image["url"].startswith(public["S3_PUBLIC_ENDPOINT_URL"] + "/")
            direct = httpx.get(image["url"])
        else:  # through the API, which streams it from S3
            assert image["url"].startswith(base + "/v1/jobs/")
            direct = client.get(image["url"])
        assert direct.status_code == 200 and direct.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert len(direct.content) == image["size"]
        # the API also serves it (same bytes) for callers that cannot reach S3
        assert client.get(f"/v1/jobs/{job_id}/artifacts/{image['key']}").content == direct.content
        exemplar_image = client.get(f"/v1/exemplars/{anomaly['id']}/image")
        assert exemplar_image.status_code == 200 and exemplar_image.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert httpx.get(base + "/readyz").json()["checks"]["storage"] == "ok"
    finally:
        api.stop()
        worker.stop()


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
