"""Does CPU work stall other requests? /healthz and job-poll latency while large images upload.

`--uploads` clients (4) each upload a ~15 MB 4096x4096 JPEG as a normal image, `--rounds` times;
meanwhile one probe sends /healthz and GET /v1/jobs/{id} alternately every 20 ms. The same probe
also runs for a few seconds with no uploads, as a baseline, in the same run.

    .venv/bin/python -m bench.bench_event_loop [--uploads 4] [--rounds 3]
"""

import argparse
import asyncio
import io
import os
import platform
import time
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from bench.bench_api import KeepAliveClient
from bench.common import percentile, running_service

SIDE = 4096


def big_jpeg(seed: int) -> bytes:
    """Noise in 2x2 blocks compresses badly: about 15 MB at quality 90 and 4096 x 4096 RGB."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (SIDE // 2, SIDE // 2, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(np.repeat(np.repeat(coarse, 2, 0), 2, 1)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def probe(address, job_id, stop: asyncio.Event, health, polls):
    client = KeepAliveClient(*address)
    while not stop.is_set():
        for path, into in (("/healthz", health), (f"/v1/jobs/{job_id}", polls)):
            start = time.perf_counter()
            status, _ = await client.request("GET", path)
            into.append(time.perf_counter() - start)
            assert status == 200, status
            await asyncio.sleep(0.02)
    client.close()


async def uploader(base, data: bytes, rounds: int, durations, errors):
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        for _ in range(rounds):
            start = time.perf_counter()
            response = await client.post("/v1/exemplars", files={"image": ("big.jpg", data)}, data={"product": "b"})
            durations.append(time.perf_counter() - start)
            if response.status_code != 201:
                errors.append(response.text[:200])


async def measure(address, job_id, seconds=None, uploads=None):
    stop, health, polls = asyncio.Event(), [], []
    task = asyncio.create_task(probe(address, job_id, stop, health, polls))
    if uploads is None:
        await asyncio.sleep(seconds)
    else:
        await asyncio.gather(*uploads)
    stop.set()
    await task
    return health, polls


async def run(base, args):
    address = (urlparse(base).hostname, urlparse(base).port)
    images = [big_jpeg(seed) for seed in range(args.uploads)]
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        small = np.full((64, 64), 128, np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).save(buf, format="PNG")
        normal = (await client.post("/v1/exemplars", files={"image": ("n.png", buf.getvalue())},
                                    data={"product": "b"})).json()["id"]
        job_id = (await client.post("/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normal],
                                                        "count": 1})).json()["id"]
    idle = await measure(address, job_id, seconds=5)
    durations, errors = [], []
    busy = await measure(address, job_id, uploads=[uploader(base, data, args.rounds, durations, errors)
                                                   for data in images])
    load = os.getloadavg()
    print(f"machine: {platform.node()} {os.cpu_count()} cores, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print(f"uploads: {len(durations)} of {np.mean([len(d) for d in images]) / 1e6:.1f} MB ({SIDE}x{SIDE} JPEG), "
          f"{args.uploads} at a time; each took p50 {percentile(durations, 50) / 1000:.1f} s; errors {len(errors)}")
    for label, (health, polls) in (("idle", idle), ("while uploading", busy)):
        for name, values in (("/healthz", health), ("job poll", polls)):
            print(f"{label:16s} {name:9s} n={len(values):5d}  p50={percentile(values, 50):6.1f} ms  "
                  f"p99={percentile(values, 99):6.1f} ms  max={percentile(values, 100):7.1f} ms  (target p99 < 50 ms)")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with running_service(with_worker=False) as base:
        asyncio.run(run(base, args))


if __name__ == "__main__":
    main()
