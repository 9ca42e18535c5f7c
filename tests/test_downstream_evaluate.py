"""End to end: evaluate() on a small synthetic MVTec dataset whose defects are bright and dark squares."""

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from models.downstream.arms import GeneratedPair
from models.downstream.evaluate import evaluate
from models.downstream.metrics import SegmentationMetrics
from models.downstream.params import EvaluateParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE = 64
DEFECT_VALUES = {"bright": 235, "dark": 15}
METRICS = {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc", "image_ap", "image_f1_max"}


def normal_image(rng) -> np.ndarray:
    """A smooth grey texture around 128."""
    noise = rng.normal(0, 1, (SIZE // 8, SIZE // 8))
    texture = np.asarray(Image.fromarray(noise.astype(np.float32)).resize((SIZE, SIZE), Image.BICUBIC))
    return np.clip(128 + 12 * texture + rng.normal(0, 3, (SIZE, SIZE)), 0, 255).astype(np.uint8)


def add_square(image, rng, defect) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    side = int(rng.integers(8, 15))
    y, x = rng.integers(4, SIZE - side - 4, 2)
    out, mask = image.copy(), np.zeros_like(image)
    out[y:y + side, x:x + side] = DEFECT_VALUES[defect]
    mask[y:y + side, x:x + side] = 255
    return out, mask, (y, x, side, side)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def squares_dataset(tmp_path_factory):
    """MVTec layout: 24 normals, 6 test/good, 9 images per defect type (3 exemplars, 6 test)."""
    root = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    for i in range(24):
        save(root / f"train/good/{i:03d}.png", normal_image(rng))
    for i in range(6):
        save(root / f"test/good/{i:03d}.png", normal_image(rng))
    for defect in DEFECT_VALUES:
        for i in range(9):
            image, mask, _ = add_square(normal_image(rng), rng, defect)
            save(root / f"test/{defect}/{i:03d}.png", image)
            save(root / f"ground_truth/{defect}/{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def generated_sets(tmp_path_factory):
    """Two generate jobs: exact square masks, and weak box masks (3 px larger than the square)."""
    folder = tmp_path_factory.mktemp("generated")
    rng = np.random.default_rng(1)
    sets = {"squares": [], "boxes": []}
    for name, pairs in sets.items():
        for i in range(16):
            defect = list(DEFECT_VALUES)[i % 2]
            normal = normal_image(rng)
            image, mask, (y, x, h, w) = add_square(normal, rng, defect)
            if name == "boxes":
                mask[max(0, y - 3):y + h + 3, max(0, x - 3):x + w + 3] = 255
            pairs.append(GeneratedPair(
                image=save(folder / name / f"images/{defect}/{i}.png", image),
                mask=save(folder / name / f"masks/{defect}/{i}_mask.png", mask),
                defect=defect, weak_label=name == "boxes",
                source_normal=save(folder / name / f"normals/{i}.png", normal),
            ))
    return sets



@pytest.fixture(scope="module")
def evaluation(squares_dataset, generated_sets, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    stages = []
    params = EvaluateParams(train_steps=30, resolution=32, batch_size=8, learning_rate=3e-3,
                            unet_width=8, baseline_pairs=16)
    metrics = evaluate(squares_dataset, generated_sets, params, out, device="cpu",
                       on_progress=lambda stage, done, total: stages.append((stage, done, total)))
    return out, metrics, stages


def test_metrics_json_has_every_field_in_range(evaluation):
    out, metrics, _ = evaluation
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert list(metrics["arms"]) == ["squares", "boxes", "combined", "baseline_draem", "baseline_exemplars"]
    assert metrics["dataset"] == {"normal_images": 24, "exemplars": {"bright": 3, "dark": 3},
                                  "test_images": {"good": 6, "bright": 6, "dark": 6}}
    for name, arm in metrics["arms"].items():
        segmentation = arm["segmentation"]
        assert set(segmentation["overall"]) == METRICS
        assert set(segmentation["per_defect"]) == {"bright", "dark"}
        for values in [segmentation["overall"], *segmentation["per_defect"].values()]:
            assert all(0 <= value <= 1 for value in values.values()), (name, values)
        assert arm["training"]["steps"] == 30 and arm["training"]["precision"] == "fp32"
        assert arm["training"]["train_seconds"] <= arm["wall_seconds"]
        assert arm["generation"]["inception_score"] is None and arm["generation"]["inception_score_reason"]
        assert arm["generation"]["ic_lpips"] is None and arm["generation"]["ic_lpips_reason"]


def test_classification_and_mask_fidelity_where_they_apply(evaluation):
    arms = evaluation[1]["arms"]
    for name in ("squares", "boxes", "combined", "baseline_exemplars"):
        classification = arms[name]["classification"]
        assert 0 <= classification["accuracy"] <= 1 and classification["test_images"] == 12
        assert set(classification["per_defect"]) == {"bright", "dark"}
    assert arms["baseline_draem"]["classification"] is None and arms["baseline_draem"]["classification_reason"]

    squares = arms["squares"]["mask_fidelity"]
    assert squares["pairs"] == 16 and squares["leakage"] == 0 and squares["fill"] == 1
    assert arms["boxes"]["mask_fidelity"]["fill"] < 1  # the box is larger than the defect
    assert arms["combined"]["mask_fidelity"] is None
    assert arms["baseline_exemplars"]["mask_fidelity"]["leakage"] == 0
    assert 0 <= arms["baseline_draem"]["mask_fidelity"]["leakage"] <= 1


def test_trained_unet_beats_chance_on_the_easy_case(evaluation):
    overall = evaluation[1]["arms"]["squares"]["segmentation"]["overall"]
    assert overall["pixel_auroc"] > 0.9
    assert overall["pixel_ap"] > 0.3  # chance: the defect-pixel share, about 0.03
    assert overall["image_auroc"] > 0.7


def test_report_is_self_contained_with_its_plots(evaluation):
    """report.html carries every plot inline (it opens alone: as a download, behind a key, from
    S3), the same PNGs that are written beside it."""
    out, metrics, _ = evaluation
    page = (out / "report.html").read_text()
    for name in metrics["arms"]:
        assert name in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), "a plot links to a file"
    inline = {re.search(r'title="([^"]+)"', tag).group(1): tag for tag in re.findall(r"<img [^>]+>", page)}
    assert {"pixel_roc.png", "pixel_pr.png", "image_roc.png", "image_pr.png", "examples_squares.png"} <= set(inline)
    for name, tag in inline.items():
        data = base64.b64decode(re.search(r'base64,([^"]+)"', tag).group(1))
        assert data == (out / name).read_bytes()
        assert Image.open(io.BytesIO(data)).size[0] > 100


def test_progress_reports_every_stage(evaluation):
    stages = evaluation[2]
    assert ("arm 1/5 squares: train", 30, 30) in stages
    assert ("arm 1/5 squares: classifier", 30, 30) in stages
    assert ("arm 1/5 squares: score", 18, 18) in stages
    assert stages[-1] == ("report", 1, 1)


def test_cancel_from_the_progress_callback(squares_dataset, generated_sets, tmp_path):
    class Cancelled(Exception):
        pass

    def cancel(stage, done, total):
        if done >= 3:
            raise Cancelled

    params = EvaluateParams(train_steps=10, resolution=32, unet_width=8, baselines=False, classifier=False)
    with pytest.raises(Cancelled):
        evaluate(squares_dataset, {"squares": generated_sets["squares"]}, params, tmp_path, device="cpu",
                 on_progress=cancel)
    assert not (tmp_path / "metrics.json").exists()


def test_params_reject_unknown_names_and_bad_values():
    with pytest.raises(ValidationError):
        EvaluateParams(train_step=10)
    with pytest.raises(ValidationError):
        EvaluateParams(resolution=100)  # not a multiple of 16
    assert EvaluateParams().model_dump()["tau"] == 0.9


def test_accumulator_is_independent_per_instance():
    first, second = SegmentationMetrics(), SegmentationMetrics()
    first.update(np.ones((4, 4)), np.ones((4, 4)))
    assert second.num_regions == 0 and second.image_scores == []
