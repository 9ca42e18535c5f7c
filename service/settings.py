"""Settings from environment variables: one pydantic-settings object, each setting written once.

Every field is the upper-case environment variable of its name (`max_count` <- `MAX_COUNT`), and
every one is documented in README.md's settings table, in docker-compose.yml's `x-app-env` and in
the Kubernetes ConfigMap (a test checks all three). An empty variable counts as unset, so compose's
`${NAME:-}` passes the default through.
"""

import re
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Local weight directories a method may need, by setting name. The API reports a method whose
# weights are missing as unavailable (models.weights says why), so these are read by name.
WEIGHT_SETTINGS = ("SD_MODEL_DIR", "CONVNEXT_MODEL_DIR", "BLIP2_MODEL_DIR")


class SettingsError(ValueError):
    """A setting is malformed; the message says which and how to fix it."""


def parse_api_keys(raw: str | None) -> dict[str, str]:
    """`tenant:key,tenant:key` -> {key: tenant}."""
    keys: dict[str, str] = {}
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            raise ValueError(f"API_KEYS entry {item!r} is not 'tenant:key'")
        if key.strip() in keys:
            raise ValueError("API_KEYS lists the same key twice")
        keys[key.strip()] = tenant.strip()
    return keys


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$)(\*\.)?({_LABEL}\.)*{_LABEL}$")


def parse_allowed_hosts(raw: str) -> tuple[str, ...]:
    """`mes.example.com,*.plant.example.com,10.20.0.0/16` -> its entries, each checked: a host name
    (`*.` allows its subdomains) or an IP address or network in CIDR notation."""
    entries = []
    for item in raw.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            entries.append(str(ip_network(item, strict=False)))
        except ValueError:
            if not _HOST_NAME.match(item):
                raise ValueError(f"WEBHOOK_ALLOWED_HOSTS entry {item!r} is neither a host name nor a CIDR") from None
            entries.append(item)
    return tuple(entries)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(frozen=True, env_ignore_empty=True, extra="ignore")

    redis_url: str | None = Field(None, description="broker and job store; unset: `make run` starts an embedded Redis")
    data_dir: Path = Field(Path("data"), description="embedded Redis data and default local storage")
    storage_url: str | None = Field(None, description="file:///abs/dir or s3://bucket/prefix; default DATA_DIR/storage")
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, repr=False, description="tenant:key,tenant:key; unset: no auth, loopback only"
    )
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    sd_model_dir: str | None = Field(None, description="diffusers-format Stable Diffusion 1.5 directory")
    convnext_model_dir: str | None = Field(None, description="transformers ConvNextModel directory (GroundingAnomaly)")
    blip2_model_dir: str | None = Field(
        None, description="transformers BLIP-2 directory with tokenizer and image processor (AnomalyControl)"
    )
    inception_weights: str | None = None
    lpips_weights: str | None = None
    device: Literal["cuda", "cpu"] | None = Field(None, description="the workers' device; default cuda when present")
    downstream_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="evaluate jobs on the CPU: bf16 autocast where the CPU supports it (auto), or forced"
    )
    max_image_side: int = Field(4096, ge=16)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_count: int = Field(10_000, ge=1)
    max_dataset_bytes: int = Field(2 << 30, ge=1024)
    job_time_limit: int = Field(6 * 3600, ge=1)
    visibility_timeout: int | None = Field(None, ge=1, description="default JOB_TIME_LIMIT + 600")
    worker_metrics_port: int = Field(9101, ge=0, le=65535)
    worker_heartbeat: int = Field(15, ge=1)
    finetune_checkpoint_every: int = Field(
        250, ge=1, description="fine-tune steps between training checkpoints (a resumed job restarts from the last)"
    )
    artifact_url_expiry: int = Field(3600, ge=1)
    s3_public_endpoint_url: str | None = Field(
        None, description="S3 endpoint as callers reach it; presigned URLs point there. Unset behind a private S3 "
        "endpoint: downloads stream through the API"
    )
    retention_days: float | None = Field(
        None, gt=0, description="finished jobs older than this are removed with their outputs; unset: kept"
    )
    webhook_secret: str | None = Field(None, repr=False, description="HMAC-SHA256 key of X-Synth-Signature")
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = Field(
        ("localhost", "127.0.0.0/8", "::1/128"), description="host names and CIDRs a callback_url may name"
    )
    webhook_max_attempts: int = Field(6, ge=1, le=30)
    webhook_backoff: float = Field(30.0, gt=0, description="seconds before the first retry; doubled for each next one")
    webhook_timeout: float = Field(10.0, gt=0, description="seconds a receiver has to answer one delivery")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _parse_api_keys(cls, raw):
        return parse_api_keys(raw) if isinstance(raw, str) else raw

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _parse_allowed_hosts(cls, raw):
        return parse_allowed_hosts(raw) if isinstance(raw, str) else raw

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.resolve()

    @model_validator(mode="after")
    def _derived_defaults(self):
        # The model is frozen; derived defaults are filled in once, here.
        if self.storage_url is None:
            object.__setattr__(self, "storage_url", "file://" + str(self.data_dir / "storage"))
        if not self.storage_url.startswith(("file://", "s3://")):
            raise ValueError(f"STORAGE_URL={self.storage_url!r} must start with file:// or s3://")
        if self.visibility_timeout is None:
            object.__setattr__(self, "visibility_timeout", self.job_time_limit + 600)
        if self.visibility_timeout <= self.job_time_limit:
            raise ValueError(
                f"VISIBILITY_TIMEOUT={self.visibility_timeout} must exceed JOB_TIME_LIMIT={self.job_time_limit}: "
                "otherwise Redis hands a still-running job to a second worker"
            )
        return self

    @classmethod
    def from_env(cls) -> "Settings":
        """The settings of this process's environment; SettingsError names what is malformed."""
        try:
            return cls()
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in error['loc']).upper() or 'settings'}: {error['msg']}"
                for error in exc.errors()
            )
            raise SettingsError(problems) from None

    @property
    def weight_dirs(self) -> dict[str, str | None]:
        """The local weight directories, by setting name (WEIGHT_SETTINGS)."""
        return {name: getattr(self, name.lower()) for name in WEIGHT_SETTINGS}

    @property
    def orphan_after(self) -> int:
        """Seconds without a heartbeat after which a running job's worker is taken for dead."""
        return 4 * self.worker_heartbeat

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)
