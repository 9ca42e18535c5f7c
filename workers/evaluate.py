"""Evaluate jobs (queue `metrics`): train the downstream segmenter on each generated set and on the
baselines, score it on the real test set of a dataset, and store metrics.json, report.html and plots."""

import json
import tempfile
from pathlib import Path

from workers.context import JobContext, JobFailed


def run_evaluate(context: JobContext) -> dict:
    # torch: only in the pool child that runs the job
    from models.downstream.arms import GeneratedPair
    from models.downstream.evaluate import evaluate
    from models.downstream.mvtec import DatasetError, extract_archive
    from models.downstream.params import EvaluateParams

    job = context.job
    params = EvaluateParams.model_validate(job["params"])
    dataset = context.records.get_record("dataset", job["tenant"], job["dataset"])
    if dataset is None:
        raise JobFailed(f"dataset {job['dataset']} no longer exists; upload it again and resubmit")

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        # 1. The real dataset, unpacked (it was validated at upload).
        context.progress("loading dataset", 0, 1)
        context.storage.get_file(dataset["archive_key"], scratch / "archive")
        try:
            dataset_dir = extract_archive(scratch / "archive", scratch / "dataset")
        except DatasetError as exc:
            raise JobFailed(f"dataset {job['dataset']} cannot be read: {exc.message}") from None

        # 2. Each generate job's pairs, with the normal image each was made from.
        generated_sets = {}
        for generate_id in job["generated"]:
            pairs = _download_pairs(context, generate_id, scratch, GeneratedPair)
            generated_sets[_arm_name(context, generate_id)] = pairs

        # 3. Train and score every arm; write the report.
        output = scratch / "output"
        settings = context.settings
        metrics = evaluate(
            dataset_dir, generated_sets, params, output, device=settings.device, on_progress=context.progress,
            checkpoint_dir=scratch / "checkpoints",
            inception_weights=_weights(settings.inception_weights, "INCEPTION_WEIGHTS"),
            lpips_weights=_weights(settings.lpips_weights, "LPIPS_WEIGHTS"),
            precision=settings.downstream_precision,
        )
        context.upload_folder(output, context.prefix)
    return {
        "metrics": context.prefix + "metrics.json",
        "report": context.prefix + "report.html",
        "arms": sorted(metrics.get("arms", {})),
    }


def _weights(path: str | None, setting: str) -> Path | None:
    """A configured weights file, which must exist: a wrong path is a deployment error to report."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise JobFailed(f"{setting}={path} is not a file on this worker; fix the setting or unset it")
    return Path(path)


def _arm_name(context: JobContext, generate_id: str) -> str:
    job = context.records.get_job(generate_id, context.job["tenant"])
    return f"{job['method']}-{generate_id[:8]}"


def _download_pairs(context: JobContext, generate_id: str, scratch: Path, pair_type) -> list:
    prefix = f"jobs/{generate_id}/"
    try:
        manifest = json.loads(context.storage.get(prefix + "manifest.json"))
    except KeyError:
        raise JobFailed(f"generate job {generate_id} has no manifest.json; it did not finish") from None
    folder = scratch / generate_id
    normals = {}
    for normal_id in manifest["normals"]:
        record = context.exemplar(normal_id)
        normals[normal_id] = folder / "normals" / f"{normal_id}.png"
        normals[normal_id].parent.mkdir(parents=True, exist_ok=True)
        context.storage.get_file(record["image_key"], normals[normal_id])
    pairs = []
    for entry in manifest["pairs"]:
        image, mask = folder / entry["image"], folder / entry["mask"]
        for key, path in ((entry["image"], image), (entry["mask"], mask)):
            path.parent.mkdir(parents=True, exist_ok=True)
            context.storage.get_file(prefix + key, path)
        pairs.append(
            pair_type(
                image=image,
                mask=mask,
                defect=manifest["defect"],
                weak_label=entry.get("weak_label", False),
                source_normal=normals.get(entry["normal"]),
            )
        )
    return pairs
