"""AnomalyControl: controllable anomaly synthesis from cross-modal semantic features (He, Liu, Zhao,
"Learning Cross-modal Semantic Features for Controllable Anomaly Synthesis").

The prompt is a pair that need not match: a text-image reference (a defect image of any product,
with its defect word) and a targeted text prompt T_t = "a photo of a {product} with {defect}" for
the product being painted. The reference goes through a frozen BLIP-2 Q-Former with text input
(CSM, `csm.py`), focused on the defect by ASEA's guidance steps, giving C'; C' reaches SD 1.5
through decoupled cross-attention in all its cross-attention layers (SGA, `sga.py`), beside T_t.

Fine-tune: on the tenant's exemplars (image, mask, defect; any products), each its own reference
(I_a the exemplar, T_a its defect word) and T_t its product and defect; the LDM loss, only SGA's
W'_k, W'_v trained (AdamW, lr 1e-4, weight decay 0.01), with classifier-free-guidance dropout:
the text alone (to ""), C' alone (to zeros) and both, 5% each (IP-Adapter's scheme). The adapter
(`sga.safetensors` + `adapter_config.json`) records gamma, the templates, and fingerprints of the
SD and BLIP-2 checkpoints it was trained against: another checkpoint is refused at generate.

Generate: per reference, CSM + ASEA once -> C'. Per item, the defect is placed in its target mask
on a normal image by blended latent diffusion (Avrahami et al., which the paper cites): 30-step
DDIM from noise at guidance 7.5 (the paper's inference settings), unconditional ("", zeros),
and before every step the latents outside the mask (at latent size) are replaced by the normal
image's, noised to that step. Decoded, the generated region fades into the normal image's own
pixels across a ring of `mask_dilation` pixels on the mask's border, at most 3 of them outside it
(the label contract's band): beyond it every pixel is exact. The mask written is the target mask.

Ablations (`params.ablate`, the paper's rows): "asea", C' straight from the Q-Former without the
guidance steps; "sga", the plain SD UNet with T_t alone. Named on a fine-tune, the adapter records
them (`ablate` in its config; with SGA ablated nothing is trained) and every generate job on it runs
without them as well.

Choices where the paper is silent, or where a service needs more:
- Fine-tune computes each exemplar's C' once (the VLM is frozen and e_g is per reference), without
  flips or crops: C' describes the image as the UNet sees it. The loss is unmasked: SGA must learn
  to reproduce the whole exemplar, defect in its context, from T_t and C'.
- `train_steps` defaults to 2000: the paper's 30K iterations covered all of MVTec AD; a tenant's
  handful of exemplars needs far fewer. Not tuned on real weights (none in this workplace).
- gamma: at generate the adapter's (1) unless the job names one, as IP-Adapter's scale.
- Each output's noise comes from its seed alone (the starting noise, then one draw per step to
  noise the normal latents), so an output does not depend on its batch neighbours.
"""

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

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
from models.diffusion.generation import (
    GenerateItem,
    GenerateResult,
    blended_ddim,
    checked_items,
    painted_result,
    step_reporter,
)
from models.diffusion.images import (
    check_mask,
    check_mode,
    decode,
    encode,
    fade_into_normal,
    image_to_pixels,
)
from models.diffusion.loading import StableDiffusion, fresh_scheduler
from models.diffusion.sampling import encode_prompts
from models.diffusion.training import train
from models.errors import InputError
from models.methods.anomalycontrol import AnomalyControlParams
from models.methods.anomalycontrol.csm import TEXT_TEMPLATE, Blip2, SemanticFeatures, semantic_features
from models.methods.anomalycontrol.sga import SemanticGuidedAdapter
from models.methods.interface import Checkpoints, ProgressCallback, batched

METHOD = "anomalycontrol"
TARGET_TEMPLATE = "a photo of a {product} with {defect}"  # T_t, the targeted prompt
DEFAULT_GAMMA = 1.0


@dataclass(frozen=True)
class Reference:
    """A text-image reference: a defect image of any product, its mask and its words."""

    image: Image.Image  # "L" or "RGB"
    mask: np.ndarray  # bool (H, W): M_A
    product: str
    defect: str


def target_prompt(product: str, defect: str, template: str = TARGET_TEMPLATE) -> str:
    """T_t for painting `defect` on `product`."""
    return template.format(product=product, defect=defect)


