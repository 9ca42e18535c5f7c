"""O2MAG's side of the method interface (models.methods.interface): the worker's calls into pipeline.py.

- References: the job's exemplars, spread over the outputs in turn (`Item.reference`). Each
  output's target mask is jittered from its own reference's mask.
- Per reference, once per job: its AGO embedding (from the cache when an earlier job on the same
  model, pixels and AGO params made it; else optimised and cached; with "ago" ablated, the
  prompt's own) and its DDIM inversion.
- Every pair's manifest entry records what the job ablated (`ablated`).
- Calls: the outputs of one (reference, normal image) pair, up to PAIRS_PER_CALL at a time: they
  share the normal image's inversion.
"""

import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from models.diffusion.adapters import ablated_components, model_fingerprint
from models.diffusion.loading import StableDiffusion, load_sd
from models.methods.interface import (
    GENERATING,
    Exemplar,
    GenerateRequest,
    Item,
    Pair,
    ProgressCallback,
    batched,
)
from models.methods.o2mag import pipeline

PAIRS_PER_CALL = 32


def calls(request: GenerateRequest) -> list[list[Item]]:
    shared: dict[tuple[int, int], list[Item]] = {}  # (reference, normal) -> its items, in order of first use
    for item in request.items:
        shared.setdefault((item.reference, item.normal), []).append(item)
    return [call for items in shared.values() for call in batched(items, PAIRS_PER_CALL)]


def generate(
    request: GenerateRequest, calls: Sequence[list[Item]], on_progress: ProgressCallback
) -> Iterator[list[Pair]]:
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device, request.precision)
    prepared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # reference -> (embedding, inverted path)
    ablated = ablated_components(request.params)  # no adapter: the job's own
    for call in calls:
        position = call[0].reference
        reference = request.exemplars[position]
        if position not in prepared:
            embedding = _ago_embedding(sd, request, reference, on_progress)
            path = pipeline.invert_reference(
                sd, reference.image, reference.mask, embedding, request.params,
                lambda done, total: on_progress("inverting the reference", done, total),
            )
            prepared[position] = embedding, path
        embedding, path = prepared[position]
        items = [
            (request.normals[item.normal], request.target_mask(item, exemplar_masks=[reference.mask]), item.seed)
            for item in call
        ]
        results = pipeline.generate(
            sd, reference.image, reference.mask, items, request.params, embedding=embedding, reference_path=path,
            on_progress=lambda _stage, done, total: on_progress(GENERATING, done, total),
        )
        yield [result.pair(item.index, reference=reference.id, ablated=ablated) for item, result in zip(call, results)]


def _ago_embedding(
    sd: StableDiffusion, request: GenerateRequest, reference: Exemplar, on_progress: ProgressCallback
) -> torch.Tensor:
    """The reference's AGO embedding: from the cache if an earlier job made it, else optimised and cached."""
    key_of_reference = pipeline.ago_cache_key(reference.image, reference.mask, request.params)
    key = f"{model_fingerprint(sd.model_dir)}/{key_of_reference}.safetensors"
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "embedding.safetensors"
        if request.cache is not None and request.cache.load(key, path):
            return pipeline.load_embedding(path)
        embedding = pipeline.optimize_embedding(
            sd, reference.image, reference.mask, request.params, seed=pipeline.AGO_SEED,
            on_progress=lambda _stage, done, total: on_progress("optimising the text embedding", done, total),
        )
        if request.cache is not None:
            pipeline.save_embedding(embedding, path)
            request.cache.save(key, path)
        return embedding
