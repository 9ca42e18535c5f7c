"""Peak memory of a generate job's worker against the number of normal images it lists.

A generate worker keeps a bounded number of decoded normal images (models.methods.interface
.NORMALS_KEPT), so its peak memory must not grow with `normals`. Two cutpaste jobs through the
API and a real worker, on 1024x1024 RGB normals: one listing 20 normals, one listing 2,000 (every
one of which it uses). Prints each job's wall time and the peak RSS (VmHWM) of the worker's
pool process, read after the job, and the size all the decoded normals would take.

    .venv/bin/python -m bench.bench_generate_memory [--normals 2000] [--size 1024]
"""

import argparse
import os
import platform
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import png, running_service


def celery_children() -> list[int]:
    """Pids of the Celery pool processes (whose parent is a Celery main process)."""
    def cmdline(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return b""

    def parent(pid):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])

    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    celery = {pid for pid in pids if b"celery" in cmdline(pid) and b"workers.celery_app" in cmdline(pid)}
    return [pid for pid in celery if parent(pid) in celery]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def smooth_image(rng, size: int) -> np.ndarray:
    """A smooth product-like RGB image (compresses well, so 2,000 of them fit on disk)."""
    coarse = rng.integers(40, 220, (9, 9, 3)).astype(np.float32)
    ys = np.linspace(0, 8, size)
    rows = np.stack([np.interp(ys, np.arange(9), coarse[:, j, c]) for j in range(9) for c in range(3)], -1)
    rows = rows.reshape(size, 9, 3)
    image = np.stack([np.stack([np.interp(ys, np.arange(9), rows[i, :, c]) for c in range(3)], -1)
                      for i in range(size)])
    return image.astype(np.uint8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--normals", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with running_service(with_worker=True) as base:
        client = httpx.Client(base_url=base, timeout=120)
        mask = np.zeros((args.size, args.size), np.uint8)
        mask[args.size * 2 // 5 : args.size // 2, args.size * 3 // 8 : args.size * 5 // 8] = 255
        exemplar = client.post("/v1/exemplars", files={"image": ("a.png", png(smooth_image(rng, args.size))),
                                                       "mask": ("m.png", png(mask))},
                               data={"product": "bench", "defect": "stain"}).json()["id"]
        templates = [png(smooth_image(rng, args.size)) for _ in range(8)]
        started = time.perf_counter()
        normals = [client.post("/v1/exemplars", files={"image": ("n.png", templates[i % 8])},
                               data={"product": "bench"}).json()["id"] for i in range(args.normals)]
        elapsed = time.perf_counter() - started
        print(f"uploaded {len(normals)} normals of {args.size}x{args.size} RGB in {elapsed:.0f} s")
        decoded_gib = args.normals * args.size * args.size * 3 / 2**30
        for listed in (20, args.normals):
            started = time.perf_counter()
            job_id = client.post("/v1/jobs", json={
                "kind": "generate", "method": "cutpaste", "count": listed, "normals": normals[:listed],
                "exemplars": [exemplar], "masks": {"source": "exemplar"}, "seed": 1,
            }).json()["id"]
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
                time.sleep(1)
            assert job["status"] == "succeeded", job
            peaks = [peak_rss_mib(pid) for pid in celery_children()]
            print(f"{listed:5d} normals listed, {listed} pairs: {time.perf_counter() - started:6.1f} s, worker pool "
                  f"process peak RSS {max(peaks):.0f} MiB (all {listed} decoded would be "
                  f"{decoded_gib * listed / args.normals:.2f} GiB)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
