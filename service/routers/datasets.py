import tempfile
from pathlib import Path

from fastapi import APIRouter, File, Form, UploadFile
from starlette.concurrency import run_in_threadpool

from models.downstream.mvtec import DatasetError, import_dataset
from service.deps import RecordsDep, SettingsDep, StorageDep, Tenant
from service.errors import ApiError
from service.records import new_id, now
from service.schemas import NAME_PATTERN, Dataset, DatasetList, ErrorResponse

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 503)}
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
):
    """Upload a real dataset (train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png)
    for evaluate jobs. Zip-slip and zip-bomb safe; every layout problem names the file."""
    limit = settings.max_dataset_bytes
    with tempfile.NamedTemporaryFile(suffix=".archive") as archive:
        size = 0
        while chunk := await file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "file_too_large", f"the dataset is over the {limit}-byte limit (MAX_DATASET_BYTES)")
            await run_in_threadpool(archive.write, chunk)
        if size == 0:
            raise ApiError(400, "empty_file", "the dataset file is empty")
        await run_in_threadpool(archive.flush)
        # Unpacking and checking every image is CPU work and disk I/O: off the event loop.
        record = await run_in_threadpool(_check_and_store, storage, records, tenant, product, Path(archive.name), size)
    return public_dataset(record)


@router.get("", response_model=DatasetList, responses={c: {"model": ErrorResponse} for c in (401, 503)})
def list_datasets(tenant: Tenant, records: RecordsDep):
    return {"items": [public_dataset(r) for r in records.list_records("dataset", tenant)]}
