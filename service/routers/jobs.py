import json
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from models.downstream.exports import write_coco_zip, write_yolo_zip
from models.downstream.mvtec import write_mvtec_zip
from service.deps import ProducerDep, RecordsDep, SettingsDep, StorageDep, Tenant
from service.downloads import download
from service.errors import ApiError, describe_validation_errors, echo
from service.idempotency import IdempotencyKey, file_digest, fingerprint, run_once
from service.lifecycle import job_prefixes, purge_job
from service.metrics import JOBS_SUBMITTED
from service.pagination import DEFAULT_LIMIT, Cursor, Limit, decode_key_cursor, encode_key_cursor, page
from service.records import TERMINAL, Records, now
from service.schemas import (
    NAME_PATTERN,
    ArtifactList,
    ErrorResponse,
    Job,
    JobAccepted,
    JobCreate,
    JobDeleted,
    JobKind,
    JobList,
    JobStatus,
)
from service.storage import StorageError, check_key
from service.submission import build_job, submit
from service.thumbnails import THUMB_MAX, THUMB_MIN, thumbnail_response
from service.uploads import store_exemplars, validate_exemplar

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 503)}

PUBLIC_JOB_FIELDS = set(Job.model_fields)


def public_job(job: dict) -> dict:
    return {k: v for k, v in job.items() if k in PUBLIC_JOB_FIELDS}


def _owned_job(records: Records, tenant: str, job_id: str) -> dict:
    job = records.get_job(job_id, tenant)
    if job is None:  # another tenant's job is "not found" too: its existence is not disclosed
        raise ApiError(404, "job_not_found", f"no job {echo(job_id)}")
    return job


def _build(settings, records: Records, tenant: str, body: JobCreate, pending: dict[str, dict] | None = None) -> dict:
    """The job record, validated against the tenant's records (and `pending`, not yet stored ones)."""
    listed = [*body.exemplars, *body.normals, *body.masks.masks]
    known = records.get_records("exemplar", tenant, listed) | (pending or {})  # one round trip for 10,000 ids
    return build_job(
        settings, tenant, body, known.get, lambda i: records.get_job(i, tenant),
        lambda i: records.get_record("dataset", tenant, i),
    )


def _queue(records: Records, producer, job: dict) -> None:
    submit(records, producer, job)
    JOBS_SUBMITTED.labels(job["kind"], job["method"] or "").inc()


@router.post("", status_code=202, response_model=JobAccepted, responses=ERRORS)
async def create_job(
    body: JobCreate,
    tenant: Tenant,
    settings: SettingsDep,
    records: RecordsDep,
    producer: ProducerDep,
    idempotency_key: IdempotencyKey = None,
):
    """Queue a fine-tune, generate or evaluate job. Poll GET /v1/jobs/{id} for its progress, or give a
    `callback_url` to be called when it ends. With an `Idempotency-Key`, a retry returns the first
    response and queues nothing."""

    def build_and_queue() -> dict:
        job = _build(settings, records, tenant, body)
        _queue(records, producer, job)
        return {"id": job["id"], "status": job["status"]}

    # The hot paths (submit, poll) take one hop to the thread pool for all their Redis round trips
    # and the publish, and serialise on the loop: a sync route would take two hops, and each hop
    # waits for the GIL, which under load costs more than the work itself.
    request_fingerprint = fingerprint("POST /v1/jobs", body) if idempotency_key else None
    return await run_in_threadpool(
        run_once, records, tenant, idempotency_key, request_fingerprint, 202, JobAccepted, build_and_queue
    )


