"""The training sets ("arms") an evaluation compares, all at the model's resolution.

- a generated set: a generate job's pairs, read from local files;
- the combination of several arms;
- a model-free baseline: DRAEM (or CutPaste) anomalies made here on the real normal images;
- the exemplar baseline: the real exemplars' defects pasted onto random normal images (the
  transplant method as a plain paste).

Every arm is used together with the real normal images (all-zero masks) when training.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.downstream.data import image_tensor, mask_array, mask_tensor, open_image
from models.downstream.fidelity import mask_fidelity
from models.downstream.train import TrainingSet


@dataclass(frozen=True)
class GeneratedPair:
    """One pair of a generate job, as local files."""

    image: Path
    mask: Path
    defect: str
    weak_label: bool = False  # the mask is a box around the defect (AnoGen), not its outline
    source_normal: Path | None = None  # the normal image it was made from, for mask fidelity


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # "generated", "combined" or "baseline"
    images: torch.Tensor  # uint8 (N, C, R, R)
    masks: torch.Tensor  # bool (N, 1, R, R)
    weak: torch.Tensor  # bool (N,)
    defects: list[str]  # defect type of each pair; "" for a method without types (DRAEM)
    mask_fidelity: dict | None = None

    def training_set(self, normals: torch.Tensor) -> TrainingSet:
        return TrainingSet(self.images, self.masks, self.weak, normals)


def as_pil(image: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> PIL image, mode L or RGB."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def as_unit_array(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> float (H, W, C) in [0, 1]."""
    return image.permute(1, 2, 0).numpy() / 255.0


def _baseline_arm(name: str, images: list[torch.Tensor], masks: list[torch.Tensor], defects: list[str],
                  normals: torch.Tensor, normal_indices: list[int]) -> Arm:
    fidelity_triples = (
        (as_unit_array(image), as_unit_array(normals[index]), mask[0].numpy())
        for image, mask, index in zip(images, masks, normal_indices)
    )
    return Arm(
        name=name, kind="baseline", images=torch.stack(images), masks=torch.stack(masks),
        weak=torch.zeros(len(images), dtype=torch.bool), defects=defects, mask_fidelity=mask_fidelity(fidelity_triples),
    )


def _native_fidelity_triple(pair: GeneratedPair, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(generated, source normal, mask) at the generated image's own size, images in [0, 1]."""
    mode = "L" if channels == 1 else "RGB"
    generated = open_image(pair.image).convert(mode)
    normal = open_image(pair.source_normal).convert(mode).resize(generated.size, Image.BILINEAR)
    return np.asarray(generated) / 255.0, np.asarray(normal) / 255.0, mask_array(pair.mask)


def load_generated_arm(name: str, pairs: Sequence[GeneratedPair], resolution: int, channels: int) -> Arm:
    if not pairs:
        raise ValueError(f"generated set {name!r} has no pairs")
    images = [image_tensor(pair.image, resolution, channels) for pair in pairs]
    masks = [mask_tensor(pair.mask, resolution) for pair in pairs]
    fidelity_triples = (  # a generator: one pair at a time, at its own size
        _native_fidelity_triple(pair, channels) for pair in pairs if pair.source_normal is not None
    )
    return Arm(
        name=name, kind="generated", images=torch.stack(images), masks=torch.stack(masks),
        weak=torch.tensor([pair.weak_label for pair in pairs], dtype=torch.bool),
        defects=[pair.defect for pair in pairs], mask_fidelity=mask_fidelity(fidelity_triples),
    )


def combine_arms(name: str, arms: Sequence[Arm]) -> Arm:
    """All pairs of ``arms`` in one set (mask fidelity stays with the arms it comes from)."""
    return Arm(
        name=name, kind="combined",
        images=torch.cat([arm.images for arm in arms]), masks=torch.cat([arm.masks for arm in arms]),
        weak=torch.cat([arm.weak for arm in arms]), defects=[d for arm in arms for d in arm.defects],
    )


def model_free_arm(name: str, method: str, normals: torch.Tensor, count: int, seed: int, params: dict | None = None,
                   exemplars: tuple[torch.Tensor, torch.Tensor, list[str]] | None = None) -> Arm:
    """``count`` pairs of a model-free method (``draem``, ``cutpaste``, ``transplant``) with its
    default params updated by ``params``, made through the method interface as a generate job
    would make them. ``exemplars`` = (images, masks, defect types): the anomaly exemplars it
    copies from (transplant); each pair then has the type its method names in its details."""
    from models.methods.interface import Exemplar, GenerateRequest, NormalImages, job_items
    from models.methods.params import MaskSpec
    from models.methods.registry import METHODS, generate_all

    spec = METHODS[method]
    references = [] if exemplars is None else [
        Exemplar(str(i), as_pil(image), mask[0].numpy(), "", defect)
        for i, (image, mask, defect) in enumerate(zip(*exemplars)) if mask.any()
    ]
    request = GenerateRequest(
        params=spec.params(**(params or {})), masks=MaskSpec(source=spec.default_mask_source), exemplars=references,
        given_masks=[], normals=NormalImages.in_memory([as_pil(normal) for normal in normals]),
        items=job_items(count, seed, len(normals), len(references)),
    )
    resolution, channels = normals.shape[-1], normals.shape[1]
    pairs = generate_all(spec, request)
    images = [image_tensor(pair.image, resolution, channels) for pair in pairs]
    masks = [mask_tensor(pair.mask_u8, resolution) for pair in pairs]
    items = [request.items[pair.index] for pair in pairs]
    defects = [pair.details.get("defect") or "" for pair in pairs]
    return _baseline_arm(name, images, masks, defects, normals, [item.normal for item in items])


def exemplar_paste_arm(name: str, normals: torch.Tensor, exemplar_images: torch.Tensor,
                       exemplar_masks: torch.Tensor, exemplar_defects: list[str], count: int, seed: int) -> Arm:
    """The exemplar baseline: the transplant method as a plain paste (``PLAIN_PASTE``: a whole
    exemplar defect as it is, at a random place on a normal image, no augmentation, no
    matching), ``count`` times."""
    from models.methods.transplant import PLAIN_PASTE

    if not exemplar_masks.any():
        raise ValueError("no exemplar has a non-empty mask")
    return model_free_arm(name, "transplant", normals, count, seed, params=PLAIN_PASTE,
                          exemplars=(exemplar_images, exemplar_masks, exemplar_defects))
