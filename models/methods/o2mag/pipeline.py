"""O2MAG: training-free anomaly generation from one reference anomaly by attention control
(One-to-More, CVPR 2026, arXiv 2603.18093).

Three DDIM branches share the frozen SD 1.5 UNet, batched into one UNet call per step:

- R, the reference anomaly, and N, a normal image, are DDIM-inverted. While sampling, each replays
  its own inverted path (its latents at a step are the inversion's at that noise level, as in
  "direct inversion", Ju et al. 2024), so their attention features are those of the real images
  rather than of a guided reconstruction drifting away from them.
- T, the target, starts from N's inverted noise. In the decoder's self-attention T keeps its own
  queries; inside the target mask M_T its keys/values are R's tokens inside the reference mask M_R,
  outside M_T they are N's tokens, and the two outputs are stitched by M_T at each layer's
  resolution. Outside M_T, T's latents are set to N's before every step (DiffEdit-style masked
  decoding), and the image fades into the normal image's own pixels across a ring of
  `mask_dilation` pixels on M_T's border, at most 3 of them outside M_T (the label contract's
  blend band): beyond it every pixel is exact. The mask written is M_T.

AGO, before sampling: the text embedding (77 x width, the CLIP output for `prompt`) is optimised
with the diffusion loss on the reference inside M_R (paper: 500 Adam steps, lr 3e-3), so that the
text pulls T towards this anomaly. It depends only on the reference and a few params: the worker
caches it under `ago_cache_key` and passes it back in.

DAE: during a window of middle steps, T's self- and cross-attention outputs inside M_T, in the
controlled layers, are multiplied by `dae_factor` (prompt-to-prompt style re-weighting without
renormalisation), so the defect's signal holds its own against the surrounding normal features
and small defects do not wash out.

Ablations (`params.ablate`, the paper's ablation rows; the manifest records them): "graft" and
"background" each take one of T's grafted key/value sources away, and T attends to its own tokens
there instead (both: T's plain self-attention); "ago" uses the prompt's own embedding (as
`ago_steps` 0); "dae" scales nothing (as `dae_factor` 1). With nothing ablated none of this adds work.

Choices where the paper is silent, or where a service needs more:
- Only the reference inside M_R is ever seen: its pixels outside M_R are set to the mean colour
  inside before anything else, so neither R's features nor the AGO embedding can depend on the
  exemplar's surroundings, and the AGO cache key hashes the inside alone.
- Default layers and start: the decoder's self-attention at 32x32 and 64x64 (at 512 px), grafting
  from step 4 of 50. This is MasaCtrl's setting (Cao et al. 2023) for mutual self-attention: the
  first steps and the encoder and low-resolution layers lay out structure (here the normal image's
  and M_T's), the high-resolution decoder layers carry appearance, which is what R must supply.
  DAE: factor 1.5 over the middle 40% of the steps (0.3-0.7), after the layout is set and while
  shapes form, before fine texture. Not tuned on real weights (none in this workplace).
- Prompts: N is inverted with the empty prompt (it shows no anomaly), R with the AGO embedding
  (made to describe it); the empty prompt is guidance's unconditional one.
- Seeds: with `target_noise` 0 (the default) an output is a function of its inputs alone; above 0
  the item's seed draws fresh noise mixed into T's start inside M_T, for varied defects on one mask.
- One DDIM schedule (`num_inference_steps`) serves inversion and sampling: replaying a path needs
  its timesteps.

Cost: one UNet call per step on [R, N, T_1..T_k] (twice the batch with guidance), where up to
`targets_per_call` targets on the same normal image share R and N. The reference is inverted once
per call, each distinct normal image once per call. Attention stays on SDPA kernels: grafting is
two SDPA calls (T's queries against N's tokens, and against R's tokens inside M_R) and a masked
select, never an explicit attention matrix.
"""

