"""Segmentation metrics for anomaly maps, computed like anomalib computes them.

Every metric is built from one idea: sort the scores from high to low, group equal scores, and
count how many positives (``tp``) and negatives (``fp``) lie at or above each group's score. ROC
and precision-recall curves, AUROC, average precision and F1-max all follow from those two
cumulative counts.

- Image metrics are exact: the few hundred image scores are kept and grouped by value.
- Pixel metrics are streamed: each image adds its pixel scores (in [0, 1]) to two fixed-bin
  histograms, one for defect pixels and one for normal pixels, so a thousand 512 px maps never sit
  in memory together. With ``NUM_BINS`` bins a metric differs from the exact one by about 0.0001,
  also for a confident model whose normal pixels all score below 0.01.
- AUPRO streams the same way: for every bin threshold it accumulates each defect region's overlap
  (the share of the region's pixels scored at or above the threshold) and the false-positive rate.

``SegmentationMetrics`` is the accumulator: ``update(anomaly_map, gt_mask)`` per test image (or
``add(image_evidence(...))``, to count one image in several accumulators at the cost of one), then
``compute()``.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

NUM_BINS = 10_000
AUPRO_FPR_LIMIT = 0.3
IMAGE_SCORE_SIGMA = 4.0  # anomalib smooths the anomaly map with this Gaussian before taking its max


@dataclass(frozen=True)
class Curves:
    """Cumulative counts at each threshold, from the highest threshold to the lowest."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray

    @property
    def positives(self) -> float:
        return float(self.tp[-1]) if len(self.tp) else 0.0

    @property
    def negatives(self) -> float:
        return float(self.fp[-1]) if len(self.fp) else 0.0

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(false-positive rate, true-positive rate), starting at (0, 0)."""
        fpr = np.concatenate([[0.0], self.fp / self.negatives])
        tpr = np.concatenate([[0.0], self.tp / self.positives])
        return fpr, tpr

    def precision_recall(self) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) at each threshold that flags at least one sample."""
        flagged = self.tp + self.fp
        keep = flagged > 0
        return self.tp[keep] / flagged[keep], self.tp[keep] / self.positives


def curves_from_scores(scores: np.ndarray, labels: np.ndarray) -> Curves:
    """Exact curves: one threshold per distinct score."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    thresholds, group = np.unique(-scores, return_inverse=True)  # ascending -score = descending score
    positives = np.bincount(group, weights=labels, minlength=len(thresholds))
    negatives = np.bincount(group, weights=~labels, minlength=len(thresholds))
    return Curves(-thresholds, np.cumsum(positives), np.cumsum(negatives))


def curves_from_histograms(positive_hist: np.ndarray, negative_hist: np.ndarray) -> Curves:
    """Binned curves: bin ``i`` of ``NUM_BINS`` holds scores in [i / NUM_BINS, (i + 1) / NUM_BINS)."""
    num_bins = len(positive_hist)
    thresholds = np.arange(num_bins)[::-1] / num_bins
    return Curves(thresholds, np.cumsum(positive_hist[::-1]), np.cumsum(negative_hist[::-1]))


def score_bins(scores: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Bin index of each score in [0, 1]; 1.0 falls into the top bin."""
    return np.clip((np.asarray(scores) * num_bins).astype(np.int64), 0, num_bins - 1)


def auroc(curves: Curves) -> float | None:
    """Area under the ROC curve (trapezoids, as scikit-learn); None without both classes."""
    if curves.positives == 0 or curves.negatives == 0:
        return None
    fpr, tpr = curves.roc()
    return float(np.trapezoid(tpr, fpr))


def average_precision(curves: Curves) -> float | None:
    """Sum of precision times the recall gained at each threshold (scikit-learn's definition)."""
    if curves.positives == 0:
        return None
    precision, recall = curves.precision_recall()
    recall_gain = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(precision * recall_gain))


def _f1_scores(curves: Curves) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, F1) at each threshold that flags at least one sample; F1 = 2 tp / (flagged + positives)."""
    flagged = curves.tp + curves.fp
    keep = flagged > 0
    return curves.thresholds[keep], 2 * curves.tp[keep] / (flagged[keep] + curves.positives)


def f1_max(curves: Curves) -> float | None:
    """Best F1 score over all thresholds."""
    if curves.positives == 0:
        return None
    return float(np.max(_f1_scores(curves)[1]))


def f1_max_threshold(curves: Curves) -> float | None:
    """The threshold at which F1 is best (for drawing predicted masks)."""
    if curves.positives == 0:
        return None
    thresholds, f1 = _f1_scores(curves)
    return float(thresholds[np.argmax(f1)])


def image_score(anomaly_map: np.ndarray, sigma: float = IMAGE_SCORE_SIGMA) -> float:
    """An image's anomaly score: the maximum of its Gaussian-smoothed anomaly map."""
    return float(ndimage.gaussian_filter(np.asarray(anomaly_map, dtype=np.float64), sigma).max())


