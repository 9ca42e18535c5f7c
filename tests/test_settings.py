"""Settings: one pydantic-settings object, each setting documented in README and set in compose and k8s."""

import re
from pathlib import Path

import pytest
import yaml

from service.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {name.upper() for name in Settings.model_fields}
APP_SERVICES = ("api", "gpu-worker", "metrics-worker")
# Set per service (compose) or per Deployment (k8s) rather than shared: each kind needs its own value.
PER_SERVICE = {"HOST", "PORT", "DEVICE", "WORKER_METRICS_PORT"}


def test_defaults_and_derived_defaults(monkeypatch, tmp_path):
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("JOB_TIME_LIMIT", "100")
    monkeypatch.setenv("MAX_COUNT", "")  # empty counts as unset (compose's ${NAME:-})
    settings = Settings.from_env()
    assert settings.storage_url == f"file://{tmp_path}/storage"
    assert settings.visibility_timeout == 700
    assert settings.max_count == 10_000
    assert settings.weight_dirs == {"SD_MODEL_DIR": None, "CONVNEXT_MODEL_DIR": None, "BLIP2_MODEL_DIR": None}


@pytest.mark.parametrize(
    "env, fragment",
    [
        ({"API_KEYS": "no-colon"}, "API_KEYS"),
        ({"JOB_TIME_LIMIT": "100", "VISIBILITY_TIMEOUT": "50"}, "must exceed JOB_TIME_LIMIT"),
        ({"PORT": "eighty"}, "PORT"),
        ({"DEVICE": "tpu"}, "DEVICE"),
        ({"STORAGE_URL": "http://bucket"}, "must start with file:// or s3://"),
        ({"DOWNSTREAM_PRECISION": "fp8"}, "DOWNSTREAM_PRECISION"),
    ],
)
def test_a_malformed_setting_is_named(monkeypatch, env, fragment):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=fragment):
        Settings.from_env()


def test_api_keys_stay_out_of_the_repr(monkeypatch):
    monkeypatch.setenv("API_KEYS", "acme:secret-key-123")
    settings = Settings.from_env()
    assert settings.api_keys == {"secret-key-123": "acme"}
    assert "secret-key-123" not in repr(settings)


def test_every_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Settings") :]
    table = table[: table.index("\n## ", 1)]
    rows = "\n".join(row for row in table.splitlines() if row.startswith("|"))
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", rows))
    assert SETTINGS - documented == set()


def test_every_setting_is_set_in_compose():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    shared = set(compose["x-app-env"])
    for name in SETTINGS - shared:
        in_services = [name in compose["services"][service]["environment"] for service in APP_SERVICES]
        # Per-service settings are set where they apply; API_KEYS only on the API, the one that checks keys.
        assert name in PER_SERVICE | {"API_KEYS"} and any(in_services), f"{name} is missing from x-app-env"
    assert SETTINGS - {"API_KEYS"} - PER_SERVICE <= shared


def test_every_setting_is_in_the_k8s_configmap_secret_or_deployments():
    k8s = ROOT / "deploy" / "k8s"
    configmap = yaml.safe_load((k8s / "configmap.yaml").read_text())["data"]
    secret = yaml.safe_load((k8s / "secret.example.yaml").read_text())["stringData"]
    deployment_env = set()
    for manifest in ("api.yaml", "gpu-worker.yaml", "metrics-worker.yaml"):
        for document in yaml.safe_load_all((k8s / manifest).read_text()):
            if document and document["kind"] == "Deployment":
                for container in document["spec"]["template"]["spec"]["containers"]:
                    deployment_env |= {entry["name"] for entry in container.get("env", [])}
    for name in SETTINGS:
        where = name in configmap, name in secret, name in PER_SERVICE and name in deployment_env
        assert any(where), f"{name} is set nowhere in deploy/k8s"
