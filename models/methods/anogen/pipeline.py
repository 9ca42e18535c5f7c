"""AnoGen: few-shot anomaly-driven generation (Gui et al., arXiv 2505.09263).

Fine-tune: learn one text-embedding vector (the text encoder's width, 768 for SD 1.5) from 1-3
exemplars by textual inversion with a mask-weighted loss, E||(eps - eps_theta(z_t, t, v)) * M||^2,
so the vector describes the defect rather than the product around it. It starts from the word
"defect"; the result is an adapter directory (safetensors + JSON config), and diagnostics that say
whether it learnt: the objective of the learnt vector and of its initializer at the same fixed
draws, and how far the vector moved from its initializer.

Generate: on each normal image, inside a box, DDIM from noise with classifier-free guidance while
the latents outside the box are replaced, before every step, by the normal image's latents noised
to that step: z_t <- z_t(normal) * (1 - M_box) + z_t * M_box. Pixels outside the box are the
normal image's, exactly (composited in pixel space at the end). The box is the mask written: a
weak label, as the paper trains its detector with; optionally a refined mask marks where the
image actually changed.

Ablations (`params.ablate`, the paper's ablation rows): "masked_loss" (fine-tune) trains with the
plain loss over the whole image; "embedding" (generate) uses the initializer word's own vector in
the prompt (a fine-tune without it would learn nothing, so it is refused). The adapter's config,
the fine-tune's result and every pair's manifest entry record them.

Reproducibility: each output depends only on its inputs and its seed, whatever else shares its
batch (up to floating-point differences between batch sizes).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageFilter

from models.diffusion.adapters import ablated_components, read_adapter_config
from models.diffusion.generation import GenerateItem, GenerateResult, blended_ddim, checked_items, step_reporter
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
from models.diffusion.sampling import encode_prompts
from models.diffusion.textual_inversion import (
    LearnedEmbedding,
    initial_vectors,
    masked_mse,
    placeholder_tokens,
    train_embedding,
)
from models.masks.sampling import otsu_threshold
from models.methods.anogen import AnoGenParams
from models.methods.interface import Checkpoints, ProgressCallback, batched

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
# The diagnostics' objective: these many (timestep, noise) draws per exemplar, the same for every
# run and for the initializer, so the two losses compare without the noise of training's draws.
DIAGNOSTIC_DRAWS = 16
DIAGNOSTIC_SEED = 0


class Finetuned(NamedTuple):
    embedding: LearnedEmbedding
    diagnostics: dict[str, float]


def finetune(
    sd: StableDiffusion,
    exemplars: Sequence[tuple[Image.Image, np.ndarray]],
    params: AnoGenParams,
    *,
    seed: int,
    out_dir: str | Path,
    checkpoints: Checkpoints | None = None,
    on_progress: ProgressCallback | None = None,
) -> Finetuned:
    """Learn the defect embedding from (image, mask) exemplars and write the adapter to `out_dir`.

    checkpoints: where this run's checkpoints go; if the folder holds one, training resumes from
    it. on_progress("train", step, train_steps) follows every step. Returns the embedding it saved
    and its diagnostics (`diagnostics`).
    """
    # 1. Exemplars to latents, and their masks to latent-size loss weights (none: the plain loss).
    if "embedding" in params.ablate:
        raise ValueError("with the embedding ablated an AnoGen fine-tune has nothing to learn; "
                         "ablate it on the generate jobs instead")
    _check_exemplars(exemplars, params)
    latent_size = params.resolution // sd.vae_scale_factor
    pixels = torch.stack([image_to_pixels(image, params.resolution) for image, _ in exemplars])
    latents = encode(sd, pixels)
    masks = None
    if "masked_loss" not in params.ablate:
        masks = torch.stack([mask_to_latent(mask, latent_size) for _, mask in exemplars])

    # 2. Textual inversion of one vector, starting from the initializer word.
    embedding, final_losses = train_embedding(
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

    # 3. Diagnostics, and the adapter: safetensors + JSON config.
    start = LearnedEmbedding(embedding.tokens, initial_vectors(sd, params.initializer_token, len(embedding.tokens)))
    diagnostics = _diagnostics(sd, embedding, start, latents, masks, final_losses)
    embedding.save(Path(out_dir), {
        "method": METHOD, "seed": seed, "exemplars": len(exemplars), "params": params.model_dump(),
        "ablate": sorted(params.ablate), "diagnostics": diagnostics,
    })
    return Finetuned(embedding, diagnostics)


def _diagnostics(sd: StableDiffusion, learnt: LearnedEmbedding, start: LearnedEmbedding, latents: torch.Tensor,
                 masks: torch.Tensor | None, final_losses: dict[str, float]) -> dict:
    """Whether the embedding learnt: the training loss's final value ("losses"), the training
    objective of the learnt vector and of its initializer at the same fixed draws ("objective": a
    step's loss is too noisy to compare them by), and its L2 distance from the initializer, also
    relative to the initializer's norm (0: it never moved)."""
    distance = float((learnt.vectors - start.vectors).norm())
    return {
        "losses": {"noise_prediction": final_losses.get("total")},
        "objective": {"learnt": _objective(sd, learnt, latents, masks),
                      "initializer": _objective(sd, start, latents, masks)},
        "embedding_distance": distance,
        "relative_distance": distance / float(start.vectors.norm()),
    }


@torch.no_grad()
def _objective(sd: StableDiffusion, embedding: LearnedEmbedding, latents: torch.Tensor,
               masks: torch.Tensor | None) -> float:
    """The fine-tune's loss E||(eps - eps_theta(z_t, t, v)) * M||^2 under the first training template,
    at DIAGNOSTIC_DRAWS (t, eps) draws per exemplar from DIAGNOSTIC_SEED."""
    generator = torch.Generator().manual_seed(DIAGNOSTIC_SEED)
    picks = torch.arange(len(latents)).repeat_interleave(DIAGNOSTIC_DRAWS)
    scheduler = fresh_scheduler(sd)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(picks),), generator=generator)
    noise = torch.randn((len(picks), *latents.shape[1:]), generator=generator)
    noisy = scheduler.add_noise(latents.cpu()[picks], noise, t)
    with placeholder_tokens(sd, embedding) as (tokenizer, _):
        cond = encode_prompts(sd, [TRAINING_TEMPLATES[0].format(embedding.prompt)], tokenizer)
        losses = []
        for number in range(len(latents)):  # one UNet call per exemplar's draws
            draws = slice(number * DIAGNOSTIC_DRAWS, (number + 1) * DIAGNOSTIC_DRAWS)
            eps = sd.unet(noisy[draws].to(sd.device, sd.dtype), t[draws].to(sd.device),
                          cond.expand(DIAGNOSTIC_DRAWS, -1, -1)).sample.float()
            mask = None if masks is None else masks[number : number + 1].to(sd.device)
            losses.append(masked_mse(eps, noise[draws].to(sd.device), mask))
    return float(torch.stack(losses).mean())


