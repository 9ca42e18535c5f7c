"""Textual inversion: learn the embedding vectors of new placeholder tokens, use them in prompts.

The model is shared by every job of the worker process, so nothing here changes it for good:
`placeholder_tokens` adds the tokens to a copy of the tokenizer and puts, for the duration of a
`with` block, an embedding module in the text encoder that serves the original table for known
ids and the placeholder vectors for the new ones. Training optimises only those vectors, so no
other row of the table can move; the original table object is put back on exit.

Training runs in the shared loop of training.py: reproducible (each step's randomness from
(seed, step)) and resumable from checkpoints exactly as the uninterrupted run would have gone.
"""

import copy
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTokenizer

from models.diffusion.loading import StableDiffusion, fresh_scheduler
from models.diffusion.sampling import encode_prompts
from models.diffusion.training import train
from models.methods.interface import Checkpoints

EMBEDDINGS_FILE = "learned_embeds.safetensors"  # diffusers' textual-inversion file name and layout
CONFIG_FILE = "adapter_config.json"


@dataclass
class LearnedEmbedding:
    """Placeholder tokens and their vectors (one row per token, float32, CPU)."""

    tokens: list[str]
    vectors: torch.Tensor

    @property
    def prompt(self) -> str:
        """The placeholder as it goes into a prompt."""
        return " ".join(self.tokens)

    def save(self, folder: Path, config: dict) -> None:
        """Write `learned_embeds.safetensors` ({first token: vectors}, as diffusers' loader reads it)
        and `adapter_config.json` (`config` plus the tokens and the embedding width)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({self.tokens[0]: self.vectors.contiguous()}, folder / EMBEDDINGS_FILE)
        full_config = {**config, "tokens": self.tokens, "embedding_dim": self.vectors.shape[1]}
        (folder / CONFIG_FILE).write_text(json.dumps(full_config, indent=2), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> tuple["LearnedEmbedding", dict]:
        """The embedding and the config saved by `save`."""
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        vectors = load_file(folder / EMBEDDINGS_FILE)[config["tokens"][0]]
        return cls(tokens=list(config["tokens"]), vectors=vectors.float()), config


def save_token_entries(folder: Path, embedding: LearnedEmbedding) -> None:
    """`learned_embeds.safetensors` with one entry per token, {token: vector}: diffusers' single-token
    layout for several tokens in one file (load each with `pipe.load_textual_inversion({token:
    vector}, token=token)`), for methods whose tokens stand for different things."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({token: vector.contiguous() for token, vector in zip(embedding.tokens, embedding.vectors)},
              folder / EMBEDDINGS_FILE)


def load_token_entries(folder: Path, tokens: Sequence[str]) -> LearnedEmbedding:
    """The `tokens` saved by `save_token_entries`, in that order."""
    entries = load_file(folder / EMBEDDINGS_FILE)
    missing = [token for token in tokens if token not in entries]
    if missing:
        raise ValueError(f"{EMBEDDINGS_FILE} has no vector for {missing}")
    return LearnedEmbedding(list(tokens), torch.stack([entries[token].float() for token in tokens]))


def placeholder_names(placeholder: str, num_vectors: int) -> list[str]:
    """One token per vector: "<x>", "<x>_1", "<x>_2", ... (diffusers' multi-vector convention)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def initial_vectors(sd: StableDiffusion, word: str, num_vectors: int) -> torch.Tensor:
    """(num_vectors, width) float32 copies of `word`'s embedding (the mean, if it spans several tokens)."""
    ids = sd.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"initializer {word!r} has no tokens")
    table = sd.text_encoder.get_input_embeddings().weight
    return table[ids].float().mean(dim=0).cpu().repeat(num_vectors, 1)


class TokenEmbeddingWithPlaceholders(torch.nn.Module):
    """The text encoder's token table, with the rows of ids from `first_new_id` on taken from `vectors`."""

    def __init__(self, table: torch.nn.Embedding, vectors: torch.Tensor, first_new_id: int):
        super().__init__()
        self.table = table
        # A float32 master copy (fp16 rows would lose Adam's small updates), never the caller's tensor,
        # which training would otherwise change in place.
        self.vectors = torch.nn.Parameter(vectors.detach().to(table.weight.device, torch.float32, copy=True),
                                          requires_grad=False)
        self.first_new_id = first_new_id

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.first_new_id
        known = self.table(torch.where(is_new, 0, input_ids))
        new = self.vectors.to(known.dtype)[torch.where(is_new, input_ids - self.first_new_id, 0)]
        return torch.where(is_new[..., None], new, known)


