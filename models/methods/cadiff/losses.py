"""CADiff's training losses beside the LDM loss, and its augmentation.

L_loc (paper Eq. 5). As printed, ||(1/n) sum_i (A_i - M_i)||^2 only forces the maps to sum to
one. We use the per-token form

    L_loc = sum_l (1/n) sum_i mean_pixels (A_{l,i} - M_{l,i})^2

over the cross-attention layers l and the n (sample, learnable token) pairs of the batch, each
sample at its own timestep: A is the head-averaged attention of the token's column, normalised to
max 1 over the layer's map, M the token's mask max-pooled to the layer's size (the anomaly token:
its defect's mask; the context token: the product outside the anomaly masks). The pixel mean
(rather than a sum) keeps the layers of different sizes at equal weight.

L_contrastive: NT-Xent over per-image token features. A token vector does not depend on the
image, so each token's feature is its attention-pooled hidden state, sum_p A[p] h[p] / sum_p A[p],
at the focus layers (iar.focus_layers: SD's 16x16 ones), concatenated. Positives: the same concept (the
context token, or the same defect's token) in other samples of the batch, each a separately
augmented view; negatives: every other feature. Temperature: a parameter.

Augmentation (image and masks together): rotation, a random crop, and a translation of the crop,
as one affine map. The crop is scaled up so that the rotated frame never leaves the image: no
padding, so nothing outside the real image (a reflected defect with no label) enters a sample.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from models.diffusion.attention import AttentionMapRecorder


class TokenAttentionRecorder(AttentionMapRecorder):
    """AttentionMapRecorder (maps in the graph) that also keeps the hidden states its queries come from."""

    def __init__(self, keep_hidden: bool):
        super().__init__(keep_graph=True)
        self.keep_hidden = keep_hidden
        self.hidden: list[torch.Tensor] = []

    def project(self, attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor):
        if self.keep_hidden:
            self.hidden.append(hidden_states)
        return super().project(attn, hidden_states, context)

    def clear(self) -> None:
        self.maps, self.hidden = [], []


def token_maps(maps: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T, h, w) attention of each sample's T tokens (positions (B, T)) out of (B, hw, 77) maps."""
    batch, queries, _ = maps.shape
    side = int(round(queries**0.5))
    picked = maps.gather(2, positions[:, None, :].expand(batch, queries, -1))  # (B, hw, T)
    return picked.transpose(1, 2).reshape(batch, -1, side, side)


def localization_loss(recorded: list[torch.Tensor], positions: torch.Tensor, targets: torch.Tensor,
                      present: torch.Tensor) -> torch.Tensor:
    """L_loc over the recorded maps of every cross-attention layer.

    positions (B, T): the learnable tokens' places in each prompt; targets (B, T, H, W) their masks
    in {0, 1}; present (B, T) bool: which tokens each prompt has (a normal image has no anomaly token).
    """
    weight = present.float()
    total = targets.new_zeros(())
    for maps in recorded:
        attention = token_maps(maps.float(), positions)
        attention = attention / attention.amax(dim=(2, 3), keepdim=True).clamp(min=1e-8)
        target = F.adaptive_max_pool2d(targets, attention.shape[-1])
        error = (attention - target).pow(2).mean(dim=(2, 3))  # (B, T)
        total = total + (error * weight).sum() / weight.sum()
    return total


def pooled_token_features(recorded_maps: list[torch.Tensor], hidden: list[torch.Tensor],
                          positions: torch.Tensor) -> torch.Tensor:
    """(B, T, features): each token's attention-pooled hidden states, concatenated over the layers."""
    features = []
    for maps, states in zip(recorded_maps, hidden):
        attention = token_maps(maps.float(), positions).flatten(2)  # (B, T, hw)
        pooled = attention @ states.float() / attention.sum(-1, keepdim=True).clamp(min=1e-8)
        features.append(pooled)
    return torch.cat(features, dim=-1)


def contrastive_loss(features: torch.Tensor, concepts: torch.Tensor, present: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """NT-Xent (with every same-concept feature a positive) over the present (B, T) features.

    concepts (B, T): an id per token's concept (the context, or a defect type)."""
    z = F.normalize(features[present], dim=-1)
    labels = concepts[present]
    similarity = z @ z.T / temperature
    self_pairs = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_probability = similarity.masked_fill(self_pairs, float("-inf")).log_softmax(dim=1)
    positives = (labels[:, None] == labels[None, :]) & ~self_pairs
    anchors = positives.any(dim=1)
    if not anchors.any():
        return features.sum() * 0.0  # no concept seen twice in this batch: nothing to contrast
    per_anchor = log_probability.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1)
    return -per_anchor[anchors].mean()


def augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator, rotation: float,
            crop: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate, crop and translate (B, 3, R, R) images and (B, K, R, R) masks alike, one map per sample."""
    batch = images.shape[0]
    draws = torch.rand(batch, 4, generator=generator)
    angle = (draws[:, 0] * 2 - 1) * math.radians(rotation)
    # The crop's side as a fraction of the image, shrunk until its rotated corners stay inside.
    side = crop[0] + (crop[1] - crop[0]) * draws[:, 1]
    side = side / (angle.cos().abs() + angle.sin().abs())
    shift = (draws[:, 2:] * 2 - 1) * (1 - side * (angle.cos().abs() + angle.sin().abs()))[:, None]
    cos, sin = angle.cos() * side, angle.sin() * side
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = F.grid_sample(masks, grid.to(masks.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    return images, masks
