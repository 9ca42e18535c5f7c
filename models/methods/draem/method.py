"""DRAEM anomaly synthesis (Zavrtanik et al., ICCV 2021), model-free.

A thresholded Perlin-noise blob is the mask; inside it a texture is blended into the normal
image at a random opacity. DRAEM takes its textures from the DTD data set; we ship none, so the
texture is an augmented normal image of the product or a procedural Perlin texture.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from models.methods.draem import DraemParams
from models.methods.interface import GenerateRequest, Item, ProgressCallback
from models.methods.model_free import model_free_pairs, one_pair_per_call
from models.methods.pixels import image_pixels, mask_inside

MAX_MASK_TRIES = 64
NOISE_TEXTURE_OCTAVES = 4


calls = one_pair_per_call


def generate(request: GenerateRequest, calls: list[list[Item]], on_progress: ProgressCallback):
    """The method interface: one pair per call, each from its item's seed alone; textures from
    the job's normal images."""
    return model_free_pairs(
        request, calls, native_mask,
        lambda normal, mask, rng: synthesize(normal, mask, rng, request.params, textures=request.normals),
    )


def _apply_curve(image: Image.Image, curve: np.ndarray) -> Image.Image:
    """Map every channel's 0..255 values through curve (256 values, clipped)."""
    lut = np.clip(np.rint(curve), 0, 255).astype(int).tolist()
    return image.point(lut * len(image.getbands()))


# DRAEM's anomaly-source augmenters (imgaug there, PIL here); three are applied in random order.
AUGMENTERS = {
    "gamma": lambda image, rng: _apply_curve(image, 255 * (np.arange(256) / 255) ** rng.uniform(0.5, 2.0)),
    "brightness_contrast": lambda image, rng: _apply_curve(
        image, np.arange(256) * rng.uniform(0.8, 1.2) + rng.uniform(-30, 30)
    ),
    "sharpness": lambda image, rng: ImageEnhance.Sharpness(image).enhance(rng.uniform(0.0, 2.0)),
    "solarize": lambda image, rng: ImageOps.solarize(image, threshold=int(rng.integers(32, 129))),
    "posterize": lambda image, rng: ImageOps.posterize(image, int(rng.integers(1, 5))),
    "invert": lambda image, rng: ImageOps.invert(image),
    "autocontrast": lambda image, rng: ImageOps.autocontrast(image),
    "equalize": lambda image, rng: ImageOps.equalize(image),
}


def perlin_noise(
    rng: np.random.Generator, size: tuple[int, int], cells: tuple[int, int], angle: float = 0.0
) -> np.ndarray:
    """Perlin noise in about [-1, 1] on a (height, width) grid, float64.

    cells = (rows, columns) of the gradient lattice across the image: more cells, smaller blobs.
    The pattern is rotated by `angle` degrees about the image centre.
    """
    height, width = size
    # Each pixel reads the noise at its rotated position, in lattice units.
    ys, xs = np.ogrid[0:height, 0:width]
    centre_y, centre_x = (height - 1) / 2, (width - 1) / 2
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    y = (centre_y + cos * (ys - centre_y) - sin * (xs - centre_x)) * cells[0] / height
    x = (centre_x + sin * (ys - centre_y) + cos * (xs - centre_x)) * cells[1] / width

    corner_y, corner_x = np.floor(y), np.floor(x)
    offset_y, offset_x = y - corner_y, x - corner_x
    rows = (corner_y - corner_y.min()).astype(np.intp)
    cols = (corner_x - corner_x.min()).astype(np.intp)
    gradient_angles = rng.uniform(0, 2 * np.pi, (rows.max() + 2, cols.max() + 2))
    gradient_y, gradient_x = np.sin(gradient_angles), np.cos(gradient_angles)

    def corner_dot(dy: int, dx: int) -> np.ndarray:
        """Dot product of a cell corner's gradient with the pixel's offset from that corner."""
        g_y, g_x = gradient_y[rows + dy, cols + dx], gradient_x[rows + dy, cols + dx]
        return g_y * (offset_y - dy) + g_x * (offset_x - dx)

    def fade(t: np.ndarray) -> np.ndarray:
        return t * t * t * (t * (t * 6 - 15) + 10)

    u, v = fade(offset_x), fade(offset_y)
    n00, n01, n10, n11 = corner_dot(0, 0), corner_dot(0, 1), corner_dot(1, 0), corner_dot(1, 1)
    top = n00 + u * (n01 - n00)
    bottom = n10 + u * (n11 - n10)
    return np.sqrt(2) * (top + v * (bottom - top))  # sqrt(2): DRAEM's scaling to about [-1, 1]


