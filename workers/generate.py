"""Generate jobs: read the inputs from storage, make `count` pairs, write them out."""

from models.masks import foreground_mask
from models.methods.model_free import MODEL_FREE, synthesize_pair
from models.methods.params import MaskSpec
from models.methods.registry import METHODS
from workers.context import JobContext
from workers.outputs import GenerateOutputs


def run_generate(context: JobContext) -> dict:
    job = context.job
    method = METHODS[job["method"]]
    params = method.params_model.model_validate(job["params"])
    mask_spec = MaskSpec.model_validate(job["masks"])

    context.progress("loading inputs", 0, job["count"])
    normals = [context.load_image(context.exemplar(i)["image_key"]) for i in job["normals"]]
    exemplar_masks = [context.load_mask(context.exemplar(i)["mask_key"]) for i in job["exemplars"]]
    given_masks = [context.load_mask(context.exemplar(i)["mask_key"]) for i in mask_spec.masks]
    foregrounds = [foreground_mask(n) for n in normals] if mask_spec.inside_foreground else None

    if job["method"] not in MODEL_FREE:
        raise NotImplementedError(f"no generate runner for {job['method']}")
    outputs = GenerateOutputs(context)
    for index in range(job["count"]):
        context.progress("generating", index, job["count"])
        pair = synthesize_pair(
            job["method"], index, job["seed"], normals, params=params, mask_spec=mask_spec,
            exemplar_masks=exemplar_masks, given_masks=given_masks, foregrounds=foregrounds,
        )
        outputs.add(
            index, pair.image, pair.mask, seed=pair.seed, normal=job["normals"][pair.normal_index],
            weak_label=False,
        )
    context.progress("writing manifest", job["count"], job["count"])
    return outputs.finish()