@contextmanager
def placeholder_tokens(
    sd: StableDiffusion, embedding: LearnedEmbedding
) -> Iterator[tuple[CLIPTokenizer, TokenEmbeddingWithPlaceholders]]:
    """Inside the block, prompts tokenized with the yielded tokenizer may use `embedding.tokens`.

    Yields (tokenizer, embedding module); the module's `vectors` is the parameter to train.
    """
    expected_width = sd.text_encoder.config.hidden_size
    if embedding.vectors.shape != (len(embedding.tokens), expected_width):
        raise ValueError(
            f"embedding of shape {tuple(embedding.vectors.shape)} does not fit this model: it needs "
            f"({len(embedding.tokens)}, {expected_width})"
        )
    tokenizer = copy.deepcopy(sd.tokenizer)
    first_new_id = len(tokenizer)
    if tokenizer.add_tokens(embedding.tokens) != len(embedding.tokens):
        raise ValueError(f"placeholder tokens {embedding.tokens} clash with the vocabulary")
    table = sd.text_encoder.get_input_embeddings()
    module = TokenEmbeddingWithPlaceholders(table, embedding.vectors, first_new_id)
    sd.text_encoder.set_input_embeddings(module)
    try:
        yield tokenizer, module
    finally:
        sd.text_encoder.set_input_embeddings(table)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """E||(target - prediction) * M||^2: with a mask, only the masked cells contribute."""
    error = prediction - target
    if mask is not None:
        error = error * mask
    return error.pow(2).mean()


def train_embedding(
    sd: StableDiffusion,
    latents: torch.Tensor,
    masks: torch.Tensor | None,
    *,
    tokens: list[str],
    initializer: str,
    templates: Sequence[str],
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    checkpoints: Checkpoints | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[LearnedEmbedding, dict[str, float]]:
    """Learn vectors for `tokens` so that the frozen UNet denoises `latents` given prompts naming them;
    return them and the loss's final value (training.train's: {"total": mean of the last steps}).

    latents: (N, 4, h, w) scaled VAE latents of the training images; masks: (N, 1, h, w) {0, 1}
    loss weights (None: plain loss). Each step draws `batch_size` examples with replacement,
    flips them at random (both axes, images and masks alike), noises them at random timesteps and
    fills a random template ("a photo of a {}") with the placeholder. Adam (no weight decay)
    updates only the placeholder vectors, through the shared training loop (training.py: its
    checkpoints resume a run exactly). on_progress(step, steps) runs after every step and may
    raise to stop training.
    """
    run = {  # what a checkpoint must have been made with to be resumed
        "trainer": "textual_inversion", "tokens": tokens, "initializer": initializer, "templates": list(templates),
        "seed": seed, "learning_rate": learning_rate, "batch_size": batch_size, "masked": masks is not None,
        "latents_shape": list(latents.shape),
    }
    scheduler = fresh_scheduler(sd)  # its noise schedule noises the training latents
    placeholder = " ".join(tokens)
    start = LearnedEmbedding(tokens, initial_vectors(sd, initializer, len(tokens)))
    with placeholder_tokens(sd, start) as (tokenizer, embedding):
        embedding.vectors.requires_grad_(True)

        def loss_at(_step: int, generator: torch.Generator) -> torch.Tensor:
            batch = _draw_batch(latents, masks, scheduler, templates, batch_size, generator)
            cond = encode_prompts(sd, [template.format(placeholder) for template in batch.templates], tokenizer)
            eps = sd.unet(batch.noisy.to(sd.device, sd.dtype), batch.t.to(sd.device), cond).sample
            mask = batch.masks.to(sd.device) if batch.masks is not None else None
            return masked_mse(eps.float(), batch.noise.to(sd.device), mask)

        final_losses = train(
            {"vectors": embedding.vectors}, torch.optim.Adam([embedding.vectors], lr=learning_rate), loss_at,
            steps=steps, seed=seed, run=run, device=sd.device, mixed_precision=sd.dtype == torch.float16,
            checkpoints=checkpoints, on_step=on_progress,
        )
        return LearnedEmbedding(tokens, embedding.vectors.detach().float().cpu().clone()), final_losses


class TrainingBatch(NamedTuple):
    noisy: torch.Tensor  # (B, 4, h, w) latents noised to t
    noise: torch.Tensor  # the noise added: the UNet's target
    t: torch.Tensor  # (B,) timesteps
    masks: torch.Tensor | None  # (B, 1, h, w) loss weights
    templates: list[str]


def _draw_batch(latents, masks, scheduler, templates, batch_size, generator) -> TrainingBatch:
    count, channels, height, width = latents.shape
    picks = torch.randint(count, (batch_size,), generator=generator)
    flips = torch.rand(batch_size, 2, generator=generator) < 0.5
    t = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    noise = torch.randn((batch_size, channels, height, width), generator=generator)
    template_picks = torch.randint(len(templates), (batch_size,), generator=generator)

    def augment(x: torch.Tensor) -> torch.Tensor:
        x = torch.where(flips[:, 0, None, None, None], x.flip(-1), x)
        return torch.where(flips[:, 1, None, None, None], x.flip(-2), x)

    return TrainingBatch(
        noisy=scheduler.add_noise(augment(latents.cpu()[picks]), noise, t),
        noise=noise,
        t=t,
        masks=augment(masks.cpu()[picks]) if masks is not None else None,
        templates=[templates[i] for i in template_picks],
    )
