"""Target masks: where on a normal image a synthetic defect goes.

Every mask here is a bool array of shape (height, width), True inside. Masks that come from
callers may be bool or uint8 0/255; ``as_bool_mask`` reads both.
"""

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from models.methods.params import MaskSpec

# foreground_mask works on a copy whose longer side is at most this: fast, and it smooths noise.
FOREGROUND_WORK_SIDE = 256
# A background must differ from the product by at least this much (0-255 colour distance).
MIN_FOREGROUND_CONTRAST = 12.0
# ... and stand out of the background's spread by this many standard deviations. Magnetic-tile
# photographs (no background, shaded edges) reach 5.3; a dark screw on a noisy, shaded light
# background scores about 23.
MIN_FOREGROUND_SEPARATION = 6.0
# Random placements tried before settling for the one with the best overlap.
PLACEMENT_TRIES = 32


def as_bool_mask(mask: np.ndarray) -> np.ndarray:
    """bool copy of a caller's mask: True stays True, uint8 counts as inside from 128 up."""
    mask = np.asarray(mask)
    return mask.copy() if mask.dtype == bool else mask >= 128


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to size = (height, width)."""
    if mask.shape == size:
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
    return np.asarray(resized) >= 128


def foreground_mask(image: Image.Image) -> np.ndarray:
    """bool (H, W): True on the product, False on a plain background.

    The background colour is the median of the image border; pixels far from it (Otsu threshold
    on the colour distance) are the product. When the border looks like the rest of the image
    (a texture, or a product that fills the frame) there is no background: all True.
    """
    full_size = (image.height, image.width)
    small = image.convert("RGB")
    small.thumbnail((FOREGROUND_WORK_SIDE, FOREGROUND_WORK_SIDE))
    pixels = np.asarray(small, dtype=np.float32)

    border = np.zeros(pixels.shape[:2], dtype=bool)
    ring = max(2, min(border.shape) // 32)  # border width in pixels
    border[:ring], border[-ring:], border[:, :ring], border[:, -ring:] = True, True, True, True
    distance = np.linalg.norm(pixels - np.median(pixels[border], axis=0), axis=-1)

    everything = np.ones(full_size, dtype=bool)
    if distance.max() < MIN_FOREGROUND_CONTRAST:
        return everything
    product = distance > otsu_threshold(distance)
    # A real background sits on the border; a texture is "product" as often there as anywhere.
    if product[border].mean() > 0.5 * product.mean():
        return everything
    # A real background is plain: the product stands far out of its spread. Shading across a
    # product that fills the frame (a tile darker at its edges) splits in two less clearly.
    background = distance[~product]
    if distance[product].mean() - background.mean() < MIN_FOREGROUND_SEPARATION * (background.std() + 1):
        return everything

    product = ndimage.binary_opening(product, iterations=2)  # drop speckle
    product = ndimage.binary_fill_holes(product)
    labels, count = ndimage.label(product)
    if count == 0:
        return everything
    # Keep the largest part and any of comparable size (several products, a part split by shade).
    areas = np.bincount(labels.ravel())[1:]
    product = np.isin(labels, 1 + np.flatnonzero(areas >= 0.2 * areas.max()))
    if product.mean() < 0.005:  # a speck is no product
        return everything
    return resize_mask(product, full_size)


def otsu_threshold(values: np.ndarray) -> float:
    """The threshold that best splits values into two classes (Otsu 1979), from a 256-bin histogram."""
    counts, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    # Split after bin k, for every k: class sizes and class means.
    below = np.cumsum(counts)[:-1]
    above = values.size - below
    sum_below = np.cumsum(counts * centres)[:-1]
    mean_below = sum_below / np.maximum(below, 1)
    mean_above = (np.sum(counts * centres) - sum_below) / np.maximum(above, 1)
    between_class_variance = below * above * (mean_below - mean_above) ** 2
    return float(edges[1 + np.argmax(between_class_variance)])


def rectangle_shape(
    rng: np.random.Generator, size: tuple[int, int], area: tuple[float, float], aspect: tuple[float, float]
) -> tuple[int, int]:
    """(h, w) of a random rectangle covering an `area` fraction of size, with w/h in `aspect`.

    The aspect is log-uniform (as wide as it is tall on average) and clamped so that the
    rectangle fits the image: the area fraction is kept exact, up to rounding.
    """
    height, width = size
    fraction = rng.uniform(*area)
    ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
    ratio = np.clip(ratio, fraction * width / height, width / (fraction * height))
    pixels = fraction * height * width
    h = int(np.clip(round(np.sqrt(pixels / ratio)), 1, height))
    w = int(np.clip(round(np.sqrt(pixels * ratio)), 1, width))
    return h, w


def sample_target_mask(
    spec: MaskSpec,
    source: str,
    rng: np.random.Generator,
    size: tuple[int, int],
    *,
    foreground: np.ndarray | None = None,
    exemplar_masks: Sequence[np.ndarray] = (),
    given_masks: Sequence[np.ndarray] = (),
    index: int = 0,
    native: Callable[[np.random.Generator, tuple[int, int]], np.ndarray] | None = None,
    learned: Callable[[np.random.Generator], np.ndarray] | None = None,
) -> np.ndarray:
    """bool (H, W) target mask for pair `index`, size = (height, width); never empty.

    source (already resolved from spec.source and the method's default):
      native    native(rng, size), the method's own generator;
      exemplar  one exemplar mask, rescaled to this image, randomly scaled, rotated and flipped;
      box       a random rectangle (spec.box_area, spec.box_aspect), or spec.boxes in turn;
      given     given_masks in turn, used as they are (resized if needed);
      learned   learned(rng), a mask sampled from a fine-tune's mask model (any size: its shape is
                rescaled to this image, flipped at random and placed like an exemplar's). Only methods that learn one
                offer it; the others' specs do not list it, so the API refuses it for them.
    With spec.inside_foreground and a foreground, native, exemplar, learned and random-box masks
    are kept on the foreground. Fixed boxes and given masks are the caller's explicit choice: not moved.
    """
    keep_inside = None
    if spec.inside_foreground and foreground is not None:
        keep_inside = resize_mask(as_bool_mask(foreground), size)
        if not keep_inside.any():
            keep_inside = None

    if source == "native":
        if native is None:
            raise ValueError("mask source 'native' needs the method's mask generator")
        return _native_mask(native, rng, size, keep_inside)
    if source == "exemplar":
        if not exemplar_masks:
            raise ValueError("mask source 'exemplar' needs at least one exemplar mask")
        exemplar = as_bool_mask(exemplar_masks[rng.integers(len(exemplar_masks))])
        return _place(_jittered_exemplar(exemplar, spec, rng, size), rng, size, keep_inside)
    if source == "box" and spec.boxes:
        return _fixed_box(spec.boxes[index % len(spec.boxes)], size)
    if source == "box":
        shape = np.ones(rectangle_shape(rng, size, spec.box_area, spec.box_aspect), dtype=bool)
        return _place(shape, rng, size, keep_inside)
    if source == "given":
        if not given_masks:
            raise ValueError("mask source 'given' needs the exemplars' masks")
        mask = resize_mask(as_bool_mask(given_masks[index % len(given_masks)]), size)
        if not mask.any():
            raise ValueError(f"given mask {index % len(given_masks)} is empty")
        return mask
    if source == "learned":
        if learned is None:
            raise ValueError("mask source 'learned' needs the method's learned mask model")
        sampled = as_bool_mask(learned(rng))
        if not sampled.any():
            raise ValueError("the learned mask model gave an empty mask")
        shape = _jittered_exemplar(sampled, spec.model_copy(update={"scale": (1.0, 1.0), "rotation": 0.0}), rng, size)
        return _place(shape, rng, size, keep_inside)
    raise ValueError(f"unknown mask source {source!r}")


def _native_mask(native, rng, size, keep_inside):
    mask = as_bool_mask(native(rng, size))
    if keep_inside is None:
        return mask
    # Redraw until the method's mask touches the product; give up on the product before emptiness.
    for _ in range(PLACEMENT_TRIES):
        if (mask & keep_inside).any():
            return mask & keep_inside
        mask = as_bool_mask(native(rng, size))
    return mask


def _jittered_exemplar(exemplar, spec, rng, size):
    """The exemplar's defect shape, cropped to its bounding box, in this image's pixels and jittered."""
    if not exemplar.any():
        raise ValueError("an exemplar mask is empty")
    rows, cols = np.nonzero(exemplar)
    crop = exemplar[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]

    # Exemplar pixels -> target pixels per axis, times the random scale.
    scale = rng.uniform(*spec.scale)
    h = max(1, round(crop.shape[0] * size[0] / exemplar.shape[0] * scale))
    w = max(1, round(crop.shape[1] * size[1] / exemplar.shape[1] * scale))
    patch = Image.fromarray(crop.astype(np.uint8) * 255).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        patch = patch.transpose(Image.FLIP_TOP_BOTTOM)
    patch = patch.rotate(rng.uniform(-spec.rotation, spec.rotation), Image.BILINEAR, expand=True)

    values = np.asarray(patch)
    # A defect of a pixel or two can fade below half under resampling: keep its strongest pixel.
    shape = values >= min(128, values.max())
    rows, cols = np.nonzero(shape)
    shape = shape[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]

    fit = min(1.0, size[0] / shape.shape[0], size[1] / shape.shape[1])
    if fit < 1:  # larger than the image: shrink it to fit
        smaller = (max(1, int(shape.shape[0] * fit)), max(1, int(shape.shape[1] * fit)))
        shape = resize_mask(shape, smaller)
    return shape


def _place(shape, rng, size, keep_inside):
    """shape (a bool patch no larger than size) at a random position of a (height, width) mask.

    With keep_inside, a random pixel of the shape is put on a random foreground pixel, a few
    times, until the shape lies wholly inside; else the best try is cut to the foreground.
    """
    height, width = size
    h, w = shape.shape
    if keep_inside is None:
        return _paste(shape, rng.integers(height - h + 1), rng.integers(width - w + 1), size)

    shape_pixels = np.argwhere(shape)
    foreground_pixels = np.flatnonzero(keep_inside)
    best_inside, best_y, best_x = -1, 0, 0
    for _ in range(PLACEMENT_TRIES):
        anchor_y, anchor_x = shape_pixels[rng.integers(len(shape_pixels))]
        target_y, target_x = divmod(int(foreground_pixels[rng.integers(len(foreground_pixels))]), width)
        y = int(np.clip(target_y - anchor_y, 0, height - h))
        x = int(np.clip(target_x - anchor_x, 0, width - w))
        inside = np.count_nonzero(shape & keep_inside[y : y + h, x : x + w])
        if inside > best_inside:
            best_inside, best_y, best_x = inside, y, x
        if inside == len(shape_pixels):
            break
    placed = _paste(shape, best_y, best_x, size)
    # A shape that never met the foreground (a scattered defect on a thin product) stays whole.
    return placed & keep_inside if best_inside > 0 else placed


def _paste(shape, y, x, size):
    mask = np.zeros(size, dtype=bool)
    mask[y : y + shape.shape[0], x : x + shape.shape[1]] = shape
    return mask


def _fixed_box(box, size):
    x0, y0, x1, y1 = box
    mask = np.zeros(size, dtype=bool)
    mask[y0:y1, x0:x1] = True  # slicing clips the box to the image
    if not mask.any():
        raise ValueError(f"box {list(box)} lies outside the {size[1]}x{size[0]} image")
    return mask


def bounding_box(mask: np.ndarray) -> np.ndarray:
    """bool mask of the smallest axis-aligned rectangle holding every True pixel of `mask`."""
    mask = as_bool_mask(mask)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = np.zeros_like(mask)
    if rows.size:
        box[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1] = True
    return box
