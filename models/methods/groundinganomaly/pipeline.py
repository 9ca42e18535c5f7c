"""GroundingAnomaly: spatially-grounded diffusion for few-shot anomaly synthesis (arXiv 2604.08301).

Fine-tune, one job per product, its defect types jointly:
1. Every training image gets its semantic map (scm.py): the background token off the product,
   the product token on it, the token of the exemplar's defect type inside its mask; normal
   images carry no defect token.
2. Mask embeddings: per defect type, textual inversion (models.diffusion.textual_inversion) on the
   exemplar masks themselves, drawn as white-on-black images, so new masks can be sampled
   (the `learned` mask source).
3. The SCM (tokens, stem, ConvNeXt, SFF), the GSM (gated self-attention in every transformer
   block, gsm.py) and LoRA on the UNet's attention learn with the LDM noise-prediction loss,
   AdamW in two groups: the LoRA and ConvNeXt at GLIGEN's fine-tuning rate (`learning_rate`,
   5e-5), the new layers (gates, fusers, SFF, stem, tokens) at `grounding_learning_rate`, since
   Adam moves a gate about one learning rate a step at most and at 5e-5 the gates would stay
   nearly shut. MNT: each image of a batch is a normal one with probability `normal_fraction`,
   an exemplar otherwise; each image is flipped at random, its semantic map alike. A
   `cfg_dropout` share of steps trains the unconditional branch (empty prompt, gated blocks
   off), as GLIGEN drops its grounding.
4. The adapter: `learned_embeds.safetensors` (the map's tokens, textual-inversion layout),
   `scm.safetensors`, `gsm.safetensors`, `lora/` (peft), `mask_embeds.safetensors` and
   `adapter_config.json` (with the SD and ConvNeXt checkpoints' fingerprints: another is refused;
   `ablate`, the components it was trained without; `diagnostics`, the final loss and how far
   the gates opened, mean and max |tanh(gamma)| over every gate).

Generate, per item (normal image, target mask, seed):
1. The semantic map of the normal image with the defect's token in the target mask -> tokens.
2. NDI: the normal image's latents noised to `strength` of the schedule; DDIM from there over the
   rest of the `num_inference_steps` schedule (so fewer steps run, as diffusers' img2img counts
   them), classifier-free guided: conditional = prompt + gated blocks on the grounding tokens,
   unconditional = empty prompt, gated blocks off (both halves in one UNet call, the fusers acting
   on the conditional rows only).
3. Background "normal" (the service's): before every step the latents outside the target mask,
   dilated by one latent cell, are the normal image's noised to that step; decoded, the
   generated region fades into the normal image across `mask_dilation` pixels, at most 3 outside
   the mask, and every pixel beyond is the normal's. "generated" (the paper's whole image) is
   offered here only: its pixels outside the mask are not the normal's, which no labelled pair
   of the service may be, so jobs always use "normal".

Ablations (`params.ablate`, the paper's rows; the adapter's config records a fine-tune's, and
every generate job using it runs without them too):
- `scm` (fine-tune): GLIGEN's box grounding (scm.BoxGrounding) in place of the encoded map.
- `sff` (fine-tune): the grounding tokens from ConvNeXt's last stage alone.
- `gsm`: no grounding at all (no gated blocks, no SCM trained); `lora`: none trained or applied.
  A fine-tune without both has nothing to train and is refused.
- `mnt` (fine-tune): exemplars only; the normal images are not used.
- `ndi`: generation starts from pure noise and runs the full schedule (the normal image is still
  kept outside the mask, as the service's labels need).

Deviations and choices where the paper is silent:
- SFF: our reading, in scm.py. The map also has a background token (every pixel carries one).
- Text prompt: "a photo of a {product} with {defect}" (normals: "a photo of a {product}").
- LoRA is not in the paper (the issue asks for it); `train_steps` 2000 is ours, not tuned on real
  weights (none in this workplace).
- Learned masks: the sampled image is thresholded (Otsu, on its brightest part) and the shape
  cropped to its bounding box, then placed on the product's foreground like an exemplar mask.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig
from PIL import Image
from safetensors.torch import load_file, save_file

from models.diffusion.adapters import (
    ablated_components,
    check_base_model,
    model_fingerprint,
    read_adapter_config,
    write_adapter_config,
)
from models.diffusion.generation import GenerateItem, GenerateResult, checked_items, painted_result, step_reporter
from models.diffusion.images import (
    check_mask,
    check_mode,
    decode,
    encode,
    fade_into_normal,
    image_to_pixels,
    mask_to_latent,
    pixels_to_array,
)
from models.diffusion.loading import StableDiffusion, fresh_scheduler
from models.diffusion.sampling import ddim_sample, encode_prompts, noised
from models.diffusion.textual_inversion import (
    LearnedEmbedding,
    initial_vectors,
    placeholder_tokens,
    train_embedding,
)
from models.diffusion.training import train
from models.errors import InputError
from models.masks.sampling import foreground_mask, otsu_threshold
from models.methods.groundinganomaly import GroundingAnomalyParams
from models.methods.groundinganomaly.gsm import (
    GatedBlocks,
    attached,
    attached_for_sampling,
    load_lora,
    lora_config,
    lora_state,
    save_lora,
)
from models.methods.groundinganomaly.scm import BoxGrounding, SpatialConditioning, semantic_map
from models.methods.interface import Checkpoints, ProgressCallback

METHOD = "groundinganomaly"
PROMPT = "a photo of a {product} with {defect}"
NORMAL_PROMPT = "a photo of a {product}"
TOKENS_FILE = "learned_embeds.safetensors"  # diffusers' textual-inversion layout: {first token: vectors}
SCM_FILE = "scm.safetensors"
MASK_EMBEDDINGS_FILE = "mask_embeds.safetensors"
MASK_TEMPLATES = ("a binary mask of a {}", "a black and white mask of a {}", "a mask of a {}", "a {}")
MASK_LEARNING_RATE = 5e-3  # diffusers' textual-inversion example
MASK_INITIALIZER = "defect"


@dataclass(frozen=True)
class Exemplar:
    image: Image.Image  # "L" or "RGB"
    mask: np.ndarray  # bool (H, W)
    defect: str


@dataclass
class LoadedAdapter:
    """A fine-tune's trained parts, ready to attach: everything generate needs."""

    grounding: SpatialConditioning | BoxGrounding | None  # None: trained without the gsm
    gated: GatedBlocks | None  # None: trained without the gsm
    lora: LoraConfig | None  # None: trained without the lora
    lora_weights: dict[str, torch.Tensor] | None  # peft's state dict; None: freshly initialised or none
    mask_embeddings: LearnedEmbedding  # one token per defect type, in `defects` order
    config: dict

    @property
    def product(self) -> str:
        return self.config["product"]

    @property
    def defects(self) -> list[str]:
        return self.config["defects"]

    def defect_index(self, defect: str) -> int:
        if defect not in self.defects:
            raise InputError(f"the adapter learnt the defect types {', '.join(self.defects)}, not {defect!r}: "
                             "name one of them in `defect`")
        return self.defects.index(defect)


