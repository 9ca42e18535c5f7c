"""Fine-tune jobs: learn an adapter from the exemplars and store it under adapters/<job id>/.

Training checkpoints go to storage (jobs/<id>/checkpoint/) as they are written, so a job whose
worker died resumes where its last checkpoint left off, on whichever worker gets it next.
"""

import tempfile
from pathlib import Path

from models.methods.registry import METHODS
from workers.context import JobContext
from workers.diffusion import stable_diffusion

CHECKPOINT_EVERY = 250  # steps


def run_finetune(context: JobContext) -> dict:
    from models.methods import anogen  # torch: only in the pool child that runs the job

    job = context.job
    params = METHODS[job["method"]].params_model.model_validate(job["params"])
    context.progress("loading model", 0, params.train_steps)
    sd = stable_diffusion()
    exemplars = []
    for exemplar_id in job["exemplars"]:
        record = context.exemplar(exemplar_id)
        exemplars.append((context.load_image(record["image_key"]), context.load_mask(record["mask_key"])))

    checkpoint_prefix = context.prefix + "checkpoint/"
    adapter_prefix = f"adapters/{job['id']}/"
    with tempfile.TemporaryDirectory() as scratch:
        checkpoints, adapter = Path(scratch) / "checkpoint", Path(scratch) / "adapter"
        context.download_prefix(checkpoint_prefix, checkpoints)

        def on_progress(_stage: str, done: int, total: int) -> None:
            if done % CHECKPOINT_EVERY == 0 and checkpoints.is_dir():
                context.upload_folder(checkpoints, checkpoint_prefix)
            context.progress("training", done, total)

        anogen.finetune(
            sd,
            exemplars,
            params,
            seed=job["seed"],
            out_dir=adapter,
            checkpoint_dir=checkpoints,
            checkpoint_every=CHECKPOINT_EVERY,
            on_progress=on_progress,
        )
        files = context.upload_folder(adapter, adapter_prefix)
    context.storage.delete_prefix(checkpoint_prefix)
    return {"adapter": adapter_prefix, "files": files, "train_steps": params.train_steps}