import hashlib
import json
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from models.diffusion.attention import AttentionLayer, UNetAttention, attention_layers, attention_processors
from models.diffusion.generation import GenerateItem, GenerateResult, checked_items, painted_result
from models.diffusion.images import (
    check_mask,
    check_mode,
    decode,
    encode,
    fade_into_normal,
    image_to_pixels,
    mask_to_latent,
)
from models.diffusion.loading import StableDiffusion, fresh_scheduler
from models.diffusion.sampling import StepCallback, ddim_invert, ddim_sample, encode_prompts
from models.diffusion.textual_inversion import masked_mse
from models.methods.interface import ProgressCallback
from models.methods.o2mag import O2MAGParams

METHOD = "o2mag"
# Each guidance half of the UNet batch is [R, N, T_1 .. T_k]: the two source branches, then the targets.
REFERENCE, NORMAL, SOURCES = 0, 1, 2
SD_LATENT_SIDE = 64  # latent side at SD 1.5's 512 px: `graft_resolutions` are feature-map sides there
AGO_SEED = 0  # AGO's randomness when `generate` runs it itself
# What AGO's result depends on besides the reference; the cache key covers these and the version.
AGO_PARAMS = ("resolution", "prompt", "ago_steps", "ago_learning_rate")
AGO_VERSION = 1
EMBEDDING_KEY = "embedding"


def ago_cache_key(reference_image: Image.Image, reference_mask: np.ndarray, params: O2MAGParams) -> str:
    """Hex digest naming the AGO embedding of this reference: equal for equal pixels inside M_R,
    equal masks and equal AGO params. AGO's seed is left out on purpose: any run's embedding
    serves every later job on the exemplar. The model is not in it: keep one cache per model."""
    _check_reference(reference_image, reference_mask)
    inside = np.asarray(_reference_inside_mask(reference_image, reference_mask))
    settings = {"method": METHOD, "version": AGO_VERSION, "mode": reference_image.mode,
                "shape": list(inside.shape), **{name: getattr(params, name) for name in AGO_PARAMS},
                "ago_steps": ago_steps(params)}  # "ago" ablated: the prompt's embedding, as with 0 steps
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.packbits(np.asarray(reference_mask) > 0).tobytes())
    digest.update(inside.tobytes())
    return digest.hexdigest()


def ago_steps(params: O2MAGParams) -> int:
    """The Adam steps AGO takes: none when it is ablated (the prompt's own embedding serves)."""
    return 0 if "ago" in params.ablate else params.ago_steps


def optimize_embedding(
    sd: StableDiffusion,
    reference_image: Image.Image,
    reference_mask: np.ndarray,
    params: O2MAGParams,
    *,
    seed: int,
    on_progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """AGO: a text embedding (77, width), float32 on the CPU, under which the frozen UNet denoises
    the reference inside M_R well.

    Adam on E||(eps - eps_theta(z_t, t, e)) * M_R||^2, starting from the embedding of
    `params.prompt`, one random timestep and noise per step drawn from `seed`; with "ago" ablated,
    no step: the prompt's embedding. on_progress("ago", step, steps) follows every step and may
    raise to stop.
    """
    # 1. The reference (its inside only) to latents; M_R to latent-size loss weights.
    _check_reference(reference_image, reference_mask)
    latents, loss_mask = _reference_latents(sd, reference_image, reference_mask, params.resolution)

    # 2. Start from the prompt's embedding, the one tensor Adam moves (float32: fp16 would lose its steps).
    with torch.no_grad():
        start = encode_prompts(sd, [params.prompt])[0]
    embedding = start.float().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=params.ago_learning_rate)
    scaler = torch.amp.GradScaler(sd.device.type, enabled=sd.dtype == torch.float16)  # fp16 gradients underflow
    scheduler = fresh_scheduler(sd)
    generator = torch.Generator().manual_seed(seed)

    # 3. Adam steps on the masked diffusion loss.
    steps = ago_steps(params)
    for step in range(steps):
        t = torch.randint(scheduler.config.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator)
        loss = _masked_diffusion_loss(sd, scheduler, latents, loss_mask, embedding, t, noise)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if on_progress is not None:
            on_progress("ago", step + 1, steps)
    return embedding.detach().cpu()