def reference_features(blip2: Blip2, reference: Reference, params: AnomalyControlParams,
                       text_template: str = TEXT_TEMPLATE, ablated: Sequence[str] = ()) -> SemanticFeatures:
    """CSM + ASEA of one reference: C' with the defect in focus (with "asea" ablated: C' straight
    from the Q-Former, no guidance steps)."""
    steps = 0 if "asea" in ablated else params.asea_steps
    return semantic_features(blip2, reference.image, reference.mask, reference.defect, steps=steps,
                             step_size=params.asea_step_size, text_template=text_template)


def cfg_dropout(generator: torch.Generator, count: int, rates: tuple[float, float, float]):
    """Which of `count` training images drop their text and which their C': bool (count,) each.

    rates: the shares that drop the text alone, C' alone, and both (one uniform draw per image)."""
    text, features, both = rates
    draw = torch.rand(count, generator=generator)
    text_alone = draw < text
    features_alone = (text <= draw) & (draw < text + features)
    both_dropped = (text + features <= draw) & (draw < text + features + both)
    return text_alone | both_dropped, features_alone | both_dropped


@dataclass
class FineTuned:
    """What a fine-tune made: the trained adapter and the numbers that say whether it learnt."""

    adapter: SemanticGuidedAdapter
    # losses: {"ldm": the LDM loss, mean over the last steps}. sga_branch_share (at the start, at the end): the
    # decoupled branch's share of the cross-attention output (SemanticGuidedAdapter.branch_share) on a
    # batch of the exemplars. sga_weight_change: ||W' - W'_0|| / ||W'_0|| over the trained tensors.
    # asea_energy: E before and after the guidance steps, mean over the exemplars.
    diagnostics: dict


