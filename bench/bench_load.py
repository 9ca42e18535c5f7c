"""Submit and poll latency under load while the workers run the jobs, on this machine.

`--clients` clients (50) each submit a small draem job, poll it every `--poll-interval` s (0.5) until
it ends, and go again, for `--seconds` (60). The workers (`--workers`, at nice 10 as `make run`
starts them) run every job on the same cores as the API, Redis and this load generator. After the
window, every job is waited for and checked exactly: succeeded, `count` images and masks, a
manifest with indices 0..count-1.

    .venv/bin/python -m bench.bench_load [--clients 50] [--seconds 60] [--workers 1]
"""

import argparse
import asyncio
import json
import os
import platform
import random
import time
from urllib.parse import urlparse

import httpx
import numpy as np

from bench.bench_api import KeepAliveClient, server_side_quantiles
from bench.common import percentile, png, running_service

COUNT = 3  # pairs per job: small jobs, so the workers stay busy with many of them
SIDE = 64


async def client_loop(address, normal_id, seconds, interval, submits, polls, errors, jobs):
    client = KeepAliveClient(*address)
    await asyncio.sleep(random.uniform(0, interval))
    deadline = time.perf_counter() + seconds
    body = {"kind": "generate", "method": "draem", "normals": [normal_id], "count": COUNT}
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        status, reply = await client.request("POST", "/v1/jobs", body)
        submits.append(time.perf_counter() - start)
        if status != 202:
            errors.append((status, reply))
            await asyncio.sleep(interval)
            continue
        jobs.append(reply["id"])
        while time.perf_counter() < deadline:
            await asyncio.sleep(interval)
            start = time.perf_counter()
            status, reply = await client.request("GET", f"/v1/jobs/{jobs[-1]}")
            polls.append(time.perf_counter() - start)
            if status != 200:
                errors.append((status, reply))
            elif reply["status"] in ("succeeded", "failed", "cancelled"):
                break
    client.close()


async def check_exact(client: httpx.AsyncClient, job_id: str) -> str | None:
    """None if the job succeeded with exactly COUNT pairs, else what is wrong."""
    for _ in range(1200):
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        await asyncio.sleep(0.5)
    if job["status"] != "succeeded":
        return f"{job_id}: {job['status']} {job.get('error')}"
    items = (await client.get(f"/v1/jobs/{job_id}/artifacts")).json()["items"]
    images = [a for a in items if "/images/" in a["key"]]
    masks = [a for a in items if "/masks/" in a["key"]]
    manifest_url = next(a["url"] for a in items if a["key"].endswith("manifest.json"))
    manifest = json.loads((await client.get(manifest_url)).content)
    indices = sorted(p["index"] for p in manifest["pairs"])
    if len(images) != COUNT or len(masks) != COUNT or indices != list(range(COUNT)):
        return f"{job_id}: {len(images)} images, {len(masks)} masks, indices {indices}"
    return None


async def run(base, args):
    address = (urlparse(base).hostname, urlparse(base).port)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        rng = np.random.default_rng(0)
        image = np.clip(rng.normal(128, 20, (SIDE, SIDE)), 0, 255).astype(np.uint8)
        normal = (await client.post("/v1/exemplars", files={"image": ("n.png", png(image))},
                                    data={"product": "bench"})).json()
        submits, polls, errors, jobs = [], [], [], []
        start = time.perf_counter()
        await asyncio.gather(*(
            client_loop(address, normal["id"], args.seconds, args.poll_interval, submits, polls, errors, jobs)
            for _ in range(args.clients)
        ))
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/metrics")).text
        drain = time.perf_counter()
        problems = [p for p in await asyncio.gather(*(check_exact(client, j) for j in jobs)) if p]
        drain = time.perf_counter() - drain
    load = os.getloadavg()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; "
          f"{args.clients} clients for {args.seconds} s, polls every {args.poll_interval} s, "
          f"{args.workers} worker(s) at nice 10, draem jobs of {COUNT} pairs at {SIDE} px")
    print(f"requests: {len(submits) + len(polls)} in {elapsed:.1f} s; errors: {len(errors)} {errors[:3]}")
    print(f"jobs: {len(jobs)} submitted; not exact: {len(problems)} {problems[:3]}; drained in {drain:.1f} s")
    for name, route, method in (("submit", "/v1/jobs", "POST"), ("poll", "/v1/jobs/{job_id}", "GET")):
        server = server_side_quantiles(metrics, route, method)
        print(f"{name:7s} server-side (histogram bucket bounds): p50 <= {server[0.5]} ms, p99 <= {server[0.99]} ms")
    for name, values, target in (("submit", submits, 100), ("poll", polls, 50)):
        quantiles = "  ".join(f"p{q}={percentile(values, q):6.1f} ms" for q in (50, 95, 99))
        print(f"{name:7s} n={len(values):6d}  {quantiles}  max={percentile(values, 100):6.1f} ms  "
              f"(target p99 <= {target} ms)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    with running_service(with_worker=True, workers=args.workers) as base:
        asyncio.run(run(base, args))


if __name__ == "__main__":
    main()
