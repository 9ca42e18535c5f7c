"""Webhooks: a job that ends (succeeded, failed, cancelled) POSTs its JSON to its `callback_url`.

Signed like Stripe's and GitHub's: `X-Synth-Signature: sha256=<hex HMAC-SHA256 of the raw body>`
keyed with WEBHOOK_SECRET. The body is the job as GET /v1/jobs/{id} returns it, so its
`finished_at` and `callback.last_attempt_at` (the time of this attempt) let a receiver refuse an
old request replayed at it, and `X-Synth-Delivery` (the same for every attempt of one job's
delivery) lets it drop a retry of a request it already took.

Only hosts of WEBHOOK_ALLOWED_HOSTS may be called back (a job must not make the workers reach
into any network its submitter names): checked at submit, and again before each attempt.

Delivery runs in the workers' main processes (workers/webhooks.py), never in an API request: a
job's end makes its delivery due in Redis (service.records), a sweep takes it, tries it here, and
records the outcome in the job's `callback`, with a retry after WEBHOOK_BACKOFF x 2^(n-1) seconds
until WEBHOOK_MAX_ATTEMPTS attempts were made.
"""

import hashlib
import hmac
import json
import socket
import uuid
from ipaddress import ip_address, ip_network
from urllib.parse import urlsplit

import httpx

from service.records import Records, now
from service.schemas import Job
from service.settings import Settings

EVENT = "job.finished"
USER_AGENT = "anomaly-synth-webhooks/1"


def _is_network(entry: str) -> bool:
    try:
        ip_network(entry)
        return True
    except ValueError:
        return False


def callback_refusal(url: str, allowed_hosts: tuple[str, ...]) -> str | None:
    """Why `url` may not be called back, or None if it may. A host name must be listed (`*.` entries
    cover subdomains) or resolve only to addresses inside the listed networks; an address must be
    inside them."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "callback_url must be an absolute http:// or https:// URL"
    host = parts.hostname
    networks = [ip_network(entry) for entry in allowed_hosts if _is_network(entry)]
    names = [entry for entry in allowed_hosts if not _is_network(entry)]
    refusal = f"callback host {host!r} is not in WEBHOOK_ALLOWED_HOSTS (the hosts and networks that may be called)"
    try:
        return None if any(ip_address(host) in network for network in networks) else refusal
    except ValueError:  # a host name, not an address
        pass
    if any(host == name or (name.startswith("*.") and host.endswith(name[1:])) for name in names):
        return None
    if not networks:
        return refusal
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        return f"callback host {host!r} does not resolve"
    inside = all(any(ip_address(a.split("%")[0]) in network for network in networks) for a in addresses)
    return None if addresses and inside else refusal


def new_callback(url: str) -> dict:
    """A job's delivery state at submit: pending until the job ends and a receiver answers 2xx."""
    return {
        "url": url,
        "status": "pending",
        "delivery_id": uuid.uuid4().hex,
        "attempts": 0,
        "last_status": None,
        "last_error": None,
        "last_attempt_at": None,
        "next_attempt_at": None,
        "delivered_at": None,
    }


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def deliver(records: Records, settings: Settings, client: httpx.Client, job_id: str) -> str | None:
    """One attempt at a job's webhook. Returns `delivered`, `retrying` or `failed`; None when there
    was nothing to send (the job was purged, or its webhook delivered already)."""
    job = records.get_job(job_id)
    callback = (job or {}).get("callback")
    if not callback or callback["status"] != "pending":
        records.drop_callback(job_id)
        return None
    callback = job["callback"] = callback | {"attempts": callback["attempts"] + 1, "last_attempt_at": now()}
    body = json.dumps(Job.model_validate(job).model_dump(mode="json")).encode()
    status_code, error = None, callback_refusal(callback["url"], settings.webhook_allowed_hosts)
    if error is None and not settings.webhook_secret:
        error = "WEBHOOK_SECRET is not set on the workers: the request cannot be signed"
    if error is None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Synth-Event": EVENT,
            "X-Synth-Delivery": callback["delivery_id"],
            "X-Synth-Attempt": str(callback["attempts"]),
            "X-Synth-Signature": signature(settings.webhook_secret, body),
        }
        try:
            status_code = client.post(callback["url"], content=body, headers=headers).status_code
            error = None if 200 <= status_code < 300 else f"the receiver answered HTTP {status_code}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
    callback |= {"last_status": status_code, "last_error": error}
    if error is None:
        outcome, retry_in = "delivered", None
        callback |= {"status": "delivered", "delivered_at": now(), "next_attempt_at": None}
    elif callback["attempts"] >= settings.webhook_max_attempts:
        outcome, retry_in = "failed", None
        callback |= {"status": "failed", "next_attempt_at": None}
    else:
        outcome, retry_in = "retrying", settings.webhook_backoff * 2 ** (callback["attempts"] - 1)
        callback["next_attempt_at"] = now() + retry_in
    return outcome if records.set_callback(job_id, callback, retry_in) else None
