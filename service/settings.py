"""Settings from environment variables (every one is listed in README.md)."""

import os
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    """A setting is malformed; the message says which and how to fix it."""


def _int(env, name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def parse_api_keys(raw: str | None) -> dict[str, str]:
    """`tenant:key,tenant:key` -> {key: tenant}."""
    keys: dict[str, str] = {}
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise SettingsError(f"API_KEYS entry {item!r} is not 'tenant:key'")
        if key.strip() in keys:
            raise SettingsError("API_KEYS lists the same key twice")
        keys[key.strip()] = tenant.strip()
    return keys


@dataclass(frozen=True)
class Settings:
    redis_url: str | None = None  # None: embedded (service.embedded starts one and sets REDIS_URL)
    storage_url: str = "file://" + str(Path("data/storage").resolve())
    api_keys: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("data")
    sd_model_dir: str | None = None
    inception_weights: str | None = None
    lpips_weights: str | None = None
    device: str | None = None
    max_image_side: int = 4096
    max_upload_bytes: int = 20 * 1024 * 1024
    max_count: int = 10_000
    max_dataset_bytes: int = 2 << 30
    job_time_limit: int = 6 * 3600
    visibility_timeout: int = 6 * 3600 + 600
    worker_metrics_port: int = 9101
    worker_heartbeat: int = 15
    artifact_url_expiry: int = 3600

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        data_dir = Path(env.get("DATA_DIR") or "data").resolve()
        job_time_limit = _int(env, "JOB_TIME_LIMIT", 6 * 3600)
        visibility_timeout = _int(env, "VISIBILITY_TIMEOUT", job_time_limit + 600)
        if visibility_timeout <= job_time_limit:
            raise SettingsError(
                f"VISIBILITY_TIMEOUT={visibility_timeout} must exceed JOB_TIME_LIMIT={job_time_limit}: "
                "otherwise Redis hands a still-running job to a second worker"
            )
        storage_url = env.get("STORAGE_URL") or "file://" + str(data_dir / "storage")
        if not storage_url.startswith(("file://", "s3://")):
            raise SettingsError(f"STORAGE_URL={storage_url!r} must start with file:// or s3://")
        device = env.get("DEVICE") or None
        if device not in (None, "cuda", "cpu"):
            raise SettingsError(f"DEVICE={device!r} must be 'cuda' or 'cpu'")
        return cls(
            redis_url=env.get("REDIS_URL") or None,
            storage_url=storage_url,
            api_keys=parse_api_keys(env.get("API_KEYS")),
            host=env.get("HOST") or "127.0.0.1",
            port=_int(env, "PORT", 8000),
            data_dir=data_dir,
            sd_model_dir=env.get("SD_MODEL_DIR") or None,
            inception_weights=env.get("INCEPTION_WEIGHTS") or None,
            lpips_weights=env.get("LPIPS_WEIGHTS") or None,
            device=device,
            max_image_side=_int(env, "MAX_IMAGE_SIDE", 4096, minimum=16),
            max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", 20 * 1024 * 1024, minimum=1024),
            max_count=_int(env, "MAX_COUNT", 10_000),
            max_dataset_bytes=_int(env, "MAX_DATASET_BYTES", 2 << 30, minimum=1024),
            job_time_limit=job_time_limit,
            visibility_timeout=visibility_timeout,
            worker_metrics_port=_int(env, "WORKER_METRICS_PORT", 9101, minimum=0),
            worker_heartbeat=_int(env, "WORKER_HEARTBEAT", 15),
            artifact_url_expiry=_int(env, "ARTIFACT_URL_EXPIRY", 3600),
        )

    @property
    def orphan_after(self) -> int:
        """Seconds without a heartbeat after which a running job's worker is taken for dead."""
        return 4 * self.worker_heartbeat

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