def generate(
    sd: StableDiffusion,
    adapter: str | Path | LearnedEmbedding,
    items: Sequence[GenerateItem | tuple[Image.Image, np.ndarray, int]],
    params: AnoGenParams,
    *,
    images_per_batch: int = 4,
    on_progress: ProgressCallback | None = None,
) -> list[GenerateResult]:
    """One anomalous image per (normal image, box mask, seed) item, in order. Each result's mask
    is the box (a weak label); with `refined_mask`, its extra mask "refined_mask" marks where the
    image changed.

    adapter: a fine-tune output directory (or its embedding). With "embedding" ablated, by this job
    or in the adapter's config, the prompt's vector is the initializer word's own (the adapter's
    initializer; for an embedding given in memory, `params.initializer_token`). Up to
    `images_per_batch` items share each UNet call. on_progress("generate", steps done, steps in
    all) follows every denoising step.
    """
    # 1. Load the adapter (or, ablated, its initializer's vector) and check the items.
    embedding, config = load_adapter(adapter), adapter_config(adapter)
    if "embedding" in ablated_components(params, config):
        initializer = config.get("params", {}).get("initializer_token", params.initializer_token)
        embedding = LearnedEmbedding(embedding.tokens, initial_vectors(sd, initializer, len(embedding.tokens)))
    items = checked_items(items)

    # 2. Encode the prompt (the learnt defect token) and the empty prompt for guidance.
    with placeholder_tokens(sd, embedding) as (tokenizer, _), torch.no_grad():
        cond, uncond = encode_prompts(sd, [GENERATION_TEMPLATE.format(embedding.prompt), ""], tokenizer).chunk(2)

    # 3. Blended DDIM inside each box, batch by batch, with a fresh scheduler for the job.
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    batches = batched(items, images_per_batch)
    total_steps = len(batches) * params.num_inference_steps
    results = []
    for number, batch in enumerate(batches):
        on_step = step_reporter(on_progress, number * params.num_inference_steps, total_steps)
        latents = blended_ddim(sd, scheduler, batch, cond, uncond, params.resolution, params.guidance_scale, on_step)
        # 4. Decode, and composite the box into the normal image: every pixel outside it is the normal's.
        for item, pixels in zip(batch, decode(sd, latents)):
            results.append(_composite(item, pixels, params.refined_mask))
    return results


