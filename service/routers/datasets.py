import hashlib
import tempfile
from pathlib import Path

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from models.downstream.mvtec import DatasetError, import_dataset
from service.deps import RecordsDep, SettingsDep, StorageDep, Tenant
from service.errors import ApiError, echo
from service.idempotency import IdempotencyKey, fingerprint, run_once
from service.lifecycle import delete_record
from service.pagination import DEFAULT_LIMIT, Cursor, Limit, page
from service.records import new_id, now
from service.schemas import NAME_PATTERN, Dataset, DatasetList, ErrorResponse

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 409, 413, 422, 503)}
READ_ERRORS = {code: {"model": ErrorResponse} for code in (401, 404, 503)}
CHUNK = 1 << 20


def public_dataset(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tenant", "archive_key")}


def _check_and_store(storage, records, tenant: str, product: str, archive: Path, size: int) -> dict:
    """Unpack and validate in a scratch folder; store the archive only when it is good."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            _, counts = import_dataset(archive, Path(scratch) / "unpacked")
        except DatasetError as exc:
            raise ApiError(400, exc.code, exc.message) from None
    dataset_id = new_id()
    record = {
        "id": dataset_id,
        "tenant": tenant,
        "product": product,
        "counts": counts,
        "size": size,
        "created_at": now(),
        "archive_key": f"datasets/{dataset_id}/archive",
    }
    storage.put_file(record["archive_key"], archive)
    records.put_record("dataset", record)
    return record


@router.post("", status_code=201, response_model=Dataset, responses=ERRORS)
async def upload_dataset(
    tenant: Tenant,
    settings: SettingsDep,
    records: RecordsDep,
    storage: StorageDep,
    file: UploadFile = File(..., description="zip or tar (gz, bz2, xz) in MVTec AD layout"),
    product: str = Form(..., pattern=NAME_PATTERN, examples=["magnetic_tile"]),
    idempotency_key: IdempotencyKey = None,
):
    """Upload a real dataset (train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png)
    for evaluate jobs. Zip-slip and zip-bomb safe; every layout problem names the file."""
    limit = settings.max_dataset_bytes
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(suffix=".archive") as archive:
        size = 0
        while chunk := await file.read(CHUNK):
            size += len(chunk)
            digest.update(chunk)
            if size > limit:
                raise ApiError(413, "file_too_large", f"the dataset is over the {limit}-byte limit (MAX_DATASET_BYTES)")
            await run_in_threadpool(archive.write, chunk)
        if size == 0:
            raise ApiError(400, "empty_file", "the dataset file is empty")
        await run_in_threadpool(archive.flush)
        # Unpacking and checking every image is CPU work and disk I/O: off the event loop.
        request_fingerprint = fingerprint("POST /v1/datasets", [digest.hexdigest(), product])
        return await run_in_threadpool(
            run_once, records, tenant, idempotency_key, request_fingerprint, 201, Dataset,
            lambda: public_dataset(_check_and_store(storage, records, tenant, product, Path(archive.name), size)),
        )


@router.get("", response_model=DatasetList, responses={c: {"model": ErrorResponse} for c in (401, 422, 503)})
def list_datasets(
    tenant: Tenant,
    records: RecordsDep,
    product: str | None = Query(None, max_length=64),
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
):
    """The tenant's datasets, newest first, a page at a time."""
    found, next_cursor = page(records, "dataset", tenant, {"product": product}, limit, cursor)
    return {"items": [public_dataset(r) for r in found], "next_cursor": next_cursor}


@router.delete("/{dataset_id}", status_code=204, response_class=Response, responses=ERRORS | READ_ERRORS)
def delete_dataset(dataset_id: str, tenant: Tenant, records: RecordsDep, storage: StorageDep):
    """Delete the dataset and its archive. 409 `in_use` while a queued or running evaluate job reads it."""
    record = records.get_record("dataset", tenant, dataset_id)
    if record is None:
        raise ApiError(404, "dataset_not_found", f"no dataset {echo(dataset_id)}")
    blocking = delete_record(records, storage, "dataset", record)
    if blocking:
        raise ApiError(409, "in_use", f"job {blocking} (queued or running) reads dataset {dataset_id}")
    return Response(status_code=204)
