"""Between PIL images of any size and the model: pixels, masks, latents, and back.

The model works on square RGB images of `resolution` pixels (SD 1.5: 512). Inputs may be
grayscale ("L") or RGB of any size; outputs go back to the input's size and mode.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.diffusion.loading import StableDiffusion
from models.methods.interface import LABEL_BAND

SUPPORTED_MODES = ("L", "RGB")
# The least weight the generated pixels get anywhere on a faded mask (_border_fade): a thin part of
# the mask changes plainly, if less than a thick part's core.
MASK_WEIGHT_FLOOR = 0.5


def check_mode(image: Image.Image) -> None:
    if image.mode not in SUPPORTED_MODES:
        raise ValueError(f"image mode {image.mode!r} is not supported; convert it to one of {SUPPORTED_MODES}")


def check_mask(mask: np.ndarray, image: Image.Image | None = None) -> None:
    if np.ndim(mask) != 2:
        raise ValueError(f"a mask must be a 2-D array, got shape {np.shape(mask)}")
    if image is not None and np.shape(mask) != (image.height, image.width):
        raise ValueError(f"mask shape {np.shape(mask)} does not match the image's (height, width) "
                         f"{(image.height, image.width)}")


def image_to_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) float32 in [-1, 1]; grayscale is repeated over the channels."""
    check_mode(image)
    square = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def pixels_to_array(pixels: torch.Tensor, size: tuple[int, int], mode: str) -> np.ndarray:
    """A (3, h, w) tensor in [-1, 1] as a uint8 array of image `size` (width, height) and `mode`.

    Returns (H, W, 3) for "RGB", (H, W) for "L", ready for exact pixel compositing.
    """
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(array).resize(size, Image.Resampling.BICUBIC).convert(mode)
    return np.asarray(image)


def mask_to_latent(mask: np.ndarray, latent_size: int) -> torch.Tensor:
    """(1, latent_size, latent_size) float {0, 1}: a latent cell is on if any pixel under it is on.

    Max-pooling rather than averaging keeps thin or tiny defects from vanishing at 1/8 scale.
    """
    check_mask(mask)
    pixels = torch.from_numpy(np.asarray(mask) > 0).float()[None, None]
    return F.adaptive_max_pool2d(pixels, latent_size)[0]


@torch.no_grad()
def encode(sd: StableDiffusion, pixels: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, H/8, W/8) float32, scaled to unit variance, of pixels (B, 3, H, W) in [-1, 1].

    Uses the posterior mean: SD's VAE posterior is nearly deterministic, and the mean makes
    the same image give the same latent.
    """
    posterior = sd.vae.encode(pixels.to(sd.device, sd.dtype)).latent_dist
    return posterior.mean.float() * sd.vae.config.scaling_factor


@torch.no_grad()
def decode(sd: StableDiffusion, latents: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, H, W) float32 in [-1, 1] of scaled latents."""
    scaled = latents / sd.vae.config.scaling_factor
    return sd.vae.decode(scaled.to(sd.device, sd.dtype)).sample.float().clamp(-1, 1)


def fade_into_normal(normal: Image.Image, pixels: torch.Tensor, mask: np.ndarray, band: int) -> Image.Image:
    """The generated `pixels` (3, h, w) on `mask`, fading into the `normal` image's across a `band`
    pixels wide ring on the mask's border (a hard cut would leave a seam, a cue a defect segmenter
    could learn), the normal's beyond: an image of the normal's size and mode. The ring reaches at
    most LABEL_BAND pixels outside the mask (the label contract's blend band) and lies inside it
    for the rest; no pixel of the mask gets less than MASK_WEIGHT_FLOOR of the generated one."""
    array = np.asarray(normal)
    generated = pixels_to_array(pixels, normal.size, normal.mode)
    weight = _border_fade(np.asarray(mask) > 0, band)
    if array.ndim == 3:
        weight = weight[..., None]
    return Image.fromarray(np.round(weight * generated + (1 - weight) * array).astype(np.uint8))  # 0: normal exactly


def _border_fade(mask: np.ndarray, band: int) -> np.ndarray:
    """float32 (H, W): 1 on the mask's core, falling linearly (chessboard distance) to 0 at most
    LABEL_BAND pixels outside the mask. The core is the mask eroded by the band's inner part
    (band - LABEL_BAND pixels), less where the mask is too thin to keep a core.

    Eroding the whole mask leaves its thin parts (a crack's 1 px tail, a small blob beside a big
    one) farther from the core than the ramp reaches: they would be labelled defect and left
    normal. So every mask pixel also gets at least MASK_WEIGHT_FLOOR, fading out over the same
    min(band, LABEL_BAND) pixels outside the mask; for a band of at most LABEL_BAND the core is the
    mask itself and the floor changes nothing."""
    whole = torch.from_numpy(mask).float()[None, None]
    outer = min(band, LABEL_BAND)
    core, inner = whole, 0
    while inner < band - LABEL_BAND:
        eroded = 1 - F.max_pool2d(1 - core, 3, stride=1, padding=1)
        if not eroded.any():
            break
        core, inner = eroded, inner + 1
    if inner == 0:  # the core is the mask itself: the floor is below the ramp everywhere
        return _feathered(core, outer)
    return np.maximum(_feathered(core, inner + outer), MASK_WEIGHT_FLOOR * _feathered(whole, outer))


def _feathered(core: torch.Tensor, radius: int) -> np.ndarray:
    """float32 (H, W): 1 on `core` (1, 1, H, W), falling linearly over `radius` pixels outside it,
    0 beyond: the share of the core and its first `radius` dilations covering a pixel."""
    grown = core
    covered = grown.clone()
    for _ in range(radius):
        grown = F.max_pool2d(grown, 3, stride=1, padding=1)
        covered += grown
    return (covered / (radius + 1))[0, 0].numpy()
