"""Records of exemplars, datasets and jobs, kept in Redis so they outlive any API process.

Layout:
    exemplar:<id>, dataset:<id>    JSON string of the record
    job:<id>                       hash, one JSON-encoded value per field, so progress updates,
                                   cancel requests and status transitions never overwrite each other
    tenant:<t>:<kind>s             sorted set of ids by creation time (listing, newest first)
"""

import json
import time
import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")

# Set fields only if the current status is one of the allowed ones: one atomic step, so a worker
# finishing a job can never overwrite a cancel that landed a moment earlier.
_TRANSITION = """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return -1 end
local current = cjson.decode(raw)
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == current then
    redis.call('HSET', KEYS[1], unpack(ARGV, 2))
    return 1
  end
end
return 0
"""


# Take a job for a worker: it must be queued, or running with a heartbeat older than ARGV[1] (its
# worker died). Exclusive: two deliveries of one job can never both run it. Also files the job in
# the running set that orphan recovery scans.
_CLAIM = """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return -1 end
local status = cjson.decode(raw)
if status == 'running' then
  local beat = cjson.decode(redis.call('HGET', KEYS[1], 'heartbeat_at') or 'null')
  if beat ~= cjson.null and beat > tonumber(ARGV[1]) then return 0 end
elseif status ~= 'queued' then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# Set the fields ARGV[3..] of a running job whose heartbeat is older than ARGV[1] (its worker died):
# back to queued for orphan recovery, or cancelled for a DELETE. Either way it leaves the running set.
_TAKE_ORPHAN = """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw or cjson.decode(raw) ~= 'running' then
  redis.call('SREM', KEYS[2], ARGV[2])
  return 0
end
local beat = cjson.decode(redis.call('HGET', KEYS[1], 'heartbeat_at') or 'null')
if beat ~= cjson.null and beat > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

RUNNING_SET = "jobs:running"


def new_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return time.time()


# The API gives up on Redis quickly, so that with the store away a request is a 503 within about
# 2 s rather than a hang (redis-py would otherwise retry 10 times with backoff). Workers wait longer.
API_TIMEOUT = 0.5
WORKER_TIMEOUT = 5.0


