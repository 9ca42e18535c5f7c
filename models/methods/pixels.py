"""Pixel-array helpers the model-free methods share."""

import numpy as np
from PIL import Image

from models.masks.sampling import as_bool_mask


def image_pixels(image: Image.Image) -> np.ndarray:
    """uint8 (H, W, C): C is 1 for 'L', 3 for 'RGB'."""
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"image mode {image.mode!r} is not supported: convert it to 'L' or 'RGB'")
    return np.atleast_3d(np.asarray(image))


def mask_inside(mask: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """The mask as bool (H, W), checked against the image's pixels."""
    inside = as_bool_mask(mask)
    if inside.shape != pixels.shape[:2]:
        raise ValueError(f"mask shape {inside.shape} differs from the image's {pixels.shape[:2]}")
    return inside
