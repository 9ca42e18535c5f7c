"""Operations: the alert rules name metrics the service exports, the workers export the failure,
webhook and heartbeat metrics the rules read, and they send the task events Flower shows."""

import json
import re
import threading
from pathlib import Path
from urllib.parse import urlparse

import httpx
import prometheus_client
import yaml
from celery import Celery

from service.metrics import registry as api_registry
from tests.conftest import png_bytes, product_image, upload, wait_for_job
from tests.processes import wait_until
from tests.receiver import Receiver

ROOT = Path(__file__).resolve().parent.parent


def _exported_names() -> set[str]:
    import service.routers.health  # noqa: F401  (defines synth_queue_depth)
    import workers.metrics  # noqa: F401  (the workers' metrics, on the default registry here)

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for collector_registry in (api_registry, prometheus_client.REGISTRY):
        for metric in collector_registry.collect():
            names |= {metric.name + suffix for suffix in suffixes.get(metric.type, ("",))}
    return names


def test_alert_rules_cover_failures_queues_heartbeats_and_webhooks():
    rules = [r for g in yaml.safe_load((ROOT / "deploy" / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    exported = _exported_names()
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical") and rule["annotations"]["summary"], rule["alert"]
        for name in re.findall(r"\b(synth_[a-z_]+)", rule["expr"]):
            assert name in exported, f"{rule['alert']} reads {name}, which nothing exports"
    exprs = " ".join(r["expr"] for r in rules)
    for metric in ("synth_jobs_finished_total", "synth_queue_depth", "synth_worker_last_sweep_timestamp_seconds",
                   "synth_webhook_deliveries_total"):
        assert metric in exprs
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounted = {v.split(":")[1] for v in compose["services"]["prometheus"]["volumes"] if v.startswith("./")}
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"] and "/etc/prometheus/alerts.yml" in mounted


def test_flower_is_behind_a_compose_profile():
    flower = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]
    assert flower["profiles"] == ["flower"]
    assert "--broker=redis://redis:6379/0" in flower["command"] and flower["ports"][0].startswith("127.0.0.1:")


def test_workers_export_failures_by_code_and_webhook_outcomes(acme, service_env):
    normal = upload(acme, png_bytes(product_image(24, 24, seed=5))).json()["id"]
    storage = Path(urlparse(service_env["STORAGE_URL"]).path)
    (storage / "exemplars" / normal / "image.png").unlink()  # lost before the job runs: it fails
    with Receiver() as receiver:
        job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normal], "count": 1,
                                             "callback_url": receiver.url + "/ops"}).json()["id"]
        assert wait_for_job(acme, job_id)["error"]["code"] == "job_failed"
        wait_until(lambda: receiver.requests_to("/ops"), 30, "the webhook")
    metrics_url = f"http://127.0.0.1:{service_env['WORKER_METRICS_PORT']}/metrics"

    def scraped(pattern):
        match = re.search(pattern + r" ([0-9.e+]+)", httpx.get(metrics_url).text)
        return float(match.group(1)) if match else None

    wait_until(lambda: (scraped(r'synth_webhook_deliveries_total\{outcome="delivered"\}') or 0) >= 1, 10,
               "the delivery to be counted")
    assert scraped(r'synth_jobs_failed_total\{code="job_failed"\}') >= 1
    beat = scraped(r"synth_worker_last_sweep_timestamp_seconds")
    assert beat is not None and beat > 0


def test_workers_send_task_events(acme, redis_url):
    """What Flower reads: the worker's task events on the broker."""
    app = Celery(broker=redis_url)
    seen, ready = [], threading.Event()

    def listen():
        with app.connection() as connection:
            receiver = app.events.Receiver(connection, handlers={"*": lambda event: seen.append(event["type"])})
            ready.set()
            try:
                receiver.capture(limit=None, timeout=30, wakeup=False)
            except Exception:  # the capture ends on its timeout, or once the test has what it needs
                pass

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    assert ready.wait(10)
    normal = upload(acme, png_bytes(product_image(24, 24, seed=6))).json()["id"]
    job_id = acme.post("/v1/jobs", json={"kind": "generate", "method": "draem", "normals": [normal],
                                         "count": 1}).json()["id"]
    wait_for_job(acme, job_id)
    wait_until(lambda: "task-succeeded" in seen, 20, "the worker's task-succeeded event")


def test_the_dashboard_shows_every_exported_metric_and_reads_only_those():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "anomaly-synth.json").read_text())
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"\b(synth_[a-z_]+)", target["expr"])
    }
    exported = _exported_names()
    assert queried <= exported, f"the dashboard reads metrics nothing exports: {queried - exported}"
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in exported if name.startswith("synth_")}
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in queried}
    assert families <= shown, f"exported but on no panel: {families - shown}"