@dataclass(frozen=True)
class TrainingBatch:
    """One fine-tune step's draw: which images, flipped how, noised how."""

    picks: torch.Tensor  # (B,) indices of the training images: the exemplars first, then the normals
    flips: torch.Tensor  # (B, 2) bool: left-right, upside down
    latents: torch.Tensor  # (B, 4, h, w) the picked images' latents, flipped
    maps: torch.Tensor  # (B, H, W) their semantic maps, flipped alike
    t: torch.Tensor  # (B,) timesteps
    noise: torch.Tensor  # (B, 4, h, w)
    unconditional: bool  # a cfg_dropout step: empty prompt, no grounding


def draw_batch(latents: torch.Tensor, maps: torch.Tensor, exemplars: int, normal_fraction: float, size: int,
               cfg_dropout: float, timesteps: int, generator: torch.Generator) -> TrainingBatch:
    """A batch of `size` training images (MNT: each a normal one, past the first `exemplars`, with
    probability `normal_fraction`), drawn from `generator` alone."""
    normals = len(latents) - exemplars
    take_normal = torch.rand(size, generator=generator) < normal_fraction
    if normals == 0:
        take_normal[:] = False
    picks = torch.where(take_normal, exemplars + torch.randint(max(normals, 1), (size,), generator=generator),
                        torch.randint(exemplars, (size,), generator=generator))
    flips = torch.rand(size, 2, generator=generator) < 0.5
    t = torch.randint(timesteps, (size,), generator=generator)
    noise = torch.randn((size, *latents.shape[1:]), generator=generator)
    unconditional = bool(torch.rand(1, generator=generator) < cfg_dropout)
    return TrainingBatch(picks, flips, _flipped(latents[picks], flips), _flipped(maps[picks], flips), t, noise,
                         unconditional)


