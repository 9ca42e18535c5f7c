"""Thumbnails of stored images on request (`?thumb=<side>` on image downloads).

Generate jobs write a 256 px thumbnail of every pair beside it (jobs/<id>/thumbs/), which the
web page's grid uses: decoding a 512 px PNG to scale it costs ~50 ms of the API's CPU (1024 px:
~120 ms), so a gallery made on request would cost the API seconds per screenful and compete
with every other client. This route covers everything else, cheaply enough for a few images at
a time: exemplars in the job form, plots, jobs stored before thumbnails were written, any size.
Responses are cacheable and carry an ETag, so a browser asks once.
"""

import hashlib
import io

from fastapi import Request, Response
from PIL import Image

from models.thumbnails import looks_like_mask, thumbnail
from service.errors import ApiError

THUMB_MIN, THUMB_MAX = 16, 1024
# A stored object never changes: a key is written once per job (a redelivery writes the same
# bytes), and exemplars are immutable, so a browser may keep one for a day without asking again.
CACHE_CONTROL = "private, max-age=86400"


def thumbnail_etag(source: bytes, side: int) -> str:
    return '"' + hashlib.sha256(source + side.to_bytes(4, "big")).hexdigest()[:32] + '"'


def make_thumbnail(source: bytes, side: int) -> tuple[bytes, str]:
    """The stored image `source` scaled to fit `side`: a JPEG, or a binary PNG for a mask."""
    try:
        image = Image.open(io.BytesIO(source))
        image.load()
    except Exception:
        raise ApiError(415, "not_an_image", "thumbnails are made of images only") from None
    return thumbnail(image, side, mask=looks_like_mask(image))


def thumbnail_response(request: Request, storage, key: str, side: int) -> Response:
    """The thumbnail of the stored object `key`, or 304 when the browser's copy (If-None-Match) is
    still this one. An object lost from storage is the 404 its plain download gives."""
    try:
        source = storage.get(key)
    except KeyError:
        raise ApiError(404, "object_not_found", f"{key} is not in storage") from None
    etag = thumbnail_etag(source, side)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    data, media_type = make_thumbnail(source, side)
    return Response(data, media_type=media_type, headers=headers)
