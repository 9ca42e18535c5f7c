"""models/diffusion/generation.py: the items every diffusion pipeline checks the same way, and the
label of a painted result (the target mask's painted part)."""

import numpy as np
import pytest
from PIL import Image

from models.diffusion.generation import GenerateItem, checked_items, painted_result
from tests.diffusion_fixtures import box_mask, textured_image


def test_items_are_checked_and_an_empty_mask_is_refused_unless_allowed():
    normal = textured_image(20, 30, "RGB", seed=1)
    empty = np.zeros((20, 30), bool)
    (item,) = checked_items([(normal, box_mask(20, 30, (2, 2, 8, 8)), 5)])
    assert isinstance(item, GenerateItem) and item.seed == 5
    with pytest.raises(ValueError, match="item 0: the target mask is empty"):
        checked_items([(normal, empty, 5)])
    assert checked_items([(normal, empty, 5)], empty_masks=True)[0].seed == 5
    with pytest.raises(ValueError, match="does not match the image"):
        checked_items([(normal, np.ones((30, 20), bool), 5)])
    with pytest.raises(ValueError, match="not supported"):
        checked_items([(normal.convert("RGBA"), box_mask(20, 30, (2, 2, 8, 8)), 5)])


def test_a_results_label_is_the_part_of_its_target_that_was_painted():
    normal = textured_image(20, 30, "L", seed=2)
    target = box_mask(20, 30, (2, 2, 10, 10))
    target[15, 25] = True  # a speck the fade rounded back to the normal's value
    pixels = np.asarray(normal).copy()
    pixels[2:10, 2:10] = 255 - pixels[2:10, 2:10]
    result = painted_result(GenerateItem(normal, target, 3), Image.fromarray(pixels), {"intensity": 1.0})
    assert result.mask.dtype == np.uint8 and np.array_equal(result.mask > 0, box_mask(20, 30, (2, 2, 10, 10)))
    assert result.seed == 3 and result.pair(7, ablated=[]).details == {"intensity": 1.0, "ablated": []}
