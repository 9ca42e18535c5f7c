"""Prompt encoding, noise prediction with classifier-free guidance, DDIM sampling and inversion.

The DDIM update is written out here (deterministic, eta 0, epsilon prediction, no x0 clipping:
SD 1.5's settings) rather than taken from `DDIMScheduler.step`, for two reasons: sampling and
inversion become the same move in opposite directions, and the loop never makes the GPU wait
for the CPU (`step` turns device timesteps into Python numbers every step, stalling the queue
of UNet kernels). The scheduler supplies the timesteps and the noise schedule.

Latents stay float32 between steps (the UNet itself runs in the model dtype) so that long DDIM
chains, and inversions in particular, do not accumulate fp16 rounding.
"""

import math
from collections.abc import Callable

import torch
from diffusers import DDIMScheduler
from transformers import CLIPTokenizer

from models.diffusion.loading import StableDiffusion

# on_step(done, total): called after every step; it may raise (e.g. to cancel a job) and the
# exception propagates to the caller with the shared model untouched.
StepCallback = Callable[[int, int], None]
# before_step(step_index, t, latents) -> latents: lets a method edit the latents before each UNet call.
LatentEdit = Callable[[int, int, torch.Tensor], torch.Tensor]


def encode_prompts(
    sd: StableDiffusion, prompts: list[str], tokenizer: CLIPTokenizer | None = None
) -> torch.Tensor:
    """CLIP text embeddings (B, 77, width) in the model dtype; `tokenizer` overrides the model's
    (one with placeholder tokens added, see textual_inversion.py). Gradients flow if enabled."""
    tokenizer = tokenizer or sd.tokenizer
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return sd.text_encoder(ids.to(sd.device)).last_hidden_state


def predict_noise(
    sd: StableDiffusion,
    latents: torch.Tensor,
    t: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """eps_theta(latents, t) as float32; with `uncond`, classifier-free guided, both halves in one UNet call
    (unconditional first). cross_attention_kwargs: passed to the UNet (e.g. GLIGEN's grounding inputs)."""
    if uncond is None:
        return sd.unet(latents.to(sd.dtype), t, encoder_hidden_states=cond,
                       cross_attention_kwargs=cross_attention_kwargs).sample.float()
    both = sd.unet(
        torch.cat([latents, latents]).to(sd.dtype), t, encoder_hidden_states=torch.cat([uncond, cond]),
        cross_attention_kwargs=cross_attention_kwargs,
    ).sample.float()
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def alpha_bar(scheduler: DDIMScheduler, t: int) -> float:
    """The cumulative signal fraction at timestep t; below 0, DDIM's final value (fully denoised)."""
    return float(scheduler.alphas_cumprod[t] if t >= 0 else scheduler.final_alpha_cumprod)


def previous_timestep(scheduler: DDIMScheduler, t: int) -> int:
    """Where the DDIM step from t lands (as diffusers' DDIMScheduler computes it)."""
    return t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def noised(scheduler: DDIMScheduler, latents: torch.Tensor, noise: torch.Tensor, t: int) -> torch.Tensor:
    """Clean latents noised to timestep t: sqrt(a) z + sqrt(1 - a) noise."""
    alpha = alpha_bar(scheduler, t)
    return math.sqrt(alpha) * latents + math.sqrt(1 - alpha) * noise


def ddim_move(latents: torch.Tensor, eps: torch.Tensor, alpha_from: float, alpha_to: float) -> torch.Tensor:
    """Deterministic DDIM: from noise level alpha_from to alpha_to along the predicted noise eps.

    Towards less noise this is a sampling step, towards more noise an inversion step.
    """
    predicted_clean = (latents - math.sqrt(1 - alpha_from) * eps) / math.sqrt(alpha_from)
    return math.sqrt(alpha_to) * predicted_clean + math.sqrt(1 - alpha_to) * eps


@torch.no_grad()
def ddim_sample(
    sd: StableDiffusion,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    *,
    before_step: LatentEdit | None = None,
    on_step: StepCallback | None = None,
    cross_attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """Denoise `latents` along `scheduler.timesteps` (call `set_timesteps` first) with DDIM, eta 0.

    Classifier-free guidance is applied when `uncond` is given and `guidance_scale` != 1.
    cross_attention_kwargs go to every UNet call (see predict_noise).
    """
    if guidance_scale == 1.0:
        uncond = None  # guidance 1 is the conditional prediction alone: skip half the UNet batch
    latents = latents.float()
    timesteps = scheduler.timesteps.tolist()
    unet_timesteps = scheduler.timesteps.to(sd.device)  # moved once: no host-to-device copy per step
    for i, t in enumerate(timesteps):
        if before_step is not None:
            latents = before_step(i, t, latents)
        eps = predict_noise(sd, latents, unet_timesteps[i], cond, uncond, guidance_scale, cross_attention_kwargs)
        alpha_to = alpha_bar(scheduler, previous_timestep(scheduler, t))
        latents = ddim_move(latents, eps, alpha_bar(scheduler, t), alpha_to)
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents


@torch.no_grad()
def ddim_invert(
    sd: StableDiffusion,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    *,
    refine_steps: int = 0,
    on_step: StepCallback | None = None,
    trajectory: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run DDIM backwards: clean latents -> the noise that `ddim_sample` (guidance 1) maps back to them.

    Walks `scheduler.timesteps` in reverse, undoing one sampling step at a time. Classic DDIM
    inversion (`refine_steps=0`) uses eps at the current, less noisy latent as a stand-in for eps
    at the unknown noisier one; each refine step re-evaluates eps at the latest estimate of the
    noisier latent (a fixed-point iteration), which makes the step an exact inverse of the
    sampling step in the limit, at one more UNet call per step and refinement.

    trajectory: if given, the clean latents and the latents after every step are appended to it
    (steps + 1 entries, least noisy first), for methods that replay the inverted path while sampling.
    """
    latents = latents.float()
    if trajectory is not None:
        trajectory.append(latents)
    timesteps = scheduler.timesteps.flip(0).tolist()
    unet_timesteps = scheduler.timesteps.flip(0).to(sd.device)
    for i, t in enumerate(timesteps):
        alpha_from = alpha_bar(scheduler, previous_timestep(scheduler, t))  # where the sampling step lands
        alpha_to = alpha_bar(scheduler, t)
        noisier = ddim_move(latents, predict_noise(sd, latents, unet_timesteps[i], cond), alpha_from, alpha_to)
        for _ in range(refine_steps):
            noisier = ddim_move(latents, predict_noise(sd, noisier, unet_timesteps[i], cond), alpha_from, alpha_to)
        latents = noisier
        if trajectory is not None:
            trajectory.append(latents)
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents
