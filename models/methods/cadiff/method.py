"""CADiff's side of the method interface (models.methods.interface): the worker's calls into pipeline.py.

- Fine-tune: the exemplars (every defect type of one product; the API checks they show one
  product) and the job's normal images of that product, if any. The result: the steps run, what
  was ablated, and the adapter's diagnostics (final losses, the control's and the tokens' movement).
- Generate: the job's `defect` (one the adapter learnt; the API checks it) on its normal images;
  target masks from the job's mask source, 'exemplar' jittering the exemplars of that defect (all
  exemplars if none has it). Calls: up to PAIRS_PER_CALL items in one UNet batch. Every pair
  records what its job ran without (its own `ablate` and its adapter's).
"""

from collections.abc import Iterator, Sequence

from models.diffusion.adapters import ablated_components
from models.diffusion.loading import load_sd
from models.errors import InputError
from models.methods.cadiff import pipeline
from models.methods.interface import (
    GENERATING,
    FinetuneRequest,
    GenerateRequest,
    Item,
    Pair,
    ProgressCallback,
    batched,
)

PAIRS_PER_CALL = 8


def finetune(request: FinetuneRequest, on_progress: ProgressCallback) -> dict:
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device)
    images = [pipeline.TrainingImage(e.image, e.mask, e.defect or "anomaly") for e in request.exemplars]
    images += [pipeline.TrainingImage(request.normals[i], None, None) for i in range(len(request.normals))]
    adapter = pipeline.finetune(
        sd, images, request.params, product=request.exemplars[0].product, seed=request.seed,
        out_dir=request.adapter_dir, checkpoints=request.checkpoints,
        on_progress=lambda _stage, done, total: on_progress("training", done, total),
    )
    config = adapter.config
    return {"train_steps": config["params"]["train_steps"], "defects": sorted(adapter.defect_tokens),
            "exemplars": len(request.exemplars), "normals": len(request.normals), "ablated": config["ablate"],
            "diagnostics": config["diagnostics"]}


def calls(request: GenerateRequest) -> list[list[Item]]:
    return batched(request.items, PAIRS_PER_CALL)


def generate(
    request: GenerateRequest, calls: Sequence[list[Item]], on_progress: ProgressCallback
) -> Iterator[list[Pair]]:
    if request.adapter_dir is None:
        raise InputError("CADiff generate jobs need `adapter`: a cadiff fine-tune job id")
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device, request.precision)
    adapter = pipeline.load_adapter(request.adapter_dir, sd)
    ablated = ablated_components(request.params, adapter.config)
    # The job's defect (the API sets it), else the exemplars', else the adapter's only one.
    defect = request.defect or next((e.defect for e in request.exemplars if e.defect), None)
    if defect is None and len(adapter.defect_tokens) == 1:
        defect = next(iter(adapter.defect_tokens))
    shapes = [e.mask for e in request.exemplars if e.defect == defect] or None  # None: every exemplar's
    for call in calls:
        items = [(request.normals[item.normal], request.target_mask(item, exemplar_masks=shapes), item.seed)
                 for item in call]
        results = pipeline.generate(
            sd, adapter, items, request.params, defect=defect, images_per_batch=PAIRS_PER_CALL,
            on_progress=lambda _stage, done, total: on_progress(GENERATING, done, total),
        )
        yield [result.pair(item.index, defect=defect, ablated=ablated) for item, result in zip(call, results)]
