"""The numbers of the integrations issue, on real processes (Redis, the API as uvicorn, a worker):

1. listing latency with 100,000 jobs in one tenant: the first page (limit 100) of GET /v1/jobs,
   unfiltered and filtered by status=failed (1 % of the jobs), alternating;
2. submit latency with an Idempotency-Key and without, alternating;
3. webhook latency: from a job's end (its `finished_at`) to the receiver's arrival time, over 100
   jobs run by one worker.

The load generator shares the machine's cores with the service, and on a shared machine so do
others: beside each wall time, the API process's own CPU time per request (from /proc) says what
a request costs the server, whatever the load.

    .venv/bin/python -m bench.bench_integrations [--jobs 100000] [--pages 200] [--submits 500] [--webhooks 100]
"""

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

from bench.bench_api import KeepAliveClient, server_side_quantiles
from bench.common import percentile, png, running_service
from service.embedded import start_redis
from service.records import Records, connect, new_id, now
from tests.receiver import Receiver

TENANT = "default"  # the service runs without API_KEYS here


def _row(name: str, values: list[float], target: float | None = None) -> str:
    line = (f"{name:44s} n={len(values):5d}  p50={percentile(values, 50):7.2f} ms  "
            f"p95={percentile(values, 95):7.2f} ms  p99={percentile(values, 99):7.2f} ms")
    return line + (f"  (target < {target} ms)" if target else "")


def fill_jobs(redis_url: str, count: int, normal_id: str) -> None:
    """`count` finished jobs of one tenant, written through Records.create_job (every index filed as
    a submit files it); 1 % failed."""
    records = Records(connect(redis_url))
    started = now() - count
    for i in range(count):
        status = "failed" if i % 100 == 0 else "succeeded"
        job = {
            "id": new_id(), "tenant": TENANT, "kind": "generate", "method": "draem", "status": status,
            "progress": {"fraction": 1.0, "stage": "done", "done": 10, "total": 10},
            "created_at": started + i, "started_at": started + i, "finished_at": started + i + 0.5,
            "result": {"pairs": 10} if status == "succeeded" else None,
            "error": {"code": "job_failed", "message": "an input was lost"} if status == "failed" else None,
            "product": "bench", "defect": "anomaly", "count": 10, "seed": i, "exemplars": [], "normals": [normal_id],
            "adapter": None, "masks": {"source": "native"}, "params": {}, "dataset": None, "generated": [],
            "callback": None, "cancel_requested": False, "attempts": 1,
        }
        records.create_job(job)


def api_cpu_seconds(port: int) -> float:
    """CPU time (user + system) of the API process serving `port`, from /proc: what a request costs
    the server, whatever else the machine's cores are doing."""
    for proc in Path("/proc").iterdir():
        try:
            if b"service.serve" in (proc / "cmdline").read_bytes() and f"PORT={port}".encode() in (
                proc / "environ"
            ).read_bytes().split(b"\0"):
                fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
                return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            continue
    raise RuntimeError(f"no API process on port {port}")


