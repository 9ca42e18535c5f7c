"""CADiff: context-aware diffusion for controllable anomaly generation (Tong et al., AAAI 2026).

Fine-tune (one job per product, all its defect types jointly):
- Context-aware text prompt (CTP): learnable tokens in the text encoder's width (768 for SD 1.5),
  one context token for the product and one anomaly token per defect type, in the prompt
  "a photo of <ctx> with <ano_k>" (a normal image of the product, if given: "a photo of <ctx>").
  The UNet and the text encoder stay frozen; the tokens live in a copy of the tokenizer and a
  wrapped embedding table (textual_inversion.placeholder_tokens).
- Self-adaptive spatial control (SSC, `control.py`): a ControlNet initialised from the UNet
  (diffusers' `ControlNetModel.from_unet`, conditioning = the binary mask, one channel) fused into
  the UNet by SAIM at each residual; the UNet's output at step 0 is exactly the frozen model's.
- Loss L = L_CALDM + gamma L_loc + beta L_contrastive (gamma 0.001, beta 0.0005, the paper's):
  L_CALDM the noise-prediction MSE with the tokens in the prompt; L_loc and L_contrastive on the
  tokens' cross-attention maps (`losses.py`, which names its reading of Eq. 5).
- Augmentation: rotation, random crop and translation of image and masks together, in pixels,
  VAE-encoded each step.
- AdamW, constant learning rates, through the shared loop (training.py: checkpoints, resume).

Generate: the target mask is both the ControlNet's input and the written mask. Each pair's
intensity w is drawn from its seed; 50-step DDIM with classifier-free guidance; IAR (`iar.py`)
multiplies the anomaly token's attention inside the mask by w once the delayed focus scheduler
lets it. Background "normal" (default): before every step the latents outside the mask are the
normal image's noised to that step, and the decoded region fades into the normal image across a
`mask_dilation` ring (at most 3 px outside the mask: the label contract's band), exact beyond.
"generated" is the paper's whole generated image: no label describes it, so jobs never ask for
it (it is a keyword of `generate` here, not a job parameter).

Deviations from the paper, and choices where it is silent:
- Tokens get their own `token_learning_rate` (5e-3): at the paper's 1e-5 they barely move.
- The context token starts from the product's name, the anomaly tokens from `initializer_token`
  ("anomaly").
- Batch 4 and 2000 steps by default (the paper: batch 16, 1000 epochs), for one GPU and a
  handful of exemplars; not tuned on real weights (none in this workplace).
- Guidance (7.5) is not in the paper; nor is the contrastive temperature (0.1).
- SAIM's Eq. 10 concatenation is read as [y_a ; y_c] followed by an MLP with a zero last layer.
- IAR multiplies the probabilities without renormalising, from the step after alpha_t first
  exceeds the threshold (alpha_t is known only once the step's attention has been computed).
- Exemplars' foreground (models.masks.sampling.foreground_mask) minus their anomaly masks is the
  context token's L_loc target: "the product region outside the anomaly masks".
- The contrastive views are the batch's own samples, each augmented on its own (no second view
  of each image, which would double the UNet batch). Gradients are clipped at norm 1.
- Each output's noise comes from its seed alone, so an output does not depend on its batch.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.diffusion.adapters import check_base_model, model_fingerprint, read_adapter_config, write_adapter_config
from models.diffusion.attention import attention_processors, select_layers
from models.diffusion.generation import GenerateItem, GenerateResult, as_items, step_reporter
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
    load_token_entries,
    placeholder_tokens,
    save_token_entries,
)
from models.diffusion.training import train
from models.errors import InputError
from models.masks.sampling import foreground_mask
from models.methods.cadiff import CADiffParams
from models.methods.cadiff.control import SpatialControl
from models.methods.cadiff.iar import FOCUS_DOWNSAMPLE, FocusSchedule, IntensityReweighting
from models.methods.cadiff.losses import (
    TokenAttentionRecorder,
    augment,
    contrastive_loss,
    localization_loss,
    pooled_token_features,
)
from models.methods.interface import Checkpoints, ProgressCallback, batched

METHOD = "cadiff"
CONTEXT_TOKEN = "<cadiff-context>"
ANOMALY_TOKEN = "<cadiff-anomaly-{}>"
PROMPT_TEMPLATE = "a photo of {context} with {anomaly}"
NORMAL_TEMPLATE = "a photo of {context}"
INTENSITY_STREAM = 1  # the seed's stream w is drawn from, apart from the mask's and the noise's
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TrainingImage:
    image: Image.Image  # "L" or "RGB"
    mask: np.ndarray | None  # bool (H, W); None for a normal image of the product
    defect: str | None  # None for a normal image


class Losses(NamedTuple):
    caldm: torch.Tensor
    loc: torch.Tensor
    contrastive: torch.Tensor


def prompt_for(defect_token: str | None) -> str:
    if defect_token is None:
        return NORMAL_TEMPLATE.format(context=CONTEXT_TOKEN)
    return PROMPT_TEMPLATE.format(context=CONTEXT_TOKEN, anomaly=defect_token)


def token_position(tokenizer, prompt: str, token: str) -> int:
    """Where `token` sits in the tokenized `prompt` (the column of its cross-attention)."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return ids.index(tokenizer.convert_tokens_to_ids(token))


