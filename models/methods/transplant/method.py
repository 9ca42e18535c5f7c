"""Transplant anomaly synthesis, model-free: the exemplars' real defects moved onto normal images.

Each pair is planned from its item's seed alone, then rendered from the plan alone:

1. Source: a random exemplar and one connected component of its mask (or the whole mask), cut
   with its surroundings. Random rather than the item's reference: a job of few pairs over many
   normal images would otherwise copy its first exemplar only.
2. Geometry: the cut is rescaled to the destination per side (a defect keeps its size and place
   relative to the image), then randomly scaled, rotated, flipped and elastically warped, image
   and mask together (OpenCV warpAffine and remap).
3. Placement: near the defect's own relative position, anywhere, or into the mask the job's mask
   source draws; on the product's foreground when the mask spec asks for it.
4. Photometry: the mean and contrast of the cut's surroundings are matched to the destination's,
   so a defect from a darker exemplar does not arrive as a dark stain.
5. Blending over the defect mask dilated by `blend_margin`, nowhere else: OpenCV seamless cloning
   (Poisson image editing: the defect's gradients, the destination's border values; mixed
   gradients keep a textured destination's own where they are stronger), an alpha feather, or a
   hard paste.

The plan (one `Transplant` per defect) is the pair's manifest entry; `reproduce` renders an entry
again on the same normal image and exemplars and gives the same pixels.

Deviations from the anchors: NSA clones patches of the normal images themselves and PRN learns
from its augmented anomalies; here the patches are the real exemplar defects and nothing is learnt.
The written mask is the transplanted defect mask itself; the blend band around it (at most 3 px)
is left unlabelled, as the label contract allows.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from models.errors import InputError
from models.masks.sampling import PLACEMENT_TRIES, foreground_mask
from models.methods.interface import Exemplar, GenerateRequest, Item, Pair, ProgressCallback
from models.methods.model_free import one_pair_per_call
from models.methods.pixels import image_pixels
from models.methods.transplant import TransplantParams

# Surroundings with fewer pixels than this give no reliable mean and contrast: left unmatched.
MIN_RING_PIXELS = 8
# Photometric matching changes contrast by at most this factor either way (a flat exemplar
# border next to a textured destination would otherwise blow the defect up).
MAX_CONTRAST_RATIO = 2.0
# The elastic field is smoothed over this fraction of the patch's shorter side: a gentle bend.
ELASTIC_SMOOTHNESS = 0.25
# seamlessClone clears the outermost pixel row of its mask: pad so a defect at the image edge blends too.
CLONE_PAD = 2


calls = one_pair_per_call


@dataclass(frozen=True)
class Transplant:
    """One defect of a pair: where it came from, how it was transformed, where it went."""

    exemplar: str  # the exemplar's id
    component: int | None  # label of its mask's 8-connected component (OpenCV's order); None: the whole mask
    scale: float  # relative to the exemplar-to-destination size ratio
    rotation: float  # degrees, counter-clockwise
    flip_horizontal: bool
    flip_vertical: bool
    elastic_seed: int  # seeds the elastic displacement field
    position: tuple[int, int]  # (top, left) of the transformed patch on the destination
    gain: float  # intensity gain after photometric matching

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "position": list(self.position)}

    @classmethod
    def from_dict(cls, entry: Mapping) -> "Transplant":
        return cls(**{**entry, "position": tuple(entry["position"])})


@dataclass(frozen=True)
class Patch:
    """A defect cut with its surroundings and transformed, in destination pixels."""

    image: np.ndarray  # float32 (h, w, C)
    defect: np.ndarray  # bool (h, w)
    valid: np.ndarray  # bool (h, w): pixels that come from the exemplar, not from border filling

    def defect_box(self) -> tuple[int, int, int, int]:
        rows, cols = np.nonzero(self.defect)
        return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def generate(request: GenerateRequest, calls: Sequence[list[Item]], on_progress: ProgressCallback):
    """The method interface: one pair per call, each from its item's seed alone."""
    sources = defect_exemplars(request.exemplars)
    for call in calls:
        yield [transplant_pair(request, item, sources) for item in call]


