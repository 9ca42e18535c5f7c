"""Images and masks as tensors at the model's resolution, and the training augmentation.

Images are kept as uint8 (channels, R, R) tensors and masks as bool (1, R, R) tensors so that
hundreds of training images fit in memory; they become floats in [0, 1] only batch by batch.
Grayscale products use one channel, colour products three (``channels``).
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

MAX_SHIFT_FRACTION = 1 / 16
CONTRAST_JITTER = 0.2
BRIGHTNESS_JITTER = 0.1


def open_image(source: Path | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    with Image.open(source) as image:
        image.load()
        return image


def image_channels(sources: list[Path | Image.Image]) -> int:
    """1 when every image is single-channel (grayscale), else 3. Reads only the file headers."""
    def mode(source: Path | Image.Image) -> str:
        if isinstance(source, Image.Image):
            return source.mode
        with Image.open(source) as image:
            return image.mode

    return 1 if all(mode(source) in ("L", "I;16", "I", "F") for source in sources) else 3


def image_tensor(source: Path | Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """uint8 tensor (channels, resolution, resolution)."""
    image = open_image(source).convert("L" if channels == 1 else "RGB")
    array = np.asarray(image.resize((resolution, resolution), Image.BILINEAR))
    return torch.from_numpy(array.reshape(resolution, resolution, channels).copy()).permute(2, 0, 1)


def mask_array(source: Path | Image.Image | np.ndarray) -> np.ndarray:
    """bool array (H, W) at the mask's own size: True where the mask is non-zero."""
    if isinstance(source, np.ndarray):
        return source > 0
    return np.asarray(open_image(source).convert("L")) > 0


def mask_tensor(source: Path | Image.Image | np.ndarray, resolution: int) -> torch.Tensor:
    """bool tensor (1, resolution, resolution); nearest-neighbour resize keeps it binary."""
    mask = Image.fromarray(mask_array(source).astype(np.uint8) * 255)
    return torch.from_numpy(np.asarray(mask.resize((resolution, resolution), Image.NEAREST)) > 0)[None]


def as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255


def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, a small shift and brightness/contrast jitter; the mask follows the geometry.

    ``images``: float (B, C, R, R) in [0, 1]; ``masks``: float (B, 1, R, R). All randomness comes
    from ``generator`` (on the CPU), so a seed fixes the whole training run.
    """
    batch, _, size, _ = images.shape
    both = torch.cat([images, masks], dim=1)
    for dim in (-1, -2):
        flip = torch.rand(batch, generator=generator) < 0.5
        both[flip] = both[flip].flip(dim)
    shift = max(1, int(size * MAX_SHIFT_FRACTION))
    padded = F.pad(both, (shift, shift, shift, shift), mode="reflect")
    offsets = torch.randint(0, 2 * shift + 1, (batch, 2), generator=generator).tolist()
    both = torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])
    # A contiguous copy (2 MB at 256 px): the loss's elementwise kernels take a slower path on a strided view.
    images, masks = both[:, :-1], both[:, -1:].contiguous()
    contrast = 1 + CONTRAST_JITTER * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)
    brightness = BRIGHTNESS_JITTER * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = ((images - mean) * contrast + mean + brightness).clamp(0, 1)
    return images, masks