def save_embedding(embedding: torch.Tensor, path: str | Path) -> None:
    """Write an AGO embedding as safetensors."""
    save_file({EMBEDDING_KEY: embedding.detach().float().cpu().contiguous()}, str(path), metadata={"method": METHOD})


def load_embedding(path: str | Path) -> torch.Tensor:
    """An AGO embedding written by `save_embedding`, float32."""
    with safe_open(str(path), framework="pt") as file:
        if (file.metadata() or {}).get("method") != METHOD or EMBEDDING_KEY not in file.keys():  # noqa: SIM118
            raise ValueError(f"{path} holds no {METHOD} embedding")
        return file.get_tensor(EMBEDDING_KEY).float()


def generate(
    sd: StableDiffusion,
    reference_image: Image.Image,
    reference_mask: np.ndarray,
    items: Sequence[GenerateItem | tuple[Image.Image, np.ndarray, int]],
    params: O2MAGParams,
    *,
    embedding: torch.Tensor | None = None,
    reference_path: torch.Tensor | None = None,
    targets_per_call: int = 4,
    on_progress: ProgressCallback | None = None,
) -> list[GenerateResult]:
    """One image per (normal image, target mask, seed) item, in order, with the reference's anomaly
    (image, mask M_R) grown into the item's target mask M_T.

    embedding: the reference's AGO embedding (`optimize_embedding`, or `load_embedding` from the
    cache), used as given; None runs AGO here (honouring `params.ablate`), with seed AGO_SEED.
    reference_path: R's inverted path under that embedding (`invert_reference`), for a caller
    that serves several calls from one reference; None inverts it here. Items on the same normal
    image share its inversion and, up to `targets_per_call` at a time, the UNet calls.
    on_progress(stage, done, total) after every step: stage "ago", "invert" or "generate"; done and
    total count the steps of the whole call, every stage alike, so done / total is the call's progress.
    """
    # 1. Check the inputs; group the items by normal image, each group in batches of targets.
    items = checked_items(items, empty_masks=True)
    _check_reference(reference_image, reference_mask)
    if targets_per_call < 1:
        raise ValueError(f"targets_per_call must be at least 1, got {targets_per_call}")
    if not items:
        return []
    groups = [
        (indices[0], [indices[i : i + targets_per_call] for i in range(0, len(indices), targets_per_call)])
        for indices in _group_by_normal(items)
    ]
    steps = params.num_inference_steps
    # Inversions (the reference's unless given, one per normal image) and sampling runs.
    runs = (reference_path is None) + len(groups) + sum(len(batches) for _, batches in groups)
    progress = _Progress(on_progress, total=(ago_steps(params) if embedding is None else 0) + runs * steps)

    # 2. Text conditioning: the AGO embedding (optimised here if not given), and the empty prompt.
    if embedding is None:
        embedding = optimize_embedding(sd, reference_image, reference_mask, params, seed=AGO_SEED,
                                       on_progress=progress.stage("ago"))
    cond = _checked_embedding(sd, embedding)[None].to(sd.device, sd.dtype)
    with torch.no_grad():
        uncond = encode_prompts(sd, [""])

    # 3. Invert the reference under its embedding: R's path.
    if reference_path is None:
        reference_path = invert_reference(sd, reference_image, reference_mask, embedding, params,
                                          progress.stage("invert"))
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(steps)

    # 4. Per normal image: invert it once under the empty prompt (N's path), then denoise its
    #    targets batch by batch beside R and N.
    results: list[GenerateResult | None] = [None] * len(items)
    for first, batches in groups:
        normal_latents = encode(sd, image_to_pixels(items[first].normal, params.resolution)[None])
        normal_path = _inverted_path(sd, scheduler, normal_latents, uncond, progress.stage("invert"))
        for batch in batches:
            targets = [items[i] for i in batch]
            latents = _denoise_targets(sd, scheduler, reference_path, normal_path, reference_mask, targets,
                                       cond, uncond, params, progress.stage("generate"))
            # 5. Decode, and fade each M_T into the normal image across its border: exact beyond it.
            for index, item, pixels in zip(batch, targets, decode(sd, latents)):
                results[index] = _composite(item, pixels, params.mask_dilation)
    return results