def defect_exemplars(exemplars: Sequence[Exemplar]) -> list[Exemplar]:
    """The exemplars that have a defect to transplant."""
    sources = [e for e in exemplars if e.mask is not None and np.asarray(e.mask).any()]
    if not sources:
        raise InputError("transplant needs at least one anomaly exemplar with a non-empty mask")
    return sources


def transplant_pair(request: GenerateRequest, item: Item, sources: Sequence[Exemplar]) -> Pair:
    params: TransplantParams = request.params
    rng = np.random.default_rng(item.seed)
    normal = request.normals[item.normal]
    foreground = request.normals.foreground(item.normal) if request.masks.inside_foreground else None
    transplants = plan(request, item, rng, sources, _restricting(foreground))
    image, mask = render(normal, {e.id: e for e in sources}, transplants, params, foreground)
    defect = next(e.defect for e in sources if e.id == transplants[0].exemplar)  # the first defect's type
    details = {"defect": defect, "blend": params.blend, "mixed": params.mixed,
               "transplants": [t.as_dict() for t in transplants]}
    return Pair(item.index, image, mask.astype(np.uint8) * 255, item.seed, details=details)


def reproduce(entry: Mapping, normal: Image.Image, exemplars: Sequence[Exemplar], params: TransplantParams,
              inside_foreground: bool = True) -> tuple[Image.Image, np.ndarray]:
    """A pair again from its manifest entry, the job's params and inside_foreground: (image, mask)."""
    transplants = [Transplant.from_dict(t) for t in entry["transplants"]]
    foreground = foreground_mask(normal) if inside_foreground else None
    return render(normal, {e.id: e for e in exemplars}, transplants, params, foreground)


# --- planning: every random draw of a pair -------------------------------------------------------


def plan(request: GenerateRequest, item: Item, rng: np.random.Generator, sources: Sequence[Exemplar],
         foreground: np.ndarray | None) -> list[Transplant]:
    """The defects of `item`'s pair, drawn from `rng` in a fixed order."""
    params: TransplantParams = request.params
    normal = request.normals[item.normal]
    size = (normal.height, normal.width)
    count = int(rng.integers(params.defects_per_image[0], params.defects_per_image[1] + 1))
    transplants = []
    for _ in range(count):
        exemplar = sources[int(rng.integers(len(sources)))]
        labels, components = _components(exemplar.mask)
        component = None if params.components == "whole" else int(rng.integers(components)) + 1
        flips = rng.random(2) < 0.5
        transplant = Transplant(
            exemplar=exemplar.id, component=component,
            scale=float(rng.uniform(*params.scale)),
            rotation=float(rng.uniform(-params.rotation, params.rotation)),
            flip_horizontal=bool(params.flip and flips[0]), flip_vertical=bool(params.flip and flips[1]),
            elastic_seed=int(rng.integers(2**32)),
            position=(0, 0),
            gain=float(rng.uniform(1 - params.gain_jitter, 1 + params.gain_jitter)),
        )
        source = _source_mask(labels, component)
        pixels = image_pixels(exemplar.image.convert(normal.mode))
        # 'native': the method's own placement; any other mask source draws the mask the defect goes in.
        target = None if request.masks.source == "native" else request.target_mask(item, rng)
        room = (0, size[0], 0, size[1]) if target is None else _box(target)
        transplant, patch = _fitted(transplant, pixels, source, size, params, room)
        position = _position(rng, patch, source, size, params, foreground, target)
        transplants.append(dataclasses.replace(transplant, position=position))
    return transplants


def _fitted(transplant: Transplant, pixels: np.ndarray, source: np.ndarray, size: tuple[int, int],
            params: TransplantParams, box: tuple[int, int, int, int]) -> tuple[Transplant, Patch]:
    """The transplant with its scale reduced until the defect fits into box = (top, bottom, left, right)."""
    patch = warped_patch(pixels, source, transplant, size, params)
    for _ in range(8):
        top, bottom, left, right = patch.defect_box()
        shrink = min(1.0, (box[1] - box[0]) / (bottom - top), (box[3] - box[2]) / (right - left))
        if shrink >= 1:
            break
        # A little more than the ratio: rotation and resampling do not shrink a box exactly.
        transplant = dataclasses.replace(transplant, scale=transplant.scale * shrink * 0.95)
        patch = warped_patch(pixels, source, transplant, size, params)
    return transplant, patch


