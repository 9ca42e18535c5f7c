"""Fine-tune jobs: learn an adapter from the exemplars and store it under adapters/<job id>/.

Training checkpoints go to storage (jobs/<id>/checkpoint/) as they are written, so a job whose
worker died resumes where its last checkpoint left off, on whichever worker gets it next. This is
the same for every fine-tune method: each trains through models.diffusion.training, which writes
them and calls back here.
"""

import tempfile
from pathlib import Path

from models.methods.interface import Checkpoints, FinetuneRequest
from models.methods.registry import METHODS, implementation
from workers.context import JobContext


def run_finetune(context: JobContext) -> dict:
    job = context.job
    spec = METHODS[job["method"]]
    params = spec.params.model_validate(job["params"])
    context.progress("loading inputs", 0, params.train_steps)
    checkpoint_prefix = context.prefix + "checkpoint/"
    adapter_prefix = f"adapters/{job['id']}/"
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint_dir, adapter_dir = Path(scratch) / "checkpoint", Path(scratch) / "adapter"
        context.download_prefix(checkpoint_prefix, checkpoint_dir)
        request = FinetuneRequest(
            params=params,
            exemplars=[context.load_exemplar(i) for i in job["exemplars"]],
            normals=context.normal_images(),
            seed=job["seed"],
            adapter_dir=adapter_dir,
            checkpoints=Checkpoints(
                checkpoint_dir, context.settings.finetune_checkpoint_every,
                saved=lambda: context.upload_folder(checkpoint_dir, checkpoint_prefix),
            ),
            weight_dirs=context.settings.weight_dirs,
            device=context.settings.device,
        )
        summary = implementation(spec).finetune(request, context.progress)
        files = context.upload_folder(adapter_dir, adapter_prefix)
    context.storage.delete_prefix(checkpoint_prefix)
    return {"adapter": adapter_prefix, "files": files, **summary}
