"""Contact sheet of generated pairs: each image with its mask outlined in red (a job's preview.png)."""

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from models.masks.sampling import as_bool_mask

GAP = 4  # pixels between and around thumbnails
BACKGROUND = (32, 32, 32)
OUTLINE = (255, 0, 0)
OUTLINE_WIDTH = 2


def contact_sheet(
    pairs: Sequence[tuple[Image.Image, np.ndarray]], *, max_items: int = 16, thumb: int = 160
) -> Image.Image:
    """RGB grid of the first max_items pairs, each in a thumb x thumb cell (aspect kept, letterboxed)."""
    pairs = pairs[:max_items]
    columns = max(1, math.ceil(math.sqrt(len(pairs))))
    rows = max(1, math.ceil(len(pairs) / columns))
    sheet = Image.new("RGB", (GAP + columns * (thumb + GAP), GAP + rows * (thumb + GAP)), BACKGROUND)
    for number, (image, mask) in enumerate(pairs):
        row, column = divmod(number, columns)
        tile = _outlined_thumbnail(image, as_bool_mask(mask), thumb)
        left = GAP + column * (thumb + GAP) + (thumb - tile.width) // 2
        top = GAP + row * (thumb + GAP) + (thumb - tile.height) // 2
        sheet.paste(tile, (left, top))
    return sheet


def _outlined_thumbnail(image: Image.Image, mask: np.ndarray, thumb: int) -> Image.Image:
    scale = thumb / max(image.width, image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.array(image.convert("RGB").resize(size, Image.BILINEAR))
    # Area resampling, then "any coverage": a defect smaller than a thumbnail pixel stays visible.
    small_mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.BOX)) > 0

    # The outline is the mask minus its erosion by OUTLINE_WIDTH pixels (4-neighbourhood).
    eroded = small_mask
    for _ in range(OUTLINE_WIDTH):
        padded = np.pad(eroded, 1)
        eroded = eroded & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    pixels[small_mask & ~eroded] = OUTLINE
    return Image.fromarray(pixels)