def _position(rng, patch: Patch, source: np.ndarray, size: tuple[int, int], params: TransplantParams,
              foreground: np.ndarray | None, target: np.ndarray | None) -> tuple[int, int]:
    """(top, left) of the patch: its defect wholly inside the image, on the foreground if it can be."""
    height, width = size
    top, bottom, left, right = patch.defect_box()
    lowest, highest = (-top, -left), (height - bottom, width - right)

    def clipped(y, x):
        return int(np.clip(round(y), lowest[0], highest[0])), int(np.clip(round(x), lowest[1], highest[1]))

    def centred_on(y, x):  # the defect's box centred on (y, x)
        return clipped(y - (top + bottom - 1) / 2, x - (left + right - 1) / 2)

    if target is not None:
        t_top, t_bottom, t_left, t_right = _box(target)
        return centred_on((t_top + t_bottom - 1) / 2, (t_left + t_right - 1) / 2)

    defect_pixels = np.argwhere(patch.defect)

    def anywhere():
        if foreground is None:
            return int(rng.integers(lowest[0], highest[0] + 1)), int(rng.integers(lowest[1], highest[1] + 1))
        anchor_y, anchor_x = defect_pixels[rng.integers(len(defect_pixels))]
        y, x = np.unravel_index(int(rng.choice(np.flatnonzero(foreground))), size)
        return clipped(y - anchor_y, x - anchor_x)

    def near():
        rows, cols = np.nonzero(source)
        y = (rows.min() + rows.max() + 1) / 2 / source.shape[0] * height
        x = (cols.min() + cols.max() + 1) / 2 / source.shape[1] * width
        shift = rng.uniform(-params.max_shift, params.max_shift, 2) * (height, width)
        return centred_on(y + shift[0], x + shift[1])

    draw = near if params.placement == "near" else anywhere
    if foreground is None:
        return draw()
    # The first place where the whole defect is on the product, else the one with most of it there.
    best, best_inside = None, -1
    for attempt in range(2 * PLACEMENT_TRIES):
        if attempt == PLACEMENT_TRIES and best_inside > 0:
            break
        # Near the defect's own place first; anywhere on the product when nothing there touches it.
        y, x = draw() if attempt < PLACEMENT_TRIES else anywhere()
        inside = np.count_nonzero(_placed(patch.defect, (y, x), size) & foreground)
        if inside > best_inside:
            best, best_inside = (y, x), inside
        if inside == len(defect_pixels):
            break
    return best


# --- rendering: a pair from its plan, deterministic ----------------------------------------------


def render(normal: Image.Image, exemplars: Mapping[str, Exemplar], transplants: Sequence[Transplant],
           params: TransplantParams, foreground: np.ndarray | None) -> tuple[Image.Image, np.ndarray]:
    """The normal image with the planned defects blended in, and the written mask (bool)."""
    out = image_pixels(normal).copy()
    size = out.shape[:2]
    foreground = _restricting(foreground)
    written = np.zeros(size, bool)
    for transplant in transplants:
        exemplar = exemplars[transplant.exemplar]
        labels, _ = _components(exemplar.mask)
        pixels = image_pixels(exemplar.image.convert(normal.mode))
        patch = warped_patch(pixels, _source_mask(labels, transplant.component), transplant, size, params)

        # The patch on a copy of the destination; its defect, on the product when it touches it.
        defect = _placed(patch.defect, transplant.position, size)
        if foreground is not None and (defect & foreground).any():
            defect &= foreground
        source, valid = out.astype(np.float32), _placed(patch.valid, transplant.position, size)
        source[valid] = _placed_values(patch.image, patch.valid, transplant.position, size)
        if params.match_photometry:
            _match_surroundings(source, out, defect, valid, params.context_margin)
        source[valid] *= transplant.gain

        out = blended(np.clip(np.rint(source), 0, 255).astype(np.uint8), out, defect, params)
        written |= defect
    return Image.fromarray(out[..., 0] if normal.mode == "L" else out), written


