"""Generate jobs: read the inputs from storage, make `count` pairs, write them out as they come."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.masks import bounding_box, foreground_mask, sample_target_mask
from models.methods.model_free import pair_seed, synthesize_pair
from models.methods.params import MaskSpec
from models.methods.registry import METHODS
from workers.context import JobContext
from workers.diffusion import stable_diffusion
from workers.outputs import GenerateOutputs

DIFFUSION_PAIRS_PER_CALL = 8  # outputs handed to a diffusion method at once (it batches them)


@dataclass
class Inputs:
    normals: list[Image.Image]
    exemplar_masks: list[np.ndarray]
    given_masks: list[np.ndarray]
    foregrounds: list[np.ndarray] | None


def run_generate(context: JobContext) -> dict:
    job = context.job
    method = METHODS[job["method"]]
    params = method.params_model.model_validate(job["params"])
    mask_spec = MaskSpec.model_validate(job["masks"])

    context.progress("loading inputs", 0, job["count"])
    normals = [context.load_image(context.exemplar(i)["image_key"]) for i in job["normals"]]
    inputs = Inputs(
        normals=normals,
        exemplar_masks=[context.load_mask(context.exemplar(i)["mask_key"]) for i in job["exemplars"]],
        given_masks=[context.load_mask(context.exemplar(i)["mask_key"]) for i in mask_spec.masks],
        foregrounds=[foreground_mask(n) for n in normals] if mask_spec.inside_foreground else None,
    )
    outputs = GenerateOutputs(context)
    if method.family == "model-free":
        _model_free(context, inputs, params, mask_spec, outputs)
    else:
        _anogen(context, inputs, params, mask_spec, outputs)
    context.progress("writing manifest", job["count"], job["count"])
    return outputs.finish()


def _model_free(context, inputs: Inputs, params, mask_spec, outputs) -> None:
    job = context.job
    for index in range(job["count"]):
        context.progress("generating", index, job["count"])
        pair = synthesize_pair(
            job["method"],
            index,
            job["seed"],
            inputs.normals,
            params=params,
            mask_spec=mask_spec,
            exemplar_masks=inputs.exemplar_masks,
            given_masks=inputs.given_masks,
            foregrounds=inputs.foregrounds,
        )
        outputs.add(
            index, pair.image, pair.mask, seed=pair.seed, normal=job["normals"][pair.normal_index], weak_label=False
        )


def _anogen(context, inputs: Inputs, params, mask_spec, outputs) -> None:
    from models.methods import anogen  # torch: only in the pool child that runs the job

    job = context.job
    sd = stable_diffusion()
    count, steps = job["count"], params.num_inference_steps
    with tempfile.TemporaryDirectory() as adapter:
        context.download_prefix(f"adapters/{job['adapter']}/", Path(adapter))
        for start in range(0, count, DIFFUSION_PAIRS_PER_CALL):
            indices = range(start, min(count, start + DIFFUSION_PAIRS_PER_CALL))
            items = [_box_item(job, inputs, mask_spec, index) for index in indices]

            def on_progress(_stage, done, total, start=start, size=len(items)):
                context.progress("denoising", start * steps + round(done / total * size * steps), count * steps)

            results = anogen.generate(
                sd, adapter, items, params, images_per_batch=DIFFUSION_PAIRS_PER_CALL, on_progress=on_progress
            )
            for index, result in zip(indices, results):
                outputs.add(
                    index,
                    result.image,
                    result.mask,
                    refined_mask=result.refined_mask,
                    seed=result.seed,
                    normal=job["normals"][index % len(inputs.normals)],
                    weak_label=result.weak_label,
                )


def _box_item(job: dict, inputs: Inputs, mask_spec: MaskSpec, index: int):
    """AnoGen paints inside a box: the bounding box of the target mask from the mask source."""
    normal_index = index % len(inputs.normals)
    normal = inputs.normals[normal_index]
    seed = pair_seed(job["seed"], index)
    target = sample_target_mask(
        mask_spec,
        mask_spec.source,
        np.random.default_rng(seed),
        (normal.height, normal.width),
        foreground=inputs.foregrounds[normal_index] if inputs.foregrounds else None,
        exemplar_masks=inputs.exemplar_masks,
        given_masks=inputs.given_masks,
        index=index,
    )
    return (normal, bounding_box(target), seed)
