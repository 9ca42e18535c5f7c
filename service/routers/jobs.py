import json
import mimetypes
import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from models.downstream.mvtec import write_mvtec_zip
from service.deps import ProducerDep, RecordsDep, SettingsDep, StorageDep, Tenant
from service.errors import ApiError, describe_validation_errors, echo
from service.metrics import JOBS_SUBMITTED
from service.records import TERMINAL, Records, now
from service.schemas import (
    NAME_PATTERN,
    ArtifactList,
    ErrorResponse,
    Job,
    JobAccepted,
    JobCreate,
    JobKind,
    JobList,
    JobStatus,
)
from service.storage import LocalStorage, StorageError, check_key
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
    body: JobCreate, tenant: Tenant, settings: SettingsDep, records: RecordsDep, producer: ProducerDep
):
    """Queue a fine-tune, generate or evaluate job. Poll GET /v1/jobs/{id} for its progress."""

    def build_and_queue() -> dict:
        job = _build(settings, records, tenant, body)
        _queue(records, producer, job)
        return job

    # The hot paths (submit, poll) take one hop to the thread pool for all their Redis round trips
    # and the publish, and serialise on the loop: a sync route would take two hops, and each hop
    # waits for the GIL, which under load costs more than the work itself.
    job = await run_in_threadpool(build_and_queue)
    return {"id": job["id"], "status": job["status"]}


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
):
    """Ad hoc shortcut: upload one exemplar and its normals and queue a generate job in one call.
    All files are validated before anything is stored."""
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
        )
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation_errors(exc.errors())) from None
    pending = {p.record["id"]: p.record for p in [anomaly, *normals]}

    def build_store_and_queue() -> dict:
        # Validate the job against the not-yet-stored exemplars, then store files, then queue.
        job = _build(settings, records, tenant, body, pending)
        store_exemplars(storage, records, [anomaly, *normals])
        _queue(records, producer, job)
        return job

    job = await run_in_threadpool(build_store_and_queue)
    return {"id": job["id"], "status": job["status"]}


@router.get("", response_model=JobList, responses={c: {"model": ErrorResponse} for c in (401, 422, 503)})
def list_jobs(
    tenant: Tenant,
    records: RecordsDep,
    status: JobStatus | None = Query(None),
    kind: JobKind | None = Query(None),
    limit: int = Query(50, ge=1, le=1000),
):
    jobs = records.list_jobs(tenant, status, kind, limit)
    return {"items": [public_job(j) for j in jobs]}


@router.get("/{job_id}", response_model=Job, responses=ERRORS)
async def get_job(job_id: str, tenant: Tenant, records: RecordsDep):
    # One hop to the thread pool (see create_job): a Redis that is slow or away never holds up the loop.
    return public_job(await run_in_threadpool(_owned_job, records, tenant, job_id))


@router.delete("/{job_id}", status_code=202, response_model=JobAccepted, responses=ERRORS)
def cancel_job(job_id: str, tenant: Tenant, records: RecordsDep, settings: SettingsDep):
    """Cancel: a queued job is cancelled at once; a running one at its next step (within seconds);
    a running one whose worker died (no heartbeat for WORKER_HEARTBEAT x 4 s) at once."""
    job = _owned_job(records, tenant, job_id)
    if job["status"] in TERMINAL:
        raise ApiError(409, "job_finished", f"job {job_id} is already {job['status']}")
    records.update_job(job_id, cancel_requested=True)
    if records.transition(job_id, ("queued",), status="cancelled", finished_at=now()):
        return {"id": job_id, "status": "cancelled"}
    if records.cancel_if_orphaned(job_id, stale_before=now() - settings.orphan_after):
        return {"id": job_id, "status": "cancelled"}
    return {"id": job_id, "status": records.get_job_field(job_id, "status")}


def _artifact_prefixes(job_id: str) -> tuple[str, ...]:
    return (f"jobs/{job_id}/", f"adapters/{job_id}/")


@router.get("/{job_id}/artifacts", response_model=ArtifactList, responses=ERRORS)
def list_artifacts(
    job_id: str, request: Request, tenant: Tenant, records: RecordsDep, storage: StorageDep, settings: SettingsDep
):
    """Every stored output of the job, with a download URL (presigned on S3, through the API on disk)."""
    _owned_job(records, tenant, job_id)
    base = str(request.base_url).rstrip("/")
    items = []
    for prefix in _artifact_prefixes(job_id):
        for obj in storage.list(prefix):
            url = storage.presigned_url(obj.key, settings.artifact_url_expiry)
            items.append(
                {"key": obj.key, "url": url or f"{base}/v1/jobs/{job_id}/artifacts/{obj.key}", "size": obj.size}
            )
    return {"items": items}


def _write_export(storage, job: dict, records, out: Path) -> None:
    # Generators: each file is read from storage as it goes into the zip, one at a time.
    files = ((obj.key, storage.get(obj.key)) for obj in storage.list(f"jobs/{job['id']}/"))
    normal_records = (records.get_record("exemplar", job["tenant"], i) for i in job["normals"])
    normals = ((f"{r['id']}.png", storage.get(r["image_key"])) for r in normal_records if r is not None)
    write_mvtec_zip(files, out, normals)


@router.get("/{job_id}/export", responses=ERRORS, response_class=FileResponse)
def export_mvtec(job_id: str, tenant: Tenant, records: RecordsDep, storage: StorageDep):
    """The job's pairs as an MVTec AD zip: test/<defect>/<n>.png, ground_truth/<defect>/<n>_mask.png,
    and the normal images it used as train/good/."""
    job = _owned_job(records, tenant, job_id)
    if job["kind"] != "generate" or job["status"] != "succeeded":
        raise ApiError(
            409, "not_exportable", f"only succeeded generate jobs export; this is a {job['status']} {job['kind']} job"
        )
    scratch = tempfile.mkdtemp()
    out = Path(scratch) / f"{job_id}.zip"
    try:
        _write_export(storage, job, records, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return FileResponse(
        out,
        media_type="application/zip",
        filename=f"{job['product'] or 'dataset'}-{job_id}.zip",
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
    if not key.startswith(_artifact_prefixes(job_id)) or not storage.exists(key):
        raise ApiError(404, "artifact_not_found", f"no artifact {echo(key)}")
    if thumb is not None:
        return thumbnail_response(request, storage.get(key), thumb)
    media_type = mimetypes.guess_type(key)[0] or "application/octet-stream"
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.local_path(key), media_type=media_type)
    return Response(storage.get(key), media_type=media_type)
