"""The fade of a generated region into its normal image (models.diffusion.images._border_fade) on
thin and multi-part masks, at every `mask_dilation` a job may ask for: every pixel of the mask
gets a real share of the generated pixels, and nothing beyond LABEL_BAND pixels of it gets any.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from models.diffusion.images import MASK_WEIGHT_FLOOR, _border_fade, fade_into_normal
from models.methods.interface import LABEL_BAND, Pair, label_contract_violation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
pytest_plugins = ["tests.diffusion_fixtures"]

SIZE = 48
BANDS = range(0, 65)  # every mask_dilation the params allow (FadeRing)


def horizontal_line() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[20, 6:40] = True
    return mask


def diagonal_line_2px() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    for i in range(30):
        mask[8 + i, 8 + i : 10 + i] = True
    return mask


def blob() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:30, 8:30] = True
    return mask


def blob_with_tail() -> np.ndarray:
    """A crack: a blob with a 1 px tail running from its side."""
    mask = blob()
    mask[18, 30:46] = True
    return mask


def scattered_parts() -> np.ndarray:
    """A blob, a 2x2 square, a 1 px line and single pixels, none touching another."""
    mask = blob()
    mask[36:38, 4:6] = True
    mask[42, 10:30] = True
    mask[4, 40] = mask[30, 44] = mask[44, 44] = True
    return mask


MASKS = {
    "horizontal line": horizontal_line,
    "2 px diagonal line": diagonal_line_2px,
    "blob": blob,
    "blob with a tail": blob_with_tail,
    "scattered parts": scattered_parts,
}


def distance_to(mask: np.ndarray) -> np.ndarray:
    """Chessboard distance of every pixel to the mask (0 on it)."""
    return ndimage.distance_transform_cdt(~mask, metric="chessboard")


@pytest.mark.parametrize("shape", MASKS)
def test_every_mask_pixel_gets_the_floor_and_nothing_beyond_the_band_gets_anything(shape):
    mask = MASKS[shape]()
    far = distance_to(mask) > LABEL_BAND
    for band in BANDS:
        weight = _border_fade(mask, band)
        assert weight.dtype == np.float32 and weight.shape == mask.shape
        assert weight[mask].min() >= MASK_WEIGHT_FLOOR, f"band {band}"
        assert (weight[far] == 0).all(), f"band {band}"
        assert weight.max() == 1, f"band {band}"


@pytest.mark.parametrize("band", BANDS)
def test_a_thick_blob_keeps_its_core_at_full_weight(band):
    mask = blob()
    depth = ndimage.distance_transform_cdt(mask, metric="chessboard")  # 1 on the mask's outer ring
    # The core is the blob eroded band - LABEL_BAND times, or as far as it keeps a pixel.
    core = depth > min(max(band - LABEL_BAND, 0), depth.max() - 1)
    assert (_border_fade(mask, band)[core] == 1).all()


@pytest.mark.parametrize("shape", MASKS)
@pytest.mark.parametrize("band", range(0, LABEL_BAND + 1))
def test_a_band_within_the_label_band_fades_linearly_from_the_mask(shape, band):
    """As before the floor: 1 on the mask, then (band + 1 - d) / (band + 1) at d px outside it."""
    mask = MASKS[shape]()
    steps = np.clip(band + 1 - distance_to(mask), 0, None).astype(np.float32)
    expected = steps / np.float32(band + 1)
    np.testing.assert_array_equal(_border_fade(mask, band), expected)


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("shape", MASKS)
def test_the_faded_image_changes_every_component_of_the_mask(shape, mode):
    mask = MASKS[shape]()
    normal = Image.new(mode, (SIZE, SIZE), 40)
    generated = torch.full((3, SIZE, SIZE), 220 / 127.5 - 1)  # differs from the normal everywhere
    for band in BANDS:
        image = fade_into_normal(normal, generated, mask, band)
        changed = np.asarray(image) != np.asarray(normal)
        if changed.ndim == 3:
            changed = changed.any(axis=2)
        assert changed[mask].all(), f"band {band}"
        assert label_contract_violation(normal, Pair(0, image, mask, 0)) is None, f"band {band}"