def invert_reference(
    sd: StableDiffusion,
    reference_image: Image.Image,
    reference_mask: np.ndarray,
    embedding: torch.Tensor,
    params: O2MAGParams,
    on_step: StepCallback | None = None,
) -> torch.Tensor:
    """R's path: the reference (its inside only) DDIM-inverted under its AGO embedding, (steps + 1,
    1, 4, h, w), clean first. It depends on nothing else, so one serves every call on the reference."""
    _check_reference(reference_image, reference_mask)
    cond = _checked_embedding(sd, embedding)[None].to(sd.device, sd.dtype)
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    reference_latents, _ = _reference_latents(sd, reference_image, reference_mask, params.resolution)
    return _inverted_path(sd, scheduler, reference_latents, cond, on_step)


class AttentionControl:
    """What the attention processors of one tri-branch batch share: the masks at each controlled
    layer's resolution, which grafted sources T takes (those not ablated), and, set before every
    step, whether grafting is on and the DAE scale."""

    def __init__(self, reference_mask: np.ndarray, target_masks: list[np.ndarray], sides: set[int],
                 device: torch.device, ablate: Collection[str] = ()):
        self.targets = len(target_masks)
        # Keyed by the layer's token count (side * side), which is all a processor sees.
        self.reference_tokens = {  # indices of R's tokens inside M_R
            side * side: mask_to_latent(reference_mask, side).flatten().nonzero()[:, 0].to(device) for side in sides
        }
        self.target_masks = {  # bool (targets, tokens): T's tokens inside M_T
            side * side: torch.stack([mask_to_latent(mask, side).flatten() for mask in target_masks]).bool().to(device)
            for side in sides
        }
        # TriAG's two key/value sources for T; an ablated one leaves T its own tokens there.
        self.from_reference = "graft" not in ablate
        self.from_normal = "background" not in ablate
        self.grafting = False
        self.dae_scale = 1.0

    def boost(self, out: torch.Tensor) -> torch.Tensor:
        """DAE: the targets' attention output (batch, heads, tokens, dim) inside M_T, times the scale."""
        if self.dae_scale == 1.0:
            return out
        batch, heads, tokens, dim = out.shape
        branches = out.reshape(-1, SOURCES + self.targets, heads, tokens, dim)
        targets = branches[:, SOURCES:]
        inside = self.target_masks[tokens][None, :, None, :, None]
        targets = torch.where(inside, targets * self.dae_scale, targets)
        return torch.cat([branches[:, :SOURCES], targets], dim=1).reshape(batch, heads, tokens, dim)