def warped_patch(pixels: np.ndarray, source: np.ndarray, transplant: Transplant, size: tuple[int, int],
                 params: TransplantParams) -> Patch:
    """The source defect of `pixels` (uint8 (H, W, C)) cut with its surroundings and transformed
    into a destination of size (height, width)."""
    channels = pixels.shape[2]
    factor_y = transplant.scale * size[0] / source.shape[0]
    factor_x = transplant.scale * size[1] / source.shape[1]
    # Enough exemplar pixels for context_margin and the blend band at the destination's scale.
    margin = math.ceil((params.context_margin + params.blend_margin + 2) / min(factor_y, factor_x))
    rows, cols = np.nonzero(source)
    top, bottom = max(0, rows.min() - margin), min(source.shape[0], rows.max() + 1 + margin)
    left, right = max(0, cols.min() - margin), min(source.shape[1], cols.max() + 1 + margin)
    cut = pixels[top:bottom, left:right].astype(np.float32)
    cut_defect = source[top:bottom, left:right].astype(np.float32)
    cut_height, cut_width = cut_defect.shape

    # 1. Scale, flips and rotation about the cut's centre, into a patch that holds all of it.
    angle = math.radians(transplant.rotation)
    rotation = np.array([[math.cos(angle), math.sin(angle)], [-math.sin(angle), math.cos(angle)]])
    linear = rotation @ np.diag([factor_x * (-1 if transplant.flip_horizontal else 1),
                                 factor_y * (-1 if transplant.flip_vertical else 1)])
    corners = linear @ np.array([[-1, 1, -1, 1], [-1, -1, 1, 1]]) * np.array([[cut_width / 2], [cut_height / 2]])
    width = max(1, math.ceil(np.ptp(corners[0]) - 1e-6))
    height = max(1, math.ceil(np.ptp(corners[1]) - 1e-6))
    centre_in = np.array([(cut_width - 1) / 2, (cut_height - 1) / 2])
    centre_out = np.array([(width - 1) / 2, (height - 1) / 2])
    matrix = np.hstack([linear, (centre_out - linear @ centre_in)[:, None]])

    def warp(values, border):
        return cv2.warpAffine(values, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=border)

    image = warp(cut, cv2.BORDER_REFLECT_101).reshape(height, width, channels)
    defect = warp(cut_defect, cv2.BORDER_CONSTANT)
    valid = warp(np.ones_like(cut_defect), cv2.BORDER_CONSTANT)

    # 2. A smooth random displacement of every pixel by at most `elastic` pixels.
    if params.elastic > 0:
        field = np.random.default_rng(transplant.elastic_seed).uniform(-1, 1, (2, height, width))
        field = ndimage.gaussian_filter(field, (0, *(max(1.0, ELASTIC_SMOOTHNESS * min(height, width)),) * 2))
        field *= params.elastic / max(np.abs(field).max(), 1e-9)
        grid_y, grid_x = np.mgrid[0:height, 0:width].astype(np.float32)
        map_x, map_y = grid_x + field[1].astype(np.float32), grid_y + field[0].astype(np.float32)

        def remap(values, border):
            return cv2.remap(values, map_x, map_y, cv2.INTER_LINEAR, borderMode=border)

        image = remap(image, cv2.BORDER_REFLECT_101).reshape(height, width, channels)
        defect, valid = remap(defect, cv2.BORDER_CONSTANT), remap(valid, cv2.BORDER_CONSTANT)

    # A defect of a pixel or two can fade below half under resampling: keep its strongest pixel.
    return Patch(image, defect >= min(0.5, defect.max()) if defect.max() > 0 else _centre(defect), valid >= 0.999)


def blended(source: np.ndarray, destination: np.ndarray, defect: np.ndarray, params: TransplantParams) -> np.ndarray:
    """uint8 (H, W, C): `source` blended into `destination` over `defect` and a band of
    `params.blend_margin` pixels around it; every pixel beyond is the destination's."""
    band = params.blend_margin
    if params.blend == "paste":
        return np.where(defect[..., None], source, destination)
    if params.blend == "feather":
        # 1 on the defect, falling linearly to 0 at band + 1 pixels (chessboard distance) from it.
        distance = ndimage.distance_transform_cdt(~defect, metric="chessboard")
        alpha = np.clip(1 - distance / (band + 1), 0, 1)[..., None]
        return np.rint(alpha * source + (1 - alpha) * destination).astype(np.uint8)
    region = _dilated(defect, band)
    cloned = seamless_clone(source, destination, region, params.mixed)
    return np.where(region[..., None], cloned, destination)