def token_names(defects: Sequence[str]) -> list[str]:
    """The map's tokens in label order (scm.BACKGROUND, scm.PRODUCT, then each defect type)."""
    return ["<groundinganomaly-background>", "<groundinganomaly-product>",
            *(f"<groundinganomaly-defect-{k}>" for k in range(len(defects)))]


def finetune(
    sd: StableDiffusion,
    convnext,
    exemplars: Sequence[Exemplar],
    normals: Sequence[Image.Image],
    params: GroundingAnomalyParams,
    *,
    product: str,
    seed: int,
    out_dir: str | Path,
    checkpoints: Checkpoints | None = None,
    on_progress: ProgressCallback | None = None,
) -> LoadedAdapter:
    """Learn the mask embeddings, then the SCM, GSM and LoRA; write the adapter to `out_dir`.

    convnext: a fresh ConvNextModel (scm.load_convnext), trained in place. checkpoints: each stage
    checkpoints in its own sub-folder and resumes from it. on_progress(stage, done, total) follows
    every step and may raise to stop.
    """
    ablated = sorted(params.ablate)
    learns_from_normals = params.learns_from_normals()
    normal_fraction = params.normal_fraction if learns_from_normals else 0.0
    normals = list(normals) if learns_from_normals else []
    _check_training_set(exemplars, normals, normal_fraction, ablated)
    report = on_progress or (lambda _stage, _done, _total: None)
    defects = list(dict.fromkeys(e.defect for e in exemplars))
    resolution = params.resolution

    # 1. Latents, semantic maps and prompts of the exemplars, then of the normal images.
    images = [e.image for e in exemplars] + normals
    latents = encode(sd, torch.stack([image_to_pixels(image, resolution) for image in images]))
    maps = torch.stack(
        [semantic_map(foreground_mask(e.image) | e.mask, e.mask, defects.index(e.defect), resolution)
         for e in exemplars]
        + [semantic_map(foreground_mask(image), None, None, resolution) for image in normals]
    )
    with torch.no_grad():
        prompts = encode_prompts(sd, [PROMPT.format(product=product, defect=e.defect) for e in exemplars]
                                 + [NORMAL_PROMPT.format(product=product)] * len(normals)).float()
        empty = encode_prompts(sd, [""]).float()

    # 2. A mask embedding per defect type, by textual inversion on its exemplars' masks.
    mask_vectors, mask_losses = [], {}
    for k, defect in enumerate(defects):
        masks = [e.mask for e in exemplars if e.defect == defect]
        mask_latents = encode(sd, torch.stack([image_to_pixels(_mask_image(m), resolution) for m in masks]))
        learned, mask_losses[defect] = train_embedding(
            sd, mask_latents, None, tokens=[_mask_token(k)], initializer=MASK_INITIALIZER, templates=MASK_TEMPLATES,
            steps=params.mask_train_steps, learning_rate=MASK_LEARNING_RATE, batch_size=params.batch_size,
            seed=seed + 1 + k, checkpoints=_stage_checkpoints(checkpoints, f"mask-{k}"),
            on_progress=lambda done, total: report("learning the mask embeddings", done, total),
        )
        mask_vectors.append(learned.vectors)
    mask_embeddings = LearnedEmbedding([_mask_token(k) for k in range(len(defects))], torch.cat(mask_vectors))

    # 3. SCM + GSM + LoRA with the LDM loss, batches mixing exemplars and normal images (MNT).
    words = ["background", product, *defects]
    tokens = torch.cat([initial_vectors(sd, word, 1) for word in words])
    lora = None if "lora" in ablated else lora_config(params.lora_rank)
    scheduler = fresh_scheduler(sd)
    anomalous = len(exemplars)

    def loss_at(_step: int, generator: torch.Generator) -> torch.Tensor:
        batch = draw_batch(latents, maps, anomalous, normal_fraction, params.batch_size, params.cfg_dropout,
                           scheduler.config.num_train_timesteps, generator)
        t, noise = batch.t.to(sd.device), batch.noise.to(sd.device)
        noisy = scheduler.add_noise(batch.latents, noise, t).to(sd.dtype)
        if batch.unconditional:
            eps = sd.unet(noisy, t, empty.expand(len(t), -1, -1)).sample
        else:
            grounded = None if grounding is None else {"gligen": grounding.grounding_inputs(batch.maps.to(sd.device))}
            eps = sd.unet(noisy, t, prompts[batch.picks], cross_attention_kwargs=grounded).sample
        return F.mse_loss(eps.float(), noise)

    run = {"method": METHOD, "params": params.model_dump(mode="json"), "product": product, "defects": defects,
           "latents_shape": list(latents.shape), "exemplars": anomalous, "normals": len(normals)}
    # The new layers (stem, SFF, fusers, LoRA's A) start from the job's seed, so that a resumed run
    # starts as the uninterrupted one did; the global random state is left as it was.
    with torch.random.fork_rng(devices=[]):  # the CPU generator, which initialises new layers
        torch.default_generator.manual_seed(seed)
        grounding, gated = _new_grounding(sd, convnext, tokens, ablated)
        position_net = grounding.position_net if grounding is not None else None
        with attached(sd.unet, gated, position_net, lora) as lora_parameters:
            trainables = {**({"scm": grounding, "gsm": gated} if gated is not None else {}),
                          **{f"lora.{i}": p for i, p in enumerate(lora_parameters)}}
            new = [*grounding.new_parameters(), *gated.parameters()] if gated is not None else []
            pretrained = grounding.pretrained_parameters() if grounding is not None else []
            groups = [{"params": [*lora_parameters, *pretrained], "lr": params.learning_rate},
                      {"params": new, "lr": params.grounding_learning_rate}]
            optimizer = torch.optim.AdamW([group for group in groups if group["params"]])
            final = train(trainables, optimizer, loss_at, steps=params.train_steps, seed=seed, run=run,
                          device=sd.device, mixed_precision=sd.dtype == torch.float16,
                          checkpoints=_stage_checkpoints(checkpoints, "gsm"),
                          on_step=lambda done, total: report("training", done, total))
            trained_lora = lora_state(sd.unet) if lora is not None else None
    if gated is not None:
        grounding.eval()
        gated.eval()

    # 4. The adapter.
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = token_names(defects)
    if gated is not None:
        save_file({names[0]: grounding.tokens.detach().float().cpu().contiguous()}, out_dir / TOKENS_FILE)
        save_file({key: value.detach().contiguous() for key, value in grounding.state_dict().items()
                   if key != "tokens"}, out_dir / SCM_FILE)
        gated.save(out_dir)
    if lora is not None:
        save_lora(out_dir, lora, trained_lora)
    save_file({mask_embeddings.tokens[0]: mask_embeddings.vectors.contiguous()}, out_dir / MASK_EMBEDDINGS_FILE)
    config = {
        "product": product, "defects": defects, "tokens": names, "token_width": tokens.shape[1],
        "mask_tokens": mask_embeddings.tokens, "lora_rank": params.lora_rank,
        "blocks": gated.blocks if gated is not None else [],
        "templates": {"prompt": PROMPT, "normal": NORMAL_PROMPT, "mask": MASK_TEMPLATES[0]},
        "sd_fingerprint": model_fingerprint(sd.model_dir),
        "convnext_fingerprint": model_fingerprint(convnext.name_or_path),
        "seed": seed, "exemplars": anomalous, "normals": len(normals), "params": params.model_dump(mode="json"),
        "ablate": ablated, "diagnostics": diagnostics(final, mask_losses, gated),
    }
    write_adapter_config(out_dir, METHOD, **config)
    return LoadedAdapter(grounding, gated, lora, trained_lora, mask_embeddings, {"method": METHOD, **config})


