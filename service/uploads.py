"""Exemplar uploads: validate every file first, store only when all of them are good."""

import os
from dataclasses import dataclass
from functools import partial

import anyio
from fastapi import UploadFile

from service.errors import ApiError
from service.images import DecodedImage, decode_image, decode_mask, read_upload
from service.records import new_id, now

# Decoding (and re-encoding) an image is seconds of CPU for a 4096 px upload. It runs in threads,
# off the event loop, and at most this many at once, so that a burst of uploads leaves a core to the
# loop and the request threads.
DECODE_LIMITER = anyio.CapacityLimiter(max(1, (os.cpu_count() or 2) - 1))


async def _decode(function, *args):
    return await anyio.to_thread.run_sync(partial(function, *args), limiter=DECODE_LIMITER)


@dataclass
class PendingExemplar:
    """A validated upload that is not stored yet."""

    record: dict
    image: DecodedImage
    mask: DecodedImage | None


async def validate_exemplar(
    settings,
    tenant: str,
    image: UploadFile,
    mask: UploadFile | None,
    product: str,
    defect: str | None,
    field: str = "image",
) -> PendingExemplar:
    if mask is not None and not defect:
        raise ApiError(422, "defect_required", "a mask was sent: name its `defect` type as well")
    if defect and mask is None:
        raise ApiError(422, "mask_required", f"defect {defect!r} needs its `mask` file")
    data = await read_upload(image, field, settings.max_upload_bytes)
    # Decoding is CPU work (a 4096 px JPEG takes a second): in the thread pool, off the event loop.
    decoded = await _decode(decode_image, data, field, settings.max_image_side)
    decoded_mask = None
    if mask is not None:
        mask_data = await read_upload(mask, "mask", settings.max_upload_bytes)
        decoded_mask = await _decode(decode_mask, mask_data, "mask", decoded.size, settings.max_image_side)
    exemplar_id = new_id()
    record = {
        "id": exemplar_id,
        "tenant": tenant,
        "product": product,
        "defect": defect if mask is not None else None,
        "kind": "anomaly" if mask is not None else "normal",
        "width": decoded.size[0],
        "height": decoded.size[1],
        "mode": decoded.image.mode,
        "created_at": now(),
        "image_key": f"exemplars/{exemplar_id}/image.png",
        "mask_key": f"exemplars/{exemplar_id}/mask.png" if mask is not None else None,
    }
    return PendingExemplar(record, decoded, decoded_mask)


def store_exemplars(storage, records, pending: list[PendingExemplar]) -> None:
    """Files first, records last: a failure leaves no record pointing at a missing file, and undoes
    only what was written (a store that is away is not asked again to undo what it never took)."""
    stored: list[PendingExemplar] = []
    recorded: list[PendingExemplar] = []
    try:
        for item in pending:
            stored.append(item)
            storage.put(item.record["image_key"], item.image.png, "image/png")
            if item.mask is not None:
                storage.put(item.record["mask_key"], item.mask.png, "image/png")
        for item in pending:
            records.put_record("exemplar", item.record)
            recorded.append(item)
    except Exception:
        for item in recorded:
            records.delete_record("exemplar", item.record)
        for item in stored:
            storage.delete_prefix(f"exemplars/{item.record['id']}/")
        raise


def public_exemplar(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("tenant", "image_key", "mask_key")}
