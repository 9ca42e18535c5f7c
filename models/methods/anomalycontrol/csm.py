"""Cross-modal semantic modelling (CSM) with anomaly-semantic enhanced attention (ASEA): the BLIP-2 side.

CSM: a frozen BLIP-2 Q-Former with text input (transformers' `Blip2ForImageTextRetrieval`, the
image-text matching set-up) reads the visual anomaly descriptor I_a (the reference image, through
the ViT) and the textual one T_a = "This is an image with {defect}"; its learned queries attend
to the image patches (cross-attention) and, in the same self-attention, to T_a's tokens. The query
outputs are C', the cross-modal semantic features (num_query_tokens x Q-Former width).

ASEA: a guidance variable e_g, shaped like the visual embeddings and starting at zero, is added to
them before the Q-Former; T_g gradient steps on e_g minimise

    E = (1 - sum_{i in M_A} A_i / sum_i A_i)^2,

A being the attention of T_a's [anomaly] tokens over the image patches and M_A the reference mask
at the patch grid, so that C' is made from what lies inside the defect. Only the queries attend
to the image, so A is chained: in each Q-Former layer l with cross-attention, the queries'
attention over the patches (layer l's cross-attention) is carried to the text by the [anomaly]
tokens' attention over the queries in the next layer's self-attention (where the text first sees
the queries after they read the patches); each map averaged over its heads, the products over the
[anomaly] tokens and the layer pairs.

Choices where the paper is silent:
- The step: e_g <- e_g - step_size * rms(v) * g / rms(g), with g = dE/de_g and v the visual
  embeddings: a normalised gradient step, so that `step_size` is a fraction of the embeddings'
  scale whatever the checkpoint's gradient magnitudes (the paper gives no step size; real weights
  were not available here to tune one). A zero gradient (M_A covering the grid) ends the steps.
- M_A at the patch grid by max-pooling (a patch is in M_A if any of its pixels is), as the latent
  masks are: thin defects do not vanish on a 16 x 16 grid.
- The ViT runs once per reference, without gradients (e_g enters after it); the Q-Former runs
  T_g + 1 times: the last run gives C' and the final energy.
- Everything is fp32 (the Q-Former is kept fp32 by BLIP-2 itself; the ViT too, for the gradients'
  sake), with eager attention, whose weights the forward hooks read.
"""

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BaseImageProcessor,
    Blip2ForImageTextRetrieval,
    PreTrainedTokenizerBase,
)

from models.diffusion.images import check_mask, check_mode, mask_to_latent
from models.diffusion.loading import ModelUnavailable
from models.weights import blip2_dir_problem

TEXT_TEMPLATE = "This is an image with {defect}"  # T_a, the textual anomaly descriptor


@dataclass(eq=False)
class Blip2:
    """The loaded BLIP-2 of one directory, on one device, fp32, frozen, eager attention."""

    model_dir: Path
    model: Blip2ForImageTextRetrieval
    tokenizer: PreTrainedTokenizerBase  # the directory's BERT tokenizer
    image_processor: BaseImageProcessor  # the directory's BLIP image processor (PIL backend: no torchvision)
    device: torch.device

    @property
    def width(self) -> int:
        """Width of C': the Q-Former's hidden size."""
        return self.model.config.qformer_config.hidden_size

    @property
    def num_queries(self) -> int:
        return self.model.config.num_query_tokens

    @property
    def patch_grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        return vision.image_size // vision.patch_size, vision.image_size // vision.patch_size


@dataclass
class SemanticFeatures:
    """CSM + ASEA of one reference."""

    features: torch.Tensor  # C': (num_queries, width) float32, CPU
    guidance: torch.Tensor  # e_g after the steps, like the visual embeddings (tokens, vision width), CPU
    energies: list[float]  # E at e_g = 0, then after each step
    attention: torch.Tensor  # the chained [anomaly]-token map over the patch grid (rows, cols), at the final e_g


def load_blip2(model_dir: str | Path | None, device: str | torch.device | None = None) -> Blip2:
    """The BLIP-2 in `model_dir` (a `Blip2ForImageTextRetrieval` checkpoint with its tokenizer and
    image processor) on `device`, loaded once per process. ModelUnavailable when it is not usable."""
    problem = blip2_dir_problem(str(model_dir) if model_dir else None)
    if problem:
        raise ModelUnavailable(f"this worker cannot load BLIP-2: {problem}")
    return _load(Path(model_dir).resolve(), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))


@functools.cache
def _load(model_dir: Path, device: torch.device) -> Blip2:
    model, info = Blip2ForImageTextRetrieval.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", local_files_only=True, output_loading_info=True,
    )
    # Another BLIP-2 (e.g. a captioning one) loads as this class with the Q-Former's text parts left random.
    missing = sorted(key for key in info["missing_keys"] if key.startswith(("embeddings.", "qformer.", "query_tokens")))
    if not model.config.qformer_config.use_qformer_text_input:
        missing.insert(0, "use_qformer_text_input is off in its config")
    if missing:
        raise ModelUnavailable(
            f"BLIP2_MODEL_DIR {model_dir} lacks the Q-Former's text input ({', '.join(missing[:3])}, ...): it needs "
            "an image-text matching checkpoint such as Salesforce/blip2-itm-vit-g"
        )
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil", local_files_only=True)
    return Blip2(model_dir=model_dir, model=model, tokenizer=tokenizer, image_processor=image_processor, device=device)