def finetune(
    sd: StableDiffusion,
    blip2: Blip2,
    exemplars: Sequence[Reference],
    params: AnomalyControlParams,
    *,
    seed: int,
    out_dir: str | Path,
    checkpoints: Checkpoints | None = None,
    on_progress: ProgressCallback | None = None,
) -> FineTuned:
    """Train SGA on the exemplars and write the adapter to `out_dir`; returns it with its diagnostics.

    params.ablate: "asea" trains on C' without the guidance steps; "sga" trains nothing (the plain
    SD UNet is the ablation row) and writes the untrained adapter; the config records both, so every
    generate job on the adapter drops them too. checkpoints: where this run's checkpoints go; if the
    folder holds one, training resumes from it. on_progress("train", step, train_steps) follows every
    step and may raise to stop.
    """
    # 1. Exemplars to latents: the LDM loss's targets.
    _check_references(exemplars)
    latents = encode(sd, torch.stack([image_to_pixels(e.image, params.resolution) for e in exemplars]))

    # 2. Text conditioning: each exemplar's T_t, and the empty prompt that text dropout uses.
    with torch.no_grad():
        prompts = encode_prompts(sd, [target_prompt(e.product, e.defect) for e in exemplars]).float()
        empty = encode_prompts(sd, [""]).float()

    # 3. CSM + ASEA on each exemplar, once: C' (the VLM is frozen).
    ablated = sorted(params.ablate)
    semantics = [reference_features(blip2, e, params, ablated=ablated) for e in exemplars]
    features = torch.stack([s.features for s in semantics]).to(sd.device)

    # 4. SGA on the UNet (W'_k, W'_v from each layer's own), trained with the LDM loss and CFG dropout
    #    (with SGA ablated nothing is: the plain SD UNet is that row).
    gamma = DEFAULT_GAMMA if params.gamma is None else params.gamma
    adapter = SemanticGuidedAdapter.from_unet(sd.unet, blip2.width, blip2.num_queries, gamma)
    scheduler = fresh_scheduler(sd)  # its noise schedule noises the training latents

    def loss_at(_step: int, generator: torch.Generator) -> torch.Tensor:
        picks = torch.randint(len(exemplars), (params.batch_size,), generator=generator)
        t = torch.randint(scheduler.config.num_train_timesteps, (params.batch_size,), generator=generator)
        noise = torch.randn((params.batch_size, *latents.shape[1:]), generator=generator).to(sd.device)
        drop_text, drop_features = (d.to(sd.device) for d in cfg_dropout(generator, params.batch_size,
                                                                           params.cfg_dropout))
        text = torch.where(drop_text[:, None, None], empty, prompts[picks])
        reference = torch.where(drop_features[:, None, None], 0.0, features[picks])
        noisy = scheduler.add_noise(latents[picks], noise, t.to(sd.device))
        eps = sd.unet(noisy.to(sd.dtype), t.to(sd.device),
                      encoder_hidden_states=adapter.condition(text, reference, sd.dtype)).sample
        return F.mse_loss(eps.float(), noise)

    # The diagnostics: ASEA's energies; the LDM loss, SGA's branch share on a fixed batch of the
    # exemplars before and after training, and how far W' moved (SGA ablated: nothing is trained).
    diagnostics = {"asea_energy": [float(np.mean([s.energies[0] for s in semantics])),
                                   float(np.mean([s.energies[-1] for s in semantics]))]}
    if "sga" in ablated:
        diagnostics.update(sga_branch_share=[0.0, 0.0], sga_weight_change=0.0)
    else:
        run = {"method": METHOD, "params": params.model_dump(mode="json"), "latents_shape": list(latents.shape),
               "exemplars": [[e.product, e.defect] for e in exemplars]}
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=params.learning_rate,
                                      weight_decay=params.weight_decay)
        initial = [parameter.detach().clone() for parameter in adapter.parameters()]
        share_batch = _share_batch(latents[:params.batch_size], prompts, features, scheduler, seed)
        with adapter.attached(sd.unet):
            share_at_start = _branch_share(sd, adapter, share_batch)
            losses = train(
                {"sga": adapter}, optimizer, loss_at, steps=params.train_steps, seed=seed, run=run,
                device=sd.device, mixed_precision=sd.dtype == torch.float16, checkpoints=checkpoints,
                on_step=(lambda done, total: on_progress("train", done, total)) if on_progress else None,
            )
            share_at_end = _branch_share(sd, adapter, share_batch)
        moved = torch.stack([(p.detach() - p0).norm() for p, p0 in zip(adapter.parameters(), initial)]).norm()
        diagnostics.update(losses={"ldm": losses.get("total")}, sga_branch_share=[share_at_start, share_at_end],
                           sga_weight_change=float(moved / torch.stack([p0.norm() for p0 in initial]).norm()))

    # 5. The adapter: sga.safetensors + adapter_config.json.
    out_dir = Path(out_dir)
    adapter.save(out_dir)
    write_adapter_config(
        out_dir, METHOD, gamma=gamma, templates={"text": TEXT_TEMPLATE, "target": TARGET_TEMPLATE},
        sd_fingerprint=model_fingerprint(sd.model_dir), blip2_fingerprint=model_fingerprint(blip2.model_dir),
        feature_width=blip2.width, num_tokens=blip2.num_queries, layers=adapter.layers, seed=seed,
        exemplars=[{"product": e.product, "defect": e.defect} for e in exemplars],
        params=params.model_dump(mode="json"), ablate=ablated,
    )
    return FineTuned(adapter, diagnostics)


def _share_batch(latents: torch.Tensor, prompts: torch.Tensor, features: torch.Tensor, scheduler, seed: int):
    """A batch on which to read SGA's branch share: the first exemplars (as many as `latents`), each
    once, with its T_t and C' (no dropout), noised to timesteps drawn from the seed: the same batch
    before and after training."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(scheduler.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
    noise = torch.randn(latents.shape, generator=generator).to(latents.device)
    count = len(latents)
    return scheduler.add_noise(latents, noise, t), t, prompts[:count], features[:count]


def _branch_share(sd: StableDiffusion, adapter: SemanticGuidedAdapter, batch) -> float:
    """SGA's branch share on `batch`, under the fp16 autocast training uses (the adapter is fp32 there)."""
    noisy, t, prompts, features = batch
    with torch.autocast(sd.device.type, dtype=torch.float16, enabled=sd.dtype == torch.float16):
        return adapter.branch_share(sd.unet, noisy.to(sd.dtype), t, adapter.condition(prompts, features, sd.dtype))


@dataclass
class LoadedAdapter:
    adapter: SemanticGuidedAdapter
    config: dict

    @property
    def text_template(self) -> str:
        return self.config["templates"]["text"]

    @property
    def target_template(self) -> str:
        return self.config["templates"]["target"]

    def ablated(self, params: AnomalyControlParams) -> list[str]:
        """What a generate job with `params` runs without: its own `ablate` and its fine-tune's."""
        return ablated_components(params, self.config)


