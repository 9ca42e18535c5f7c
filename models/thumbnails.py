"""Thumbnails of single images and masks, for the web page's grids: written beside every pair by
the workers, and made on request by the API. PIL only, so the slim API image can import it."""

import io

from PIL import Image

THUMBNAIL_SIDE = 256  # the web page's grid cells at up to twice their CSS size
JPEG_QUALITY = 82


def looks_like_mask(image: Image.Image) -> bool:
    """A binary image: only 0 and 255."""
    if image.mode == "1":
        return True
    colors = image.getcolors(2) if image.mode == "L" else None  # None: more than two grey levels
    return colors is not None and {value for _, value in colors} <= {0, 255}


def thumbnail(image: Image.Image, side: int = THUMBNAIL_SIDE, *, mask: bool) -> tuple[bytes, str]:
    """`image` scaled to fit side x side (never enlarged) and encoded: (bytes, media type).

    A mask stays a binary PNG, scaled so that a defect never disappears: any covered source pixel
    marks its thumbnail pixel (box resampling, then "any coverage"), so a 1-px scratch still
    shows. An image becomes a JPEG (transparency flattened on white)."""
    out = io.BytesIO()
    if mask:
        small = image.convert("L")
        small.thumbnail((side, side), Image.Resampling.BOX)
        small.point(lambda v: 255 if v > 0 else 0).save(out, format="PNG")
        return out.getvalue(), "image/png"
    small = image.copy()
    small.thumbnail((side, side), Image.Resampling.LANCZOS)
    if small.mode in ("RGBA", "LA", "P", "PA"):
        small = small.convert("RGBA")
        flat = Image.new("RGB", small.size, "white")
        flat.paste(small, mask=small.getchannel("A"))
        small = flat
    elif small.mode not in ("L", "RGB"):
        small = small.convert("RGB")
    small.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue(), "image/jpeg"
