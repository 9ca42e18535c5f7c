"""Records of exemplars, datasets and jobs, kept in Redis so they outlive any API process.

Layout:
    exemplar:<id>, dataset:<id>    JSON string of the record
    job:<id>                       hash, one JSON-encoded value per field, so progress updates,
                                   cancel requests and status transitions never overwrite each other
    tenant:<t>:<kind>s             sorted set of ids by creation time (listing, newest first)
    tenant:<t>:<kind>s:<field>:<v> the same, for one value of a filter (INDEXED): the list filters
                                   read these instead of the whole tenant's records
    jobs:finished                  finished jobs by finish time, for RETENTION_DAYS
    callbacks:due                  job ids whose webhook is due, by due time (Redis' clock)
    callbacks:wake                 a one-item doorbell list: a job with a callback just ended
    idempotency:<t>:<sha256(key)>  the first response to an Idempotency-Key, for 24 h

A job's status changes only inside the Lua scripts below, which move it between its status
indexes in the same atomic step (`refile`), so the indexes never disagree with the records.
"""

import base64
import hashlib
import json
import math
import time
import uuid

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("queued", "running")
# The list filters of each kind of record, each kept as a secondary index.
INDEXED = {"job": ("status", "kind", "product"), "exemplar": ("product", "defect", "kind"), "dataset": ("product",)}
FINISHED = "jobs:finished"
CALLBACKS_DUE = "callbacks:due"
CALLBACKS_WAKE = "callbacks:wake"
IDEMPOTENCY_TTL = 24 * 3600
INDEXES_BUILT = "indexes:version"  # set once the secondary indexes cover records older than them

# Called by every script that changes a job's status (from `old`), after it wrote the new one: moves
# the job to its new status index; on a terminal status files it for retention and, when it has a
# callback still to deliver, makes that due now and rings the delivery sweeps' doorbell.
_REFILE = """
local function refile(job_key, old)
  local job_id = string.sub(job_key, 5)
  local f = redis.call('HMGET', job_key, 'status', 'tenant', 'created_at', 'finished_at', 'callback')
  local new = cjson.decode(f[1])
  if new == old then return end
  local by_status = 'tenant:' .. cjson.decode(f[2]) .. ':jobs:status:'
  redis.call('ZREM', by_status .. old, job_id)
  redis.call('ZADD', by_status .. new, f[3] or 0, job_id)
  if new ~= 'succeeded' and new ~= 'failed' and new ~= 'cancelled' then return end
  local t = redis.call('TIME')
  local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local finished = f[4] and cjson.decode(f[4]) or cjson.null
  if finished == cjson.null then finished = clock end
  redis.call('ZADD', 'jobs:finished', finished, job_id)
  local callback = f[5] and cjson.decode(f[5]) or cjson.null
  if callback ~= cjson.null and callback['status'] == 'pending' then
    redis.call('ZADD', 'callbacks:due', clock, job_id)
    redis.call('LPUSH', 'callbacks:wake', job_id)
    redis.call('LTRIM', 'callbacks:wake', 0, 0)
  end
end
"""

# Set fields only if the current status is one of the allowed ones: one atomic step, so a worker
# finishing a job can never overwrite a cancel that landed a moment earlier.
_TRANSITION = _REFILE + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw then return -1 end
local current = cjson.decode(raw)
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == current then
    redis.call('HSET', KEYS[1], unpack(ARGV, 2))
    refile(KEYS[1], current)
    return 1
  end
end
return 0
"""


# Take a job for a worker: it must be queued, or running with a heartbeat older than ARGV[1] (its
# worker died). Exclusive: two deliveries of one job can never both run it. Also files the job in
# the running set that orphan recovery scans.
_CLAIM = _REFILE + """
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
refile(KEYS[1], status)
redis.call('SADD', KEYS[2], ARGV[2])
return 1
"""

# Set the fields ARGV[3..] of a running job whose heartbeat is older than ARGV[1] (its worker died):
# back to queued for orphan recovery, or cancelled for a DELETE. Either way it leaves the running set.
_TAKE_ORPHAN = _REFILE + """
local raw = redis.call('HGET', KEYS[1], 'status')
if not raw or cjson.decode(raw) ~= 'running' then
  redis.call('SREM', KEYS[2], ARGV[2])
  return 0
