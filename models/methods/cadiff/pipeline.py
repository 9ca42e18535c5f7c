"""CADiff: context-aware diffusion for controllable anomaly generation (Tong et al., AAAI 2026).

Fine-tune (one job per product, all its defect types jointly):
- Context-aware text prompt (CTP): learnable tokens in the text encoder's width (768 for SD 1.5),
  one context token for the product and one anomaly token per defect type, in the prompt
  "a photo of <ctx> with <ano_k>" (a normal image of the product, if given: "a photo of <ctx>").
  The UNet and the text encoder stay frozen; the tokens live in a copy of the tokenizer and a
  wrapped embedding table (textual_inversion.placeholder_tokens).
- Self-adaptive spatial control (SSC, `control.py`): a ControlNet initialised from the UNet
  (diffusers' `ControlNetModel.from_unet`, conditioning = the binary mask, one channel) fused into
  the UNet by SAIM at each residual; the UNet's output at step 0 is exactly the frozen model's,
  and the ControlNet's zero convolutions get a first-order gradient from step 0.
- Loss L = L_CALDM + gamma L_loc + beta L_contrastive (gamma 0.001, beta 0.0005, the paper's):
  L_CALDM the noise-prediction MSE with the tokens in the prompt; L_loc and L_contrastive on the
  tokens' cross-attention maps (`losses.py`, which names its reading of Eq. 5).
- Augmentation: rotation, random crop and translation of image and masks together, in pixels,
  VAE-encoded each step.
- AdamW, constant learning rates, through the shared loop (training.py: checkpoints, resume);
  `train_steps` defaults to the paper's 1000 epochs over the training images (capped).
- The result's diagnostics: each loss term's mean over the last steps, the ControlNet's (+ SAIM's)
  contribution ||y_f - y|| / ||y|| to the skip features on a training batch, and how far the tokens
  moved from their initializers.

Ablations (`params.ablate`, the paper's rows): `ctp_tokens` keeps the tokens at their initializer
embeddings; `controlnet` drops the ControlNet and SAIM (not built in a fine-tune); `saim` adds the
residuals as plain ControlNet does (SAIM not trained); `iar` samples without re-weighting;
`loc_loss` and `contrastive_loss` drop their terms from the fine-tune's loss. The adapter's config
records a fine-tune's, and every generate job with that adapter runs without them too.

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
- Batch 4 by default (the paper: 16), for one GPU; the same 1000 epochs take 4x the steps. Not
  tuned on real weights (none in this workplace).
- Guidance (7.5) is not in the paper; nor is the contrastive temperature (0.1).
- SAIM's Eq. 10 concatenation is read as [y_a ; y_c] followed by an MLP with a zero last layer,
  added to the plain ControlNet sum y + y_c (control.py says why).
- IAR multiplies the probabilities without renormalising, from the step after alpha_t first
  exceeds the threshold (alpha_t is known only once the step's attention has been computed).
- The focus layers (IAR's measurement, L_contrastive's features) are SD's 16x16 ones, or in another
  UNet the cross-attention scale nearest a quarter of the latent side; the ControlNet's mask
  embedding has one halving per halving of the VAE.
- Exemplars' foreground (models.masks.sampling.foreground_mask) minus their anomaly masks is the
  context token's L_loc target: "the product region outside the anomaly masks".
- The contrastive views are the batch's own samples, each augmented on its own (no second view
  of each image, which would double the UNet batch). Gradients are clipped at norm 1.
- Each output's noise comes from its seed alone, so an output does not depend on its batch.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.diffusion.adapters import (
    ablated_components,
    check_base_model,
    model_fingerprint,
    read_adapter_config,
    write_adapter_config,
)
from models.diffusion.attention import attention_processors, select_layers
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
    load_token_entries,
    placeholder_tokens,
    save_token_entries,
)
from models.diffusion.training import train
from models.errors import InputError
from models.masks.sampling import foreground_mask
from models.methods.cadiff import CADiffParams
from models.methods.cadiff.control import SpatialControl
from models.methods.cadiff.iar import FocusSchedule, IntensityReweighting, focus_layers
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


class TrainingBatch(NamedTuple):
    """One step's samples: latents noised to their timesteps, the noise, the augmented masks."""

    noisy: torch.Tensor  # (B, 4, h, w)
    timesteps: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B, 4, h, w): what the UNet predicts
    anomaly: torch.Tensor  # (B, 1, R, R) in {0, 1}: the ControlNet's input and the anomaly token's target
    context: torch.Tensor  # (B, 1, R, R) in {0, 1}: the context token's target
    concepts: torch.Tensor  # (B,) 0: a normal image (its prompt has no anomaly token); 1 + k: defect k