def diagnostics(final_losses: dict[str, float], mask_losses: dict[str, dict[str, float]],
                gated: GatedBlocks | None) -> dict:
    """What a user reads off a fine-tune: the final values of the LDM loss and of each defect's mask
    inversion (means of their last steps; None when a resumed run had no step left) and how far
    the gates opened, |tanh(gamma)| over both
    gates (attention, feed-forward) of every gated block: near 0 the grounding hardly acts."""
    result = {"losses": {"noise_prediction": final_losses.get("total"),
                         **{f"mask_inversion_{defect}": losses.get("total") for defect, losses in mask_losses.items()}}}
    if gated is not None:
        openings = gated.gammas().tanh().abs()
        result["gates"] = {"mean_abs_tanh": float(openings.mean()), "max_abs_tanh": float(openings.max())}
    return result


def _new_grounding(sd: StableDiffusion, convnext, tokens: torch.Tensor, ablated: Sequence[str]):
    """Fresh (grounding, gated blocks) as `ablated` asks: the SCM, its SFF on the last stage alone
    (`sff`), GLIGEN's box grounding (`scm`), or none at all (`gsm`)."""
    width = sd.unet.config.cross_attention_dim
    if "gsm" in ablated:
        return None, None
    if "scm" in ablated:
        grounding = BoxGrounding(tokens, width)
    else:
        grounding = SpatialConditioning(tokens, convnext, width, last_stage_only="sff" in ablated)
    return grounding.to(sd.device).train(), GatedBlocks(sd.unet, width).to(sd.device).train()


