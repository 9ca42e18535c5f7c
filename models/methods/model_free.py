"""The model-free baselines (draem, cutpaste) behind one call: one image/mask pair per index.

A pair depends only on its inputs and (job_seed, index), so a job can be split, retried or
resumed pair by pair and give the same output.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.masks.sampling import foreground_mask, sample_target_mask
from models.methods import cutpaste, draem
from models.methods.params import PARAMS_BY_METHOD, CutPasteParams, DraemParams, MaskSpec

MODEL_FREE = {"draem": draem, "cutpaste": cutpaste}
DEFAULT_MASK_SOURCE = "native"


def pair_seed(job_seed: int, index: int) -> int:
    """The seed of pair `index` of a job: deterministic, in [0, 2**32)."""
    return int(np.random.SeedSequence([job_seed, index]).generate_state(1)[0])


@dataclass
class Pair:
    index: int
    seed: int
    normal_index: int  # which of the normals it was made from
    image: Image.Image  # same size and mode as that normal
    mask: np.ndarray  # uint8 0/255, (H, W)


def synthesize_pair(
    method: str,
    index: int,
    job_seed: int,
    normals: Sequence[Image.Image],
    *,
    params: DraemParams | CutPasteParams,
    mask_spec: MaskSpec,
    exemplar_masks: Sequence[np.ndarray] = (),
    given_masks: Sequence[np.ndarray] = (),
    foregrounds: Sequence[np.ndarray | None] | None = None,
) -> Pair:
    """Pair `index` of a job: a defect synthesised on normals[index % len(normals)].

    foregrounds, one per normal (None entries are computed), saves recomputing the product's
    foreground for every pair; it is only used when mask_spec.inside_foreground.
    """
    if method not in MODEL_FREE:
        raise ValueError(f"{method!r} is not a model-free method: one of {sorted(MODEL_FREE)}")
    if not isinstance(params, PARAMS_BY_METHOD[method]):
        raise TypeError(f"{method} needs {PARAMS_BY_METHOD[method].__name__}, not {type(params).__name__}")
    if not normals:
        raise ValueError("at least one normal image is needed")
    module = MODEL_FREE[method]
    normal_index = index % len(normals)
    normal = normals[normal_index]
    seed = pair_seed(job_seed, index)
    rng = np.random.default_rng(seed)

    # 1. Where the product is (textures: everywhere).
    foreground = None
    if mask_spec.inside_foreground:
        foreground = foregrounds[normal_index] if foregrounds is not None else None
        if foreground is None:
            foreground = foreground_mask(normal)

    # 2. Where the defect goes.
    mask = sample_target_mask(
        mask_spec,
        mask_spec.source or DEFAULT_MASK_SOURCE,
        rng,
        (normal.height, normal.width),
        foreground=foreground,
        exemplar_masks=exemplar_masks,
        given_masks=given_masks,
        index=index,
        native=lambda mask_rng, size: module.native_mask(mask_rng, size, params),
    )

    # 3. The defect itself.
    if module is draem:
        image = draem.synthesize(normal, mask, rng, params, textures=normals)
    else:
        image = cutpaste.synthesize(normal, mask, rng, params)
    return Pair(index, seed, normal_index, image, mask.astype(np.uint8) * 255)
