"""What the model-free methods share: one pair per call, made from its item's seed alone, so a job
can be split, retried or resumed pair by pair and give the same output."""

from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from models.methods.interface import GenerateRequest, Item, Pair, batched, painted_part

NativeMask = Callable[[np.random.Generator, tuple[int, int], object], np.ndarray]  # (rng, size, params)
Synthesize = Callable[[Image.Image, np.ndarray, np.random.Generator], Image.Image]  # (normal, mask, rng)


def one_pair_per_call(request: GenerateRequest) -> list[list[Item]]:
    return batched(request.items, 1)


def model_free_pairs(
    request: GenerateRequest, calls: Sequence[list[Item]], native_mask: NativeMask, synthesize: Synthesize
) -> Iterator[list[Pair]]:
    for call in calls:
        yield [model_free_pair(request, item, native_mask, synthesize) for item in call]


def model_free_pair(request: GenerateRequest, item: Item, native_mask: NativeMask, synthesize: Synthesize) -> Pair:
    """Item's pair: one generator from its seed draws the mask (1), then the defect (2); the label is
    the mask's painted part (a blend can round back to the normal's values on a one-pixel speck)."""
    rng = np.random.default_rng(item.seed)
    mask = request.target_mask(item, rng, native=lambda mask_rng, size: native_mask(mask_rng, size, request.params))
    normal = request.normals[item.normal]
    image = synthesize(normal, mask, rng)
    return Pair(item.index, image, painted_part(mask, image, normal).astype(np.uint8) * 255, item.seed)