async def listing(base: str, pages: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Wall time per request, and the API's CPU time per request, of each kind of first page, in
    alternating blocks of 10."""
    port = urlparse(base).port
    client = KeepAliveClient(urlparse(base).hostname, port)
    timings = {"unfiltered": [], "status=failed": []}
    cpu = dict.fromkeys(timings, 0.0)
    paths = {"unfiltered": "/v1/jobs?limit=100", "status=failed": "/v1/jobs?status=failed&limit=100"}
    for path in paths.values():  # warm-up
        status, body = await client.request("GET", path)
        assert status == 200 and len(body["items"]) == 100 and body["next_cursor"], body
    for _ in range(pages // 10):
        for name, path in paths.items():
            cpu_before = api_cpu_seconds(port)
            for _ in range(10):
                start = time.perf_counter()
                status, body = await client.request("GET", path)
                timings[name].append(time.perf_counter() - start)
                assert status == 200 and len(body["items"]) == 100
                if name == "status=failed":
                    assert all(job["status"] == "failed" for job in body["items"])
            cpu[name] += api_cpu_seconds(port) - cpu_before
    client.close()
    return timings, {name: 1000 * cpu[name] / len(timings[name]) for name in timings}


async def submits(base: str, normal_id: str, count: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """POST /v1/jobs with a fresh Idempotency-Key each time and without one, in alternating blocks
    of 10 from one keep-alive client: wall time per request and the API's CPU time per request."""
    port = urlparse(base).port
    client = KeepAliveClient(urlparse(base).hostname, port)
    timings = {"with Idempotency-Key": [], "without": []}
    cpu = dict.fromkeys(timings, 0.0)
    body = {"kind": "generate", "method": "draem", "normals": [normal_id], "count": 10}
    await client.request("POST", "/v1/jobs", body)  # warm-up
    for _ in range(count // 10):
        for name in timings:
            cpu_before = api_cpu_seconds(port)
            for _ in range(10):
                headers = {"Idempotency-Key": str(uuid.uuid4())} if name != "without" else None
                start = time.perf_counter()
                status, reply = await client.request("POST", "/v1/jobs", body, headers)
                timings[name].append(time.perf_counter() - start)
                assert status == 202, reply
            cpu[name] += api_cpu_seconds(port) - cpu_before
    client.close()
    return timings, {name: 1000 * cpu[name] / len(timings[name]) for name in timings}


def webhooks(count: int) -> list[float]:
    latencies = []
    with running_service(with_worker=True) as base, Receiver() as receiver:
        client = httpx.Client(base_url=base, timeout=30)
        image = np.full((32, 32), 128, np.uint8)
        normal = client.post("/v1/exemplars", files={"image": ("n.png", png(image))}, data={"product": "bench"}).json()
        ids = []
        for _ in range(count):
            reply = client.post("/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normal["id"]],
                                                  "count": 1, "callback_url": receiver.url + "/hook"})
            assert reply.status_code == 202, reply.text
            ids.append(reply.json()["id"])
        deadline = time.monotonic() + 600
        while len(receiver.requests_to("/hook")) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        for request in receiver.requests_to("/hook"):
            job = json.loads(request.body)
            latencies.append(request.at - job["finished_at"])
    return latencies


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--pages", type=int, default=200, help="of each kind, in blocks of 10")
    parser.add_argument("--submits", type=int, default=500, help="of each kind")
    parser.add_argument("--webhooks", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("WEBHOOK_SECRET", "bench-secret")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores (shared with the load generator)")
    with tempfile.TemporaryDirectory() as tmp, running_redis(Path(tmp)) as redis_url, running_service(
        with_worker=False, redis_url=redis_url
    ) as base:
        client = httpx.Client(base_url=base, timeout=30)
        image = np.full((32, 32), 128, np.uint8)
        normal = client.post("/v1/exemplars", files={"image": ("n.png", png(image))}, data={"product": "bench"}).json()
        start = time.perf_counter()
        fill_jobs(redis_url, args.jobs, normal["id"])
        print(f"filled {args.jobs} jobs in {time.perf_counter() - start:.1f} s")
        timings, cpu = asyncio.run(listing(base, args.pages))
        metrics = client.get("/metrics").text
        server = server_side_quantiles(metrics, "/v1/jobs", "GET")
        print(f"listing, first page of 100, {args.jobs} jobs in the tenant (load average {os.getloadavg()[0]:.1f}):")
        for name, values in timings.items():
            print(_row(f"  GET /v1/jobs {name}", values, 20 if name == "status=failed" else None)
                  + f"  API CPU {cpu[name]:.1f} ms/request")
        print(f"  server-side, both (histogram bucket bounds): p50 <= {server[0.5]} ms, p99 <= {server[0.99]} ms")
        timings, cpu = asyncio.run(submits(base, normal["id"], args.submits))
        print(f"submit, one client (load average {os.getloadavg()[0]:.1f}):")
        for name, values in timings.items():
            print(_row(f"  POST /v1/jobs {name}", values) + f"  API CPU {cpu[name]:.1f} ms/request")
    latencies = webhooks(args.webhooks)
    print(f"webhook, job end (finished_at) to receipt, {len(latencies)} of {args.webhooks} jobs, one worker "
          f"(load average {os.getloadavg()[0]:.1f}):")
    print(_row("  delivery latency", latencies))


@contextmanager
def running_redis(folder: Path):
    proc, url = start_redis(folder)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
