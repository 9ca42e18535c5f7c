"""AnoGen's side of the method interface (models.methods.interface): the worker's calls into pipeline.py."""

from collections.abc import Iterator, Sequence

from models.diffusion.adapters import ablated_components
from models.diffusion.loading import load_sd
from models.masks.sampling import bounding_box
from models.methods.anogen import pipeline
from models.methods.interface import (
    GENERATING,
    FinetuneRequest,
    GenerateRequest,
    Item,
    Pair,
    ProgressCallback,
    batched,
)

PAIRS_PER_CALL = 8  # items per call, all in one UNet batch


def finetune(request: FinetuneRequest, on_progress: ProgressCallback) -> dict:
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device)
    finetuned = pipeline.finetune(
        sd,
        [(exemplar.image, exemplar.mask) for exemplar in request.exemplars],
        request.params,
        seed=request.seed,
        out_dir=request.adapter_dir,
        checkpoints=request.checkpoints,
        on_progress=lambda _stage, done, total: on_progress("training", done, total),
    )
    return {"train_steps": request.params.train_steps, "ablated": sorted(request.params.ablate),
            "diagnostics": finetuned.diagnostics}


def calls(request: GenerateRequest) -> list[list[Item]]:
    return batched(request.items, PAIRS_PER_CALL)


def generate(
    request: GenerateRequest, calls: Sequence[list[Item]], on_progress: ProgressCallback
) -> Iterator[list[Pair]]:
    """Each item is painted inside the bounding box of its target mask: the box is its (weak) label.
    Every pair records what was ablated: by the job, and by the adapter's fine-tune."""
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device, request.precision)
    ablated = ablated_components(request.params, pipeline.adapter_config(request.adapter_dir))
    for call in calls:
        items = [(request.normals[item.normal], bounding_box(request.target_mask(item)), item.seed) for item in call]
        results = pipeline.generate(
            sd, request.adapter_dir, items, request.params, images_per_batch=PAIRS_PER_CALL,
            on_progress=lambda _stage, done, total: on_progress(GENERATING, done, total),
        )
        yield [result.pair(item.index, ablated=ablated) for item, result in zip(call, results)]
