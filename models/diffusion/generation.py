"""What every diffusion pipeline's `generate` shares: the items it takes and the results it gives,
job-wide step progress, and blended DDIM inpainting (the normal image's latents kept outside the
mask at every step).
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from models.diffusion.images import check_mask, check_mode, encode, image_to_pixels, mask_to_latent
from models.diffusion.loading import StableDiffusion
from models.diffusion.sampling import StepCallback, ddim_sample, noised
from models.methods.interface import Pair, ProgressCallback, painted_part


class GenerateItem(NamedTuple):
    """One image to make: the normal image it is painted on, where, and from which seed."""

    normal: Image.Image  # "L" or "RGB", any size
    target_mask: np.ndarray  # bool (H, W) of the normal image: where the defect goes (may be empty for O2MAG)
    seed: int


@dataclass
class GenerateResult:
    """One generated image and its label, as a pipeline returns it."""

    image: Image.Image  # same size and mode as the normal image
    mask: np.ndarray  # uint8 0/255 (H, W): the label written
    seed: int
    weak_label: bool = False  # the mask covers the defect loosely (AnoGen's box)
    extra_masks: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. AnoGen's "refined_mask"
    details: dict = field(default_factory=dict)  # facts for the pair's manifest entry (CADiff's intensity)

    def pair(self, index: int, **details) -> Pair:
        """The job's pair `index`, with `details` added to the result's own."""
        return Pair(index, self.image, self.mask, self.seed, self.weak_label, self.extra_masks,
                    {**self.details, **details})


def checked_items(
    items: Sequence[GenerateItem | tuple[Image.Image, np.ndarray, int]], *, empty_masks: bool = False
) -> list[GenerateItem]:
    """The items as GenerateItems, each normal image's mode and its mask's shape checked; an empty
    mask is refused unless `empty_masks`."""
    checked = [GenerateItem(*item) for item in items]
    for number, item in enumerate(checked):
        check_mode(item.normal)
        check_mask(item.target_mask, item.normal)
        if not empty_masks and not np.any(item.target_mask):
            raise ValueError(f"item {number}: the target mask is empty")
    return checked


def painted_result(item: GenerateItem, image: Image.Image, details: dict | None = None) -> GenerateResult:
    """The result of painting `image` for `item`: its label is the target mask's painted part (a
    fade can round back to the normal's values on a one-pixel speck, and the label must not claim
    a defect that is not in the image)."""
    mask = painted_part(item.target_mask, image, item.normal).astype(np.uint8) * 255
    return GenerateResult(image, mask, item.seed, details=details or {})


def step_reporter(on_progress: ProgressCallback | None, steps_before: int, total_steps: int) -> StepCallback:
    """A batch's on_step(done, total) that reports progress over all of a call's batches, as
    on_progress("generate", steps done, steps in all)."""
    if on_progress is None:
        return lambda _done, _total: None
    return lambda done, _batch_total: on_progress("generate", steps_before + done, total_steps)


def blended_ddim(
    sd: StableDiffusion, scheduler, items: Sequence[GenerateItem], cond: torch.Tensor, uncond: torch.Tensor,
    resolution: int, guidance_scale: float, on_step: StepCallback | None = None,
) -> torch.Tensor:
    """Clean latents (k, 4, h, w): guided DDIM from each item's noise (its seed's first draw), with
    the normal image's latents, noised to each step by the seed's next draws, put back outside the
    item's latent-size mask before every step, z_t <- z_t(normal) * (1 - M) + z_t * M, and its clean
    latents there at the end. Each output depends on its item alone, whatever shares the batch."""
    latent_size = resolution // sd.vae_scale_factor
    steps = len(scheduler.timesteps)
    normal_latents = encode(sd, torch.stack([image_to_pixels(item.normal, resolution) for item in items]))
    masks = torch.stack([mask_to_latent(item.target_mask, latent_size) for item in items]).to(sd.device)
    noise_shape = (steps + 1, sd.latent_channels, latent_size, latent_size)
    noise = torch.stack(
        [torch.randn(noise_shape, generator=torch.Generator().manual_seed(item.seed)) for item in items]
    ).to(sd.device)

    def keep_outside_mask(i: int, t: int, latents: torch.Tensor) -> torch.Tensor:
        return noised(scheduler, normal_latents, noise[:, i + 1], t) * (1 - masks) + latents * masks

    count = len(items)
    latents = ddim_sample(sd, scheduler, noise[:, 0], cond.expand(count, -1, -1), uncond.expand(count, -1, -1),
                          guidance_scale, before_step=keep_outside_mask, on_step=on_step)
    return normal_latents * (1 - masks) + latents * masks
