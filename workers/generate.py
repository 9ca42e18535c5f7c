"""Generate jobs: read the inputs from storage, make `count` pairs, write them out as they come."""

import hashlib
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
O2MAG_PAIRS_PER_CALL = 32  # outputs of one normal image per call: they share its inversion


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
    generate = _model_free if method.family == "model-free" else {"anogen": _anogen, "o2mag": _o2mag}[method.name]
    generate(context, inputs, params, mask_spec, outputs)
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
    count = job["count"]
    with tempfile.TemporaryDirectory() as adapter:
        context.download_prefix(f"adapters/{job['adapter']}/", Path(adapter))
        calls = [
            range(start, min(count, start + DIFFUSION_PAIRS_PER_CALL))
            for start in range(0, count, DIFFUSION_PAIRS_PER_CALL)
        ]
        _generate_in_calls(
            context,
            inputs,
            outputs,
            calls,
            lambda index: _box_item(job, inputs, mask_spec, index),
            lambda items, on_progress: anogen.generate(
                sd, adapter, items, params, on_progress=on_progress, images_per_batch=DIFFUSION_PAIRS_PER_CALL
            ),
        )


def _o2mag(context, inputs: Inputs, params, mask_spec, outputs) -> None:
    from models.methods import o2mag  # torch: only in the pool child that runs the job

    job = context.job
    sd = stable_diffusion()
    reference = context.exemplar(job["exemplars"][0])
    reference_image, reference_mask = context.load_image(reference["image_key"]), inputs.exemplar_masks[0]
    embedding = _ago_embedding(context, sd, o2mag, reference_image, reference_mask, params)

    # Outputs on the same normal image share its inversion, so each call takes one normal's outputs.
    count, normals = job["count"], len(inputs.normals)
    calls = []
    for first in range(min(normals, count)):
        on_this_normal = range(first, count, normals)
        calls += [
            on_this_normal[i : i + O2MAG_PAIRS_PER_CALL] for i in range(0, len(on_this_normal), O2MAG_PAIRS_PER_CALL)
        ]
    _generate_in_calls(
        context,
        inputs,
        outputs,
        calls,
        lambda index: _target_mask(job, inputs, mask_spec, index),
        lambda items, on_progress: o2mag.generate(
            sd, reference_image, reference_mask, items, params, embedding=embedding, on_progress=on_progress
        ),
    )


def _generate_in_calls(context, inputs: Inputs, outputs, calls, make_item, generate) -> None:
    """Run a diffusion method call by call (each a list of output indices) and store each call's
    outputs as soon as it returns. Progress counts outputs, interpolated within a call."""
    job = context.job
    done = 0
    for indices in calls:
        items = [make_item(index) for index in indices]

        def on_progress(_stage, step, total, done=done, size=len(items)):
            context.progress("generating", done + step * size // total, job["count"])

        for index, result in zip(indices, generate(items, on_progress)):
            outputs.add(
                index,
                result.image,
                result.mask,
                refined_mask=getattr(result, "refined_mask", None),
                seed=result.seed,
                normal=job["normals"][index % len(inputs.normals)],
                weak_label=getattr(result, "weak_label", False),
            )
        done += len(items)


def _ago_embedding(context, sd, o2mag, reference_image, reference_mask, params):
    """O2MAG's AGO text embedding for this reference: from the tenant's cache in storage when an
    earlier job made it with the same model, reference and AGO params; else optimised and cached."""
    model = hashlib.sha256(str(sd.model_dir).encode()).hexdigest()[:16]
    reference_key = o2mag.ago_cache_key(reference_image, reference_mask, params)
    key = f"cache/o2mag/{context.job['tenant']}/{model}/{reference_key}.safetensors"
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "embedding.safetensors"
        if context.storage.exists(key):
            context.storage.get_file(key, path)
            return o2mag.load_embedding(path)
        embedding = o2mag.optimize_embedding(
            sd,
            reference_image,
            reference_mask,
            params,
            seed=o2mag.AGO_SEED,
            on_progress=lambda _stage, done, total: context.progress("optimising the text embedding", done, total),
        )
        o2mag.save_embedding(embedding, path)
        context.storage.put_file(key, path)
        return embedding


def _target_mask(job: dict, inputs: Inputs, mask_spec: MaskSpec, index: int) -> tuple[Image.Image, np.ndarray, int]:
    """Output `index`: its normal image, its target mask from the mask source, and its seed."""
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
    return normal, target, seed


def _box_item(job: dict, inputs: Inputs, mask_spec: MaskSpec, index: int):
    """AnoGen paints inside a box: the bounding box of the target mask from the mask source."""
    normal, target, seed = _target_mask(job, inputs, mask_spec, index)
    return normal, bounding_box(target), seed
