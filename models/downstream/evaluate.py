"""The evaluate job: train a segmenter on each set of synthetic pairs, score it on real defects.

``evaluate`` is what the metrics worker calls. For each arm (each generated set, their
combination, and the baselines) it:

1. trains a U-Net on the arm's pairs plus the real normal images (``train``);
2. trains a defect-type classifier on the arm's images when it has two or more defect types
   (``classify``);
3. runs both over the real test set once, streaming: pixel, image and region metrics overall and
   per defect type (``metrics``), and classification accuracy;
4. adds mask fidelity and generation metrics (``fidelity``).

It writes metrics.json, report.html and the report's PNGs into ``output_dir`` and returns the
metrics.json content. The real data follows the few-shot split of ``mvtec.few_shot_split``.
"""

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.downstream.arms import (
    Arm,
    GeneratedPair,
    combine_arms,
    exemplar_paste_arm,
    load_generated_arm,
    model_free_arm,
)
from models.downstream.classify import classification_accuracy, predict_classes, train_classifier
from models.downstream.data import image_channels, image_tensor, mask_array, mask_tensor, open_image
from models.downstream.fidelity import generation_metrics
from models.downstream.metrics import SegmentationMetrics, image_evidence
from models.downstream.mvtec import FewShotSplit, few_shot_split
from models.downstream.params import EvaluateParams
from models.downstream.report import Example, write_report
from models.downstream.train import ProgressCallback, predict, train_segmenter
from models.host_memory import reused_host_memory
from models.precision import Precision, autocast_dtype, precision_name

EXAMPLES_PER_DEFECT = 2
EXAMPLE_SIZE = 128
SCORE_BATCH = 32  # test images per forward pass: fewer, larger oneDNN calls than the training batch


@dataclass(frozen=True)
class RealData:
    """The real dataset, decoded once per job and shared by every arm: normals, exemplars and test
    images at the model's resolution, and the test set's masks at their own size (metrics are
    computed there)."""

    split: FewShotSplit
    channels: int
    normals: torch.Tensor  # uint8 (M, C, R, R)
    exemplar_images: torch.Tensor  # uint8 (E, C, R, R)
    exemplar_masks: torch.Tensor  # bool (E, 1, R, R)
    exemplar_defects: list[str]
    test_images: torch.Tensor  # uint8 (T, C, R, R), in split.test's order
    test_masks: list[np.ndarray]  # bool (H, W) at each test image's own size; all False for test/good


@dataclass
class TestScores:
    overall: SegmentationMetrics = field(default_factory=SegmentationMetrics)
    per_defect: dict[str, SegmentationMetrics] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)
    predicted_classes: list[int] = field(default_factory=list)
    true_classes: list[int] = field(default_factory=list)


def load_real_data(dataset_dir: Path, resolution: int, split: FewShotSplit | None = None) -> RealData:
    """The dataset's few-shot split (or ``split``, e.g. ``mvtec.exemplar_validation_split``), decoded."""
    split = split or few_shot_split(dataset_dir)
    if not split.normals:
        raise ValueError(f"{dataset_dir}: train/good holds no images")
    channels = image_channels(split.normals)
    exemplars = [exemplar for defect in split.defects for exemplar in split.exemplars[defect]]
    test_images, test_masks = [], []
    for item in split.test:
        original = open_image(item.path)
        test_images.append(image_tensor(original, resolution, channels))
        width, height = original.size
        test_masks.append(mask_array(item.mask) if item.mask is not None else np.zeros((height, width), bool))
    return RealData(
        split=split, channels=channels,
        normals=torch.stack([image_tensor(path, resolution, channels) for path in split.normals]),
        exemplar_images=torch.stack([image_tensor(e.path, resolution, channels) for e in exemplars])
        if exemplars else torch.zeros(0, channels, resolution, resolution, dtype=torch.uint8),
        exemplar_masks=torch.stack([mask_tensor(e.mask, resolution) for e in exemplars])
        if exemplars else torch.zeros(0, 1, resolution, resolution, dtype=torch.bool),
        exemplar_defects=[exemplar.defect for exemplar in exemplars],
        test_images=torch.stack(test_images)
        if test_images else torch.zeros(0, channels, resolution, resolution, dtype=torch.uint8),
        test_masks=test_masks,
    )