def _parse_json_object(field: str, raw: str) -> dict:
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_params", f"{field} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(422, "invalid_params", f"{field} is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise ApiError(422, "invalid_params", f"{field} must be a JSON object")
    return parsed


@router.post("/generate", status_code=202, response_model=JobAccepted, responses=ERRORS)
async def create_generate_job_from_files(
    tenant: Tenant,
    settings: SettingsDep,
    records: RecordsDep,
    storage: StorageDep,
    producer: ProducerDep,
    image: UploadFile = File(..., description="the reference anomaly image"),
    mask: UploadFile = File(..., description="its defect mask"),
    normal: list[UploadFile] = File(..., description="one or more normal images"),
    method: str = Form(..., examples=["draem"]),
    count: int = Form(10, ge=1),
    params: str = Form("{}", description="method parameters as a JSON object"),
    masks: str = Form("{}", description='mask spec as a JSON object, e.g. {"source": "exemplar"}'),
    seed: int | None = Form(None, ge=0, lt=2**32),
    product: str = Form("adhoc", pattern=NAME_PATTERN),
    defect: str = Form("anomaly", pattern=NAME_PATTERN),
    callback_url: str | None = Form(None, max_length=2048, description="called when the job ends (see POST /v1/jobs)"),
    idempotency_key: IdempotencyKey = None,
):
    """Ad hoc shortcut: upload one exemplar and its normals and queue a generate job in one call.
    All files are validated before anything is stored."""
    request_fingerprint = None
    if idempotency_key:
        files = [await file_digest(f) for f in (image, mask, *normal)]
        form = [method, count, params, masks, seed, product, defect, callback_url]
        request_fingerprint = fingerprint("POST /v1/jobs/generate", {"files": files, "form": form})
    parsed = {field: _parse_json_object(field, raw) for field, raw in (("params", params), ("masks", masks))}
    anomaly = await validate_exemplar(settings, tenant, image, mask, product, defect)
    normals = [
        await validate_exemplar(settings, tenant, f, None, product, None, field=f"normal[{i}]")
        for i, f in enumerate(normal)
    ]
    try:
        body = JobCreate(
            kind="generate",
            method=method,
            product=product,
            defect=defect,
            count=count,
            seed=seed,
            exemplars=[anomaly.record["id"]],
            normals=[n.record["id"] for n in normals],
            masks=parsed["masks"],
            params=parsed["params"],
            callback_url=callback_url,
        )
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation_errors(exc.errors())) from None
    pending = {p.record["id"]: p.record for p in [anomaly, *normals]}

    def build_store_and_queue() -> dict:
        # Validate the job against the not-yet-stored exemplars, then store files, then queue.
        job = _build(settings, records, tenant, body, pending)
        store_exemplars(storage, records, [anomaly, *normals])
        _queue(records, producer, job)
        return {"id": job["id"], "status": job["status"]}

    return await run_in_threadpool(
        run_once, records, tenant, idempotency_key, request_fingerprint, 202, JobAccepted, build_store_and_queue
    )


@router.get("", response_model=JobList, responses={c: {"model": ErrorResponse} for c in (401, 422, 503)})
def list_jobs(
    tenant: Tenant,
    records: RecordsDep,
    status: JobStatus | None = Query(None),
    kind: JobKind | None = Query(None),
    product: str | None = Query(None, max_length=64),
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
):
    """The tenant's jobs, newest first, a page at a time (`next_cursor`); filters combine."""
    filters = {"status": status, "kind": kind, "product": product}
    jobs, next_cursor = page(records, "job", tenant, filters, limit, cursor)
    return {"items": [public_job(j) for j in jobs], "next_cursor": next_cursor}


@router.get("/{job_id}", response_model=Job, responses=ERRORS)
async def get_job(job_id: str, tenant: Tenant, records: RecordsDep):
    # One hop to the thread pool (see create_job): a Redis that is slow or away never holds up the loop.
    return public_job(await run_in_threadpool(_owned_job, records, tenant, job_id))


@router.delete("/{job_id}", status_code=202, response_model=JobDeleted, responses=ERRORS)
def cancel_job(
    job_id: str,
    tenant: Tenant,
    records: RecordsDep,
    storage: StorageDep,
    settings: SettingsDep,
    purge: bool = Query(False, description="also remove the job's record and every object it stored"),
):
    """Cancel: a queued job is cancelled at once; a running one at its next step (within seconds);
    a running one whose worker died (no heartbeat for WORKER_HEARTBEAT x 4 s) at once.

    With `purge=true`, also delete the job's record and every object it stored (a finished job
    too): at once for a job that is not running (`purged: true`), else by its worker when it stops,
    within seconds (`purged: false`; the job then disappears). 409 `in_use` while a queued or
    running job reads its outputs (its adapter, its pairs)."""
    job = _owned_job(records, tenant, job_id)
    if purge:
        return _purge(records, storage, settings, job)
    if job["status"] in TERMINAL:
        raise ApiError(409, "job_finished", f"job {job_id} is already {job['status']}")
    return {"id": job_id, "status": _cancel(records, settings, job_id), "purged": False}


def _cancel(records: Records, settings, job_id: str) -> str:
    """Ask the job to stop; its status after that (cancelled, or still running until its next step)."""
    records.update_job(job_id, cancel_requested=True)
    if records.transition(job_id, ("queued",), status="cancelled", finished_at=now()):
        return "cancelled"
    if records.cancel_if_orphaned(job_id, stale_before=now() - settings.orphan_after):
        return "cancelled"
    return records.get_job_field(job_id, "status")


