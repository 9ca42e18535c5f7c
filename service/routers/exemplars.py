from fastapi import APIRouter, File, Form, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from service.deps import RecordsDep, SettingsDep, StorageDep, Tenant
from service.schemas import NAME_PATTERN, ErrorResponse, Exemplar, ExemplarList
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
