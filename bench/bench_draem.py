"""Wall time of a `draem` generate job of 100 pairs at 256x256, through the API and a real worker.

Target: under 30 s on a 2-core CPU. Measured from submit to `succeeded`, so it includes queueing,
loading inputs, writing 200 PNGs, the manifest and the preview.

    .venv/bin/python -m bench.bench_draem [--count 100] [--size 256] [--rgb]
"""

import argparse
import os
import platform
import time

import httpx
import numpy as np

from bench.common import png, running_service


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rgb", action="store_true")
    parser.add_argument("--method", default="draem")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (args.size, args.size, 3) if args.rgb else (args.size, args.size)
    with running_service(with_worker=True) as base:
        client = httpx.Client(base_url=base, timeout=60)
        normals = [
            client.post(
                "/v1/exemplars",
                files={"image": ("n.png", png(rng.integers(60, 200, shape, dtype=np.uint8)))},
                data={"product": "bench"},
            ).json()["id"]
            for _ in range(4)
        ]
        mask = np.zeros((args.size, args.size), np.uint8)
        mask[100:140, 90:170] = 255
        exemplar = client.post(
            "/v1/exemplars",
            files={"image": ("a.png", png(rng.integers(0, 255, shape, dtype=np.uint8))), "mask": ("m.png", png(mask))},
            data={"product": "bench", "defect": "stain"},
        ).json()["id"]
        for source in ("native", "exemplar"):
            start = time.perf_counter()
            job_id = client.post(
                "/v1/jobs",
                json={
                    "kind": "generate",
                    "method": args.method,
                    "count": args.count,
                    "normals": normals,
                    "exemplars": [exemplar],
                    "masks": {"source": source},
                },
            ).json()["id"]
            while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                time.sleep(0.05)
            elapsed = time.perf_counter() - start
            print(
                f"{platform.node()} ({os.cpu_count()} cores): {args.method} {args.count} pairs "
                f"at {args.size}x{args.size} "
                f"{'RGB' if args.rgb else 'L'}, masks {source}: {job['status']} in {elapsed:.2f} s "
                f"(worker-side {job['finished_at'] - job['started_at']:.2f} s; target < 30 s)"
            )


if __name__ == "__main__":
    main()
