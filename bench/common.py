"""Start a throwaway Redis and API for a benchmark (real processes, temporary directories)."""

import io
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from service.embedded import free_port, lower_priority, start_redis, worker_command

ROOT = Path(__file__).resolve().parent.parent


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@contextmanager
def running_service(with_worker: bool, workers: int = 1, extra_env: dict | None = None):
    """Yields the API base URL; Redis (append-only off), storage and logs live in a temp dir. Workers
    run at a lower CPU priority than the API, as `make run` starts them."""
    with tempfile.TemporaryDirectory() as tmp:
        redis_proc, redis_url = start_redis(Path(tmp))
        port = free_port()
        env = dict(
            os.environ,
            REDIS_URL=redis_url,
            STORAGE_URL=f"file://{tmp}/storage",
            PORT=str(port),
            WORKER_METRICS_PORT=str(free_port()),
            DATA_DIR=tmp,
            **(extra_env or {}),
        )
        env.pop("API_KEYS", None)
        log = open(Path(tmp) / "service.log", "wb")
        children = [
            subprocess.Popen(
                [sys.executable, "-m", "service.serve"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )
        ]
        for number in range(workers if with_worker else 0):
            command = worker_command("gpu", 1)
            command[command.index("--hostname") + 1] = f"gpu{number}@%h"
            worker_env = dict(env, WORKER_METRICS_PORT=str(free_port()))
            children.append(subprocess.Popen(command, env=worker_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                             preexec_fn=lower_priority))
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(base + "/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            if with_worker:  # wait for the workers to be ready
                for _ in range(600):
                    if (Path(tmp) / "service.log").read_bytes().count(b" ready.") >= workers:
                        break
                    time.sleep(0.1)
            yield base
        finally:
            for child in children:
                child.terminate()
            for child in children:
                child.wait(timeout=30)
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
