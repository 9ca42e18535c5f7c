import tempfile
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from models.downstream.mvtec import DatasetError, import_dataset
from service.auth import current_tenant
from service.errors import ApiError
from service.records import new_id, now
from service.schemas import NAME_PATTERN, Dataset, DatasetList, ErrorResponse

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 422)}
CHUNK = 1 << 20


def public_dataset(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tenant", "archive_key")}


def _check_and_store(state, tenant: str, product: str, archive: Path, size: int) -> dict:
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
    state.storage.put_file(record["archive_key"], archive)
    state.records.put_record("dataset", record)
    return record


@router.post("", status_code=201, response_model=Dataset, responses=ERRORS)
async def upload_dataset(
    request: Request,
    file: UploadFile = File(..., description="zip or tar (gz, bz2, xz) in MVTec AD layout"),
    product: str = Form(..., pattern=NAME_PATTERN, examples=["magnetic_tile"]),
    tenant: str = Depends(current_tenant),
):
    """Upload a real dataset (train/good, test/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png)
    for evaluate jobs. Zip-slip and zip-bomb safe; every layout problem names the file."""
    state = request.app.state
    limit = state.settings.max_dataset_bytes
    with tempfile.NamedTemporaryFile(suffix=".archive") as archive:
        size = 0
        while chunk := await file.read(CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "file_too_large", f"the dataset is over the {limit}-byte limit (MAX_DATASET_BYTES)")
            archive.write(chunk)
        if size == 0:
            raise ApiError(400, "empty_file", "the dataset file is empty")
        archive.flush()
        record = await run_in_threadpool(_check_and_store, state, tenant, product, Path(archive.name), size)
    return public_dataset(record)


@router.get("", response_model=DatasetList, responses={401: {"model": ErrorResponse}})
def list_datasets(request: Request, tenant: str = Depends(current_tenant)):
    return {"items": [public_dataset(r) for r in request.app.state.records.list_records("dataset", tenant)]}