def connect(url: str, timeout: float = WORKER_TIMEOUT) -> redis.Redis:
    """A client that waits at most `timeout` s to connect or for a reply, and retries once at once
    (a pooled connection that Redis closed, say after a restart)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
    )


class Records:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._take_orphan = client.register_script(_TAKE_ORPHAN)

    # -- exemplars and datasets: immutable JSON records ------------------------------------
    def put_record(self, kind: str, record: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.set(f"{kind}:{record['id']}", json.dumps(record))
        pipe.zadd(f"tenant:{record['tenant']}:{kind}s", {record["id"]: record["created_at"]})
        pipe.execute()

    def get_record(self, kind: str, tenant: str, record_id: str) -> dict | None:
        raw = self.redis.get(f"{kind}:{record_id}")
        record = json.loads(raw) if raw else None
        return record if record and record["tenant"] == tenant else None

    def get_records(self, kind: str, tenant: str, ids: list[str]) -> dict[str, dict]:
        """The tenant's records among `ids`, by id, in one round trip (a job may list 10,000)."""
        if not ids:
            return {}
        found = {}
        for raw in self.redis.mget([f"{kind}:{i}" for i in ids]):
            record = json.loads(raw) if raw else None
            if record and record["tenant"] == tenant:
                found[record["id"]] = record
        return found

    def list_records(self, kind: str, tenant: str, limit: int = 1000) -> list[dict]:
        ids = self.redis.zrevrange(f"tenant:{tenant}:{kind}s", 0, limit - 1)
        if not ids:
            return []
        raws = self.redis.mget([f"{kind}:{i}" for i in ids])
        return [json.loads(r) for r in raws if r]

    def delete_record(self, kind: str, record: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(f"{kind}:{record['id']}")
        pipe.zrem(f"tenant:{record['tenant']}:{kind}s", record["id"])
        pipe.execute()

    # -- jobs -------------------------------------------------------------------------------
    def create_job(self, job: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(f"job:{job['id']}", mapping={k: json.dumps(v) for k, v in job.items()})
        pipe.zadd(f"tenant:{job['tenant']}:jobs", {job["id"]: job["created_at"]})
        pipe.execute()

    def delete_job(self, job: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(f"job:{job['id']}")
        pipe.zrem(f"tenant:{job['tenant']}:jobs", job["id"])
        pipe.execute()

    def get_job(self, job_id: str, tenant: str | None = None) -> dict | None:
        """The job, or None if it does not exist or belongs to another tenant."""
        raw = self.redis.hgetall(f"job:{job_id}")
        if not raw:
            return None
        job = {k: json.loads(v) for k, v in raw.items()}
        if tenant is not None and job.get("tenant") != tenant:
            return None
        return job

    def get_job_field(self, job_id: str, field: str):
        raw = self.redis.hget(f"job:{job_id}", field)
        return json.loads(raw) if raw is not None else None

    def list_jobs(self, tenant: str, status: str | None, kind: str | None, limit: int) -> list[dict]:
        ids = self.redis.zrevrange(f"tenant:{tenant}:jobs", 0, -1)
        found: list[dict] = []
        for start in range(0, len(ids), 200):
            pipe = self.redis.pipeline()
            for job_id in ids[start : start + 200]:
                pipe.hgetall(f"job:{job_id}")
            for raw in pipe.execute():
                if not raw:
                    continue
                job = {k: json.loads(v) for k, v in raw.items()}
                if (status is None or job["status"] == status) and (kind is None or job["kind"] == kind):
                    found.append(job)
                    if len(found) == limit:
                        return found
        return found

    def update_job(self, job_id: str, **fields) -> None:
        self.redis.hset(f"job:{job_id}", mapping={k: json.dumps(v) for k, v in fields.items()})

    def claim(self, job_id: str, stale_before: float, **fields) -> bool:
        """Mark the job running for this worker (with `fields`), if it is queued or its last
        heartbeat is older than `stale_before`."""
        fields = {"status": "running", "heartbeat_at": now(), **fields}
        args = [stale_before, job_id]
        for key, value in fields.items():
            args += [key, json.dumps(value)]
        return self._claim(keys=[f"job:{job_id}", RUNNING_SET], args=args) == 1

    def heartbeat(self, job_id: str) -> None:
        self.redis.hset(f"job:{job_id}", "heartbeat_at", json.dumps(now()))

    def requeue_orphans(self, stale_before: float) -> list[dict]:
        """Running jobs whose worker stopped beating before `stale_before`, set back to queued."""
        requeued = []
        for job_id in self.redis.smembers(RUNNING_SET):
            if self._set_if_orphaned(job_id, stale_before, status="queued"):
                requeued.append(self.get_job(job_id))
        return requeued

    def cancel_if_orphaned(self, job_id: str, stale_before: float) -> bool:
        """Cancel a running job at once if its worker stopped beating before `stale_before`: no
        worker is left to see the cancel request."""
        return self._set_if_orphaned(job_id, stale_before, status="cancelled", finished_at=now())

    def _set_if_orphaned(self, job_id: str, stale_before: float, **fields) -> bool:
        args = [stale_before, job_id]
        for key, value in fields.items():
            args += [key, json.dumps(value)]
        return self._take_orphan(keys=[f"job:{job_id}", RUNNING_SET], args=args) == 1

    def transition(self, job_id: str, allowed_from: tuple[str, ...], **fields) -> bool:
        """Set `fields` (normally including a new status) only if the status is in allowed_from."""
        args = [",".join(allowed_from)]
        for key, value in fields.items():
            args += [key, json.dumps(value)]
        done = self._transition(keys=[f"job:{job_id}"], args=args) == 1
        if done and fields.get("status") in TERMINAL:
            self.redis.srem(RUNNING_SET, job_id)
        return done
