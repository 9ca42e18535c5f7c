"""AnoGen: few-shot anomaly-driven generation (Gui et al., arXiv 2505.09263).

Fine-tune: learn one text-embedding vector (the text encoder's width, 768 for SD 1.5) from 1-3
exemplars by textual inversion with a mask-weighted loss, E||(eps - eps_theta(z_t, t, v)) * M||^2,
so the vector describes the defect rather than the product around it. It starts from the word
"defect"; the result is an adapter directory (safetensors + JSON config).

Generate: on each normal image, inside a box, DDIM from noise with classifier-free guidance while
the latents outside the box are replaced, before every step, by the normal image's latents noised
to that step: z_t <- z_t(normal) * (1 - M_box) + z_t * M_box. Pixels outside the box are the
normal image's, exactly (composited in pixel space at the end). The box is the mask written: a
weak label, as the paper trains its detector with; optionally a refined mask marks where the
image actually changed.

Reproducibility: each output depends only on its inputs and its seed, whatever else shares its
batch (up to floating-point differences between batch sizes).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter

from models.diffusion.adapters import read_adapter_config
from models.diffusion.images import (
    check_mask,
    check_mode,
    decode,
    encode,
    image_to_pixels,
    mask_to_latent,
    pixels_to_array,
)
from models.diffusion.loading import StableDiffusion, fresh_scheduler
from models.diffusion.sampling import ddim_sample, encode_prompts, noised
from models.diffusion.textual_inversion import LearnedEmbedding, placeholder_tokens, train_embedding
from models.masks.sampling import otsu_threshold
from models.methods.anogen import AnoGenParams
from models.methods.interface import Checkpoints, ProgressCallback

METHOD = "anogen"
PLACEHOLDER = "<anogen-defect>"
# Fine-tuning prompts, textual-inversion style; generation prompts the placeholder alone, as the
# paper's generation script does.
TRAINING_TEMPLATES = (
    "a photo of a {}",
    "a close-up photo of a {}",
    "a cropped photo of the {}",
    "a photo of the {}",
    "a good photo of a {}",
    "a dark photo of the {}",
    "a bright photo of the {}",
    "a photo of a small {}",
)
GENERATION_TEMPLATE = "{}"
# A refined mask ignores changes below this (out of 255): VAE round-trip noise, not defect.
MIN_CHANGE = 12


class GenerateItem(NamedTuple):
    normal: Image.Image  # "L" or "RGB", any size
    box: np.ndarray  # bool (H, W) of the normal image: where the defect goes
    seed: int


@dataclass
class AnoGenResult:
    image: Image.Image  # same size and mode as the normal image
    mask: np.ndarray  # uint8 0/255 (H, W): the box
    refined_mask: np.ndarray | None  # uint8 0/255 (H, W) where the image changed, if asked for
    seed: int
    weak_label: bool = True  # `mask` is the box, not the defect's outline


def finetune(
    sd: StableDiffusion,
    exemplars: Sequence[tuple[Image.Image, np.ndarray]],
    params: AnoGenParams,
    *,
    seed: int,
    out_dir: str | Path,
    checkpoints: Checkpoints | None = None,
    on_progress: ProgressCallback | None = None,
) -> LearnedEmbedding:
    """Learn the defect embedding from (image, mask) exemplars and write the adapter to `out_dir`.

    checkpoints: where this run's checkpoints go; if the folder holds one, training resumes from
    it. on_progress("train", step, train_steps) follows every step. Returns the embedding it saved.
    """
    # 1. Exemplars to latents, and their masks to latent-size loss weights.
    _check_exemplars(exemplars, params)
    latent_size = params.resolution // sd.vae_scale_factor
    pixels = torch.stack([image_to_pixels(image, params.resolution) for image, _ in exemplars])
    latents = encode(sd, pixels)
    masks = torch.stack([mask_to_latent(mask, latent_size) for _, mask in exemplars]) if params.masked_loss else None

    # 2. Textual inversion of one vector, starting from the initializer word.
    embedding = train_embedding(
        sd,
        latents,
        masks,
        tokens=[PLACEHOLDER],
        initializer=params.initializer_token,
        templates=TRAINING_TEMPLATES,
        steps=params.train_steps,
        learning_rate=params.learning_rate,
        batch_size=params.batch_size,
        seed=seed,
        checkpoints=checkpoints,
        on_progress=(lambda done, total: on_progress("train", done, total)) if on_progress else None,
    )

    # 3. The adapter: safetensors + JSON config.
    embedding.save(
        Path(out_dir),
        {"method": METHOD, "seed": seed, "exemplars": len(exemplars), "params": params.model_dump()},
    )
    return embedding


def generate(
    sd: StableDiffusion,
    adapter: str | Path | LearnedEmbedding,
    items: Sequence[GenerateItem | tuple[Image.Image, np.ndarray, int]],
    params: AnoGenParams,
    *,
    images_per_batch: int = 4,
    on_progress: ProgressCallback | None = None,
) -> list[AnoGenResult]:
    """One anomalous image per (normal image, box mask, seed) item, in order.

    adapter: a fine-tune output directory (or its embedding). Up to `images_per_batch` items share
    each UNet call. on_progress("generate", steps done, steps in all) follows every denoising step.
    """
    # 1. Load the adapter and check the items.
    embedding = load_adapter(adapter)
    items = [GenerateItem(*item) for item in items]
    _check_items(items)

    # 2. Encode the prompt (the learnt defect token) and the empty prompt for guidance.
    with placeholder_tokens(sd, embedding) as (tokenizer, _), torch.no_grad():
        cond, uncond = encode_prompts(sd, [GENERATION_TEMPLATE.format(embedding.prompt), ""], tokenizer).chunk(2)

    # 3. Generate batch by batch with a fresh scheduler for the job.
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    batches = [items[i : i + images_per_batch] for i in range(0, len(items), images_per_batch)]
    total_steps = len(batches) * params.num_inference_steps
    results = []
    for number, batch in enumerate(batches):
        on_step = _step_reporter(on_progress, number * params.num_inference_steps, total_steps)
        results += _generate_batch(sd, scheduler, cond, uncond, batch, params, on_step)
    return results


def _step_reporter(on_progress: ProgressCallback | None, steps_before: int, total_steps: int):
    """A batch's on_step(done, total) that reports job-wide progress."""
    if on_progress is None:
        return None
    return lambda done, _batch_total: on_progress("generate", steps_before + done, total_steps)


