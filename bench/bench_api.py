"""Submit and poll latency of the API under 100 concurrent clients, on a real Redis.

Each client submits a generate job, then polls it every `--poll-interval` seconds (1 s: how a
script watching a job polls), `--polls` times, and does that `--rounds` times; clients start
spread over the first interval. No worker runs, so only the API and Redis are measured
(jobs stay queued). The load generator runs on the same machine and shares its cores.

    .venv/bin/python bench/bench_api.py [--clients 100] [--rounds 5] [--polls 10] [--poll-interval 1.0]
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

from bench.common import percentile, png, running_service


class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection, as one polling client holds. Deliberately minimal (JSON
    in and out, Content-Length framing, which uvicorn always sends): a full client library costs
    milliseconds a request on a small machine, which would be counted as server latency."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def request(
        self, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        payload = json.dumps(body).encode() if body is not None else b""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(payload)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        if body is not None:
            head += "Content-Type: application/json\r\n"
        self.writer.write(head.encode() + b"\r\n" + payload)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), json.loads(await self.reader.readexactly(length))

    def close(self):
        if self.writer is not None:
            self.writer.close()


async def client_loop(address, normal_id, rounds, polls, interval, submits, first_submits, gets, errors):
    client = KeepAliveClient(*address)
    await asyncio.sleep(random.uniform(0, interval))  # clients arrive spread over one interval
    for round_number in range(rounds):
        start = time.perf_counter()
        status, body = await client.request(
            "POST", "/v1/jobs", {"kind": "generate", "method": "draem", "normals": [normal_id], "count": 10}
        )
        (first_submits if round_number == 0 else submits).append(time.perf_counter() - start)
        if status != 202:
            errors.append(body)
            continue
        job_id = body["id"]
        for _ in range(polls):
            await asyncio.sleep(interval)
            start = time.perf_counter()
            status, body = await client.request("GET", f"/v1/jobs/{job_id}")
            gets.append(time.perf_counter() - start)
            if status != 200:
                errors.append(body)
    client.close()


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
    address = (urlparse(base).hostname, urlparse(base).port)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        image = np.full((64, 64), 128, np.uint8)
        normal = (
            await client.post("/v1/exemplars", files={"image": ("n.png", png(image))}, data={"product": "bench"})
        ).json()
        submits, first_submits, gets, errors = [], [], [], []
        start = time.perf_counter()
        await asyncio.gather(
            *(
                client_loop(address, normal["id"], args.rounds, args.polls, args.poll_interval, submits, first_submits,
                            gets, errors)
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
        f"requests: {len(submits) + len(first_submits) + len(gets)} in {elapsed:.1f} s "
        f"({(len(submits) + len(first_submits) + len(gets)) / elapsed:.0f}/s), "
        f"errors: {len(errors)}"
    )
    for name, route, method in (("submit", "/v1/jobs", "POST"), ("poll", "/v1/jobs/{job_id}", "GET")):
        server = server_side_quantiles(metrics, route, method)
        print(f"{name:7s} server-side (histogram bucket bounds): p50 <= {server[0.5]} ms, p99 <= {server[0.99]} ms")
    # A client's first submit also opens its connection (100 of them within a second): shown apart,
    # and together with the rest, so neither number hides the other.
    for name, values, target in (
        ("submit, all", submits + first_submits, 50),
        ("submit, first on a new connection", first_submits, 50),
        ("submit, on an open connection", submits, 50),
        ("poll (open connection)", gets, 20),
    ):
        print(
            f"{name:36s} n={len(values):5d}  p50={percentile(values, 50):6.1f} ms  "
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