def semantic_features(
    blip2: Blip2,
    image: Image.Image,
    mask: np.ndarray,
    defect: str,
    *,
    steps: int = 3,
    step_size: float = 0.1,
    text_template: str = TEXT_TEMPLATE,
) -> SemanticFeatures:
    """C' of a reference (image, mask M_A, defect word) after `steps` ASEA steps of `step_size`;
    `text_template` makes T_a (an adapter records the one it was trained with)."""
    check_mode(image)
    check_mask(mask, image)
    if not np.any(mask):
        raise ValueError("the reference mask is empty: ASEA has no anomaly to focus on")

    # 1. The visual embeddings v of I_a (the ViT's output, the Q-Former's keys and values).
    pixels = blip2.image_processor(images=image.convert("RGB"), return_tensors="pt").pixel_values
    with torch.no_grad():
        visual = blip2.model.vision_model(pixel_values=pixels.to(blip2.device)).last_hidden_state

    # 2. T_a, and which of its tokens are the [anomaly] words.
    text = blip2.tokenizer(text_template.format(defect=defect), return_tensors="pt")
    anomaly_tokens = anomaly_token_positions(blip2.tokenizer, text_template, defect)

    # 3. M_A at the patch grid.
    rows, cols = blip2.patch_grid
    inside = mask_to_latent(mask, rows).flatten().to(blip2.device)

    # 4. ASEA: normalised gradient steps on e_g; the last Q-Former run gives C'.
    guidance = torch.zeros_like(visual)
    energies = []
    scale = visual.pow(2).mean().sqrt()
    for step in range(steps + 1):
        guidance.requires_grad_(step < steps)
        with torch.enable_grad() if step < steps else torch.no_grad():
            features, attention = _qformer(blip2, visual + guidance, text, anomaly_tokens)
            energy = (1 - (attention * inside).sum() / attention.sum()) ** 2
        energies.append(float(energy.detach()))
        if step == steps:
            break
        (gradient,) = torch.autograd.grad(energy, guidance)
        norm = gradient.pow(2).mean().sqrt()
        if norm == 0:
            energies += energies[-1:] * (steps - step)
            break
        guidance = (guidance - step_size * scale * gradient / norm).detach()
    return SemanticFeatures(
        features=features[0].detach().float().cpu(),
        guidance=guidance[0].detach().cpu(),
        energies=energies,
        attention=attention.detach().reshape(rows, cols).cpu(),
    )


def anomaly_token_positions(tokenizer: PreTrainedTokenizerBase, text_template: str, defect: str) -> list[int]:
    """The positions of the defect word's tokens in T_a = `text_template` with `defect`, [CLS] at 0:
    those after the template's prefix (WordPiece splits each word on its own, so the prefix keeps
    its tokens)."""
    prefix = len(tokenizer(text_template.split("{defect}")[0]).input_ids) - 1  # without its [SEP]
    words = len(tokenizer(defect, add_special_tokens=False).input_ids)
    if not words:
        raise ValueError(f"the defect word {defect!r} has no tokens")
    return list(range(prefix, prefix + words))


def _qformer(blip2: Blip2, visual: torch.Tensor, text, anomaly_tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The query outputs C' (1, queries, width) and the chained [anomaly]-token map A (patches,)."""
    model, queries = blip2.model, blip2.num_queries
    query_tokens = model.query_tokens.expand(visual.shape[0], -1, -1)
    embeddings = model.embeddings(input_ids=text.input_ids.to(blip2.device), query_embeds=query_tokens)
    attention_mask = torch.cat([torch.ones(query_tokens.shape[:2], dtype=torch.long),
                                text.attention_mask], dim=1).to(blip2.device)
    with _attention_weights(model) as maps:
        output = model.qformer(
            query_embeds=embeddings, query_length=queries, attention_mask=attention_mask,
            encoder_hidden_states=visual,
            encoder_attention_mask=torch.ones(visual.shape[:2], dtype=torch.long, device=blip2.device),
        )
    text_rows = [queries + token for token in anomaly_tokens]
    chained = []
    for layer, cross in maps["cross"].items():
        if layer + 1 in maps["self"]:
            text_to_queries = maps["self"][layer + 1].mean(dim=1)[:, text_rows, :queries]  # (1, anomaly, queries)
            queries_to_patches = cross.mean(dim=1)[:, :, 1:]  # (1, queries, patches): the class token left out
            chained.append((text_to_queries @ queries_to_patches).mean(dim=1))
    if not chained:
        raise ValueError("this Q-Former has no self-attention after a cross-attention layer: no chained map")
    return output.last_hidden_state[:, :queries], torch.stack(chained).mean(dim=0)[0]


@contextmanager
def _attention_weights(model: Blip2ForImageTextRetrieval) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Inside the block, each Q-Former run fills {"self": {layer: weights}, "cross": {layer: weights}}
    with the (batch, heads, queries, keys) attention weights of every layer (eager attention returns them)."""
    maps: dict[str, dict[int, torch.Tensor]] = {"self": {}, "cross": {}}
    handles = []
    for index, layer in enumerate(model.qformer.encoder.layer):
        parts = [("self", layer.attention.attention)]
        if layer.has_cross_attention:
            parts.append(("cross", layer.crossattention.attention))
        for kind, module in parts:
            def keep(_module, _inputs, output, kind=kind, index=index):
                maps[kind][index] = output[1]
            handles.append(module.register_forward_hook(keep))
    try:
        yield maps
    finally:
        for handle in handles:
            handle.remove()
