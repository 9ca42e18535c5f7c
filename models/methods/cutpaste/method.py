"""CutPaste anomaly synthesis (Li et al., CVPR 2021), model-free.

A patch of the image itself, cut from one place and colour-jittered, is pasted into the mask.
Native masks are CutPaste's: a rectangle ('cutpaste'), a thin rotated strip ('scar'), or either.
"""

import numpy as np
from PIL import Image

from models.masks.sampling import rectangle_shape
from models.methods.cutpaste import CutPasteParams
from models.methods.interface import GenerateRequest, Item, ProgressCallback
from models.methods.model_free import model_free_pairs, one_pair_per_call
from models.methods.pixels import image_pixels, mask_inside

# Scar sizes in CutPasteParams are in pixels of a 256-pixel image.
SCAR_REFERENCE_SIDE = 256
# CutPaste-Scar turns its strip by up to this many degrees either way from upright.
SCAR_MAX_ANGLE = 45.0


calls = one_pair_per_call


def generate(request: GenerateRequest, calls: list[list[Item]], on_progress: ProgressCallback):
    """The method interface: one pair per call, each from its item's seed alone."""
    return model_free_pairs(
        request, calls, native_mask, lambda normal, mask, rng: synthesize(normal, mask, rng, request.params)
    )


def native_mask(rng: np.random.Generator, size: tuple[int, int], params: CutPasteParams) -> np.ndarray:
    """bool (H, W): a CutPaste rectangle or scar at a random position; never empty."""
    variant = params.variant
    if variant == "mixed":
        variant = "cutpaste" if rng.random() < 0.5 else "scar"
    return _rectangle(rng, size, params) if variant == "cutpaste" else _scar(rng, size, params)


def synthesize(
    normal: Image.Image, mask: np.ndarray, rng: np.random.Generator, params: CutPasteParams
) -> Image.Image:
    """The normal image with the mask filled from another place of itself; same size and mode."""
    pixels = image_pixels(normal)
    inside = mask_inside(mask, pixels)
    height, width = inside.shape

    # 1. The mask's bounding box, and another box of the same shape to cut from.
    rows, cols = np.nonzero(inside)
    top, left = rows.min(), cols.min()
    h, w = rows.max() + 1 - top, cols.max() + 1 - left
    positions_x = width - w + 1
    positions = (height - h + 1) * positions_x
    if positions > 1:
        # Any position but the mask's own: draw from the others.
        position = rng.integers(positions - 1)
        position += position >= top * positions_x + left
        source_top, source_left = divmod(int(position), positions_x)
        patch = pixels[source_top : source_top + h, source_left : source_left + w]
    else:
        # The box is the whole image, so there is no other place: use the image upside down.
        patch = pixels[::-1, ::-1]

    # 2. Colour jitter: brightness and contrast factors in [1 - jitter, 1 + jitter].
    patch = patch.astype(np.float64)
    brightness, contrast = rng.uniform(1 - params.color_jitter, 1 + params.color_jitter, size=2)
    mean = patch.mean(axis=(0, 1))
    patch = np.clip(np.rint(((patch - mean) * contrast + mean) * brightness), 0, 255)

    # 3. Paste the patch over the bounding box; keep it only inside the mask.
    pasted = pixels.copy()
    pasted[top : top + h, left : left + w] = patch
    out = np.where(inside[..., None], pasted, pixels).astype(np.uint8)
    return Image.fromarray(out[..., 0] if normal.mode == "L" else out)


def _rectangle(rng, size, params):
    height, width = size
    h, w = rectangle_shape(rng, size, params.area, params.aspect)
    top, left = rng.integers(height - h + 1), rng.integers(width - w + 1)
    mask = np.zeros(size, dtype=bool)
    mask[top : top + h, left : left + w] = True
    return mask


def _scar(rng, size, params):
    """A strip scar_width wide and scar_length long, turned up to 45 degrees from upright."""
    height, width = size
    pixels_per_unit = min(size) / SCAR_REFERENCE_SIDE
    strip_width = max(1.0, rng.uniform(*params.scar_width) * pixels_per_unit)
    strip_length = max(1.0, rng.uniform(*params.scar_length) * pixels_per_unit)
    angle = np.radians(rng.uniform(-SCAR_MAX_ANGLE, SCAR_MAX_ANGLE))

    # A centre far enough from the edges for the whole strip, when the image is large enough.
    reach = int(np.ceil(np.hypot(strip_width, strip_length) / 2))
    centre_y = rng.integers(min(reach, height // 2), max(height - reach, height // 2 + 1))
    centre_x = rng.integers(min(reach, width // 2), max(width - reach, width // 2 + 1))

    # Pixel offsets from the centre, in the strip's own axes (across, along).
    ys, xs = np.ogrid[0:height, 0:width]
    across = (xs - centre_x) * np.cos(angle) + (ys - centre_y) * np.sin(angle)
    along = (ys - centre_y) * np.cos(angle) - (xs - centre_x) * np.sin(angle)
    # The centre pixel always counts: a strip is never empty.
    return (np.abs(across) <= strip_width / 2) & (np.abs(along) <= strip_length / 2)