def load_adapter(folder: str | Path, sd: StableDiffusion, convnext) -> LoadedAdapter:
    """The trained parts of a GroundingAnomaly fine-tune, on `convnext` (a fresh scm.load_convnext);
    InputError for another method's adapter or one trained against other SD or ConvNeXt checkpoints."""
    folder = Path(folder)
    config = read_adapter_config(folder, METHOD)
    check_base_model(config, "sd_fingerprint", sd.model_dir, "SD_MODEL_DIR")
    check_base_model(config, "convnext_fingerprint", convnext.name_or_path, "CONVNEXT_MODEL_DIR")
    ablated = config.get("ablate", [])
    try:
        grounding = gated = None
        if "gsm" not in ablated:
            tokens = load_file(folder / TOKENS_FILE)[config["tokens"][0]]
            grounding, gated = _new_grounding(sd, convnext, tokens, ablated)
            grounding.load_state_dict({**load_file(folder / SCM_FILE), "tokens": tokens})
            if gated.blocks != config["blocks"]:
                raise ValueError("the UNet's transformer blocks are not those the adapter was trained on")
            gated.load(folder)
            grounding.eval()
            gated.eval()
        lora = (None, None) if "lora" in ablated else load_lora(folder)
        vectors = load_file(folder / MASK_EMBEDDINGS_FILE)[config["mask_tokens"][0]].float()
    except (KeyError, ValueError, RuntimeError, FileNotFoundError) as error:
        raise InputError(f"the adapter does not fit these models: {error}") from None
    return LoadedAdapter(grounding, gated, *lora, LearnedEmbedding(list(config["mask_tokens"]), vectors), config)