def _purge(records: Records, storage, settings, job: dict) -> dict:
    job_id = job["id"]
    if job["status"] not in TERMINAL:
        records.update_job(job_id, purge_requested=True)
        _cancel(records, settings, job_id)
        job = records.get_job(job_id)
        if job is None:  # its worker stopped and purged it meanwhile
            return {"id": job_id, "status": "cancelled", "purged": True}
        if job["status"] not in TERMINAL:  # running: its worker purges it at its next step
            return {"id": job_id, "status": job["status"], "purged": False}
    blocking = purge_job(records, storage, job)
    if blocking:
        raise ApiError(409, "in_use", f"job {blocking} (queued or running) reads the outputs of job {job_id}")
    return {"id": job_id, "status": job["status"], "purged": True}


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=ERRORS)
def list_artifacts(
    job_id: str,
    request: Request,
    tenant: Tenant,
    records: RecordsDep,
    storage: StorageDep,
    settings: SettingsDep,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
):
    """The job's stored outputs in key order, a page at a time, each with a download URL: presigned
    on S3 where callers can reach it (S3_PUBLIC_ENDPOINT_URL), else through the API."""
    _owned_job(records, tenant, job_id)
    base = str(request.base_url).rstrip("/")
    after = decode_key_cursor(cursor) if cursor else None
    found = []
    for prefix in job_prefixes(job_id):  # in key order, so one cursor runs through both
        if after is not None and after >= prefix and not after.startswith(prefix):
            continue  # the cursor is past this prefix
        start = after if after is not None and after.startswith(prefix) else None
        found += storage.list(prefix, start_after=start, limit=limit + 1 - len(found))
        if len(found) > limit:
            break
    items = []
    for obj in found[:limit]:
        url = storage.presigned_url(obj.key, settings.artifact_url_expiry)
        items.append({"key": obj.key, "url": url or f"{base}/v1/jobs/{job_id}/artifacts/{obj.key}", "size": obj.size})
    next_cursor = encode_key_cursor(found[limit - 1].key) if len(found) > limit else None
    return {"items": items, "next_cursor": next_cursor}


ExportFormat = Literal["mvtec", "coco", "yolo"]


def _write_export(storage, job: dict, records, out: Path, export_format: ExportFormat) -> None:
    # Generators: each file is read from storage as it goes into the zip, one at a time.
    prefix = f"jobs/{job['id']}/"
    normal_records = (records.get_record("exemplar", job["tenant"], i) for i in job["normals"])
    normals = ((f"{r['id']}.png", storage.get(r["image_key"])) for r in normal_records if r is not None)
    if export_format == "mvtec":
        write_mvtec_zip(((obj.key, storage.get(obj.key)) for obj in storage.list(prefix)), out, normals)
        return
    manifest = json.loads(storage.get(prefix + "manifest.json"))
    pairs = ((e["image"], storage.get(prefix + e["image"]), storage.get(prefix + e["mask"])) for e in manifest["pairs"])
    writer = write_coco_zip if export_format == "coco" else write_yolo_zip
    writer(pairs, out, manifest["defect"], normals)


@router.get("/{job_id}/export", responses=ERRORS, response_class=FileResponse)
def export_pairs(
    job_id: str,
    tenant: Tenant,
    records: RecordsDep,
    storage: StorageDep,
    export_format: ExportFormat = Query("mvtec", alias="format"),
):
    """The job's pairs, and the normal images it used, as a zip for training:

    - `mvtec`: the MVTec AD layout, test/<defect>/<n>.png, ground_truth/<defect>/<n>_mask.png, train/good/;
    - `coco`: COCO instance segmentation, annotations.json (one instance per connected defect region, its
      mask as compressed RLE, one category per defect type) and images/ (normals as images without
      annotations);
    - `yolo`: YOLO segmentation, data.yaml, images/train/ and labels/train/ (one polygon per region)."""
    job = _owned_job(records, tenant, job_id)
    if job["kind"] != "generate" or job["status"] != "succeeded":
        raise ApiError(
            409, "not_exportable", f"only succeeded generate jobs export; this is a {job['status']} {job['kind']} job"
        )
    scratch = tempfile.mkdtemp()
    out = Path(scratch) / f"{job_id}.zip"
    try:
        _write_export(storage, job, records, out, export_format)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return FileResponse(
        out,
        media_type="application/zip",
        filename=f"{job['product'] or 'dataset'}-{job_id}{'' if export_format == 'mvtec' else '-' + export_format}.zip",
        background=BackgroundTask(shutil.rmtree, scratch, ignore_errors=True),
    )


@router.get("/{job_id}/artifacts/{key:path}", responses=ERRORS, response_class=Response)
def download_artifact(
    job_id: str,
    key: str,
    request: Request,
    tenant: Tenant,
    records: RecordsDep,
    storage: StorageDep,
    thumb: int | None = Query(None, ge=THUMB_MIN, le=THUMB_MAX, description="an image scaled to fit this many px"),
):
    """Download one artifact by its key (as listed); with `thumb`, a small JPEG of an image (a mask
    stays a PNG mask)."""
    _owned_job(records, tenant, job_id)
    try:
        check_key(key)
    except StorageError:
        raise ApiError(404, "artifact_not_found", f"no artifact {echo(key)}") from None
    if not key.startswith(job_prefixes(job_id)) or not storage.exists(key):
        raise ApiError(404, "artifact_not_found", f"no artifact {echo(key)}")  # checked here to say so
    if thumb is not None:
        return thumbnail_response(request, storage, key, thumb)
    return download(storage, key)