def region_overlaps(score_bin: np.ndarray, gt_mask: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """For each connected defect region (8-connectivity), its overlap at every bin threshold.

    Row ``r``, column ``k``: the share of region ``r``'s pixels whose score bin is >= ``k``.
    """
    regions, num_regions = ndimage.label(gt_mask, structure=np.ones((3, 3)))
    in_region = regions > 0
    # One histogram of score bins per region, all at once: row = region label - 1.
    region_hists = np.bincount(
        (regions[in_region] - 1) * num_bins + score_bin[in_region], minlength=num_regions * num_bins
    ).reshape(num_regions, num_bins)
    at_least = np.cumsum(region_hists[:, ::-1], axis=1)[:, ::-1]
    return at_least / np.maximum(region_hists.sum(axis=1, keepdims=True), 1)


def aupro(overlap_sum: np.ndarray, num_regions: int, negative_hist: np.ndarray,
          fpr_limit: float = AUPRO_FPR_LIMIT) -> float | None:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``.

    ``overlap_sum[k]``: the overlaps at bin threshold ``k`` summed over all regions;
    ``negative_hist``: the histogram of normal-pixel scores.
    """
    if num_regions == 0 or negative_hist.sum() == 0:
        return None
    # Thresholds from high to low, starting above every score (no pixel flagged: FPR 0, PRO 0) and
    # ending at 0 (every pixel flagged: FPR 1); the curve is cut at the limit by linear interpolation.
    pro = np.concatenate([[0.0], overlap_sum[::-1] / num_regions])
    fpr = np.concatenate([[0.0], np.cumsum(negative_hist[::-1]) / negative_hist.sum()])
    inside = fpr < fpr_limit
    pro_at_limit = np.interp(fpr_limit, fpr, pro)
    area = np.trapezoid(np.append(pro[inside], pro_at_limit), np.append(fpr[inside], fpr_limit))
    return float(area / fpr_limit)


@dataclass(frozen=True)
class ImageEvidence:
    """What every metric needs of one scored test image, computed once: an image counts toward
    several accumulators (overall, and each defect type's)."""

    positive_hist: np.ndarray  # score-bin histogram of its defect pixels
    negative_hist: np.ndarray  # ... and of its normal pixels
    overlaps: np.ndarray  # (regions, bins): region_overlaps
    image_score: float
    is_anomalous: bool


def image_evidence(anomaly_map: np.ndarray, gt_mask: np.ndarray, is_anomalous: bool | None = None,
                   num_bins: int = NUM_BINS) -> ImageEvidence:
    """One image's evidence; it is anomalous when ``is_anomalous`` says so, by default when its mask
    has any defect pixel."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
    gt_mask = np.asarray(gt_mask) > 0
    if anomaly_map.shape != gt_mask.shape:
        raise ValueError(f"anomaly map {anomaly_map.shape} and mask {gt_mask.shape} differ in shape")
    bins = score_bins(anomaly_map, num_bins)
    return ImageEvidence(
        positive_hist=np.bincount(bins[gt_mask], minlength=num_bins),
        negative_hist=np.bincount(bins[~gt_mask], minlength=num_bins),
        overlaps=region_overlaps(bins, gt_mask, num_bins),
        image_score=image_score(anomaly_map),
        is_anomalous=bool(gt_mask.any()) if is_anomalous is None else is_anomalous,
    )


class SegmentationMetrics:
    """Pixel, image and region metrics of anomaly maps against ground-truth masks, one image at a time.

    Anomaly maps are scores in [0, 1] (higher: more anomalous); an image counts as anomalous when
    its ``is_anomalous`` flag says so (by default: when its mask has any defect pixel).
    """

    def __init__(self, num_bins: int = NUM_BINS):
        self.num_bins = num_bins
        self.positive_hist = np.zeros(num_bins)
        self.negative_hist = np.zeros(num_bins)
        self.overlap_sum = np.zeros(num_bins)
        self.num_regions = 0
        self.image_scores: list[float] = []
        self.image_labels: list[bool] = []

    def update(self, anomaly_map: np.ndarray, gt_mask: np.ndarray, is_anomalous: bool | None = None) -> None:
        self.add(image_evidence(anomaly_map, gt_mask, is_anomalous, self.num_bins))

    def add(self, evidence: ImageEvidence) -> None:
        """Count an image whose evidence is already computed (``image_evidence``, at this num_bins)."""
        self.positive_hist += evidence.positive_hist
        self.negative_hist += evidence.negative_hist
        self.overlap_sum += evidence.overlaps.sum(axis=0)
        self.num_regions += len(evidence.overlaps)
        self.image_scores.append(evidence.image_score)
        self.image_labels.append(evidence.is_anomalous)

    def pixel_curves(self) -> Curves:
        return curves_from_histograms(self.positive_hist, self.negative_hist)

    def image_curves(self) -> Curves:
        return curves_from_scores(np.array(self.image_scores), np.array(self.image_labels))

    def compute(self) -> dict[str, float | None]:
        """Every metric in [0, 1]; None where it is undefined (e.g. no normal images at all)."""
        pixel, image = self.pixel_curves(), self.image_curves()
        return {
            "pixel_auroc": auroc(pixel),
            "pixel_ap": average_precision(pixel),
            "pixel_f1_max": f1_max(pixel),
            "aupro": aupro(self.overlap_sum, self.num_regions, self.negative_hist),
            "image_auroc": auroc(image),
            "image_ap": average_precision(image),
            "image_f1_max": f1_max(image),
        }