def evaluate(
    dataset_dir: Path,
    generated_sets: Mapping[str, Sequence[GeneratedPair]],
    params: EvaluateParams,
    output_dir: Path,
    *,
    device: str | torch.device | None = None,
    on_progress: ProgressCallback | None = None,
    checkpoint_dir: Path | None = None,
    inception_weights: Path | None = None,
    lpips_weights: Path | None = None,
    precision: Precision = "fp32",
) -> dict:
    """Evaluate each generated set (name -> pairs), their combination and, with ``params.baselines``,
    the DRAEM and exemplar copy-paste baselines. See the module docstring; returns metrics.json."""
    real = load_real_data(Path(dataset_dir), params.resolution)
    arms = [load_generated_arm(name, pairs, params.resolution, real.channels) for name, pairs in generated_sets.items()]
    if len(arms) > 1:
        arms.append(combine_arms("combined", arms))
    skipped = {}
    if params.baselines:
        arms.append(model_free_arm("baseline_draem", "draem", real.normals, params.baseline_pairs, params.seed))
        if real.exemplar_masks.any():
            arms.append(exemplar_paste_arm(
                "baseline_exemplars", real.normals, real.exemplar_images, real.exemplar_masks,
                real.exemplar_defects, params.baseline_pairs, params.seed,
            ))
        else:
            skipped["baseline_exemplars"] = "no exemplars: a defect type needs 3 or more test images to give one"
    if not arms:
        raise ValueError("nothing to evaluate: no generated sets and baselines are off")
    return evaluate_arms(real, arms, params, Path(output_dir), device=device, on_progress=on_progress,
                         checkpoint_dir=checkpoint_dir, inception_weights=inception_weights,
                         lpips_weights=lpips_weights, skipped=skipped, precision=precision)


def evaluate_arms(
    real: RealData,
    arms: Sequence[Arm],
    params: EvaluateParams,
    output_dir: Path,
    *,
    device: str | torch.device | None = None,
    on_progress: ProgressCallback | None = None,
    checkpoint_dir: Path | None = None,
    inception_weights: Path | None = None,
    lpips_weights: Path | None = None,
    skipped: Mapping[str, str] | None = None,
    precision: Precision = "fp32",
) -> dict:
    """Train, score and report every arm; write metrics.json and report.html into ``output_dir``.

    ``precision``: autocast on the CPU (``models.precision``): the segmenter's training and scoring.
    """
    started = time.monotonic()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    results, scores_by_arm = {}, {}
    with reused_host_memory():  # every training step allocates the same activations again
        for number, arm in enumerate(arms, start=1):
            results[arm.name], scores_by_arm[arm.name] = evaluate_arm(
                arm, real, params, device=device,
                on_progress=_prefixed(on_progress, f"arm {number}/{len(arms)} {arm.name}"),
                checkpoint=checkpoint_dir / f"{arm.name}.pt" if checkpoint_dir is not None else None,
                inception_weights=inception_weights, lpips_weights=lpips_weights, precision=precision,
            )

    metrics = {
        "params": params.model_dump(),
        "dataset": {
            "normal_images": len(real.normals),
            "exemplars": {d: len(real.split.exemplars[d]) for d in real.split.defects},
            "test_images": {d: sum(item.defect == d for item in real.split.test)
                            for d in ["good"] + real.split.defects},
        },
        "arms": results,
        "skipped_arms": dict(skipped or {}),
        "wall_seconds": round(time.monotonic() - started, 2),
    }
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if on_progress is not None:
        on_progress("report", 0, 1)
    write_report(
        output_dir, metrics,
        curves={name: (s.overall.pixel_curves(), s.overall.image_curves()) for name, s in scores_by_arm.items()},
        examples={name: s.examples for name, s in scores_by_arm.items()},
    )
    if on_progress is not None:
        on_progress("report", 1, 1)
    return metrics


