import numpy as np
import pytest
from PIL import Image

from models.masks import foreground_mask, sample_target_mask
from models.methods.params import MaskSpec

SIZE = (90, 140)  # (height, width): non-square on purpose


def disc(size=SIZE, radius=35):
    ys, xs = np.ogrid[0 : size[0], 0 : size[1]]
    return (ys - size[0] / 2) ** 2 + (xs - size[1] / 2) ** 2 < radius**2


def bright_disc_image(rng, size=SIZE):
    """A textured bright disc (the product) on a noisy black background."""
    inside = disc(size)
    pixels = rng.normal(10, 3, size + (3,)) + inside[..., None] * rng.normal(150, 25, size + (3,))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_foreground_of_a_disc_on_black_is_the_disc():
    image = bright_disc_image(np.random.default_rng(0))
    foreground = foreground_mask(image)
    assert foreground.dtype == bool and foreground.shape == SIZE
    assert iou(foreground, disc()) > 0.95


def test_foreground_of_a_dark_product_on_a_light_greyscale_background():
    rng = np.random.default_rng(1)
    pixels = np.clip(200 + rng.normal(0, 5, SIZE) - 140 * disc(), 0, 255).astype(np.uint8)
    assert iou(foreground_mask(Image.fromarray(pixels)), disc()) > 0.95


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_foreground_of_a_noise_texture_is_everything(mode):
    rng = np.random.default_rng(2)
    texture = Image.fromarray(rng.integers(0, 256, SIZE + (3,), dtype=np.uint8)).convert(mode)
    assert foreground_mask(texture).all()


def test_foreground_of_a_plain_image_is_everything():
    assert foreground_mask(Image.new("RGB", (140, 90), (90, 90, 90))).all()


def sample(spec, source, seed=0, **kwargs):
    return sample_target_mask(spec, source, np.random.default_rng(seed), SIZE, **kwargs)


def exemplar_ellipse():
    """A uint8 0/255 exemplar mask, as callers send them: half the target size, an ellipse in it."""
    ys, xs = np.ogrid[0:45, 0:70]
    return ((((ys - 15) / 5) ** 2 + ((xs - 30) / 12) ** 2) <= 1).astype(np.uint8) * 255


def test_exemplar_masks_are_jittered_and_land_inside_the_foreground():
    foreground = disc()
    masks = [
        sample(
            MaskSpec(source="exemplar"),
            "exemplar",
            seed,
            foreground=foreground,
            exemplar_masks=[exemplar_ellipse()],
        )
        for seed in range(20)
    ]
    for mask in masks:
        assert mask.dtype == bool and mask.shape == SIZE
        assert mask.any()
        assert not (mask & ~foreground).any()
    assert len({mask.tobytes() for mask in masks}) == len(masks)  # positions and jitter vary


def test_exemplar_masks_are_rescaled_to_the_target_image():
    exemplar = exemplar_ellipse()
    exemplar_fraction = (exemplar > 0).mean()
    spec = MaskSpec(source="exemplar", scale=(0.8, 1.2), inside_foreground=False)
    for seed in range(20):
        fraction = sample(spec, "exemplar", seed, exemplar_masks=[exemplar]).mean()
        # Per-axis rescale keeps the area fraction; the jitter scales it by 0.8**2 .. 1.2**2.
        assert 0.8**2 * 0.85 < fraction / exemplar_fraction < 1.2**2 * 1.15


def test_exemplar_bigger_than_the_foreground_is_cut_to_it():
    big = np.zeros((50, 50), dtype=bool)
    big[5:45, 5:45] = True
    foreground = disc(radius=10)
    mask = sample(MaskSpec(scale=(1.0, 1.0)), "exemplar", foreground=foreground, exemplar_masks=[big])
    assert mask.any() and not (mask & ~foreground).any()


def test_random_boxes_have_the_requested_area_and_aspect():
    spec = MaskSpec(box_area=(0.02, 0.08), box_aspect=(0.5, 2.0), inside_foreground=False)
    for seed in range(30):
        mask = sample(spec, "box", seed)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()
        assert mask.sum() == h * w  # a filled rectangle
        assert 0.02 * 0.9 <= mask.mean() <= 0.08 * 1.1
        assert 0.5 * 0.8 <= w / h <= 2.0 * 1.25


def test_random_boxes_stay_inside_the_foreground():
    foreground = disc()
    for seed in range(20):
        mask = sample(MaskSpec(), "box", seed, foreground=foreground)
        assert mask.any() and not (mask & ~foreground).any()


def test_fixed_boxes_are_used_in_turn_and_clipped():
    spec = MaskSpec(source="box", boxes=[(10, 20, 30, 25), (120, 80, 400, 300)])
    first = sample(spec, "box", index=2)
    assert first.sum() == 20 * 5 and first[20:25, 10:30].all()
    second = sample(spec, "box", index=3)
    assert second.sum() == 20 * 10 and second[80:, 120:].all()


def test_given_masks_are_used_in_turn_and_resized_nearest():
    rng = np.random.default_rng(3)
    small = [(rng.random((45, 70)) > 0.7).astype(np.uint8) * 255 for _ in range(2)]
    spec = MaskSpec(source="given", masks=["a", "b"])
    mask = sample(spec, "given", index=3, given_masks=small)
    expected = np.repeat(np.repeat(small[1] >= 128, 2, axis=0), 2, axis=1)
    assert mask.shape == SIZE and np.array_equal(mask, expected)


def test_given_mask_of_the_right_size_is_used_as_is():
    given = disc(radius=5)
    mask = sample(MaskSpec(source="given", masks=["a"]), "given", given_masks=[given], foreground=~given)
    assert np.array_equal(mask, given)


def test_native_masks_come_from_the_method_and_keep_to_the_foreground():
    calls = []

    def left_half(rng, size):
        calls.append(size)
        mask = np.zeros(size, dtype=bool)
        mask[:, : size[1] // 2] = True
        return mask

    alone = sample(MaskSpec(inside_foreground=False), "native", native=left_half)
    assert calls == [SIZE] and alone[:, :70].all() and not alone[:, 70:].any()
    kept = sample(MaskSpec(), "native", native=left_half, foreground=disc())
    assert np.array_equal(kept, alone & disc())


@pytest.mark.parametrize(
    "source, kwargs",
    [("exemplar", {}), ("given", {}), ("native", {}), ("somewhere", {"native": lambda rng, size: None})],
)
def test_missing_inputs_are_clear_errors(source, kwargs):
    with pytest.raises(ValueError):
        sample(MaskSpec(), source, **kwargs)