class Losses(NamedTuple):
    caldm: torch.Tensor
    loc: torch.Tensor | None  # None: ablated
    contrastive: torch.Tensor | None


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


def initial_embedding(sd: StableDiffusion, product: str, initializer_token: str, defects: int) -> LearnedEmbedding:
    """The tokens as training starts them and as the `ctp_tokens` ablation keeps them: the context
    token the product's name, each of the `defects` anomaly tokens `initializer_token`."""
    tokens = [CONTEXT_TOKEN, *(ANOMALY_TOKEN.format(k) for k in range(defects))]
    return LearnedEmbedding(tokens, torch.cat([initial_vectors(sd, product.replace("_", " "), 1),
                                               initial_vectors(sd, initializer_token, defects)]))


class CADiffTraining:
    """The fine-tune's data, trainable parts and losses; `attached()` puts them on the shared model."""

    def __init__(self, sd: StableDiffusion, images: Sequence[TrainingImage], params: CADiffParams, product: str,
                 seed: int):
        _check_training_images(images)
        self.sd, self.params, self.product = sd, params, product
        self.ablated = set(params.ablate)
        if {"ctp_tokens", "controlnet"} <= self.ablated:
            raise InputError("with ctp_tokens and controlnet ablated a CADiff fine-tune has nothing to train")
        self.defects = list(dict.fromkeys(image.defect for image in images if image.defect is not None))
        self.defect_tokens = {defect: ANOMALY_TOKEN.format(k) for k, defect in enumerate(self.defects)}
        self.start = initial_embedding(sd, product, params.initializer_token, len(self.defects))
        self.control = None  # None: the `controlnet` ablation
        if "controlnet" not in self.ablated:
            with torch.random.fork_rng(devices=[]):  # SAIM's initial weights from the run's seed: resumable
                torch.manual_seed(seed)
                self.control = SpatialControl.from_unet(sd.unet, sd.vae_scale_factor)
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
        # The attention maps the token losses read: every cross-attention layer's for L_loc, the
        # focus layers' with their hidden states for L_contrastive; none while both are ablated.
        focus = {layer.name for layer in focus_layers(sd.unet)}
        loc, contrastive = "loc_loss" not in self.ablated, "contrastive_loss" not in self.ablated
        self.recorders = {
            layer.name: TokenAttentionRecorder(keep_hidden=contrastive and layer.name in focus)
            for layer in select_layers(sd.unet, kind="cross") if loc or (contrastive and layer.name in focus)
        }
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
        control = (self.control.attached(sd.unet, saim="saim" not in self.ablated) if self.control is not None
                   else nullcontext())
        with (placeholder_tokens(sd, self.start) as (self.tokenizer, self.embedding), control,
              attention_processors(sd.unet, self.recorders)):
            self.embedding.vectors.requires_grad_("ctp_tokens" not in self.ablated)
            # Each prompt's token columns: (context, anomaly); a normal's anomaly column is unused.
            context = token_position(self.tokenizer, self.prompts[0], CONTEXT_TOKEN)
            self._positions = [(context, context)] + [
                (context, token_position(self.tokenizer, prompt, token))
                for prompt, token in zip(self.prompts[1:], self.defect_tokens.values())
            ]
            yield self

    def draw(self, generator: torch.Generator) -> TrainingBatch:
        """One step's batch: images drawn and augmented with their masks, encoded and noised."""
        sd, params = self.sd, self.params
        batch = params.batch_size
        picks = torch.randint(len(self.pixels), (batch,), generator=generator)
        pixels, masks = augment(self.pixels[picks], self.masks[picks], generator, params.rotation, params.crop)
        t = torch.randint(self.scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn((batch, sd.latent_channels, self.latent_size, self.latent_size), generator=generator)
        noise, t = noise.to(sd.device), t.to(sd.device)
        noisy = self.scheduler.add_noise(encode(sd, pixels), noise, t)
        masks = masks.to(sd.device)
        return TrainingBatch(noisy, t, noise, masks[:, :1], masks[:, 1:], self.concepts[picks].to(sd.device))

    def losses(self, batch: TrainingBatch) -> Losses:
        """The batch's L_CALDM, L_loc and L_contrastive (call inside `attached()`)."""
        sd = self.sd
        if self.control is not None:
            self.control.condition = batch.anomaly
        text = encode_prompts(sd, self.prompts, self.tokenizer)[batch.concepts]
        for recorder in self.recorders.values():
            recorder.clear()
        eps = sd.unet(batch.noisy.to(sd.dtype), batch.timesteps, encoder_hidden_states=text).sample
        caldm = F.mse_loss(eps.float(), batch.noise)
        if not self.recorders:
            return Losses(caldm, None, None)

        # Tokens of each image's prompt: the context, then its anomaly token (absent for a normal).
        concepts = batch.concepts
        positions = torch.tensor([self._positions[c] for c in concepts.tolist()], device=sd.device)
        present = torch.stack([torch.ones_like(concepts, dtype=torch.bool), concepts > 0], 1)
        loc = contrastive = None
        if "loc_loss" not in self.ablated:
            maps = [recorder.maps[0] for recorder in self.recorders.values()]
            loc = localization_loss(maps, positions, torch.cat([batch.context, batch.anomaly], 1), present)
        if "contrastive_loss" not in self.ablated:
            focus = [recorder for recorder in self.recorders.values() if recorder.keep_hidden]
            features = pooled_token_features([r.maps[0] for r in focus], [r.hidden[0] for r in focus], positions)
            token_concepts = torch.stack([torch.zeros_like(concepts), concepts], 1)
            contrastive = contrastive_loss(features, token_concepts, present, self.params.temperature)
        return Losses(caldm, loc, contrastive)

    def loss(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The step's "total", L = L_CALDM + gamma L_loc + beta L_contrastive, and each term unweighted."""
        caldm, loc, contrastive = self.losses(self.draw(generator))
        terms, total = {"caldm": caldm}, caldm
        if loc is not None:
            terms["loc_unweighted"] = loc
            total = total + self.params.loc_weight * loc
        if contrastive is not None:
            terms["contrastive_unweighted"] = contrastive
            total = total + self.params.contrastive_weight * contrastive
        return {"total": total, **terms}

    def trainables(self) -> dict[str, torch.Tensor | torch.nn.Module]:
        return {"tokens": self.embedding.vectors, **({"control": self.control} if self.control is not None else {})}

    def optimizer(self) -> torch.optim.Optimizer:
        groups = []
        if "ctp_tokens" not in self.ablated:
            groups.append({"params": [self.embedding.vectors], "lr": self.params.token_learning_rate,
                           "weight_decay": 0.0})
        if self.control is not None:
            trained = self.control.controlnet if "saim" in self.ablated else self.control
            groups.append({"params": list(trained.parameters()), "lr": self.params.learning_rate,
                           "weight_decay": self.params.weight_decay})
        return torch.optim.AdamW(groups)

    def control_contribution(self, generator: torch.Generator) -> dict[str, float]:
        """||y_f - y|| / ||y|| at each fusion of a training batch's UNet call (0 at initialisation):
        its mean and max over the ControlNet's residuals (call inside `attached()`)."""
        self.control.contributions = []
        try:
            with torch.no_grad(), torch.autocast(self.sd.device.type, dtype=torch.float16,
                                                 enabled=self.sd.dtype == torch.float16):
                self.losses(self.draw(generator))
            ratios = torch.stack(self.control.contributions)
        finally:
            self.control.contributions = None
        return {"mean": round(float(ratios.mean()), 6), "max": round(float(ratios.max()), 6)}

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
    The adapter's config carries the run's `diagnostics`.
    """
    # 1. Data, tokens and the ControlNet + SAIM; the default steps from the number of images.
    normals = sum(image.defect is None for image in images)
    params = params.for_training_set(len(images) - normals, normals)
    training = CADiffTraining(sd, images, params, product, seed)

    # 2. Train through the shared loop, everything attached to the shared model inside the block.
    with training.attached():
        final_losses = train(
            training.trainables(), training.optimizer(), lambda _step, generator: training.loss(generator),
            steps=params.train_steps, seed=seed, run=training.run_description(), device=sd.device,
            mixed_precision=sd.dtype == torch.float16, checkpoints=checkpoints, max_grad_norm=MAX_GRAD_NORM,
            on_step=(lambda done, total: on_progress("train", done, total)) if on_progress else None,
        )
        embedding = training.learned_embedding()
        # 3. Diagnostics: the final losses, and whether the ControlNet and the tokens have moved.
        diagnostics = {"losses": {name: round(value, 6) for name, value in final_losses.items()},
                       "token_shift": _relative_shift(embedding.vectors, training.start.vectors)}
        if training.control is not None:
            diagnostics["control_to_skip_norm"] = training.control_contribution(torch.Generator().manual_seed(seed))

    # 4. The adapter: learned_embeds.safetensors, controlnet/ and saim.safetensors (unless ablated),
    # adapter_config.json.
    out_dir = Path(out_dir)
    save_token_entries(out_dir, embedding)
    if training.control is not None:
        training.control.save(out_dir)
    config = {
        "product": product, "context_token": CONTEXT_TOKEN, "defect_tokens": training.defect_tokens,
        "template": PROMPT_TEMPLATE, "sd_fingerprint": model_fingerprint(sd.model_dir), "seed": seed,
        "exemplars": int(training.has_anomaly.sum()), "normals": normals, "params": params.model_dump(mode="json"),
        "ablate": sorted(params.ablate), "diagnostics": diagnostics,
    }
    write_adapter_config(out_dir, METHOD, **config)
    control = None
    if training.control is not None:
        control = training.control.to(sd.dtype).eval().requires_grad_(False)  # as `load_adapter` gives it
    return CADiffAdapter(embedding, control, dict(training.defect_tokens), {"method": METHOD, **config})


def _relative_shift(vectors: torch.Tensor, start: torch.Tensor) -> dict[str, float]:
    """||v - v_0|| / ||v_0|| of each token from its initializer: mean and max."""
    shift = (vectors - start).norm(dim=1) / start.norm(dim=1).clamp(min=1e-8)
    return {"mean": round(float(shift.mean()), 6), "max": round(float(shift.max()), 6)}


@dataclass
class CADiffAdapter:
    embedding: LearnedEmbedding  # the context token, then the anomaly tokens
    control: SpatialControl | None  # None: trained with the ControlNet ablated
    defect_tokens: dict[str, str]  # defect type -> its anomaly token
    config: dict  # adapter_config.json's

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
        trained_without = "controlnet" in config.get("ablate", ())
        control = None if trained_without else SpatialControl.load(folder, sd.device, sd.dtype)
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
    images_per_batch: int = 8,
    on_progress: ProgressCallback | None = None,
) -> list[GenerateResult]:
    """One image per (normal image, target mask, seed) item, in order, with `defect` in the mask;
    each result's details give its intensity and the first step IAR re-weighted (None: never).

    The components in `params.ablate` and the adapter's config's `ablate` are left out.
    background: "normal" keeps the normal image outside the mask, "generated" is the whole generated
    image (the paper's output).
    on_progress("generate", steps done, steps in all) follows every denoising step.
    """
    # 1. The adapter, what it runs without, and the items; each pair's intensity from its seed.
    if not isinstance(adapter, CADiffAdapter):
        adapter = load_adapter(adapter, sd)
    ablated = ablated_components(params, adapter.config)
    items = checked_items(items)
    prompt = adapter.prompt(defect)
    embedding = adapter.embedding
    if "ctp_tokens" in ablated:
        embedding = initial_embedding(sd, adapter.config["product"], adapter.config["params"]["initializer_token"],
                                      len(adapter.defect_tokens))
    control = None if "controlnet" in ablated else adapter.control

    # 2. The prompt with the tokens, and the empty prompt for guidance.
    with placeholder_tokens(sd, embedding) as (tokenizer, _), torch.no_grad():
        cond, uncond = encode_prompts(sd, [prompt, ""], tokenizer).chunk(2)
        anomaly_column = token_position(tokenizer, prompt, adapter.defect_tokens[defect])

    # 3. Controlled DDIM with IAR, batch by batch, with a fresh scheduler for the job.
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    batches = batched(items, images_per_batch)
    total = len(batches) * params.num_inference_steps
    results = []
    attached = (control.attached(sd.unet, sampling=True, saim="saim" not in ablated) if control is not None
                else nullcontext())
    with attached:
        for number, batch in enumerate(batches):
            report = step_reporter(on_progress, number * params.num_inference_steps, total)
            intensities = None if "iar" in ablated else [intensity_of(item.seed, params.intensity) for item in batch]
            latents, schedule = _controlled_ddim(sd, scheduler, control, batch, cond, uncond, params,
                                                 anomaly_column, intensities, background, report)
            # 4. Decode: the region fades into the normal image (exact beyond), or the whole generated image.
            for index, (item, pixels) in enumerate(zip(batch, decode(sd, latents))):
                if background == "normal":
                    image = fade_into_normal(item.normal, pixels, item.target_mask, params.mask_dilation)
                else:
                    image = Image.fromarray(pixels_to_array(pixels, item.normal.size, item.normal.mode))
                details = {"intensity": round(intensities[index], 6) if schedule else None,
                           "reweighted_from_step": schedule.started_at[index] if schedule else None}
                results.append(painted_result(item, image, details))
    return results


def _controlled_ddim(sd, scheduler, control: SpatialControl | None, items: list[GenerateItem], cond, uncond,
                     params: CADiffParams, anomaly_column: int, intensities: list[float] | None, background: str,
                     report):
    """Clean latents (k, 4, h, w) and the IAR schedule (None without re-weighting)."""
    latent_size = params.resolution // sd.vae_scale_factor
    steps = len(scheduler.timesteps)
    masks = torch.stack([mask_to_latent(item.target_mask, latent_size) for item in items]).to(sd.device)
    if control is not None:
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
        focus = {layer.name for layer in focus_layers(sd.unet)}
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
