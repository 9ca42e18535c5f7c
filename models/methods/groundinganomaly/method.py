"""GroundingAnomaly's side of the method interface (models.methods.interface): the worker's calls into pipeline.py.

- Fine-tune: the job's exemplars (any number of defect types, each its own token) and its normal
  images (MNT); the product is the exemplars' (one job per product).
- Generate: the job's `defect` must be one the adapter learnt. Target masks come from the job's
  mask source: 'exemplar' (the default) jitters the masks of the job's exemplars of that defect
  type (all of them if none has it); 'learned' samples the adapter's mask embedding of it, the
  masks of a call in one batch, each from its own item's seed.
- Calls: up to PAIRS_PER_CALL items, in one UNet batch.
- Ablations (`params.ablate`): a fine-tune's are recorded in its adapter and its result (with the
  diagnostics: final loss, how far the gates opened); every pair's manifest entry names those it
  ran without (the job's and its adapter's).
"""

from collections.abc import Iterator, Sequence

import numpy as np

from models.diffusion.loading import load_sd
from models.errors import InputError
from models.methods.groundinganomaly import pipeline
from models.methods.groundinganomaly.scm import load_convnext
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
MASK_SAMPLING = "sampling the learned masks"


def mask_seed(item: Item) -> int:
    """The seed of an item's learned mask: its own, so that its mask does not depend on its call."""
    return int(np.random.SeedSequence([item.seed, 1]).generate_state(1)[0])


def finetune(request: FinetuneRequest, on_progress: ProgressCallback) -> dict:
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device)
    convnext = load_convnext(request.weight_dirs.get("CONVNEXT_MODEL_DIR"), sd.device)
    products = list(dict.fromkeys(exemplar.product for exemplar in request.exemplars))
    if len(products) > 1:
        raise InputError(f"a GroundingAnomaly fine-tune learns one product; the exemplars show {', '.join(products)}")
    exemplars = [pipeline.Exemplar(e.image, e.mask, e.defect or "defect") for e in request.exemplars]
    adapter = pipeline.finetune(
        sd, convnext, exemplars, [request.normals[i] for i in range(len(request.normals))], request.params,
        product=products[0], seed=request.seed, out_dir=request.adapter_dir, checkpoints=request.checkpoints,
        on_progress=on_progress,
    )
    return {"train_steps": request.params.train_steps, "product": adapter.product, "defects": adapter.defects,
            "exemplars": len(exemplars), "normals": adapter.config["normals"], "ablated": adapter.config["ablate"],
            "diagnostics": adapter.config["diagnostics"]}


def calls(request: GenerateRequest) -> list[list[Item]]:
    return batched(request.items, PAIRS_PER_CALL)


def generate(
    request: GenerateRequest, calls: Sequence[list[Item]], on_progress: ProgressCallback
) -> Iterator[list[Pair]]:
    if request.adapter_dir is None:
        raise InputError("GroundingAnomaly generate jobs need `adapter`: a groundinganomaly fine-tune job id")
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device, request.precision)
    convnext = load_convnext(request.weight_dirs.get("CONVNEXT_MODEL_DIR"), sd.device)
    adapter = pipeline.load_adapter(request.adapter_dir, sd, convnext)
    defect = request.defect or (request.exemplars[0].defect if request.exemplars else None) or ""
    adapter.defect_index(defect)  # a defect type the adapter did not learn fails before any work
    own_masks = [e.mask for e in request.exemplars if e.defect == defect] or None

    for call in calls:
        sampled = [None] * len(call)  # the call's learned masks, sampled in one batch
        if request.masks.source == "learned":
            on_progress(MASK_SAMPLING, 0, len(call))
            sampled = pipeline.sample_masks(sd, adapter, defect, [mask_seed(item) for item in call], request.params)
        items = [(request.normals[item.normal],
                  request.target_mask(item, exemplar_masks=own_masks, learned=lambda _rng, mask=mask: mask),
                  item.seed) for item, mask in zip(call, sampled)]
        results = pipeline.generate(
            sd, adapter, items, request.params, defect=defect,
            on_progress=lambda _stage, done, total: on_progress(GENERATING, done, total),
        )
        details = {"defect": defect, "mask_source": request.masks.source}
        yield [result.pair(item.index, **details) for item, result in zip(call, results)]