def native_mask(rng: np.random.Generator, size: tuple[int, int], params: DraemParams) -> np.ndarray:
    """DRAEM's mask: rotated Perlin noise with 2**k cells per axis, thresholded; never empty."""
    low, high = params.perlin_scale
    for _ in range(MAX_MASK_TRIES):
        # DRAEM draws each exponent with torch.randint(low, high): the upper bound is exclusive.
        cells = 2 ** rng.integers(low, max(high, low + 1), size=2)
        noise = perlin_noise(rng, size, (int(cells[0]), int(cells[1])), angle=rng.uniform(-90, 90))
        mask = noise > params.perlin_threshold
        if mask.any():
            return mask
    # A threshold near 1 is above almost every Perlin value: keep the noise's top percent instead.
    return noise >= np.quantile(noise, 0.99)


def synthesize(
    normal: Image.Image,
    mask: np.ndarray,
    rng: np.random.Generator,
    params: DraemParams,
    textures: Sequence[Image.Image],
) -> Image.Image:
    """The normal image with a texture blended in where mask is True; same size and mode."""
    pixels = image_pixels(normal)
    inside = mask_inside(mask, pixels)

    texture_kind = params.texture
    if texture_kind == "auto":
        texture_kind = "normals" if textures and rng.random() < 0.5 else "noise"
    if texture_kind == "normals":
        if not textures:
            raise ValueError("draem texture 'normals' needs at least one normal image")
        texture = _augmented_normal(rng, textures, normal)
    else:
        texture = _noise_texture(rng, pixels.shape[:2], pixels.shape[2])

    # DRAEM: out = normal*(1-M) + (1-beta)*texture*M + beta*normal*M, with opacity = 1 - beta.
    # M is binary here, so inside the mask that is opacity*texture + (1-opacity)*normal.
    opacity = rng.uniform(*params.opacity)
    blended = np.rint(opacity * texture + (1 - opacity) * pixels)
    out = np.where(inside[..., None], blended, pixels).astype(np.uint8)
    return Image.fromarray(out[..., 0] if normal.mode == "L" else out)


def _augmented_normal(rng: np.random.Generator, textures: Sequence[Image.Image], normal: Image.Image):
    """A random normal image, turned, flipped, augmented and shifted: float (H, W, C)."""
    source = textures[rng.integers(len(textures))].convert(normal.mode)
    turned = np.rot90(np.asarray(source), k=rng.integers(4))
    if rng.random() < 0.5:
        turned = turned[:, ::-1]
    texture = Image.fromarray(np.ascontiguousarray(turned)).resize(normal.size, Image.BILINEAR)
    for name in rng.choice(list(AUGMENTERS), size=3, replace=False):
        texture = AUGMENTERS[name](texture, rng)
    shift = (rng.integers(normal.height), rng.integers(normal.width))
    return np.roll(image_pixels(texture), shift, axis=(0, 1)).astype(np.float64)


def _noise_texture(rng: np.random.Generator, size: tuple[int, int], channels: int) -> np.ndarray:
    """Multi-octave Perlin noise between two random colours: float (H, W, channels) in 0..255."""
    base_cells = 2 ** int(rng.integers(1, 5))
    angle = rng.uniform(-90, 90)
    octaves = sum(
        0.5**octave * perlin_noise(rng, size, (base_cells * 2**octave,) * 2, angle)
        for octave in range(NOISE_TEXTURE_OCTAVES)
    )
    level = (octaves - octaves.min()) / (np.ptp(octaves) + 1e-9)
    dark, bright = rng.uniform(0, 255, size=(2, channels))
    return dark + (bright - dark) * level[..., None]


