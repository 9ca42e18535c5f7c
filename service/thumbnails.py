"""Small previews of stored images for the web page's grids (`?thumb=<side>` on image downloads).

Made on request with Pillow rather than written beside every pair: a thumbnail of a 512 px pair
costs a few milliseconds, works for every job already stored (and for exemplars and plots), and
leaves the job's output layout and its MVTec export as they are. Browsers keep them (the
response is cacheable and has an ETag), so a page seen twice costs nothing.
"""

import hashlib
import io

from fastapi import Request, Response
from PIL import Image

from service.errors import ApiError

THUMB_MIN, THUMB_MAX = 16, 1024
JPEG_QUALITY = 82
# Thumbnails of stored objects never change: a key is written once per job (a redelivery writes
# the same bytes), so a browser may keep one for a day without asking again.
CACHE_CONTROL = "private, max-age=86400"


def thumbnail_etag(source: bytes, side: int) -> str:
    return '"' + hashlib.sha256(source + side.to_bytes(4, "big")).hexdigest()[:32] + '"'


def make_thumbnail(source: bytes, side: int) -> tuple[bytes, str]:
    """The image scaled to fit `side` x `side` (never enlarged): (bytes, media type).

    A binary image (a mask: only 0 and 255) stays a PNG mask and is scaled so that a defect never
    disappears: any source pixel of the mask marks its thumbnail pixel, so a 1-px scratch still
    shows. Everything else becomes a JPEG (RGBA plots on white)."""
    try:
        image = Image.open(io.BytesIO(source))
        image.load()
    except Exception:
        raise ApiError(415, "not_an_image", "thumbnails are made of images only") from None
    out = io.BytesIO()
    if _is_mask(image):
        image = image.convert("L")
        image.thumbnail((side, side), Image.Resampling.BOX)
        image.point(lambda v: 255 if v > 0 else 0).save(out, format="PNG", optimize=True)
        return out.getvalue(), "image/png"
    image.thumbnail((side, side), Image.Resampling.LANCZOS)
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, "white")
        flat.paste(image, mask=image.getchannel("A"))
        image = flat
    elif image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    image.save(out, format="JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue(), "image/jpeg"


def _is_mask(image: Image.Image) -> bool:
    if image.mode == "1":
        return True
    colors = image.getcolors(2) if image.mode == "L" else None  # None: more than two grey levels
    return colors is not None and {value for _, value in colors} <= {0, 255}


def thumbnail_response(request: Request, source: bytes, side: int) -> Response:
    """The thumbnail, or 304 when the browser's copy (If-None-Match) is still this one."""
    etag = thumbnail_etag(source, side)
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    data, media_type = make_thumbnail(source, side)
    return Response(data, media_type=media_type, headers=headers)
