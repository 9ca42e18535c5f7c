"""Soak: `make run`'s embedded service under mixed load and faults, then an exact audit.

`--clients` clients (20) submit small draem and cutpaste jobs, poll them, cancel some, list jobs and
download artifacts and exports, for `--minutes` (30). Meanwhile the gpu worker is SIGKILLed every
`--kill-every` s (180) and the API once, half-way; the embedded supervisor restarts both. Then
every job is waited for and audited: none lost (each submitted id is found, and ends), none with
duplicated pairs (a succeeded job has exactly `count` images and masks, manifest indices
0..count-1), and no 5xx answered at any time.

    .venv/bin/python -m bench.bench_soak [--minutes 30] [--clients 20]
"""

import argparse
import asyncio
import json
import os
import platform
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from bench.common import ROOT, png
from service.embedded import free_port

TERMINAL = ("succeeded", "failed", "cancelled")
OPEN_PER_CLIENT = 3


class Soak:
    def __init__(self, base: str):
        self.base = base
        self.statuses: Counter = Counter()
        self.connection_errors = 0
        self.jobs: dict[str, int] = {}  # id -> count
        self.cancelled: set[str] = set()
        self.server_errors: list[str] = []

    async def call(self, client: httpx.AsyncClient, method: str, path: str, **kwargs) -> httpx.Response | None:
        try:
            response = await client.request(method, path, **kwargs)
        except httpx.TransportError:  # the API being restarted: the client retries later
            self.connection_errors += 1
            await asyncio.sleep(0.5)
            return None
        self.statuses[response.status_code] += 1
        if response.status_code >= 500:
            self.server_errors.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
        return response

    async def client(self, normals: list[str], deadline: float, seed: int):
        """Submits only while it has fewer than OPEN_PER_CLIENT unfinished jobs, as a script waiting
        for its jobs would: the queue stays as long as the workers can run, and the audit complete."""
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as client:
            mine: list[str] = []
            unfinished: set[str] = set()
            while time.monotonic() < deadline:
                action = rng.choices(["submit", "poll", "cancel", "list", "download"], [3, 8, 1, 1, 2])[0]
                if (action == "submit" and len(unfinished) < OPEN_PER_CLIENT) or not mine:
                    count = rng.randint(2, 8)
                    body = {"kind": "generate", "method": rng.choice(["draem", "cutpaste"]), "count": count,
                            "normals": rng.sample(normals, rng.randint(1, 3)), "seed": rng.randrange(2**32)}
                    response = await self.call(client, "POST", "/v1/jobs", json=body)
                    if response is not None and response.status_code == 202:
                        self.jobs[response.json()["id"]] = count
                        mine.append(response.json()["id"])
                        unfinished.add(mine[-1])
                elif action in ("poll", "submit"):
                    job_id = rng.choice(sorted(unfinished) or mine)
                    response = await self.call(client, "GET", f"/v1/jobs/{job_id}")
                    if response is not None and response.status_code == 200 and response.json()["status"] in TERMINAL:
                        unfinished.discard(job_id)
                elif action == "cancel":
                    job_id = rng.choice(mine)
                    response = await self.call(client, "DELETE", f"/v1/jobs/{job_id}")
                    if response is not None and response.status_code == 202:
                        self.cancelled.add(job_id)
                elif action == "list":
                    await self.call(client, "GET", "/v1/jobs", params={"limit": 20})
                else:
                    job_id = rng.choice(mine)
                    if rng.random() < 0.3:
                        await self.call(client, "GET", f"/v1/jobs/{job_id}/export")
                    else:
                        response = await self.call(client, "GET", f"/v1/jobs/{job_id}/artifacts")
                        if response is not None and response.status_code == 200 and response.json()["items"]:
                            item = rng.choice(response.json()["items"])
                            await self.call(client, "GET", item["url"].removeprefix(self.base))
                await asyncio.sleep(rng.uniform(0.1, 0.6))

    async def audit(self, timeout: float) -> dict:
        lost, stuck, duplicated, wrong, ended = [], [], [], [], Counter()
        async with httpx.AsyncClient(base_url=self.base, timeout=60) as client:
            deadline = time.monotonic() + timeout
            pending = set(self.jobs)
            while pending and time.monotonic() < deadline:
                for job_id in list(pending):
                    response = await self.call(client, "GET", f"/v1/jobs/{job_id}")
                    if response is None:
                        continue
                    if response.status_code == 404:
                        lost.append(job_id)
                        pending.discard(job_id)
                    elif response.json()["status"] in TERMINAL:
                        pending.discard(job_id)
                if pending:
                    await asyncio.sleep(2)
            stuck = sorted(pending)
            for job_id, count in self.jobs.items():
                if job_id in lost or job_id in pending:
                    continue
                job = (await client.get(f"/v1/jobs/{job_id}")).json()
                ended[job["status"]] += 1
                if job["status"] == "failed":
                    wrong.append(f"{job_id}: failed: {job['error']}")
                if job["status"] != "succeeded":
                    continue
                items = (await client.get(f"/v1/jobs/{job_id}/artifacts")).json()["items"]
                images = [a for a in items if "/images/" in a["key"]]
                masks = [a for a in items if "/masks/" in a["key"]]
                url = next(a["url"] for a in items if a["key"].endswith("manifest.json"))
                indices = sorted(p["index"] for p in json.loads((await client.get(url)).content)["pairs"])
                if len(images) != count or len(masks) != count or indices != list(range(count)):
                    duplicated.append(f"{job_id}: {len(images)} images, {len(masks)} masks for {count}")
        return {"lost": lost, "stuck": stuck, "duplicated": duplicated, "failed": wrong, "ended": dict(ended)}