def intensity_of(seed: int, intensity: tuple[float, float]) -> float:
    """w of the pair with this seed: uniform in `intensity`."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, INTENSITY_STREAM]))
    return float(rng.uniform(*intensity))


class CADiffTraining:
    """The fine-tune's data, trainable parts and losses; `attached()` puts them on the shared model."""

    def __init__(self, sd: StableDiffusion, images: Sequence[TrainingImage], params: CADiffParams, product: str,
                 seed: int):
        _check_training_images(images)
        self.sd, self.params, self.product = sd, params, product
        self.defects = list(dict.fromkeys(image.defect for image in images if image.defect is not None))
        self.defect_tokens = {defect: ANOMALY_TOKEN.format(k) for k, defect in enumerate(self.defects)}
        tokens = [CONTEXT_TOKEN, *self.defect_tokens.values()]
        vectors = torch.cat([initial_vectors(sd, product.replace("_", " "), 1),
                             initial_vectors(sd, params.initializer_token, len(self.defects))])
        self.start = LearnedEmbedding(tokens, vectors)
        with torch.random.fork_rng(devices=[]):  # SAIM's initial weights from the run's seed: resumable
            torch.manual_seed(seed)
            self.control = SpatialControl.from_unet(sd.unet)
        self.scheduler = fresh_scheduler(sd)  # its noise schedule noises the training latents

        # Pixels, and per image two masks at model size: the anomaly's and the context's.
        size = params.resolution
        self.pixels = torch.stack([image_to_pixels(image.image, size) for image in images])
        anomaly = [image.mask if image.mask is not None else np.zeros((image.image.height, image.image.width), bool)
                   for image in images]
        context = [foreground_mask(image.image) & ~mask for image, mask in zip(images, anomaly)]
        self.masks = torch.stack([torch.cat([mask_to_latent(a, size), mask_to_latent(c, size)])
                                  for a, c in zip(anomaly, context)])
        self.has_anomaly = torch.tensor([image.defect is not None for image in images])
        # Concept ids (0: the context; 1 + k: defect k) and which prompt each image uses.
        self.concepts = torch.tensor([0 if image.defect is None else 1 + self.defects.index(image.defect)
                                      for image in images])
        self.prompts = [prompt_for(None), *(prompt_for(token) for token in self.defect_tokens.values())]
        self.latent_size = size // sd.vae_scale_factor
        self.cross_layers = select_layers(sd.unet, kind="cross")
        focus = {layer.name for layer in select_layers(sd.unet, kind="cross", latent_size=self.latent_size,
                                                       resolutions={self.latent_size // FOCUS_DOWNSAMPLE})}
        self.recorders = {layer.name: TokenAttentionRecorder(keep_hidden=layer.name in focus)
                          for layer in self.cross_layers}
        # Set inside `attached()`: the extended tokenizer, the token module, each prompt's token columns.
        self.tokenizer = None
        self.embedding = None
        self._positions: list[tuple[int, int]] = []

    def run_description(self) -> dict:
        """What a checkpoint must have been made with to be resumed."""
        return {"method": METHOD, "params": self.params.model_dump(mode="json"), "defects": self.defects,
                "product": self.product, "pixels_shape": list(self.pixels.shape)}

    @contextmanager
    def attached(self) -> Iterator["CADiffTraining"]:
        """Inside: the tokens in the text encoder, the ControlNet + SAIM and the recorders on the UNet."""
        sd = self.sd
        with (placeholder_tokens(sd, self.start) as (self.tokenizer, self.embedding),
              self.control.attached(sd.unet), attention_processors(sd.unet, self.recorders)):
            self.embedding.vectors.requires_grad_(True)
            # Each prompt's token columns: (context, anomaly); a normal's anomaly column is unused.
            context = token_position(self.tokenizer, self.prompts[0], CONTEXT_TOKEN)
            self._positions = [(context, context)] + [
                (context, token_position(self.tokenizer, prompt, token))
                for prompt, token in zip(self.prompts[1:], self.defect_tokens.values())
            ]
            yield self

    def losses(self, generator: torch.Generator) -> Losses:
        """One batch's L_CALDM, L_loc and L_contrastive (call inside `attached()`)."""
        sd, params = self.sd, self.params
        batch = params.batch_size
        picks = torch.randint(len(self.pixels), (batch,), generator=generator)
        pixels, masks = augment(self.pixels[picks], self.masks[picks], generator, params.rotation, params.crop)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn((batch, sd.latent_channels, self.latent_size, self.latent_size), generator=generator)
        noise, t = noise.to(sd.device), t.to(sd.device)
        noisy = self.scheduler.add_noise(encode(sd, pixels), noise, t)

        anomaly, context = masks[:, :1], masks[:, 1:]
        has_anomaly, concepts = self.has_anomaly[picks], self.concepts[picks]
        self.control.condition = anomaly.to(sd.device)
        text = encode_prompts(sd, self.prompts, self.tokenizer)[concepts.to(sd.device)]
        for recorder in self.recorders.values():
            recorder.clear()
        eps = sd.unet(noisy.to(sd.dtype), t, encoder_hidden_states=text).sample
        caldm = F.mse_loss(eps.float(), noise)

        # Tokens of each image's prompt: the context, then its anomaly token (absent for a normal).
        positions = torch.tensor([self._positions[c] for c in concepts.tolist()])
        present = torch.stack([torch.ones_like(has_anomaly), has_anomaly], 1).to(sd.device)
        targets = torch.cat([context, anomaly], 1).to(sd.device)
        maps = [recorder.maps[0] for recorder in self.recorders.values()]
        loc = localization_loss(maps, positions.to(sd.device), targets, present)
        focus = [recorder for recorder in self.recorders.values() if recorder.keep_hidden]
        features = pooled_token_features([r.maps[0] for r in focus], [r.hidden[0] for r in focus],
                                         positions.to(sd.device))
        token_concepts = torch.stack([torch.zeros_like(concepts), concepts], 1).to(sd.device)
        contrastive = contrastive_loss(features, token_concepts, present, params.temperature)
        return Losses(caldm, loc, contrastive)

    def loss(self, generator: torch.Generator) -> torch.Tensor:
        caldm, loc, contrastive = self.losses(generator)
        return caldm + self.params.loc_weight * loc + self.params.contrastive_weight * contrastive

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([
            {"params": [self.embedding.vectors], "lr": self.params.token_learning_rate, "weight_decay": 0.0},
            {"params": list(self.control.parameters()), "lr": self.params.learning_rate,
             "weight_decay": self.params.weight_decay},
        ])

    def learned_embedding(self) -> LearnedEmbedding:
        return LearnedEmbedding(self.start.tokens, self.embedding.vectors.detach().float().cpu().clone())


def finetune(
    sd: StableDiffusion,
    images: Sequence[TrainingImage],
    params: CADiffParams,
    *,
    product: str,
    seed: int,
    out_dir: str | Path,
    checkpoints: Checkpoints | None = None,
    on_progress: ProgressCallback | None = None,
) -> "CADiffAdapter":
    """Learn the tokens, the ControlNet and SAIM from one product's images; write the adapter to `out_dir`.

    images: the anomaly exemplars (any number of defect types) and, optionally, normal images of
    the product. checkpoints: if the folder holds one of this run, training resumes from it.
    on_progress("train", step, train_steps) follows every step and may raise to stop.
    """
    # 1. Data, tokens and the ControlNet + SAIM.
    training = CADiffTraining(sd, images, params, product, seed)

    # 2. Train through the shared loop, everything attached to the shared model inside the block.
    with training.attached():
        train(
            {"tokens": training.embedding.vectors, "control": training.control}, training.optimizer(),
            lambda _step, generator: training.loss(generator), steps=params.train_steps, seed=seed,
            run=training.run_description(), device=sd.device, mixed_precision=sd.dtype == torch.float16,
            checkpoints=checkpoints, max_grad_norm=MAX_GRAD_NORM,
            on_step=(lambda done, total: on_progress("train", done, total)) if on_progress else None,
        )
        embedding = training.learned_embedding()

    # 3. The adapter: learned_embeds.safetensors, controlnet/, saim.safetensors, adapter_config.json.
    out_dir = Path(out_dir)
    save_token_entries(out_dir, embedding)
    training.control.save(out_dir)
    write_adapter_config(
        out_dir, METHOD, product=product, context_token=CONTEXT_TOKEN, defect_tokens=training.defect_tokens,
        template=PROMPT_TEMPLATE, sd_fingerprint=model_fingerprint(sd.model_dir), seed=seed,
        exemplars=int(training.has_anomaly.sum()), normals=int((~training.has_anomaly).sum()),
        params=params.model_dump(mode="json"),
    )
    control = training.control.to(sd.dtype).eval().requires_grad_(False)  # as `load_adapter` gives it
    return CADiffAdapter(embedding, control, dict(training.defect_tokens), {"template": PROMPT_TEMPLATE})


@dataclass
class CADiffAdapter:
    embedding: LearnedEmbedding  # the context token, then the anomaly tokens
    control: SpatialControl
    defect_tokens: dict[str, str]  # defect type -> its anomaly token
    config: dict

    def prompt(self, defect: str) -> str:
        if defect not in self.defect_tokens:
            known = ", ".join(sorted(self.defect_tokens))
            raise InputError(f"the adapter learnt no defect {defect!r}; it knows: {known}")
        return self.config["template"].format(context=self.embedding.tokens[0], anomaly=self.defect_tokens[defect])


def load_adapter(folder: str | Path, sd: StableDiffusion) -> CADiffAdapter:
    """The adapter of a CADiff fine-tune, for this model; InputError for another method's adapter
    or one trained on another SD checkpoint."""
    folder = Path(folder)
    config = read_adapter_config(folder, METHOD)
    check_base_model(config, "sd_fingerprint", sd.model_dir, "SD_MODEL_DIR")
    try:
        tokens = [config["context_token"], *config["defect_tokens"].values()]
        embedding = load_token_entries(folder, tokens)
        control = SpatialControl.load(folder, sd.device, sd.dtype)
    except (KeyError, ValueError, OSError, RuntimeError) as error:
        raise InputError(f"the adapter does not fit this model: {error}") from None
    return CADiffAdapter(embedding, control, dict(config["defect_tokens"]), config)


def generate(
    sd: StableDiffusion,
    adapter: str | Path | CADiffAdapter,
    items: Sequence[GenerateItem | tuple[Image.Image, np.ndarray, int]],
    params: CADiffParams,
    *,
    defect: str,
    background: Literal["normal", "generated"] = "normal",
    reweighting: bool = True,
    images_per_batch: int = 8,
    on_progress: ProgressCallback | None = None,
) -> list[GenerateResult]:
    """One image per (normal image, target mask, seed) item, in order, with `defect` in the mask;
    each result's details give its intensity and the first step IAR re-weighted (None: never).

    background: "normal" keeps the normal image outside the mask, "generated" is the whole generated
    image (the paper's output). reweighting: False samples without IAR (the reference the IAR tests
    compare against).
    on_progress("generate", steps done, steps in all) follows every denoising step.
    """
    # 1. The adapter and the items; each pair's intensity from its seed.
    if not isinstance(adapter, CADiffAdapter):
        adapter = load_adapter(adapter, sd)
    items = as_items(items)
    _check_items(items)
    prompt = adapter.prompt(defect)

    # 2. The prompt with the learnt tokens, and the empty prompt for guidance.
    with placeholder_tokens(sd, adapter.embedding) as (tokenizer, _), torch.no_grad():
        cond, uncond = encode_prompts(sd, [prompt, ""], tokenizer).chunk(2)
        anomaly_column = token_position(tokenizer, prompt, adapter.defect_tokens[defect])

    # 3. Controlled DDIM with IAR, batch by batch, with a fresh scheduler for the job.
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    batches = batched(items, images_per_batch)
    total = len(batches) * params.num_inference_steps
    results = []
    with adapter.control.attached(sd.unet, sampling=True):
        for number, batch in enumerate(batches):
            report = step_reporter(on_progress, number * params.num_inference_steps, total)
            intensities = [intensity_of(item.seed, params.intensity) for item in batch]
            latents, schedule = _controlled_ddim(sd, scheduler, adapter.control, batch, cond, uncond, params,
                                                 anomaly_column, intensities if reweighting else None, background,
                                                 report)
            # 4. Decode: the region fades into the normal image (exact beyond), or the whole generated image.
            for index, (item, pixels) in enumerate(zip(batch, decode(sd, latents))):
                if background == "normal":
                    image = fade_into_normal(item.normal, pixels, item.target_mask, params.mask_dilation)
                else:
                    image = Image.fromarray(pixels_to_array(pixels, item.normal.size, item.normal.mode))
                mask = (np.asarray(item.target_mask) > 0).astype(np.uint8) * 255
                details = {"intensity": round(intensities[index], 6),
                           "reweighted_from_step": schedule.started_at[index] if schedule else None}
                results.append(GenerateResult(image, mask, item.seed, details=details))
    return results


def _controlled_ddim(sd, scheduler, control: SpatialControl, items: list[GenerateItem], cond, uncond,
                     params: CADiffParams, anomaly_column: int, intensities: list[float] | None, background: str,
                     report):
    """Clean latents (k, 4, h, w) and the IAR schedule (None without re-weighting)."""
    latent_size = params.resolution // sd.vae_scale_factor
    steps = len(scheduler.timesteps)
    masks = torch.stack([mask_to_latent(item.target_mask, latent_size) for item in items]).to(sd.device)
    control.condition = torch.stack([mask_to_latent(item.target_mask, params.resolution) for item in items]).to(
        sd.device)
    noise_shape = (steps + 1, sd.latent_channels, latent_size, latent_size)
    noise = torch.stack(
        [torch.randn(noise_shape, generator=torch.Generator().manual_seed(item.seed)) for item in items]
    ).to(sd.device)

    before_step = None
    normal_latents = None
    if background == "normal":
        normal_latents = encode(sd, torch.stack([image_to_pixels(item.normal, params.resolution) for item in items]))

        def before_step(i: int, t: int, latents: torch.Tensor) -> torch.Tensor:
            return noised(scheduler, normal_latents, noise[:, i + 1], t) * (1 - masks) + latents * masks

    schedule, processors = None, {}
    if intensities is not None:
        schedule = FocusSchedule(anomaly_column, torch.tensor(intensities, device=sd.device), masks,
                                 params.alpha_threshold, steps)
        focus = {layer.name for layer in select_layers(sd.unet, kind="cross", latent_size=latent_size,
                                                       resolutions={latent_size // FOCUS_DOWNSAMPLE})}
        processors = {layer.name: IntensityReweighting(schedule, focus=layer.name in focus)
                      for layer in select_layers(sd.unet, kind="cross")}

    def on_step(done: int, total: int) -> None:
        if schedule is not None:
            schedule.end_step()
        report(done, total)

    count = len(items)
    with attention_processors(sd.unet, processors):
        latents = ddim_sample(sd, scheduler, noise[:, 0], cond.expand(count, -1, -1), uncond.expand(count, -1, -1),
                              params.guidance_scale, before_step=before_step, on_step=on_step)
    if normal_latents is not None:
        latents = normal_latents * (1 - masks) + latents * masks  # t = 0: the clean normal latents outside
    return latents, schedule


def _check_training_images(images: Sequence[TrainingImage]) -> None:
    if not any(image.defect is not None for image in images):
        raise InputError("CADiff needs at least one anomaly exemplar")
    for number, image in enumerate(images):
        check_mode(image.image)
        if image.defect is None:
            continue
        check_mask(image.mask, image.image)
        if not np.any(image.mask):
            raise InputError(f"exemplar {number} has an empty mask: its anomaly token would have nothing to find")


def _check_items(items: list[GenerateItem]) -> None:
    for number, item in enumerate(items):
        check_mode(item.normal)
        check_mask(item.target_mask, item.normal)
        if not np.any(item.target_mask):
            raise ValueError(f"item {number}: the target mask is empty")
