import numpy as np
from PIL import Image

from models.preview import GAP, contact_sheet


def grey_pair(size, mode, with_mask=True):
    """A grey image (no pure red anywhere) and a 0/255 mask with a block in the middle."""
    width, height = size
    image = Image.new(mode, size, 128 if mode == "L" else (120, 130, 140))
    mask = np.zeros((height, width), dtype=np.uint8)
    if with_mask:
        mask[height // 4 : height // 2, width // 4 : width // 2] = 255
    return image, mask


def red_pixels(sheet):
    pixels = np.asarray(sheet)
    return (pixels[..., 0] == 255) & (pixels[..., 1] == 0) & (pixels[..., 2] == 0)


def test_sheet_is_an_rgb_grid_of_thumbnails_with_red_outlines():
    pairs = [grey_pair((300, 200), "RGB"), grey_pair((90, 240), "L"), grey_pair((64, 64), "L")]
    sheet = contact_sheet(pairs, thumb=100)
    assert sheet.mode == "RGB"
    assert sheet.size == (GAP + 2 * (100 + GAP), GAP + 2 * (100 + GAP))  # 3 items: 2 x 2 grid
    red = red_pixels(sheet)
    # One outline per pair: red in the first three cells, the fourth cell empty.
    step = 100 + GAP
    cells = [
        red[GAP + r * step : r * step + step, GAP + c * step : c * step + step]
        for r in (0, 1)
        for c in (0, 1)
    ]
    assert [cell.any() for cell in cells] == [True, True, True, False]
    # An outline, not a filled block: the middle of the first pair's red box is not red.
    rows, cols = np.nonzero(cells[0])
    assert not cells[0][(rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2]


def test_sheet_shows_at_most_max_items():
    pairs = [grey_pair((50, 40), "RGB") for _ in range(20)]
    sheet = contact_sheet(pairs, max_items=4, thumb=60)
    assert sheet.size == (GAP + 2 * (60 + GAP), GAP + 2 * (60 + GAP))


def test_empty_masks_draw_no_outline_and_tiny_defects_stay_visible():
    assert not red_pixels(contact_sheet([grey_pair((200, 100), "L", with_mask=False)])).any()
    image, mask = grey_pair((1000, 800), "RGB", with_mask=False)
    mask[400, 500] = 255  # one pixel, much smaller than a thumbnail pixel
    assert red_pixels(contact_sheet([(image, mask)], thumb=100)).any()


def test_bool_masks_are_accepted():
    image, mask = grey_pair((120, 80), "RGB")
    assert red_pixels(contact_sheet([(image, mask == 255)])).any()
