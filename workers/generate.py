"""Generate jobs: the method's request from storage, then its pairs call by call, each call's
pairs stored as soon as they exist.

A redelivered job (its worker died) keeps the pairs already stored and makes only the calls it
is missing. A method splits a job into the same calls every time, so those come out exactly as
an uninterrupted run would have made them.
"""

import tempfile
from pathlib import Path

from models.methods.interface import GENERATING, GenerateRequest, Item, job_items
from models.methods.params import MaskSpec
from models.methods.registry import METHODS, implementation
from workers.context import JobContext, StorageCache
from workers.outputs import GenerateOutputs


def run_generate(context: JobContext) -> dict:
    job = context.job
    spec = METHODS[job["method"]]
    method = implementation(spec)
    with tempfile.TemporaryDirectory() as scratch:
        request = _request(context, spec, Path(scratch))
        outputs = GenerateOutputs(context, request.normals)
        todo = [call for call in method.calls(request) if not outputs.has_all(call)]
        progress = _CallProgress(context, todo)
        progress.pairs("loading the model")
        for pairs in method.generate(request, todo, progress.report):
            for pair in pairs:
                outputs.add(pair, request.items[pair.index])
            progress.call_done()
        context.progress("writing manifest", job["count"], job["count"])
        return outputs.finish()


def _request(context: JobContext, spec, scratch: Path) -> GenerateRequest:
    job = context.job
    masks = MaskSpec.model_validate(job["masks"])
    exemplars = [context.load_exemplar(i) for i in job["exemplars"]]
    normals = context.normal_images()
    adapter_dir = None
    if job["adapter"]:
        adapter_dir = scratch / "adapter"
        context.download_prefix(f"adapters/{job['adapter']}/", adapter_dir)
    return GenerateRequest(
        params=spec.params.model_validate(job["params"]),
        masks=masks,
        exemplars=exemplars,
        given_masks=[context.load_exemplar(i).mask for i in masks.masks],
        normals=normals,
        items=job_items(job["count"], job["seed"], len(normals), len(exemplars)),
        product=job["product"],
        defect=job["defect"],
        adapter_dir=adapter_dir,
        cache=StorageCache(context.storage, f"cache/{job['method']}/{job['tenant']}/"),
        weight_dirs=context.settings.weight_dirs,
        device=context.settings.device,
        precision=context.settings.generation_precision,
    )


class _CallProgress:
    """Job progress in pairs: those stored, plus the current call's share of its own steps."""

    def __init__(self, context: JobContext, todo: list[list[Item]]):
        self.context, self.sizes = context, [len(call) for call in todo]
        self.total = context.job["count"]
        self.done = self.total - sum(self.sizes)  # stored by an earlier delivery

    def report(self, stage: str, done: int, total: int) -> None:
        """The method's on_progress: the current call's steps, or a stage of its own as it is."""
        if stage == GENERATING:
            self.pairs(GENERATING, self.sizes[0] * done // total if total else 0)
        else:
            self.context.progress(stage, done, total)

    def call_done(self) -> None:
        self.done += self.sizes.pop(0)
        self.pairs(GENERATING)

    def pairs(self, stage: str, within_call: int = 0) -> None:
        self.context.progress(stage, self.done + within_call, self.total)
