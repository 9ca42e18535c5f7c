from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from service.deps import RecordsDep, SettingsDep, StorageDep, Tenant
from service.errors import ApiError, echo
from service.schemas import NAME_PATTERN, ErrorResponse, Exemplar, ExemplarList
from service.thumbnails import CACHE_CONTROL, THUMB_MAX, THUMB_MIN, thumbnail_response
from service.uploads import public_exemplar, store_exemplars, validate_exemplar

router = APIRouter(prefix="/v1/exemplars", tags=["exemplars"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}


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
):
    """Upload an anomaly exemplar (image + mask + defect) or a normal image (image only)."""
    pending = await validate_exemplar(settings, tenant, image, mask, product, defect)
    await run_in_threadpool(store_exemplars, storage, records, [pending])
    return public_exemplar(pending.record)


@router.get("", response_model=ExemplarList, responses={c: {"model": ErrorResponse} for c in (401, 503)})
def list_exemplars(
    tenant: Tenant,
    records: RecordsDep,
    product: str | None = Query(None),
    defect: str | None = Query(None),
    kind: str | None = Query(None, pattern="^(anomaly|normal)$"),
):
    items = [
        public_exemplar(r)
        for r in records.list_records("exemplar", tenant, limit=100_000)
        if (product is None or r["product"] == product)
        and (defect is None or r["defect"] == defect)
        and (kind is None or r["kind"] == kind)
    ]
    return {"items": items}


def _stored_image(request: Request, records, storage, tenant: str, exemplar_id: str, which: str, thumb: int | None):
    record = records.get_record("exemplar", tenant, exemplar_id)
    if record is None:  # another tenant's exemplar is "not found" too
        raise ApiError(404, "exemplar_not_found", f"no exemplar {echo(exemplar_id)}")
    key = record[f"{which}_key"]
    if key is None:
        raise ApiError(404, "no_mask", f"exemplar {exemplar_id} is a normal image: it has no mask")
    data = storage.get(key)
    if thumb is not None:
        return thumbnail_response(request, data, thumb)
    # An exemplar never changes after its upload.
    return Response(data, media_type="image/png", headers={"Cache-Control": CACHE_CONTROL})


THUMB = Query(None, ge=THUMB_MIN, le=THUMB_MAX, description="an image scaled to fit this many px")
IMAGE_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 422, 503)}


@router.get("/{exemplar_id}/image", response_class=Response, responses=IMAGE_ERRORS)
def exemplar_image(
    exemplar_id: str, request: Request, tenant: Tenant, records: RecordsDep, storage: StorageDep,
    thumb: int | None = THUMB,
):
    """The exemplar's image as stored (PNG); with `thumb`, a small JPEG."""
    return _stored_image(request, records, storage, tenant, exemplar_id, "image", thumb)


@router.get("/{exemplar_id}/mask", response_class=Response, responses=IMAGE_ERRORS)
def exemplar_mask(
    exemplar_id: str, request: Request, tenant: Tenant, records: RecordsDep, storage: StorageDep,
    thumb: int | None = THUMB,
):
    """An anomaly exemplar's mask (PNG, 0/255); with `thumb`, a small one that keeps every defect pixel."""
    return _stored_image(request, records, storage, tenant, exemplar_id, "mask", thumb)
