"""Submit and poll latency of the API under 100 concurrent clients, on a real Redis.

Each client submits a generate job, then polls it every `--poll-interval` seconds (1 s: how a
script watching a job polls), `--polls` times, and does that `--rounds` times; clients start
spread over the first interval. No worker runs, so only the API and Redis are measured
(jobs stay queued). The load generator runs on the same machine and shares its cores.

    .venv/bin/python bench/bench_api.py [--clients 100] [--rounds 5] [--polls 10] [--poll-interval 1.0]
"""

import argparse
import asyncio
import os
import platform
import random
import time

import httpx
import numpy as np

from bench.common import percentile, png, running_service


async def client_loop(client, normal_id, rounds, polls, interval, submits, gets, errors):
    await asyncio.sleep(random.uniform(0, interval))  # clients arrive spread over one interval
    for _ in range(rounds):
        start = time.perf_counter()
        response = await client.post(
            "/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normal_id], "count": 10}
        )
        submits.append(time.perf_counter() - start)
        if response.status_code != 202:
            errors.append(response.text)
            continue
        job_id = response.json()["id"]
        for _ in range(polls):
            await asyncio.sleep(interval)
            start = time.perf_counter()
            response = await client.get(f"/v1/jobs/{job_id}")
            gets.append(time.perf_counter() - start)
            if response.status_code != 200:
                errors.append(response.text)


def server_side_quantiles(metrics_text: str, route: str, method: str, quantiles=(0.5, 0.99)) -> dict:
    """Quantiles of the API's own latency histogram (upper bucket bounds, in ms): time spent in the
    server, without the load generator's share."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith("synth_http_request_duration_seconds_bucket") and f'route="{route}"' in line \
                and f'method="{method}"' in line:
            bound = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if bound == "+Inf" else float(bound), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0
    return {q: next((b * 1000 for b, c in buckets if c >= q * total), None) for q in quantiles}


async def run(base, args):
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30) as client:
        image = np.full((64, 64), 128, np.uint8)
        normal = (
            await client.post("/v1/exemplars", files={"image": ("n.png", png(image))}, data={"product": "bench"})
        ).json()
        submits, gets, errors = [], [], []
        start = time.perf_counter()
        await asyncio.gather(
            *(
                client_loop(client, normal["id"], args.rounds, args.polls, args.poll_interval, submits, gets, errors)
                for _ in range(args.clients)
            )
        )
        elapsed = time.perf_counter() - start
        metrics = (await client.get("/metrics")).text
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores; {args.clients} clients, {args.rounds} rounds, "
        f"{args.polls} polls every {args.poll_interval} s"
    )
    print(
        f"requests: {len(submits) + len(gets)} in {elapsed:.1f} s ({(len(submits) + len(gets)) / elapsed:.0f}/s), "
        f"errors: {len(errors)}"
    )
    for name, route, method in (("submit", "/v1/jobs", "POST"), ("poll", "/v1/jobs/{job_id}", "GET")):
        server = server_side_quantiles(metrics, route, method)
        print(f"{name:7s} server-side (histogram bucket bounds): p50 <= {server[0.5]} ms, p99 <= {server[0.99]} ms")
    for name, values, target in (("submit", submits, 50), ("poll", gets, 20)):
        print(
            f"{name:7s} n={len(values):5d}  p50={percentile(values, 50):6.1f} ms  "
            f"p95={percentile(values, 95):6.1f} ms  p99={percentile(values, 99):6.1f} ms  (target p99 < {target} ms)"
        )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--polls", type=int, default=10)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    args = parser.parse_args()
    with running_service(with_worker=False) as base:
        asyncio.run(run(base, args))


if __name__ == "__main__":
    main()