class GraftedSelfAttention(UNetAttention):
    """Self-attention of a [R, N, T_1..T_k] batch. R and N attend to themselves. Each T keeps its
    queries and, once grafting is on, attends inside M_T to R's tokens inside M_R ("graft") and
    outside M_T to N's tokens ("background"); the two outputs are stitched by M_T at this layer's
    resolution. Where a source is ablated, T attends to its own tokens instead."""

    def __init__(self, control: AttentionControl):
        self.control = control

    def attend(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        control = self.control
        if not control.grafting:
            return control.boost(super().attend(attn, query, key, value))
        batch, heads, tokens, dim = query.shape
        query, key, value = (x.unflatten(0, (-1, SOURCES + control.targets)) for x in (query, key, value))
        sources = super().attend(attn, *(x[:, :SOURCES].flatten(0, 1) for x in (query, key, value)))

        # Every target's queries side by side on the token axis: one SDPA call per key/value source.
        target_queries = query[:, SOURCES:].transpose(1, 2).flatten(2, 3)  # (halves, heads, targets * tokens, dim)
        own = None if control.from_reference and control.from_normal else self._own(attn, query, key, value)
        if control.from_normal:
            from_normal = super().attend(attn, target_queries, key[:, NORMAL], value[:, NORMAL])
        else:
            from_normal = own
        if control.from_reference:
            defect = control.reference_tokens[tokens]
            from_reference = super().attend(
                attn, target_queries, key[:, REFERENCE][:, :, defect], value[:, REFERENCE][:, :, defect]
            )
        else:
            from_reference = own
        inside = control.target_masks[tokens].flatten()[:, None]
        targets = torch.where(inside, from_reference, from_normal).unflatten(2, (control.targets, tokens))
        out = torch.cat([sources.unflatten(0, (-1, SOURCES)), targets.transpose(1, 2)], dim=1)
        return control.boost(out.reshape(batch, heads, tokens, dim))

    def _own(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Each T's plain self-attention, laid out as the grafted outputs: (halves, heads, targets * tokens, dim)."""
        own = super().attend(attn, *(x[:, SOURCES:].flatten(0, 1) for x in (query, key, value)))
        return own.unflatten(0, (-1, self.control.targets)).transpose(1, 2).flatten(2, 3)


class BoostedCrossAttention(UNetAttention):
    """Cross-attention with DAE on the targets inside M_T."""

    def __init__(self, control: AttentionControl):
        self.control = control

    def attend(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return self.control.boost(super().attend(attn, query, key, value))


def controlled_layers(unet: UNet2DConditionModel, graft_resolutions: Sequence[int]) -> list[AttentionLayer]:
    """The decoder's (and middle block's) attention layers, self and cross, at the chosen
    resolutions: feature-map sides at 512 px."""
    downsamples = {SD_LATENT_SIDE // side for side in graft_resolutions}
    return [
        layer for layer in attention_layers(unet)
        if not layer.name.startswith("down_blocks") and layer.downsample in downsamples
    ]


def _denoise_targets(
    sd: StableDiffusion,
    scheduler: DDIMScheduler,
    reference_path: torch.Tensor,
    normal_path: torch.Tensor,
    reference_mask: np.ndarray,
    targets: list[GenerateItem],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    params: O2MAGParams,
    on_step: StepCallback | None,
) -> torch.Tensor:
    """The targets' clean latents (k, 4, h, w): tri-branch DDIM with grafting and DAE.

    reference_path, normal_path: (steps + 1, 1, 4, h, w) inverted paths, clean first.
    """
    steps, latent_size = len(scheduler.timesteps), normal_path.shape[-1]
    masks = torch.stack([mask_to_latent(item.target_mask, latent_size) for item in targets]).to(sd.device)
    start = _target_start(normal_path[-1], masks, targets, params.target_noise)

    layers = controlled_layers(sd.unet, params.graft_resolutions)
    sides = {math.ceil(latent_size / layer.downsample) for layer in layers}  # stride-2 convs round up
    control = AttentionControl(reference_mask, [item.target_mask for item in targets], sides, sd.device,
                               params.ablate)
    processors = {
        layer.name: (GraftedSelfAttention if layer.kind == "self" else BoostedCrossAttention)(control)
        for layer in layers
    }
    dae_start, dae_end = params.dae_window
    dae_factor = 1.0 if "dae" in params.ablate else params.dae_factor

    def before_step(i: int, t: int, latents: torch.Tensor) -> torch.Tensor:
        """R and N onto their inverted paths at this step's noise level; T onto N's outside M_T."""
        control.grafting = i / steps >= params.graft_start
        control.dae_scale = dae_factor if dae_start <= i / steps < dae_end else 1.0
        level = steps - i  # the inverted paths' entry at this step's noise level
        normal = normal_path[level]
        kept_outside = normal * (1 - masks) + latents[SOURCES:] * masks
        return torch.cat([reference_path[level], normal, kept_outside])

    batch = SOURCES + len(targets)
    with attention_processors(sd.unet, processors):
        latents = ddim_sample(
            sd, scheduler, torch.cat([reference_path[-1], normal_path[-1], start]),
            cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1), params.guidance_scale,
            before_step=before_step, on_step=on_step,
        )
    return normal_path[0] * (1 - masks) + latents[SOURCES:] * masks  # t = 0: the clean normal latents outside


def _target_start(normal_noise: torch.Tensor, masks: torch.Tensor, targets: list[GenerateItem], share: float):
    """T's starting latents: N's inverted noise, with inside M_T a `share` (in standard deviation)
    of fresh noise from each item's seed, variance kept."""
    fresh = torch.stack([
        torch.randn(normal_noise.shape[1:], generator=torch.Generator().manual_seed(item.seed)) for item in targets
    ]).to(normal_noise.device)
    mixed = math.sqrt(1 - share**2) * normal_noise + share * fresh
    return normal_noise * (1 - masks) + mixed * masks


def _inverted_path(sd, scheduler, latents, cond, on_step) -> torch.Tensor:
    """(steps + 1, 1, 4, h, w): the latents along the DDIM inversion of `latents`, clean first."""
    path: list[torch.Tensor] = []
    ddim_invert(sd, scheduler, latents, cond, on_step=on_step, trajectory=path)
    return torch.stack(path)


def _reference_inside_mask(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The reference with the pixels outside M_R set to the mean colour inside it: nothing outside
    the mask can then reach R's features or AGO (resizing mixes neighbours, so this comes first)."""
    array = np.asarray(image)
    inside = np.asarray(mask) > 0
    mean_colour = np.round(array[inside].mean(axis=0)).astype(np.uint8)
    return Image.fromarray(np.where(inside[..., None] if array.ndim == 3 else inside, array, mean_colour))


def _reference_latents(sd, image, mask, resolution) -> tuple[torch.Tensor, torch.Tensor]:
    """R's clean latents (1, 4, h, w), from the inside of M_R alone, and M_R at latent size (1, 1, h, w)."""
    latents = encode(sd, image_to_pixels(_reference_inside_mask(image, mask), resolution)[None])
    return latents, mask_to_latent(mask, latents.shape[-1])[None].to(sd.device)


def _masked_diffusion_loss(sd, scheduler, latents, mask, embedding, t, noise) -> torch.Tensor:
    """AGO's objective at timesteps t and noise: E||(noise - eps_theta(z_t, t, embedding)) * M_R||^2."""
    noise, t = noise.to(latents.device), t.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    context = embedding[None].to(sd.dtype).expand(len(t), -1, -1)
    prediction = sd.unet(noisy.to(sd.dtype), t, encoder_hidden_states=context).sample.float()
    return masked_mse(prediction, noise, mask)


def _composite(item: GenerateItem, pixels: torch.Tensor, band: int) -> GenerateResult:
    """The generated pixels on M_T, fading into the normal image across a `band` pixels wide ring
    on M_T's border (at most LABEL_BAND of them outside M_T), the normal's beyond."""
    return painted_result(item, fade_into_normal(item.normal, pixels, item.target_mask, band))


def _group_by_normal(items: list[GenerateItem]) -> list[list[int]]:
    """Indices of the items on each distinct normal image (same pixels), in order of first use."""
    groups: dict[bytes, list[int]] = {}
    for index, item in enumerate(items):
        key = hashlib.sha256(f"{item.normal.mode} {item.normal.size}".encode() + item.normal.tobytes()).digest()
        groups.setdefault(key, []).append(index)
    return list(groups.values())


def _checked_embedding(sd: StableDiffusion, embedding: torch.Tensor) -> torch.Tensor:
    expected = (sd.tokenizer.model_max_length, sd.text_encoder.config.hidden_size)
    if tuple(embedding.shape) != expected:
        raise ValueError(f"an embedding of shape {tuple(embedding.shape)} does not fit this model: it needs {expected}")
    return embedding


def _check_reference(image: Image.Image, mask: np.ndarray) -> None:
    check_mode(image)
    check_mask(mask, image)
    if not np.any(mask):
        raise ValueError("the reference mask is empty: there is no anomaly to take")


class _Progress:
    """Counts the steps of the whole call for on_progress(stage, done, total)."""

    def __init__(self, on_progress: ProgressCallback | None, total: int):
        self.on_progress, self.done, self.total = on_progress, 0, total

    def stage(self, name: str) -> Callable[..., None] | None:
        """A per-step callback for one stage: DDIM loops call it as (done, total), AGO as (stage, done, total)."""
        if self.on_progress is None:
            return None

        def step(*_ignored) -> None:
            self.done += 1
            self.on_progress(name, self.done, self.total)

        return step