def _generate_batch(sd, scheduler, cond, uncond, items, params, on_step) -> list[AnoGenResult]:
    latent_size = params.resolution // sd.vae_scale_factor
    steps = len(scheduler.timesteps)

    # Normal latents, latent-size boxes, and each item's noise from its own seed: the starting
    # noise, then one draw per step for noising the normal latents.
    normal_latents = encode(sd, torch.stack([image_to_pixels(item.normal, params.resolution) for item in items]))
    boxes = torch.stack([mask_to_latent(item.box, latent_size) for item in items]).to(sd.device)
    noise_shape = (steps + 1, sd.latent_channels, latent_size, latent_size)
    noise = torch.stack(
        [torch.randn(noise_shape, generator=torch.Generator().manual_seed(item.seed)) for item in items]
    ).to(sd.device)

    def keep_outside_box(i: int, t: int, latents: torch.Tensor) -> torch.Tensor:
        return noised(scheduler, normal_latents, noise[:, i + 1], t) * (1 - boxes) + latents * boxes

    count = len(items)
    latents = ddim_sample(
        sd, scheduler, noise[:, 0], cond.expand(count, -1, -1), uncond.expand(count, -1, -1),
        params.guidance_scale, before_step=keep_outside_box, on_step=on_step,
    )
    latents = normal_latents * (1 - boxes) + latents * boxes  # t = 0: the clean normal latents outside
    pixels = decode(sd, latents)

    results = []
    for item, item_pixels in zip(items, pixels):
        normal = np.asarray(item.normal)
        generated = pixels_to_array(item_pixels, item.normal.size, item.normal.mode)
        box = item.box.astype(bool)
        image = np.where(box[..., None] if normal.ndim == 3 else box, generated, normal)
        refined = _changed_region(image, normal, box) if params.refined_mask else None
        results.append(AnoGenResult(
            image=Image.fromarray(image), mask=box.astype(np.uint8) * 255, refined_mask=refined, seed=item.seed,
        ))
    return results


def load_adapter(adapter: str | Path | LearnedEmbedding) -> LearnedEmbedding:
    """The embedding of an AnoGen fine-tune's output folder; InputError for another method's."""
    if isinstance(adapter, LearnedEmbedding):
        return adapter
    read_adapter_config(Path(adapter), METHOD)
    return LearnedEmbedding.load(Path(adapter))[0]


def _check_exemplars(exemplars, params: AnoGenParams) -> None:
    if not exemplars:
        raise ValueError("AnoGen needs at least one exemplar")
    for number, (image, mask) in enumerate(exemplars):
        check_mode(image)
        check_mask(mask, image)
        if params.masked_loss and not np.any(mask):
            raise ValueError(f"exemplar {number} has an empty mask: the masked loss would learn nothing from it")


def _check_items(items: list[GenerateItem]) -> None:
    for number, item in enumerate(items):
        check_mode(item.normal)
        check_mask(item.box, item.normal)
        if not np.any(item.box):
            raise ValueError(f"item {number}: the box mask is empty")


def _changed_region(image: np.ndarray, normal: np.ndarray, box: np.ndarray) -> np.ndarray:
    """uint8 0/255: pixels inside the box whose (slightly blurred) change exceeds Otsu's threshold."""
    change = np.abs(image.astype(np.int16) - normal.astype(np.int16)).astype(np.uint8)
    if change.ndim == 3:
        change = change.max(axis=2)
    radius = max(1, round(min(change.shape) / 256))  # ignore pixel-level speckle
    change = np.asarray(Image.fromarray(change).filter(ImageFilter.GaussianBlur(radius)))
    threshold = max(otsu_threshold(change[box]), MIN_CHANGE)
    return ((change >= threshold) & box).astype(np.uint8) * 255
