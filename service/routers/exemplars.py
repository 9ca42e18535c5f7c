from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.deps import RecordsDep, SettingsDep, StorageDep, Tenant
from service.downloads import download
from service.errors import ApiError, echo
from service.idempotency import IdempotencyKey, file_digest, fingerprint, run_once
from service.lifecycle import delete_record
from service.pagination import DEFAULT_LIMIT, Cursor, Limit, page
from service.records import Records
from service.schemas import NAME_PATTERN, ErrorResponse, Exemplar, ExemplarList
from service.thumbnails import THUMB_MAX, THUMB_MIN, thumbnail_response
from service.uploads import public_exemplar, store_exemplars, validate_exemplar

router = APIRouter(prefix="/v1/exemplars", tags=["exemplars"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 409, 413, 415, 422, 503)}
READ_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 503)}
IMAGE_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 422, 503)}


@router.post("", status_code=201, response_model=Exemplar, responses=ERRORS)
async def upload_exemplar(
    tenant: Tenant,
    settings: SettingsDep,
    records: RecordsDep,
    storage: StorageDep,
    image: UploadFile = File(..., description="PNG, JPEG, BMP or TIFF; grayscale or RGB"),
    mask: UploadFile | None = File(
        None, description="defect mask (same size; >=128 is defect); omit for a normal image"
    ),
    product: str = Form(..., pattern=NAME_PATTERN, examples=["magnetic_tile"]),
    defect: str | None = Form(None, pattern=NAME_PATTERN, examples=["crack"]),
    idempotency_key: IdempotencyKey = None,
):
    """Upload an anomaly exemplar (image + mask + defect) or a normal image (image only)."""
    request_fingerprint = None
    if idempotency_key:
        files = [await file_digest(image), await file_digest(mask)]
        request_fingerprint = fingerprint("POST /v1/exemplars", [*files, product, defect])
    pending = await validate_exemplar(settings, tenant, image, mask, product, defect)

    def store() -> dict:
        store_exemplars(storage, records, [pending])
        return public_exemplar(pending.record)

    return await run_in_threadpool(
        run_once, records, tenant, idempotency_key, request_fingerprint, 201, Exemplar, store
    )


@router.get("", response_model=ExemplarList, responses={c: {"model": ErrorResponse} for c in (401, 422, 503)})
def list_exemplars(
    tenant: Tenant,
    records: RecordsDep,
    product: str | None = Query(None, max_length=64),
    defect: str | None = Query(None, max_length=64),
    kind: str | None = Query(None, pattern="^(anomaly|normal)$"),
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
):
    """The tenant's exemplars and normal images, newest first, a page at a time; filters combine."""
    filters = {"product": product, "defect": defect, "kind": kind}
    found, next_cursor = page(records, "exemplar", tenant, filters, limit, cursor)
    return {"items": [public_exemplar(r) for r in found], "next_cursor": next_cursor}


def _owned(records: Records, tenant: str, exemplar_id: str) -> dict:
    record = records.get_record("exemplar", tenant, exemplar_id)
    if record is None:
        raise ApiError(404, "exemplar_not_found", f"no exemplar {echo(exemplar_id)}")
    return record


@router.get("/{exemplar_id}", response_model=Exemplar, responses=READ_ERRORS)
def get_exemplar(exemplar_id: str, tenant: Tenant, records: RecordsDep):
    return public_exemplar(_owned(records, tenant, exemplar_id))


THUMB = Query(None, ge=THUMB_MIN, le=THUMB_MAX, description="an image scaled to fit this many px")


def _stored_image(request: Request, storage, record: dict, which: str, thumb: int | None) -> Response:
    key = record[f"{which}_key"]
    if key is None:
        raise ApiError(404, "no_mask", f"exemplar {record['id']} is a normal image: it has no mask")
    if thumb is not None:
        return thumbnail_response(request, storage, key, thumb)
    suffix = "" if which == "image" else "_mask"
    return download(storage, key, f"{record['id']}{suffix}.png")


@router.get("/{exemplar_id}/image", response_class=Response, responses=IMAGE_ERRORS)
def download_image(
    exemplar_id: str, request: Request, tenant: Tenant, records: RecordsDep, storage: StorageDep,
    thumb: int | None = THUMB,
):
    """The image as stored (PNG: grayscale or RGB, as it was validated); with `thumb`, a small JPEG."""
    return _stored_image(request, storage, _owned(records, tenant, exemplar_id), "image", thumb)


@router.get("/{exemplar_id}/mask", response_class=Response, responses=IMAGE_ERRORS)
def download_mask(
    exemplar_id: str, request: Request, tenant: Tenant, records: RecordsDep, storage: StorageDep,
    thumb: int | None = THUMB,
):
    """The defect mask as stored (PNG, 0/255), a normal image has none (404); with `thumb`, a small
    mask that keeps every defect pixel."""
    return _stored_image(request, storage, _owned(records, tenant, exemplar_id), "mask", thumb)


@router.delete("/{exemplar_id}", status_code=204, response_class=Response, responses=ERRORS | READ_ERRORS)
def delete_exemplar(exemplar_id: str, tenant: Tenant, records: RecordsDep, storage: StorageDep):
    """Delete the exemplar and its files. 409 `in_use` while a queued or running job reads it;
    finished jobs keep their outputs."""
    blocking = delete_record(records, storage, "exemplar", _owned(records, tenant, exemplar_id))
    if blocking:
        raise ApiError(409, "in_use", f"job {blocking} (queued or running) reads exemplar {exemplar_id}")
    return Response(status_code=204)
