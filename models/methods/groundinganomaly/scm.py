"""The Spatial Conditioning Module (SCM): a per-pixel semantic map, encoded by ConvNeXt into
grounding tokens of the UNet's cross-attention width.

- The semantic map is a label per pixel at the model's resolution: BACKGROUND off the product,
  PRODUCT on it, and FIRST_DEFECT + k inside a mask of defect type k (class-aware). Each label
  stands for a learned token vector (the text encoder's width, initialised from the CLIP
  embedding of its word: "background", the product's name, the defect's name).
- The stem: a learned linear projection takes each pixel's token to ConvNeXt's few input
  channels. It is applied to the token table before the table is spread over the pixels, which is
  the same linear map as a 1x1 convolution over the (width, H, W) map at 1/width of its memory.
- ConvNeXt (transformers `ConvNextModel`, weights from CONVNEXT_MODEL_DIR) encodes the projected
  map; it is fine-tuned with the rest.
- SFF, our reading (the paper does not specify it): the four stages' feature maps are pooled to
  the last stage's grid (1/32 of the resolution: 16 x 16 tokens at 512 px), each projected to the
  cross-attention width and summed, FPN-style, so the tokens see fine edges and coarse context;
  then fixed 2-D sin-cos position embeddings are added, so each token knows where it lies.
  Ablated (`sff`): the last stage's projection alone, with the same positions.

The fusion is the UNet's `position_net` while the GSM is attached (diffusers' GLIGEN hook): the
UNet calls it on `cross_attention_kwargs["gligen"]` (a grounding's `grounding_inputs`) and hands
the tokens to every gated block.

Ablated (`scm`), BoxGrounding stands in: GLIGEN's own box grounding, from the same label maps.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import GLIGENTextBoundingboxProjection
from PIL import Image
from transformers import ConvNextModel

from models.errors import InputError
from models.weights import convnext_dir_problem

BACKGROUND, PRODUCT, FIRST_DEFECT = 0, 1, 2


def load_convnext(model_dir: str | None, device: torch.device) -> ConvNextModel:
    """A fresh ConvNeXt from `model_dir` (fine-tuned per job, so never shared), float32 on `device`."""
    problem = convnext_dir_problem(str(model_dir) if model_dir else None)
    if problem:
        raise InputError(f"this worker cannot load ConvNeXt: {problem}")
    return ConvNextModel.from_pretrained(Path(model_dir), local_files_only=True).to(device).float()


def label_at(mask: np.ndarray, resolution: int) -> np.ndarray:
    """bool (resolution, resolution): a cell is on if any pixel of `mask` under it is (thin defects stay)."""
    pixels = torch.from_numpy(np.asarray(mask) > 0).float()[None, None]
    if pixels.shape[-2:] == (resolution, resolution):
        return pixels[0, 0].numpy() > 0
    return F.adaptive_max_pool2d(pixels, resolution)[0, 0].numpy() > 0


def semantic_map(foreground: np.ndarray, defect_mask: np.ndarray | None, defect: int | None,
                 resolution: int) -> torch.Tensor:
    """(resolution, resolution) int64 labels: PRODUCT on the foreground (and the defect), BACKGROUND
    elsewhere, FIRST_DEFECT + defect inside the defect mask."""
    foreground = np.asarray(Image.fromarray(np.asarray(foreground, bool).astype(np.uint8) * 255).resize(
        (resolution, resolution), Image.Resampling.NEAREST)) >= 128
    labels = np.where(foreground, PRODUCT, BACKGROUND)
    if defect_mask is not None:
        labels = np.where(label_at(defect_mask, resolution), FIRST_DEFECT + defect, labels)
    return torch.from_numpy(labels.astype(np.int64))


def position_embeddings(height: int, width: int, channels: int) -> torch.Tensor:
    """(height * width, channels) fixed 2-D sin-cos embeddings: half the channels for rows, half for columns."""
    quarter = channels // 4
    frequencies = 1.0 / (10_000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    rows = torch.arange(height, dtype=torch.float32)[:, None] * frequencies
    cols = torch.arange(width, dtype=torch.float32)[:, None] * frequencies
    rows = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None].expand(height, width, -1)
    cols = torch.cat([cols.sin(), cols.cos()], dim=1)[None].expand(height, width, -1)
    embeddings = torch.cat([rows, cols], dim=2).reshape(height * width, -1)
    return F.pad(embeddings, (0, channels - embeddings.shape[1]))


class SemanticFeatureFusion(torch.nn.Module):
    """SFF: ConvNeXt's stage features -> (B, tokens, width) grounding tokens (the UNet's position_net)."""

    def __init__(self, stage_widths: list[int], width: int, last_stage_only: bool = False):
        super().__init__()
        self.first_stage = len(stage_widths) - 1 if last_stage_only else 0  # the `sff` ablation: the last alone
        self.projections = torch.nn.ModuleList(torch.nn.Linear(stage, width)
                                               for stage in stage_widths[self.first_stage:])
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, stage_features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        grid = stage_features[-1].shape[-2:]
        fused = sum(
            projection(F.adaptive_avg_pool2d(features.float(), grid).flatten(2).transpose(1, 2))
            for projection, features in zip(self.projections, stage_features[self.first_stage:])
        )
        positions = position_embeddings(*grid, fused.shape[-1]).to(fused.device)
        return self.norm(fused) + positions


class SpatialConditioning(torch.nn.Module):
    """The learned tokens, the stem projection, ConvNeXt and the SFF: everything the SCM trains."""

    def __init__(self, tokens: torch.Tensor, convnext: ConvNextModel, width: int, last_stage_only: bool = False):
        super().__init__()
        self.tokens = torch.nn.Parameter(tokens.float().clone())  # (labels, token width)
        self.stem = torch.nn.Linear(tokens.shape[1], convnext.config.num_channels)
        self.convnext = convnext
        self.fusion = SemanticFeatureFusion(list(convnext.config.hidden_sizes), width, last_stage_only)

    @property
    def position_net(self) -> torch.nn.Module:
        return self.fusion

    def new_parameters(self) -> list[torch.nn.Parameter]:
        """What the fine-tune adds (trained at the grounding rate)."""
        return [self.tokens, *self.stem.parameters(), *self.fusion.parameters()]

    def pretrained_parameters(self) -> list[torch.nn.Parameter]:
        """What it fine-tunes (at the LoRA's rate): ConvNeXt."""
        return list(self.convnext.parameters())

    def grounding_inputs(self, labels: torch.Tensor) -> dict:
        """The UNet's `cross_attention_kwargs["gligen"]` for (B, H, W) label maps."""
        return {"stage_features": self.stage_features(labels)}

    @staticmethod
    def token_count(inputs: dict) -> int:
        """How many grounding tokens the fusion makes of `inputs`: one per cell of the last stage."""
        return inputs["stage_features"][-1].shape[-2] * inputs["stage_features"][-1].shape[-1]

    def stage_features(self, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """ConvNeXt's four stage outputs for (B, H, W) label maps."""
        pixels = self.stem(self.tokens)[labels].permute(0, 3, 1, 2)  # (B, channels, H, W)
        return self.convnext(pixels, output_hidden_states=True).hidden_states[1:]

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, tokens, width) grounding tokens of (B, H, W) label maps."""
        return self.fusion(self.stage_features(labels))


class BoxGrounding(torch.nn.Module):
    """The `scm` ablation: GLIGEN's box grounding in place of the encoded semantic map. Each label map
    gives two boxes, the product's (every cell off the background) with the product token and the
    defect's (its cells' bounding box) with its defect token; a map without a defect pads the second,
    which GLIGEN's projection (diffusers' GLIGENTextBoundingboxProjection, the UNet's position_net)
    replaces by its learned null features. The shapes inside the boxes are lost: that is the ablation."""

    def __init__(self, tokens: torch.Tensor, width: int):
        super().__init__()
        self.tokens = torch.nn.Parameter(tokens.float().clone())  # (labels, token width)
        self.projection = GLIGENTextBoundingboxProjection(positive_len=tokens.shape[1], out_dim=width)

    @property
    def position_net(self) -> torch.nn.Module:
        return self.projection

    def new_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.parameters())

    def pretrained_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def grounding_inputs(self, labels: torch.Tensor) -> dict:
        product, defect = labels != BACKGROUND, labels >= FIRST_DEFECT
        boxes = torch.stack([bounding_boxes(product), bounding_boxes(defect)], dim=1)  # (B, 2, 4)
        present = torch.stack([product.flatten(1).any(1), defect.flatten(1).any(1)], dim=1).float()
        defect_label = torch.where(defect.flatten(1).any(1), labels.flatten(1).max(1).values, PRODUCT)
        which = torch.stack([torch.full_like(defect_label, PRODUCT), defect_label], dim=1)
        return {"boxes": boxes, "masks": present, "positive_embeddings": self.tokens[which]}

    @staticmethod
    def token_count(inputs: dict) -> int:
        return inputs["boxes"].shape[1]


def bounding_boxes(regions: torch.Tensor) -> torch.Tensor:
    """(B, 4) normalised (x0, y0, x1, y1) bounding boxes of (B, H, W) bool regions (GLIGEN's layout,
    x1 and y1 past the last cell); zeros for an empty region."""
    height, width = regions.shape[-2:]
    rows, cols = regions.any(dim=2), regions.any(dim=1)

    def extent(lines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = lines.int().argmax(dim=1)
        last = lines.shape[1] - lines.flip(1).int().argmax(dim=1)
        return first, last

    (y0, y1), (x0, x1) = extent(rows), extent(cols)
    boxes = torch.stack([x0 / width, y0 / height, x1 / width, y1 / height], dim=1).float()
    return boxes * rows.any(dim=1, keepdim=True)
