"""Validation of uploaded images and masks (PIL only): every problem is an ApiError naming it."""

import io
import warnings
from dataclasses import dataclass

import numpy as np
from fastapi import UploadFile
from PIL import Image, ImageOps

from service.errors import ApiError, echo

ACCEPTED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "BMP": "bmp", "TIFF": "tiff"}
# Modes we convert losslessly (or by dropping alpha) to the two modes the methods work in.
_TO_GRAY = {"1", "L", "LA", "I;8"}
_TO_RGB = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


@dataclass
class DecodedImage:
    image: Image.Image  # mode 'L' or 'RGB'
    png: bytes  # the image re-encoded losslessly, as stored

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


async def read_upload(upload: UploadFile, field: str, max_bytes: int) -> bytes:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(413, "file_too_large", f"{field} ({echo(upload.filename)}) is over the {max_bytes}-byte limit")
    if not data:
        raise ApiError(400, "empty_file", f"{field} ({echo(upload.filename)}) is empty")
    return data


def _open(data: bytes, field: str, max_side: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            if fmt not in ACCEPTED_FORMATS:
                raise ApiError(
                    415,
                    "unsupported_image_type",
                    f"{field}: {fmt or 'unknown'} images are not accepted; send PNG, JPEG, BMP or TIFF",
                )
            width, height = img.size
            if max(width, height) > max_side:
                raise ApiError(
                    413, "image_too_large", f"{field} is {width}x{height}; the limit is {max_side} px a side"
                )
            _refuse_deep_samples(img, data, field)
            img.load()
            # Phone and camera JPEGs store the sensor's orientation in EXIF: turn the pixels upright,
            # for images and masks alike, so that a mask drawn on the upright view matches.
            img = ImageOps.exif_transpose(img)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, "image_too_large", f"{field} decompresses to too many pixels") from None
    except Image.UnidentifiedImageError:
        raise ApiError(415, "unsupported_image_type", f"{field} is not an image (PNG, JPEG, BMP or TIFF)") from None
    except Exception as exc:  # truncated or corrupt data
        raise ApiError(400, "invalid_image", f"{field} could not be decoded: {exc}") from None
    return img


def _bits_per_sample(img: Image.Image, data: bytes) -> int:
    """Bits of one channel of one pixel as stored. Pillow opens 16-bit RGB PNGs and TIFFs as 8-bit
    'RGB' (keeping the high byte), so the file's own header is read."""
    if img.format == "PNG" and len(data) > 24:
        return data[24]  # IHDR's bit depth: 8-byte signature, length, "IHDR", width, height
    if img.format == "TIFF":
        bits = img.tag_v2.get(258, (8,))  # BitsPerSample
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 8


def _refuse_deep_samples(img: Image.Image, data: bytes, field: str) -> None:
    bits = _bits_per_sample(img, data)
    if bits > 8:  # grey and colour alike: refused rather than silently cut to their high byte
        raise ApiError(
            415,
            "unsupported_image_mode",
            f"{field} has {bits} bits per sample; send 8-bit grayscale or RGB "
            "(scale the data to 8 bits with the windowing that suits it, e.g. its min..max)",
        )


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, field: str, max_side: int) -> DecodedImage:
    """A product image: grayscale stays 'L', colour becomes 'RGB'."""
    img = _open(data, field, max_side)
    if img.mode in _TO_GRAY:
        img = img.convert("L")
    elif img.mode in _TO_RGB:
        img = img.convert("RGB")
    else:
        raise ApiError(
            415,
            "unsupported_image_mode",
            f"{field} has pixel mode {img.mode}; send 8-bit grayscale or RGB (16-bit and float are not supported)",
        )
    return DecodedImage(img, _png(img))


def decode_mask(data: bytes, field: str, image_size: tuple[int, int], max_side: int) -> DecodedImage:
    """A defect mask: binarised at 128 to 0/255, the same size as its image, and not empty."""
    img = _open(data, field, max_side)
    if img.size != image_size:
        raise ApiError(
            400,
            "mask_size_mismatch",
            f"{field} is {img.size[0]}x{img.size[1]} but its image is {image_size[0]}x{image_size[1]}",
        )
    try:
        gray = np.asarray(img.convert("L"))
    except Exception as exc:
        raise ApiError(400, "invalid_image", f"{field} could not be read as a mask: {exc}") from None
    binary = np.where(gray >= 128, 255, 0).astype(np.uint8)
    if not binary.any():
        raise ApiError(400, "empty_mask", f"{field} has no pixel >= 128: it marks no defect")
    mask = Image.fromarray(binary, mode="L")
    return DecodedImage(mask, _png(mask))