def _composite(item: GenerateItem, pixels: torch.Tensor, refined_mask: bool) -> GenerateResult:
    normal = np.asarray(item.normal)
    generated = pixels_to_array(pixels, item.normal.size, item.normal.mode)
    box = item.target_mask.astype(bool)
    image = np.where(box[..., None] if normal.ndim == 3 else box, generated, normal)
    extra = {"refined_mask": _changed_region(image, normal, box)} if refined_mask else {}
    return GenerateResult(Image.fromarray(image), box.astype(np.uint8) * 255, item.seed, weak_label=True,
                          extra_masks=extra)


def load_adapter(adapter: str | Path | LearnedEmbedding) -> LearnedEmbedding:
    """The embedding of an AnoGen fine-tune's output folder; InputError for another method's."""
    if isinstance(adapter, LearnedEmbedding):
        return adapter
    read_adapter_config(Path(adapter), METHOD)
    return LearnedEmbedding.load(Path(adapter))[0]


def adapter_config(adapter: str | Path | LearnedEmbedding) -> dict:
    """The config of an AnoGen fine-tune's output folder ({} for an embedding given in memory), its
    `ablate` filled in for adapters made before ablations were recorded (from their masked_loss)."""
    if isinstance(adapter, LearnedEmbedding):
        return {}
    config = read_adapter_config(Path(adapter), METHOD)
    if "ablate" not in config:
        config["ablate"] = [] if config.get("params", {}).get("masked_loss", True) else ["masked_loss"]
    return config


def _check_exemplars(exemplars, params: AnoGenParams) -> None:
    if not exemplars:
        raise ValueError("AnoGen needs at least one exemplar")
    for number, (image, mask) in enumerate(exemplars):
        check_mode(image)
        check_mask(mask, image)
        if "masked_loss" not in params.ablate and not np.any(mask):
            raise ValueError(f"exemplar {number} has an empty mask: the masked loss would learn nothing from it")


def _changed_region(image: np.ndarray, normal: np.ndarray, box: np.ndarray) -> np.ndarray:
    """uint8 0/255: pixels inside the box whose (slightly blurred) change exceeds Otsu's threshold."""
    change = np.abs(image.astype(np.int16) - normal.astype(np.int16)).astype(np.uint8)
    if change.ndim == 3:
        change = change.max(axis=2)
    radius = max(1, round(min(change.shape) / 256))  # ignore pixel-level speckle
    change = np.asarray(Image.fromarray(change).filter(ImageFilter.GaussianBlur(radius)))
    threshold = max(otsu_threshold(change[box]), MIN_CHANGE)
    return ((change >= threshold) & box).astype(np.uint8) * 255