def pids(log: Path, part: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{part} started \(pid (\d+)", log.read_text())]


async def chaos(log: Path, deadline: float, kill_every: float, api_at: float, events: list[str]):
    started = time.monotonic()
    next_kill, api_done = started + kill_every, False
    while time.monotonic() < deadline:
        await asyncio.sleep(1)
        now = time.monotonic()
        if now >= next_kill:
            pid = pids(log, "gpu worker")[-1]
            os.killpg(pid, signal.SIGKILL)
            events.append(f"{now - started:6.0f} s: SIGKILL gpu worker (pid {pid})")
            next_kill += kill_every
        if not api_done and now - started >= api_at:
            pid = pids(log, "api")[-1]
            os.killpg(pid, signal.SIGKILL)
            events.append(f"{now - started:6.0f} s: SIGKILL api (pid {pid})")
            api_done = True


def other_load(session: int) -> str:
    """The busiest processes on the machine outside this soak's service (its session), to say what
    else was running."""
    out = subprocess.run(["ps", "-eo", "pcpu,sess,etimes,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    lines = [line.strip()[:110] for line in out.splitlines()[1:]
             if float(line.split()[0]) >= 5.0 and int(line.split()[1]) != session and str(os.getpid()) not in line]
    return "\n    ".join(lines[:8]) or "nothing over 5% CPU"


async def run(base: str, log: Path, session: int, args) -> None:
    soak = Soak(base)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        rng = np.random.default_rng(0)
        normals = []
        for index in range(6):
            image = np.clip(rng.normal(120, 25, (96, 96)), 0, 255).astype(np.uint8)
            response = await client.post("/v1/exemplars", files={"image": (f"n{index}.png", png(image))},
                                         data={"product": "soak"})
            normals.append(response.json()["id"])
    seconds = args.minutes * 60
    deadline = time.monotonic() + seconds
    events: list[str] = []
    start = time.monotonic()
    await asyncio.gather(
        chaos(log, deadline, args.kill_every, seconds / 2, events),
        *(soak.client(normals, deadline, seed) for seed in range(args.clients)),
    )
    ran = time.monotonic() - start
    result = await soak.audit(timeout=600)
    load = os.getloadavg()
    print(f"machine: {platform.node()} {os.cpu_count()} cores; load average at the end {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; ran {ran / 60:.1f} min with {args.clients} clients")
    print("faults:\n    " + "\n    ".join(events))
    print(f"requests by status: {dict(sorted(soak.statuses.items()))}; connection errors (API restarting): "
          f"{soak.connection_errors}")
    print(f"5xx: {len(soak.server_errors)} {soak.server_errors[:3]}")
    print(f"jobs: {len(soak.jobs)} submitted, {len(soak.cancelled)} cancel requests; ended {result['ended']}")
    print(f"lost: {len(result['lost'])}; never ended: {len(result['stuck'])} {result['stuck'][:3]}; "
          f"duplicated or missing pairs: {len(result['duplicated'])} {result['duplicated'][:3]}; "
          f"failed: {len(result['failed'])} {result['failed'][:3]}")
    print(f"restarts logged: gpu worker {len(pids(log, 'gpu worker')) - 1}, api {len(pids(log, 'api')) - 1}")
    print("other processes at the end (%CPU, session, seconds, command):\n    " + other_load(session))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--kill-every", type=float, default=180)
    parser.add_argument("--heartbeat", type=int, default=5, help="WORKER_HEARTBEAT: a killed job returns after 4x")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "STORAGE_URL", "API_KEYS")}
        env.update(DATA_DIR=f"{tmp}/data", PORT=str(port), WORKER_METRICS_PORT=str(free_port()),
                   WORKER_HEARTBEAT=str(args.heartbeat), PYTHONUNBUFFERED="1")
        log = Path(tmp) / "embedded.log"
        with open(log, "wb") as out:
            service = subprocess.Popen([sys.executable, "-m", "service.embedded"], env=env, cwd=ROOT, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(base + "/readyz", timeout=1).status_code == 200 and " ready." in log.read_text():
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            asyncio.run(run(base, log, service.pid, args))
        finally:
            os.killpg(service.pid, signal.SIGTERM)
            service.wait(timeout=60)


if __name__ == "__main__":
    main()
