"""AnomalyControl's side of the method interface (models.methods.interface): the worker's calls into pipeline.py.

- Fine-tune: every exemplar is a text-image reference (its image, mask, product and defect).
- Generate: the references are the job's exemplars, of any product, spread over the outputs in
  turn (`Item.reference`); each output's target mask is jittered from its own reference's mask
  (mask source 'exemplar', the default). The prompt is `prompt`, else T_t with the job's product
  (the one painted on) and the reference's defect.
- Per reference, once per job: CSM + ASEA, giving C'.
- Calls: the outputs of one reference, up to PAIRS_PER_CALL at a time, in one UNet batch.
"""

from collections.abc import Iterator, Sequence

from models.diffusion.loading import load_sd
from models.errors import InputError
from models.methods.anomalycontrol import pipeline
from models.methods.anomalycontrol.csm import SemanticFeatures, load_blip2
from models.methods.interface import (
    GENERATING,
    Exemplar,
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
    blip2 = load_blip2(request.weight_dirs.get("BLIP2_MODEL_DIR"), sd.device)
    finetuned = pipeline.finetune(
        sd, blip2, [_reference(exemplar) for exemplar in request.exemplars], request.params,
        seed=request.seed, out_dir=request.adapter_dir, checkpoints=request.checkpoints,
        on_progress=lambda _stage, done, total: on_progress("training", done, total),
    )
    return {"train_steps": request.params.train_steps, "exemplars": len(request.exemplars),
            "ablated": sorted(request.params.ablate), "diagnostics": finetuned.diagnostics}


def calls(request: GenerateRequest) -> list[list[Item]]:
    by_reference: dict[int, list[Item]] = {}  # reference -> its items, in order of first use
    for item in request.items:
        by_reference.setdefault(item.reference, []).append(item)
    return [call for items in by_reference.values() for call in batched(items, PAIRS_PER_CALL)]


def generate(
    request: GenerateRequest, calls: Sequence[list[Item]], on_progress: ProgressCallback
) -> Iterator[list[Pair]]:
    if request.adapter_dir is None:
        raise InputError("AnomalyControl generate jobs need `adapter`: an anomalycontrol fine-tune job id")
    sd = load_sd(request.weight_dirs.get("SD_MODEL_DIR"), request.device, request.precision)
    blip2 = load_blip2(request.weight_dirs.get("BLIP2_MODEL_DIR"), sd.device)
    adapter = pipeline.load_adapter(request.adapter_dir, sd, blip2, request.params.gamma)
    ablated = adapter.ablated(request.params)
    prepared: dict[int, SemanticFeatures] = {}  # reference -> its C'
    for call in calls:
        position = call[0].reference
        exemplar = request.exemplars[position]
        reference = _reference(exemplar, request.defect)
        details = {"reference": exemplar.id, "ablated": ablated}
        features = None  # without SGA nothing reads C'
        if "sga" not in ablated:
            if position not in prepared:
                on_progress("encoding the reference", 0, 1)
                prepared[position] = pipeline.reference_features(blip2, reference, request.params,
                                                                 adapter.text_template, ablated)
            features = prepared[position]
            details["asea_energy"] = [round(features.energies[0], 6), round(features.energies[-1], 6)]
        prompt = request.params.prompt or pipeline.target_prompt(
            request.product or exemplar.product, reference.defect, adapter.target_template
        )
        items = [
            (request.normals[item.normal], request.target_mask(item, exemplar_masks=[exemplar.mask]), item.seed)
            for item in call
        ]
        results = pipeline.generate(
            sd, blip2, adapter, reference, items, request.params, prompt=prompt, features=features,
            images_per_batch=PAIRS_PER_CALL,
            on_progress=lambda _stage, done, total: on_progress(GENERATING, done, total),
        )
        yield [result.pair(item.index, prompt=prompt, **details) for item, result in zip(call, results)]


def _reference(exemplar: Exemplar, defect: str | None = None) -> pipeline.Reference:
    return pipeline.Reference(exemplar.image, exemplar.mask, exemplar.product, exemplar.defect or defect or "defect")