def generate(
    sd: StableDiffusion,
    adapter: LoadedAdapter,
    items: Sequence[GenerateItem | tuple[Image.Image, np.ndarray, int]],
    params: GroundingAnomalyParams,
    *,
    defect: str,
    background: str = "normal",
    on_progress: ProgressCallback | None = None,
) -> list[GenerateResult]:
    """One image per (normal image, target mask, seed) item, in order, with `defect` in its mask;
    each result's details name the components it ran without (`params.ablate` and the adapter's).

    background: "normal" (the normal image outside the mask, exactly) or "generated" (the
    paper's whole generated image; no labelled pair). on_progress("generate", steps done, steps
    in all) follows every denoising step.
    """
    if background not in ("normal", "generated"):
        raise ValueError(f"background is 'normal' or 'generated', not {background!r}")
    items = checked_items(items, empty_masks=True)
    label = adapter.defect_index(defect)
    ablated = ablated_components(params, adapter.config)
    grounding = None if "gsm" in ablated else adapter.grounding
    lora_weights = None if "lora" in ablated else adapter.lora_weights
    resolution, latent_size = params.resolution, params.resolution // sd.vae_scale_factor

    # 1. Semantic maps -> the grounding's inputs (the SCM's stage features; the fusion runs inside
    #    the UNet, as position_net).
    grounded, grounding_tokens = None, 0
    with torch.no_grad():
        if grounding is not None:
            maps = torch.stack([semantic_map(foreground_mask(item.normal) | item.target_mask, item.target_mask,
                                             label, resolution) for item in items]).to(sd.device)
            inputs = grounding.grounding_inputs(maps)
            grounded, grounding_tokens = {"gligen": inputs}, grounding.token_count(inputs)
        text, empty = encode_prompts(sd, [PROMPT.format(product=adapter.product, defect=defect), ""]).chunk(2)
    count = len(items)

    # 2. NDI: the normal latents noised to `strength`, and the schedule's remaining timesteps
    #    (diffusers' img2img count: int(steps * strength) of them); ablated, pure noise and the
    #    full schedule.
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    ndi = "ndi" not in ablated
    steps = int(params.num_inference_steps * params.strength) if ndi else params.num_inference_steps
    scheduler.timesteps = scheduler.timesteps[len(scheduler.timesteps) - steps:]
    normal_latents = encode(sd, torch.stack([image_to_pixels(item.normal, resolution) for item in items]))
    noise_shape = (steps + 1, *normal_latents.shape[1:])
    noise = torch.stack([torch.randn(noise_shape, generator=torch.Generator().manual_seed(item.seed))
                         for item in items]).to(sd.device)
    masks = torch.stack([mask_to_latent(item.target_mask, latent_size) for item in items]).to(sd.device)
    region = F.max_pool2d(masks, 3, stride=1, padding=1)  # the mask dilated by one latent cell
    if not ndi:
        start = noise[:, 0]  # DDIM's initial noise sigma is 1
    elif steps:
        start = noised(scheduler, normal_latents, noise[:, 0], int(scheduler.timesteps[0]))
    else:
        start = normal_latents

    def keep_normal_outside(i: int, t: int, latents: torch.Tensor) -> torch.Tensor:
        return noised(scheduler, normal_latents, noise[:, i + 1], t) * (1 - region) + latents * region

    # 3. DDIM with guidance in one UNet call per step: [unconditional | conditional], the grounding
    #    tokens (and so the gated blocks) for the conditional half only; the LoRA merged, the
    #    fusers' attention for the visual queries only (gsm.attached_for_sampling).
    report = step_reporter(on_progress, 0, steps)
    autocast = torch.autocast(sd.device.type, dtype=torch.float16, enabled=sd.dtype == torch.float16)
    gated, position_net = (adapter.gated, grounding.position_net) if grounding is not None else (None, None)
    with attached_for_sampling(sd.unet, gated, position_net, adapter.lora, lora_weights,
                               grounding_tokens=grounding_tokens), autocast:
        latents = ddim_sample(
            sd, scheduler, start, text.expand(count, -1, -1), empty.expand(count, -1, -1), params.guidance_scale,
            before_step=keep_normal_outside if background == "normal" else None, on_step=report,
            cross_attention_kwargs=grounded,
        )
    if background == "normal":
        latents = normal_latents * (1 - region) + latents * region

    # 4. Decode; fade into the normal image on the mask's border (exact beyond), or the whole image.
    results = []
    for item, pixels in zip(items, decode(sd, latents)):
        if background == "normal":
            image = fade_into_normal(item.normal, pixels, item.target_mask, params.mask_dilation)
        else:
            image = Image.fromarray(pixels_to_array(pixels, item.normal.size, item.normal.mode))
        results.append(painted_result(item, image, {"ablated": ablated}))
    return results