def load_adapter(folder: str | Path, sd: StableDiffusion, blip2: Blip2, gamma: float | None = None) -> LoadedAdapter:
    """The adapter of an AnomalyControl fine-tune for these models (gamma: the config's unless given);
    InputError for another method's adapter or one trained against other SD or BLIP-2 checkpoints."""
    config = read_adapter_config(Path(folder), METHOD)
    check_base_model(config, "sd_fingerprint", sd.model_dir, "SD_MODEL_DIR")
    check_base_model(config, "blip2_fingerprint", blip2.model_dir, "BLIP2_MODEL_DIR")
    try:
        adapter = SemanticGuidedAdapter.load(Path(folder), sd.unet, config["feature_width"], config["num_tokens"],
                                             config["gamma"] if gamma is None else gamma)
    except (KeyError, ValueError) as error:
        raise InputError(f"the adapter does not fit these models: {error}") from None
    return LoadedAdapter(adapter, config)


def generate(
    sd: StableDiffusion,
    blip2: Blip2,
    adapter: str | Path | LoadedAdapter,
    reference: Reference,
    items: Sequence[GenerateItem | tuple[Image.Image, np.ndarray, int]],
    params: AnomalyControlParams,
    *,
    prompt: str | None = None,
    features: SemanticFeatures | None = None,
    images_per_batch: int = 8,
    on_progress: ProgressCallback | None = None,
) -> list[GenerateResult]:
    """One image per (normal image, target mask, seed) item, in order, with the reference's defect
    painted into the item's mask.

    prompt: T_t (default: the adapter's template with the reference's product and defect; a job
    passes its target product's). features: the reference's CSM + ASEA output, for a caller that
    serves several calls from one reference; None computes it here. on_progress("generate", steps
    done, steps in all) follows every denoising step. What is ablated (`adapter.ablated(params)`):
    "asea", C' without the guidance steps; "sga", the plain SD UNet with T_t alone (C' unused).
    """
    # 1. The adapter, the items, and C' of the reference (CSM + ASEA; none without SGA to read it).
    if not isinstance(adapter, LoadedAdapter):
        adapter = load_adapter(adapter, sd, blip2, params.gamma)
    ablated = adapter.ablated(params)
    sga = "sga" not in ablated
    items = checked_items(items, empty_masks=True)
    _check_references([reference])
    if features is None and sga:
        features = reference_features(blip2, reference, params, adapter.text_template, ablated)

    # 2. Conditioning: (T_t, C'), and the unconditional ("", zeros); T_t and "" alone without SGA.
    prompt = prompt or target_prompt(reference.product, reference.defect, adapter.target_template)
    with torch.no_grad():
        cond, uncond = encode_prompts(sd, [prompt, ""]).chunk(2)
        if sga:
            reference_tokens = features.features[None].to(sd.device)
            cond = adapter.adapter.condition(cond, reference_tokens, sd.dtype)
            uncond = adapter.adapter.condition(uncond, torch.zeros_like(reference_tokens), sd.dtype)

    # 3. Blended latent diffusion, batch by batch, with a fresh scheduler for the job.
    scheduler = fresh_scheduler(sd)
    scheduler.set_timesteps(params.num_inference_steps)
    batches = batched(items, images_per_batch)
    total = len(batches) * params.num_inference_steps
    results = []
    with adapter.adapter.attached(sd.unet) if sga else nullcontext():
        for number, batch in enumerate(batches):
            on_step = step_reporter(on_progress, number * params.num_inference_steps, total)
            latents = blended_ddim(sd, scheduler, batch, cond, uncond, params.resolution, params.guidance_scale,
                                   on_step)
            # 4. Decode, and fade each mask into the normal image across its border: exact beyond it.
            for item, pixels in zip(batch, decode(sd, latents)):
                image = fade_into_normal(item.normal, pixels, item.target_mask, params.mask_dilation)
                results.append(painted_result(item, image))
    return results


def _check_references(references: Sequence[Reference]) -> None:
    if not references:
        raise ValueError("AnomalyControl needs at least one exemplar")
    for number, reference in enumerate(references):
        check_mode(reference.image)
        check_mask(reference.mask, reference.image)
        if not np.any(reference.mask):
            raise ValueError(f"exemplar {number} has an empty mask: ASEA has no anomaly to focus on")
        if not reference.defect.strip():
            raise ValueError(f"exemplar {number} has no defect word: T_a and T_t name it")