def seamless_clone(source: np.ndarray, destination: np.ndarray, region: np.ndarray, mixed: bool) -> np.ndarray:
    """OpenCV's Poisson cloning of `source` into `destination` over `region`, both uint8 (H, W, C)
    of one size, in place (not shifted). Gray images are cloned as three equal channels."""
    channels = destination.shape[2]

    def padded(pixels):
        colour = np.repeat(pixels, 3, axis=2) if channels == 1 else pixels
        return cv2.copyMakeBorder(colour, *(CLONE_PAD,) * 4, cv2.BORDER_REFLECT_101)

    mask = cv2.copyMakeBorder(region.astype(np.uint8) * 255, *(CLONE_PAD,) * 4, cv2.BORDER_CONSTANT, value=0)
    x, y, w, h = cv2.boundingRect(mask)
    # seamlessClone puts the centre of the mask's bounding box at this point: the same place.
    cloned = cv2.seamlessClone(padded(source), padded(destination), mask, (x + w // 2, y + h // 2),
                               cv2.MIXED_CLONE if mixed else cv2.NORMAL_CLONE)
    cloned = cloned[CLONE_PAD:-CLONE_PAD, CLONE_PAD:-CLONE_PAD]
    return cloned[..., :1] if channels == 1 else cloned


def _match_surroundings(source: np.ndarray, destination: np.ndarray, defect: np.ndarray, valid: np.ndarray,
                        margin: int) -> None:
    """Shift and stretch the patch pixels of `source` (float, in place) so that its ring of
    surroundings around `defect` has the destination's mean and standard deviation there."""
    ring = _dilated(defect, margin) & ~defect & valid
    if np.count_nonzero(ring) < MIN_RING_PIXELS:
        return
    source_ring, destination_ring = source[ring], destination[ring].astype(np.float32)
    source_mean, destination_mean = source_ring.mean(axis=0), destination_ring.mean(axis=0)
    ratio = np.clip((destination_ring.std(axis=0) + 1) / (source_ring.std(axis=0) + 1),
                    1 / MAX_CONTRAST_RATIO, MAX_CONTRAST_RATIO)
    source[valid] = destination_mean + (source[valid] - source_mean) * ratio


# --- small helpers --------------------------------------------------------------------------------


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 8-connected components of a mask: (labels, how many)."""
    count, labels = cv2.connectedComponents((np.asarray(mask) > 0).astype(np.uint8), connectivity=8)
    return labels, count - 1


def _source_mask(labels: np.ndarray, component: int | None) -> np.ndarray:
    return labels > 0 if component is None else labels == component


def _restricting(foreground: np.ndarray | None) -> np.ndarray | None:
    """The foreground, or None where it restricts nothing (all or none of the image)."""
    if foreground is None or foreground.all() or not foreground.any():
        return None
    return foreground


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(mask)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


def _dilated(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by `pixels` (chessboard distance, as the label contract measures)."""
    if pixels == 0:
        return mask.copy()
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _centre(values: np.ndarray) -> np.ndarray:
    mask = np.zeros(values.shape, bool)
    mask[values.shape[0] // 2, values.shape[1] // 2] = True
    return mask


def _window(patch_shape: tuple[int, int], position: tuple[int, int], size: tuple[int, int]):
    """(destination slices, patch slices) of the part of a patch at `position` inside the image."""
    top, left = position
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(size[0], top + patch_shape[0]), min(size[1], left + patch_shape[1])
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left))


def _placed(patch_mask: np.ndarray, position: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A patch's bool mask at `position` on a (height, width) image, cut at the image's edges."""
    mask = np.zeros(size, bool)
    inside, part = _window(patch_mask.shape, position, size)
    mask[inside] = patch_mask[part]
    return mask


def _placed_values(values: np.ndarray, patch_mask: np.ndarray, position: tuple[int, int],
                   size: tuple[int, int]) -> np.ndarray:
    """The patch's values under patch_mask, in the order the placed mask lists its pixels."""
    _, part = _window(patch_mask.shape, position, size)
    return values[part][patch_mask[part]]