end
local beat = cjson.decode(redis.call('HGET', KEYS[1], 'heartbeat_at') or 'null')
if beat ~= cjson.null and beat > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
refile(KEYS[1], 'running')
redis.call('SREM', KEYS[2], ARGV[2])
return 1
"""

RUNNING_SET = "jobs:running"

# Create a job only if every record it reads still exists (a DELETE may have come in since its
# inputs were checked). KEYS[1]: its hash; KEYS[2..]: the records. ARGV[1]: its id, ARGV[2]: its
# score (created_at), ARGV[3]: the number n of index sets, ARGV[4..3+n]: those, then field/value pairs.
_CREATE_JOB = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return KEYS[i] end
end
local n = tonumber(ARGV[3])
for i = 4, 3 + n do redis.call('ZADD', ARGV[i], ARGV[2], ARGV[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n))
return false
"""

# Delete a record (exemplar, dataset or job) and its index entries, unless a queued or running job
# of the tenant reads it: then return that job's id. KEYS[1]: the record; KEYS[2], KEYS[3]: the
# tenant's queued and running job indexes; KEYS[4..]: the sets to remove it from. ARGV[1]: its id.
# A job names its inputs' ids as JSON strings, so a plain search of its input fields finds them.
_DELETE_UNUSED = """
local id = ARGV[1]
local needle = '"' .. id .. '"'
for i = 2, 3 do
  for _, job_id in ipairs(redis.call('ZRANGE', KEYS[i], 0, -1)) do
    if job_id ~= id then
      local inputs = redis.call('HMGET', 'job:' .. job_id, 'exemplars', 'normals', 'masks', 'adapter', 'dataset',
                                'generated')
      for _, raw in ipairs(inputs) do
        if raw and string.find(raw, needle, 1, true) then return job_id end
      end
    end
  end
end
redis.call('DEL', KEYS[1])
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], id) end
return false
"""

# Jobs as JSON objects, one string each ('' for a job that is gone): the hash's values are JSON
# already, so joining them here spares the client parsing a reply and a JSON value per field.
_LOAD_JOBS = """
local out = {}
for i, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  local parts = {}
  for j = 1, #flat, 2 do parts[#parts + 1] = cjson.encode(flat[j]) .. ':' .. flat[j + 1] end
  out[i] = #parts > 0 and '{' .. table.concat(parts, ',') .. '}' or ''
end
return out
"""

# Take the webhook deliveries due by Redis' clock, leasing each for ARGV[1] s (a sweep that dies
# mid-delivery leaves it to another after that). ARGV[2]: the most to take.
_TAKE_DUE_CALLBACKS = """
local t = redis.call('TIME')
local clock = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', clock, 'LIMIT', 0, ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], clock + tonumber(ARGV[1]), id) end
return ids
"""

# Record a delivery attempt's outcome on a job that still exists, and when to try again (ARGV[3]
# seconds from now by Redis' clock; empty: never). KEYS[1]: the job, KEYS[2]: the due set.
_SET_CALLBACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], 'callback', ARGV[2])
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[3]), ARGV[1])
end
return 1
"""

# The record of an Idempotency-Key: the stored one, or (when there is none) ARGV[1] is stored as
# this request's claim for ARGV[2] s and nothing is returned.
_CLAIM_IDEMPOTENCY_KEY = """
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return false
"""

# Delete KEYS[1] if it still holds ARGV[1].
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


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


def index_key(kind: str, tenant: str, field: str | None = None, value: str | None = None) -> str:
    """The sorted set of a tenant's records of `kind` (all of them, or those whose `field` is `value`)."""
    base = f"tenant:{tenant}:{kind}s"
    return base if field is None else f"{base}:{field}:{value}"


def index_keys(kind: str, record: dict) -> list[str]:
    """Every index a record is filed in: the tenant's list and one per filter field that has a value."""
    keys = [index_key(kind, record["tenant"])]
    for field in INDEXED[kind]:
        if record.get(field) is not None:
            keys.append(index_key(kind, record["tenant"], field, record[field]))
    return keys


class InvalidCursor(ValueError):
    pass