@torch.no_grad()
def sample_masks(sd: StableDiffusion, adapter: LoadedAdapter, defect: str, seeds: Sequence[int],
                 params: GroundingAnomalyParams) -> list[np.ndarray]:
    """bool (resolution, resolution) masks of `defect`, one per seed, sampled in one batch from its
    mask embedding (plain SD, the full DDIM schedule, guided) and thresholded at Otsu's level on
    their brightest part: never empty."""
    embedding = adapter.mask_embeddings
    token = embedding.tokens[adapter.defect_index(defect)]
    with placeholder_tokens(sd, embedding) as (tokenizer, _):
        cond, uncond = encode_prompts(sd, [MASK_TEMPLATES[0].format(token), ""], tokenizer).chunk(2)
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    latent_size = params.resolution // sd.vae_scale_factor
    shape = (sd.latent_channels, latent_size, latent_size)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed)) for seed in seeds])
    count = len(seeds)
    latents = ddim_sample(sd, scheduler, latents.to(sd.device), cond.expand(count, -1, -1),
                          uncond.expand(count, -1, -1), params.guidance_scale)
    masks = []
    for pixels in decode(sd, latents):
        gray = ((pixels.mean(dim=0) + 1) * 127.5).cpu().numpy()
        masks.append(gray >= min(otsu_threshold(gray), float(gray.max())))
    return masks


def _mask_token(k: int) -> str:
    return f"<groundinganomaly-mask-{k}>"


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).convert("RGB")


def _flipped(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Each of a batch (B, ..., H, W) flipped left-right and/or upside down by its row of flips (B, 2)."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    flips = flips.to(x.device)
    x = torch.where(flips[:, 0].view(shape), x.flip(-1), x)
    return torch.where(flips[:, 1].view(shape), x.flip(-2), x)


def _stage_checkpoints(checkpoints: Checkpoints | None, stage: str) -> Checkpoints | None:
    if checkpoints is None:
        return None
    return Checkpoints(checkpoints.folder / stage, checkpoints.every, checkpoints.saved)


def _check_training_set(exemplars: Sequence[Exemplar], normals: Sequence[Image.Image], normal_fraction: float,
                        ablated: Sequence[str]) -> None:
    if {"gsm", "lora"} <= set(ablated):
        raise InputError("ablate: without both the gsm and the lora a GroundingAnomaly fine-tune has nothing to train")
    if not exemplars:
        raise InputError("GroundingAnomaly needs at least one anomaly exemplar")
    if normal_fraction > 0 and not normals:
        raise InputError("GroundingAnomaly fine-tunes on normal images too (MNT): list some in `normals`, "
                         "or set normal_fraction to 0")
    for number, exemplar in enumerate(exemplars):
        check_mode(exemplar.image)
        check_mask(exemplar.mask, exemplar.image)
        if not np.any(exemplar.mask):
            raise InputError(f"exemplar {number} has an empty mask: its defect token would mark nothing")
    for image in normals:
        check_mode(image)
