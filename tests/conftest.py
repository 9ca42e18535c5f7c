"""Session-wide service: a real Redis, one real Celery worker (queues gpu and metrics) and the
API as a real uvicorn process, with two tenants' keys configured."""

import io
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import free_port, start_api, start_redis, start_worker

TENANT_KEYS = {"acme": "key-acme-123", "globex": "key-globex-456"}
WEBHOOK_SECRET = "test-webhook-secret"
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
MAX_IMAGE_SIDE = 2048


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    proc, url = start_redis(tmp_path_factory.mktemp("redis"))
    yield url
    proc.stop()


def make_env(redis_url: str, storage_url: str, **extra) -> dict:
    env = dict(os.environ)
    env.pop("SD_MODEL_DIR", None)
    env.pop("BLIP2_MODEL_DIR", None)
    env.pop("CONVNEXT_MODEL_DIR", None)
    env.update(
        REDIS_URL=redis_url,
        STORAGE_URL=storage_url,
        API_KEYS=",".join(f"{t}:{k}" for t, k in TENANT_KEYS.items()),
        MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES),
        MAX_IMAGE_SIDE=str(MAX_IMAGE_SIDE),
        JOB_TIME_LIMIT="120",
        VISIBILITY_TIMEOUT="150",
        WORKER_METRICS_PORT=str(free_port()),
        # Webhooks to the tests' local receivers (loopback: the default WEBHOOK_ALLOWED_HOSTS),
        # retried after 0.2, 0.4, 0.8 ... s instead of 30, 60, 120 ... s.
        WEBHOOK_SECRET=WEBHOOK_SECRET,
        WEBHOOK_BACKOFF="0.2",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine threads that wait on
    each other make them far slower. A test module opts in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def service_sd_dir(tmp_path_factory):
    """A tiny random-weight SD 1.5-architecture model in diffusers format, for the worker to load."""
    from models.diffusion.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("service_sd"), resolution=64)


@pytest.fixture(scope="session")
def service_blip2_dir(tmp_path_factory):
    """A tiny random-weight Blip2ForImageTextRetrieval with its tokenizer and image processor."""
    from models.diffusion.tiny_blip2 import build_random_blip2

    return build_random_blip2(tmp_path_factory.mktemp("service_blip2"), "tiny")


@pytest.fixture(scope="session")
def service_convnext_dir(tmp_path_factory):
    """A tiny random-weight transformers ConvNextModel, saved with save_pretrained."""
    from models.diffusion.tiny_convnext import build_random_convnext

    return build_random_convnext(tmp_path_factory.mktemp("service_convnext"), "tiny")


@pytest.fixture(scope="session")
def service_env(redis_url, service_sd_dir, service_blip2_dir, service_convnext_dir, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    # One torch thread: tiny models gain nothing from more, and CI has two shared cores.
    return make_env(redis_url, f"file://{storage}", SD_MODEL_DIR=str(service_sd_dir),
                    BLIP2_MODEL_DIR=str(service_blip2_dir), CONVNEXT_MODEL_DIR=str(service_convnext_dir),
                    DEVICE="cpu", OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def worker(service_env, tmp_path_factory):
    proc = start_worker(service_env, tmp_path_factory.mktemp("worker") / "worker.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def api_url(service_env, worker, tmp_path_factory):
    proc, base = start_api(service_env, tmp_path_factory.mktemp("api") / "api.log")
    yield base
    proc.stop()


@pytest.fixture(scope="session")
def evaluated(acme):
    """One finished evaluate job of acme's and the generate job it evaluated, for the tests that
    read its outputs (tests/test_api_evaluate.py says how it is made)."""
    from tests.test_api_evaluate import run_evaluate_job

    return run_evaluate_job(acme)


S3_BUCKET = "anomaly-test"


@pytest.fixture(scope="session")
def s3_server():
    """An S3-speaking HTTP server with one bucket, and boto3's settings for it (also set in this
    process's environment from then on). moto's server mode stands in for MinIO, a server outside
    our control; boto3 talks to it over HTTP as it would to MinIO."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        boto3.client("s3").create_bucket(Bucket=S3_BUCKET)
        yield env
    server.stop()


@pytest.fixture(scope="session")
def s3_service_env(s3_server, redis_url):
    """Settings of a second service on S3 storage (bucket prefix `e2e`) with a Redis database of its
    own, so the session's worker (on local storage) never takes its jobs. As under docker compose,
    the service reaches S3 at one address and callers at another (S3_PUBLIC_ENDPOINT_URL)."""
    port = s3_server["AWS_ENDPOINT_URL_S3"].rsplit(":", 1)[1]
    return make_env(redis_url.rsplit("/", 1)[0] + "/1", f"s3://{S3_BUCKET}/e2e", **s3_server,
                    S3_PUBLIC_ENDPOINT_URL=f"http://localhost:{port}")


@pytest.fixture(scope="session")
def s3_api_url(s3_service_env, tmp_path_factory):
    """That service's worker and API."""
    env = s3_service_env
    logs = tmp_path_factory.mktemp("s3-service")
    worker = start_worker(env, logs / "worker.log", queues="gpu", name="s3")
    api, base = start_api(env, logs / "api.log")
    yield base
    api.stop()
    worker.stop()


def client_for(base: str, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TENANT_KEYS[tenant]}"}, timeout=30)


@pytest.fixture(scope="session")
def acme(api_url):
    with client_for(api_url, "acme") as client:
        yield client


@pytest.fixture(scope="session")
def globex(api_url):
    with client_for(api_url, "globex") as client:
        yield client


# -- images ---------------------------------------------------------------------------------
def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def product_image(height: int, width: int, rgb: bool = False, seed: int = 0) -> np.ndarray:
    """A bright textured product on a dark background (so it has a foreground)."""
    rng = np.random.default_rng(seed)
    base = np.full((height, width), 20, np.uint8)
    y0, x0 = height // 8, width // 8
    base[y0 : height - y0, x0 : width - x0] = 150
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return np.stack([noisy, np.roll(noisy, 3, 1), noisy // 2 + 60], -1) if rgb else noisy


def defect_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 2 - height // 10 : height // 2 + height // 10, width // 2 - width // 8 : width // 2 + width // 8] = (
        255
    )
    return mask


def upload(
    client: httpx.Client, image: bytes, mask: bytes | None = None, product="widget", defect=None, name="image.png"
):
    files = {"image": (name, image)}
    if mask is not None:
        files["mask"] = ("mask.png", mask)
    data = {"product": product}
    if defect:
        data["defect"] = defect
    return client.post("/v1/exemplars", files=files, data=data)


def wait_for_job(client: httpx.Client, job_id: str, statuses=("succeeded", "failed", "cancelled"), timeout=90):
    from tests.processes import wait_until

    def done():
        job = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    return wait_until(done, timeout, f"job {job_id} to reach {statuses}", interval=0.2)