def encode_cursor(score: float, item_id: str) -> str:
    """An opaque page cursor: the position (score, id) of the last item a page returned."""
    return base64.urlsafe_b64encode(json.dumps([score, item_id]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        score, item_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if isinstance(score, (int, float)) and math.isfinite(score) and isinstance(item_id, str):
            return float(score), item_id
    except (ValueError, TypeError):
        pass
    raise InvalidCursor("the cursor is not one this API returned: pass `next_cursor` of the previous page")


class Records:
    def __init__(self, client: redis.Redis):
        self.redis = client
        self._transition = client.register_script(_TRANSITION)
        self._claim = client.register_script(_CLAIM)
        self._take_orphan = client.register_script(_TAKE_ORPHAN)
        self._create_job = client.register_script(_CREATE_JOB)
        self._load_jobs = client.register_script(_LOAD_JOBS)
        self._delete_unused = client.register_script(_DELETE_UNUSED)
        self._take_due_callbacks = client.register_script(_TAKE_DUE_CALLBACKS)
        self._set_callback = client.register_script(_SET_CALLBACK)
        self._claim_idempotency_key = client.register_script(_CLAIM_IDEMPOTENCY_KEY)
        self._delete_if_equal = client.register_script(_DELETE_IF_EQUAL)

    # -- exemplars and datasets: immutable JSON records ------------------------------------
    def put_record(self, kind: str, record: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.set(f"{kind}:{record['id']}", json.dumps(record))
        for key in index_keys(kind, record):
            pipe.zadd(key, {record["id"]: record["created_at"]})
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

    def delete_record(self, kind: str, record: dict) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(f"{kind}:{record['id']}")
        for key in index_keys(kind, record):
            pipe.zrem(key, record["id"])
        pipe.execute()

    def delete_if_unused(self, kind: str, record: dict) -> str | None:
        """Delete the record (exemplar, dataset or job) and its index entries in one atomic step,
        unless a queued or running job of its tenant reads it: then nothing changes and that job's
        id is returned."""
        tenant = record["tenant"]
        keys = [f"{kind}:{record['id']}", *(index_key("job", tenant, "status", s) for s in ACTIVE)]
        keys += index_keys(kind, record)
        if kind == "job":
            keys += [index_key("job", tenant, "status", s) for s in JOB_STATUSES] + [FINISHED, CALLBACKS_DUE]
        return self._delete_unused(keys=keys, args=[record["id"]])

    def page(
        self, kind: str, tenant: str, filters: dict[str, str | None], limit: int, cursor: str | None = None
    ) -> tuple[list[dict], str | None]:
        """One page of the tenant's records of `kind` that match every filter, newest first, and the
        cursor of the next page (None after the last).

        The page walks the smallest of the filters' indexes from the cursor's position and checks
        the others by membership, so its cost follows the page, not the tenant's record count. A
        cursor is a position (score, id), not an offset: records added or removed while a client
        pages through move no other record across a page boundary."""
        keys = [index_key(kind, tenant, f, v) for f, v in filters.items() if v is not None] or [index_key(kind, tenant)]
        if len(keys) > 1:
            pipe = self.redis.pipeline()
            for key in keys:
                pipe.zcard(key)
            keys = [key for _, key in sorted(zip(pipe.execute(), keys))]
        walk, others = keys[0], keys[1:]
        after = decode_cursor(cursor) if cursor else None
        found: list[tuple[str, float]] = []
        offset, batch = 0, limit + 1 if not others else max(4 * limit, 200)
        while len(found) <= limit:
            chunk = self.redis.zrevrangebyscore(
                walk, after[0] if after else "+inf", "-inf", start=offset, num=batch, withscores=True
            )
            if not chunk:
                break
            offset += len(chunk)
            if after:  # members tied with the cursor's score come in reverse id order: skip those up to it
                chunk = [(m, s) for m, s in chunk if s < after[0] or m < after[1]]
            if others and chunk:
                pipe = self.redis.pipeline()
                for member, _ in chunk:
                    for key in others:
                        pipe.zscore(key, member)
                scores = pipe.execute()
                chunk = [item for i, item in enumerate(chunk) if all(
                    s is not None for s in scores[i * len(others) : (i + 1) * len(others)])]
            found.extend(chunk)
        shown = found[:limit]
        next_cursor = encode_cursor(shown[-1][1], shown[-1][0]) if len(found) > limit else None
        return self._load(kind, [member for member, _ in shown]), next_cursor

    def _load(self, kind: str, ids: list[str]) -> list[dict]:
        """The records of `ids` in order, less any deleted since their ids were read."""
        if not ids:
            return []
        if kind == "job":
            raws = self._load_jobs(keys=[f"job:{i}" for i in ids])
        else:
            raws = self.redis.mget([f"{kind}:{i}" for i in ids])
        return [json.loads(raw) for raw in raws if raw]

    def build_indexes(self) -> None:
        """File records stored before the secondary indexes existed (once per database)."""
        if self.redis.get(INDEXES_BUILT):
            return
        for kind in INDEXED:
            for key in self.redis.scan_iter(match=f"{kind}:*", count=1000):
                if kind == "job":
                    fields = ("id", "tenant", "created_at", "finished_at", *INDEXED[kind])
                    raw = dict(zip(fields, self.redis.hmget(key, fields)))
                    if None in (raw["id"], raw["tenant"], raw["created_at"]):
                        continue
                    record = {k: json.loads(v) for k, v in raw.items() if v is not None}
                else:
                    raw = self.redis.get(key)
                    record = json.loads(raw) if raw else None
                if not record:
                    continue
                pipe = self.redis.pipeline()
                for index in index_keys(kind, record):
                    pipe.zadd(index, {record["id"]: record["created_at"]})
                if kind == "job" and record.get("status") in TERMINAL:
                    pipe.zadd(FINISHED, {record["id"]: record.get("finished_at") or record["created_at"]})
                pipe.execute()
        self.redis.set(INDEXES_BUILT, "1")

    # -- jobs -------------------------------------------------------------------------------
    def create_job(self, job: dict, reads: list[str] = ()) -> str | None:
        """Store a new job and file it in its indexes, only if each of the records `reads` names
        ("exemplar:<id>", "dataset:<id>", "job:<id>") still exists; else return the first missing one."""
        indexes = index_keys("job", job)
        args = [job["id"], job["created_at"], len(indexes), *indexes]
        for key, value in job.items():
            args += [key, json.dumps(value)]
        return self._create_job(keys=[f"job:{job['id']}", *reads], args=args)

    def delete_job(self, job: dict) -> None:
        """Remove a job that never ran (its submit failed) and its index entries."""
        pipe = self.redis.pipeline()
        pipe.delete(f"job:{job['id']}")
        for key in index_keys("job", job):
            pipe.zrem(key, job["id"])
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

    def finished_before(self, cutoff: float, limit: int = 100) -> list[str]:
        """Ids of jobs that finished before `cutoff` (epoch seconds), oldest first."""
        return self.redis.zrangebyscore(FINISHED, "-inf", cutoff, start=0, num=limit)

    def forget_finished(self, job_id: str) -> None:
        self.redis.zrem(FINISHED, job_id)

    # -- webhook deliveries -------------------------------------------------------------------
    def take_due_callbacks(self, lease: float, limit: int = 32) -> list[str]:
        """Ids of jobs whose webhook is due, each leased to this caller for `lease` seconds."""
        return self._take_due_callbacks(keys=[CALLBACKS_DUE], args=[lease, limit])

    def set_callback(self, job_id: str, callback: dict, retry_in: float | None) -> bool:
        """Record a job's delivery state and when to try again (None: never); False if the job is gone."""
        args = [job_id, json.dumps(callback), "" if retry_in is None else retry_in]
        return self._set_callback(keys=[f"job:{job_id}", CALLBACKS_DUE], args=args) == 1

    def drop_callback(self, job_id: str) -> None:
        self.redis.zrem(CALLBACKS_DUE, job_id)

    def wait_for_callbacks(self, timeout: float) -> None:
        """Block until a job with a callback ends (the doorbell rings) or `timeout` seconds pass."""
        self.redis.blpop([CALLBACKS_WAKE], timeout=max(timeout, 0.01))

    def next_callback_due_in(self) -> float | None:
        """Seconds until the next webhook delivery is due (0 if one is due now), None if none is waiting."""
        first = self.redis.zrange(CALLBACKS_DUE, 0, 0, withscores=True)
        if not first:
            return None
        seconds, micros = self.redis.time()
        return max(0.0, first[0][1] - (seconds + micros / 1e6))

    # -- Idempotency-Key ----------------------------------------------------------------------
    @staticmethod
    def _idempotency_key(tenant: str, key: str) -> str:
        return f"idempotency:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    def claim_idempotency_key(self, tenant: str, key: str, claim: dict, lease: int) -> dict | None:
        """The record stored for the tenant's key, or None after storing `claim` for `lease` seconds."""
        stored = self._claim_idempotency_key(
            keys=[self._idempotency_key(tenant, key)], args=[json.dumps(claim, sort_keys=True), lease]
        )
        return json.loads(stored) if stored else None

    def save_idempotency_key(self, tenant: str, key: str, record: dict) -> None:
        self.redis.set(self._idempotency_key(tenant, key), json.dumps(record), ex=IDEMPOTENCY_TTL)

    def release_idempotency_key(self, tenant: str, key: str, claim: dict) -> None:
        """Forget the key if it still holds this request's claim (the request failed: it may be retried)."""
        self._delete_if_equal(keys=[self._idempotency_key(tenant, key)], args=[json.dumps(claim, sort_keys=True)])
