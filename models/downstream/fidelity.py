"""Generation metrics: how faithful the synthetic pairs are, before any segmenter is trained.

Always available (no weights):

- mask fidelity: ``leakage`` is the share of the total change |generated - source normal| that
  lies outside the mask (0: the method touched only the mask); ``fill`` is the share of mask pixels
  that visibly changed (1: the whole mask shows a defect).

Only with local weights (never downloaded; torchvision's Inception-v3 and VGG cannot be built
here, so the networks come as TorchScript files, the ones NVIDIA's StyleGAN2-ADA metrics use):

- Inception Score from ``inception-2015-12-05.pt``, called as ``net(uint8 NCHW, no_output_bias=True)``
  and returning class probabilities;
- IC-LPIPS (intra-cluster LPIPS diversity, Ojha et al. 2021) from ``vgg16.pt``, called as
  ``net(float NCHW in [0, 255], resize_images=False, return_lpips=True)`` and returning features
  whose squared distance is the LPIPS distance.

Without weights these are None with the reason.
"""

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

VISIBLE_CHANGE = 0.05  # |difference| in [0, 1] intensity units above which a pixel counts as changed
INCEPTION_SIZE = 299
LPIPS_SIZE = 256


def mask_fidelity(pairs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  visible_change: float = VISIBLE_CHANGE) -> dict | None:
    """Leakage and fill pooled over (generated, source normal, mask) triples.

    Images are float arrays in [0, 1] of shape (H, W) or (H, W, C), the mask is (H, W) with
    non-zero inside. None when there are no pairs.
    """
    change_outside = change_total = changed_in_mask = mask_pixels = 0.0
    count = 0
    for generated, normal, mask in pairs:
        difference = np.abs(np.asarray(generated, np.float64) - np.asarray(normal, np.float64))
        if difference.ndim == 3:
            difference = difference.max(axis=2)
        inside = np.asarray(mask) > 0
        change_total += difference.sum()
        change_outside += difference[~inside].sum()
        changed_in_mask += (difference[inside] > visible_change).sum()
        mask_pixels += inside.sum()
        count += 1
    if count == 0:
        return None
    return {
        "leakage": float(change_outside / change_total) if change_total else 0.0,
        "fill": float(changed_in_mask / mask_pixels) if mask_pixels else 0.0,
        "pairs": count,
    }


def inception_score(probabilities: np.ndarray) -> float:
    """exp(mean KL(p(y|x) || p(y))) over all images (one split)."""
    probabilities = np.clip(np.asarray(probabilities, np.float64), 1e-12, 1)
    marginal = probabilities.mean(axis=0, keepdims=True)
    kl = (probabilities * (np.log(probabilities) - np.log(marginal))).sum(axis=1)
    return float(np.exp(kl.mean()))


def intra_cluster_distance(generated: np.ndarray, centres: np.ndarray) -> float | None:
    """IC-LPIPS from feature vectors whose squared distance is the LPIPS distance.

    Each generated image joins the cluster of its nearest centre (the exemplars); the score is
    the mean pairwise distance inside each cluster, averaged over clusters with two or more
    members. None when no cluster has two members.
    """
    def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: never holds an (N, N, features) array
        return np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T, 0)

    nearest = squared_distances(generated, centres).argmin(axis=1)
    cluster_means = []
    for centre in range(len(centres)):
        members = generated[nearest == centre]
        if len(members) >= 2:
            distances = squared_distances(members, members)
            cluster_means.append(distances[np.triu_indices(len(members), k=1)].mean())
    return float(np.mean(cluster_means)) if cluster_means else None


@torch.no_grad()
def _network_outputs(net: torch.jit.ScriptModule, images: torch.Tensor, size: int, device: str | torch.device,
                     batch_size: int, **kwargs) -> np.ndarray:
    """Run a TorchScript metric network on uint8 images (N, C, H, W) as RGB floats in [0, 255] at ``size``."""
    outputs = []
    for batch in images.split(batch_size):
        batch = batch.float().expand(-1, 3, -1, -1).to(device)  # grayscale: one channel repeated
        batch = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False)
        outputs.append(net(batch, **kwargs).float().cpu().numpy())
    return np.concatenate(outputs)


def generation_metrics(
    generated: torch.Tensor,
    exemplars: torch.Tensor,
    *,
    inception_weights: Path | None = None,
    lpips_weights: Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict:
    """Scores of uint8 images (N, C, H, W), C = 1 or 3; the exemplars are the IC-LPIPS cluster centres.

    Returns {"inception_score", "inception_score_reason", "ic_lpips", "ic_lpips_reason"}: a value is None,
    and its reason says why, when its weights are not configured or the score is undefined."""
    result = {"inception_score": None, "inception_score_reason": None, "ic_lpips": None, "ic_lpips_reason": None}
    if len(generated) == 0:
        result["inception_score_reason"] = result["ic_lpips_reason"] = "no generated images"
        return result

    if inception_weights is None:
        result["inception_score_reason"] = "Inception weights are not configured"
    else:
        inception = torch.jit.load(str(inception_weights), map_location=device).eval()
        probabilities = _network_outputs(inception, generated, INCEPTION_SIZE, device, batch_size,
                                         no_output_bias=True)
        result["inception_score"] = inception_score(probabilities)

    if lpips_weights is None:
        result["ic_lpips_reason"] = "LPIPS (VGG16) weights are not configured"
    elif len(exemplars) == 0:
        result["ic_lpips_reason"] = "no exemplars to cluster around"
    else:
        vgg = torch.jit.load(str(lpips_weights), map_location=device).eval()
        features, centres = (
            _network_outputs(vgg, images, LPIPS_SIZE, device, batch_size, resize_images=False, return_lpips=True)
            for images in (generated, exemplars)
        )
        result["ic_lpips"] = intra_cluster_distance(features, centres)
        if result["ic_lpips"] is None:
            result["ic_lpips_reason"] = "no exemplar is the nearest one to two or more generated images"
    return result
