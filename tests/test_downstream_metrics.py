"""Metric functions against scikit-learn on random data and against small hand-computed cases."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from models.downstream.metrics import (
    NUM_BINS,
    SegmentationMetrics,
    aupro,
    auroc,
    average_precision,
    curves_from_histograms,
    curves_from_scores,
    f1_max,
    f1_max_threshold,
    image_evidence,
    image_score,
    region_overlaps,
    score_bins,
)


def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    return np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))


def histograms(scores, labels):
    bins = score_bins(scores)
    return (np.bincount(bins[labels], minlength=NUM_BINS), np.bincount(bins[~labels], minlength=NUM_BINS))


def test_hand_case():
    # scikit-learn's documentation example: AUROC 0.75, AP 0.8333.
    curves = curves_from_scores(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert auroc(curves) == pytest.approx(0.75)
    assert average_precision(curves) == pytest.approx(5 / 6)
    # Thresholds 0.8, 0.4, 0.35, 0.1 give F1 2/3, 1/2, 4/5, 2/3.
    assert f1_max(curves) == pytest.approx(0.8)
    assert f1_max_threshold(curves) == pytest.approx(0.35)


def test_perfect_and_undefined():
    perfect = curves_from_scores(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1, 1, 0, 0]))
    assert auroc(perfect) == average_precision(perfect) == f1_max(perfect) == 1.0
    only_negatives = curves_from_scores(np.array([0.3, 0.5]), np.array([0, 0]))
    assert auroc(only_negatives) is None and average_precision(only_negatives) is None
    assert auroc(curves_from_scores(np.array([0.3, 0.5]), np.array([1, 1]))) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.random(300) * 0.6 + labels * 0.3, 2)  # rounding makes ties
    curves = curves_from_scores(scores, labels)
    assert auroc(curves) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(curves) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert f1_max(curves) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)


def test_binned_metrics_are_exact_on_bin_centres_and_close_otherwise():
    rng = np.random.default_rng(3)
    labels = rng.random(20_000) < 0.1
    bin_centres = (rng.integers(0, NUM_BINS, 20_000) + 0.5) / NUM_BINS
    curves = curves_from_histograms(*histograms(bin_centres, labels))
    assert auroc(curves) == pytest.approx(roc_auc_score(labels, bin_centres), abs=1e-12)
    assert average_precision(curves) == pytest.approx(average_precision_score(labels, bin_centres), abs=1e-12)

    continuous = np.clip(rng.normal(0.4 + 0.2 * labels, 0.15), 0, 1)
    curves = curves_from_histograms(*histograms(continuous, labels))
    assert auroc(curves) == pytest.approx(roc_auc_score(labels, continuous), abs=1e-4)
    assert average_precision(curves) == pytest.approx(average_precision_score(labels, continuous), abs=1e-3)
    assert f1_max(curves) == pytest.approx(sklearn_f1_max(labels, continuous), abs=1e-3)


def test_score_bins_cover_the_closed_unit_interval():
    scores = np.array([0.0, 0.4, 1.6, 5000.5, NUM_BINS - 0.5, NUM_BINS]) / NUM_BINS
    assert score_bins(scores).tolist() == [0, 0, 1, 5000, NUM_BINS - 1, NUM_BINS - 1]


def test_image_score_is_the_max_of_the_smoothed_map():
    assert image_score(np.full((32, 32), 0.3)) == pytest.approx(0.3)
    spike, blob = np.zeros((64, 64)), np.zeros((64, 64))
    spike[32, 32] = 1.0
    blob[24:40, 24:40] = 0.8
    assert image_score(blob) > image_score(spike)  # a lone hot pixel is mostly noise
    assert image_score(spike) == pytest.approx(ndimage.gaussian_filter(spike, 4).max())


def test_region_overlaps_per_connected_region():
    mask = np.zeros((4, 6), bool)
    mask[0:2, 0:2] = True  # region 1: 4 pixels
    mask[3, 4:6] = True  # region 2: 2 pixels
    bins = np.zeros((4, 6), int)
    bins[0, 0:2] = 7  # half of region 1 scores in bin 7
    bins[3, 4] = 3  # half of region 2 in bin 3
    overlaps = region_overlaps(bins, mask, num_bins=10)
    assert overlaps.shape == (2, 10)
    assert overlaps[0].tolist() == [1.0] + [0.5] * 7 + [0.0] * 2
    assert overlaps[1].tolist() == [1.0] + [0.5] * 3 + [0.0] * 6


def aupro_of(score_lists):
    """AUPRO from (region scores per region, negative-pixel scores)."""
    regions, negatives = score_lists
    overlap_sum = sum(region_overlaps(score_bins(np.array(r))[None], np.ones((1, len(r)), bool))[0] for r in regions)
    negative_hist = np.bincount(score_bins(np.array(negatives)), minlength=NUM_BINS)
    return aupro(overlap_sum, len(regions), negative_hist)


def test_aupro_hand_cases():
    # 10 normal pixels: one at 0.95 (FPR 0.1 from there on), the rest at 0.05 (FPR 1).
    negatives = [0.95] + [0.05] * 9
    # Both regions are fully found before the FPR leaves 0.1: PRO 1 from 0.1 to 0.3 -> 0.2 / 0.3.
    assert aupro_of(([[0.9, 0.9], [0.9, 0.1]], negatives)) == pytest.approx(2 / 3)
    # The region is half found at FPR 0.1 (-> 0.5 until FPR 0.5): area 0.2 * 0.5 = 0.1 -> 1/3.
    assert aupro_of(([[0.9, 0.3]], [0.95] + [0.5] * 4 + [0.05] * 5)) == pytest.approx(1 / 3)
    # One threshold moves FPR 0.1 -> 0.5 and PRO 0 -> 0.5 together: the curve is a slope,
    # cut at FPR 0.3 (PRO 0.25): triangle 0.2 * 0.25 / 2 = 0.025 -> 1/12.
    assert aupro_of(([[0.6, 0.3]], [0.95] + [0.6] * 4 + [0.05] * 5)) == pytest.approx(1 / 12)
    # A perfect map: every region found before any false positive.
    assert aupro_of(([[0.9], [0.8, 0.7]], [0.1] * 10)) == pytest.approx(1.0)
    assert aupro(np.zeros(NUM_BINS), 0, np.ones(NUM_BINS)) is None


def test_accumulator_matches_sklearn_on_the_whole_set():
    rng = np.random.default_rng(4)
    accumulator = SegmentationMetrics()
    maps, masks = [], []
    for index in range(12):
        mask = np.zeros((40, 48), bool)
        if index % 3:  # 8 anomalous images, 4 normal ones
            y, x = rng.integers(0, 30, 2)
            mask[y:y + 8, x:x + 10] = True
        anomaly_map = np.clip(rng.normal(0.3, 0.1, mask.shape) + 0.25 * mask, 0, 1)
        accumulator.update(anomaly_map, mask)
        maps.append(anomaly_map)
        masks.append(mask)
    result = accumulator.compute()

    pixels, pixel_labels = np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in masks])
    image_scores = [image_score(m) for m in maps]
    image_labels = [m.any() for m in masks]
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(pixel_labels, pixels), abs=1e-3)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(pixel_labels, pixels), abs=2e-3)
    assert result["pixel_f1_max"] == pytest.approx(sklearn_f1_max(pixel_labels, pixels), abs=2e-3)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(image_labels, image_scores))
    assert result["image_ap"] == pytest.approx(average_precision_score(image_labels, image_scores))
    assert result["image_f1_max"] == pytest.approx(sklearn_f1_max(image_labels, image_scores))
    assert 0.5 < result["aupro"] <= 1
    assert accumulator.num_regions == 8
    assert all(0 <= value <= 1 for value in result.values())


def test_an_empty_accumulator_has_only_undefined_metrics():
    assert all(value is None for value in SegmentationMetrics().compute().values())


def test_accumulator_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        SegmentationMetrics().update(np.zeros((4, 4)), np.zeros((4, 5)))


def test_one_image_evidence_counts_in_several_accumulators_as_update_does():
    rng = np.random.default_rng(5)
    updated, first, second = SegmentationMetrics(), SegmentationMetrics(), SegmentationMetrics()
    for index in range(6):
        mask = np.zeros((30, 36), bool)
        mask[5 + index:15 + index, 4:12] = index % 2 == 1
        anomaly_map = np.clip(rng.normal(0.3, 0.1, mask.shape) + 0.3 * mask, 0, 1)
        updated.update(anomaly_map, mask)
        evidence = image_evidence(anomaly_map, mask)
        first.add(evidence)
        second.add(evidence)
    assert first.compute() == updated.compute() == second.compute()
    assert first.num_regions == 3 and first.image_labels == [False, True] * 3
    # update now goes through add, so also check add's counts against the masks themselves
    assert first.positive_hist.sum() == 3 * 10 * 8 and first.negative_hist.sum() == 6 * 30 * 36 - 3 * 10 * 8