def evaluate_arm(
    arm: Arm,
    real: RealData,
    params: EvaluateParams,
    *,
    device: torch.device,
    on_progress: ProgressCallback | None,
    checkpoint: Path | None,
    inception_weights: Path | None,
    lpips_weights: Path | None,
    precision: Precision = "fp32",
) -> tuple[dict, TestScores]:
    """One arm: its entry in metrics.json, and its test scores (for the report's curves and examples)."""
    started = time.monotonic()
    # 1. The segmenter.
    model = train_segmenter(arm.training_set(real.normals), params, device=device, on_progress=on_progress,
                            checkpoint=checkpoint, precision=precision)
    train_seconds = time.monotonic() - started

    # 2. The defect-type classifier, when the arm has two or more of the real test set's types.
    class_names = sorted(set(arm.defects) & set(real.split.defects))
    classifier, classification_reason = None, None
    if not params.classifier:
        classification_reason = "the classifier is off"
    elif len(class_names) < 2:
        classification_reason = "needs two or more defect types shared with the real test set"
    else:
        picked = [i for i, defect in enumerate(arm.defects) if defect in class_names]
        labels = torch.tensor([class_names.index(arm.defects[i]) for i in picked])
        classifier = train_classifier(arm.images[picked], labels, len(class_names), params,
                                      device=device, on_progress=on_progress, precision=precision)

    # 3. One pass over the real test set.
    scores = score_test_set(model, real, device, classifier, class_names, on_progress, precision)

    # 4. Everything about the arm.
    result = {
        "kind": arm.kind,
        "pairs": len(arm.defects),
        "pairs_per_defect": {d or "untyped": arm.defects.count(d) for d in sorted(set(arm.defects))},
        "segmentation": {
            "overall": scores.overall.compute(),
            "per_defect": {d: metrics.compute() for d, metrics in scores.per_defect.items()},
        },
        "classification": (
            classification_accuracy(torch.tensor(scores.predicted_classes), torch.tensor(scores.true_classes),
                                    class_names) if classifier is not None else None
        ),
        "classification_reason": classification_reason,
        "mask_fidelity": arm.mask_fidelity,
        "generation": generation_metrics(arm.images, real.exemplar_images, inception_weights=inception_weights,
                                         lpips_weights=lpips_weights, device=device),
        "training": {
            "steps": params.train_steps, "batch_size": params.batch_size, "resolution": params.resolution,
            "learning_rate": params.learning_rate, "seed": params.seed, "tau": params.tau,
            "unet_width": params.unet_width, "normal_images": len(real.normals), "device": device.type,
            "precision": precision_name(autocast_dtype(device, precision)),
            "train_seconds": round(train_seconds, 2),
        },
        "wall_seconds": round(time.monotonic() - started, 2),
    }
    return result, scores


def _prefixed(on_progress: ProgressCallback | None, prefix: str) -> ProgressCallback | None:
    """The callback with ``prefix`` put before each stage name ("arm 2/5 boxes: train")."""
    if on_progress is None:
        return None
    return lambda stage, done, total: on_progress(f"{prefix}: {stage}", done, total)


def _example_indices(split: FewShotSplit) -> set[int]:
    """The first few test images of each type (and of test/good): the report's example grid."""
    indices = []
    for defect in ["good"] + split.defects:
        indices += [i for i, item in enumerate(split.test) if item.defect == defect][:EXAMPLES_PER_DEFECT]
    return set(indices)


def _thumbnail(array: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((EXAMPLE_SIZE, EXAMPLE_SIZE), Image.BILINEAR))


def score_test_set(model, real: RealData, device: torch.device,
                   classifier=None, class_names: Sequence[str] = (),
                   on_progress: ProgressCallback | None = None, precision: Precision = "fp32") -> TestScores:
    """One pass over the real test set (decoded once, in ``real``), ``SCORE_BATCH`` images per
    forward pass: segmentation metrics at each image's own size (the anomaly map is resized up to
    it) and, with a classifier, its prediction per anomaly."""
    test, examples = real.split.test, _example_indices(real.split)
    scores = TestScores(per_defect={defect: SegmentationMetrics() for defect in real.split.defects})
    for start in range(0, len(test), SCORE_BATCH):
        items = test[start:start + SCORE_BATCH]
        images = real.test_images[start:start + SCORE_BATCH]
        anomaly_maps = predict(model, images, device, precision)
        for offset, (item, anomaly_map) in enumerate(zip(items, anomaly_maps)):
            gt_mask = real.test_masks[start + offset]
            height, width = gt_mask.shape
            full_map = np.asarray(Image.fromarray(anomaly_map).resize((width, height), Image.BILINEAR))
            is_anomalous = item.defect != "good"
            evidence = image_evidence(full_map, gt_mask, is_anomalous)  # once: a good image counts for every type
            scores.overall.add(evidence)
            for defect in real.split.defects if not is_anomalous else [item.defect]:
                scores.per_defect[defect].add(evidence)
            if start + offset in examples:
                image = images[offset].permute(1, 2, 0).numpy()
                scores.examples.append(Example(
                    item.defect, _thumbnail(image[:, :, 0] if real.channels == 1 else image),
                    _thumbnail(anomaly_map), _thumbnail(gt_mask.astype(np.uint8) * 255) > 127,
                ))
        if classifier is not None:
            typed = [i for i, item in enumerate(items) if item.defect in class_names]
            if typed:
                scores.predicted_classes += predict_classes(classifier, images[typed], device, precision).tolist()
                scores.true_classes += [class_names.index(items[i].defect) for i in typed]
        if on_progress is not None:
            on_progress("score", min(start + SCORE_BATCH, len(test)), len(test))
    return scores
