"""The transplant method through its interface, in memory: exactness outside the blend band, the
written mask, determinism, modes and sizes, placement, the Poisson seam, and reproduction from a
manifest entry."""

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from scipy import ndimage

from models.errors import InputError
from models.masks.sampling import foreground_mask
from models.methods.interface import Exemplar, GenerateRequest, NormalImages, job_items, label_contract_violation
from models.methods.params import MaskSpec
from models.methods.registry import METHODS, generate_all
from models.methods.transplant import NO_AUGMENTATION, TransplantParams
from models.methods.transplant.method import reproduce
from tests.conftest import product_image

SPEC = METHODS["transplant"]


def spot_exemplar(height: int, width: int, mode: str, centres, radius: int = 5, seed: int = 0, id_="ex") -> Exemplar:
    """A product image with dark round spots (the defects) and their mask."""
    pixels = product_image(height, width, rgb=mode == "RGB", seed=seed).astype(np.float64)
    ys, xs = np.ogrid[0:height, 0:width]
    mask = np.zeros((height, width), bool)
    for y, x in centres:
        mask |= (ys - y) ** 2 + (xs - x) ** 2 <= radius**2
    pixels[mask] *= 0.3
    return Exemplar(id_, Image.fromarray(pixels.astype(np.uint8)), mask, "tile", "spot")


def normal_images(mode: str, sizes=((64, 80), (72, 96))) -> list[Image.Image]:
    return [Image.fromarray(product_image(h, w, rgb=mode == "RGB", seed=10 + i)) for i, (h, w) in enumerate(sizes)]


def request_for(params: dict, exemplars, normals, count=4, seed=0, masks: MaskSpec | None = None) -> GenerateRequest:
    return GenerateRequest(
        params=TransplantParams(**params), masks=masks or MaskSpec(source="native"), exemplars=list(exemplars),
        given_masks=[], normals=NormalImages.in_memory(normals), items=job_items(count, seed, len(normals), 1),
    )


def dilated(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=pixels) if pixels else mask


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("blend,blend_margin", [("poisson", 3), ("poisson", 1), ("feather", 2), ("paste", 0)])
def test_only_the_dilated_mask_changes_and_the_mask_is_on_the_product(mode, blend, blend_margin):
    exemplar = spot_exemplar(48, 64, mode, [(20, 24), (30, 44)])
    normals = normal_images(mode)
    request = request_for({"blend": blend, "blend_margin": blend_margin, "defects_per_image": (1, 3)},
                          [exemplar], normals, count=6)
    pairs = generate_all(SPEC, request)
    assert [pair.index for pair in pairs] == list(range(6))
    for pair in pairs:
        normal = normals[request.items[pair.index].normal]
        assert pair.image.mode == mode and pair.image.size == normal.size
        assert set(np.unique(pair.mask_u8)) == {0, 255}
        mask = pair.mask_u8 > 0
        assert mask.shape == (normal.height, normal.width) and mask.any()
        assert not (mask & ~foreground_mask(normal)).any(), "the defect left the product"
        changed = np.asarray(pair.image) != np.asarray(normal)
        changed = changed.any(axis=2) if changed.ndim == 3 else changed
        assert not (changed & ~dilated(mask, blend_margin)).any()
        assert changed[mask].mean() > 0.5, "the defect was not put in"
        assert label_contract_violation(normal, pair) is None
        assert 1 <= len(pair.details["transplants"]) <= 3 and pair.details["blend"] == blend


def test_the_same_seed_gives_the_same_pair_and_a_manifest_entry_reproduces_it():
    exemplars = [spot_exemplar(48, 64, "RGB", [(20, 24)], id_="a"), spot_exemplar(40, 40, "RGB", [(25, 15)], id_="b")]
    normals = normal_images("RGB")
    params = {"defects_per_image": (1, 2), "gain_jitter": 0.1, "mixed": True}
    first, second = (generate_all(SPEC, request_for(params, exemplars, normals, seed=3)) for _ in range(2))
    other = generate_all(SPEC, request_for(params, exemplars, normals, seed=4))
    for a, b, c in zip(first, second, other):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask_u8, b.mask_u8)
        assert a.details == b.details and a.details != c.details
    for pair in first:
        image, mask = reproduce(pair.details, normals[pair.index % 2], exemplars, TransplantParams(**params))
        assert np.asarray(image).tobytes() == np.asarray(pair.image).tobytes()
        assert np.array_equal(mask, pair.mask_u8 > 0)


@pytest.mark.parametrize("size", [(96, 128), (40, 50)])
def test_the_defect_is_scaled_with_the_image(size):
    exemplar = spot_exemplar(48, 64, "L", [(24, 32)], radius=6)
    normal = Image.fromarray(np.full(size, 120, np.uint8))  # no background: the whole image is product
    pairs = generate_all(SPEC, request_for({**NO_AUGMENTATION, "blend": "paste"}, [exemplar], [normal], count=2))
    exemplar_fraction = exemplar.mask.mean()
    for pair in pairs:
        assert (pair.mask_u8 > 0).mean() == pytest.approx(exemplar_fraction, rel=0.25)


def test_near_stays_near_the_exemplar_defect_and_mask_sources_choose_the_place():
    exemplar = spot_exemplar(64, 80, "L", [(20, 20)], radius=4)
    normals = [Image.fromarray(np.full((64, 80), 120, np.uint8))]
    near = generate_all(SPEC, request_for({"placement": "near", "max_shift": 0.05}, [exemplar], normals, count=4))
    for pair in near:
        rows, cols = np.nonzero(pair.mask_u8)
        assert abs(rows.mean() - 20) <= 0.05 * 64 + 2 and abs(cols.mean() - 20) <= 0.05 * 80 + 2

    box = (50, 30, 74, 58)  # x0, y0, x1, y1: far from the exemplar's own place
    boxed = generate_all(SPEC, request_for({}, [exemplar], normals, count=3,
                                           masks=MaskSpec(source="box", boxes=[box])))
    for pair in boxed:
        rows, cols = np.nonzero(pair.mask_u8)
        assert box[1] <= rows.min() and rows.max() < box[3] and box[0] <= cols.min() and cols.max() < box[2]


def test_components_each_moves_one_defect_whole_moves_them_all():
    exemplar = spot_exemplar(64, 80, "L", [(20, 20), (44, 60)], radius=4)
    normals = [Image.fromarray(np.full((64, 80), 120, np.uint8))]
    for components, expected in (("each", 1), ("whole", 2)):
        params = {**NO_AUGMENTATION, "components": components, "blend": "paste"}
        for pair in generate_all(SPEC, request_for(params, [exemplar], normals, count=3)):
            assert ndimage.label(pair.mask_u8 > 0, np.ones((3, 3)))[1] == expected, components


def _seam_ratio(image: Image.Image, normal: Image.Image, mask: np.ndarray) -> float:
    """Mean |difference| of 4-neighbours across the mask's border, over that of the normal image."""
    pixels, reference = np.asarray(image, np.float64), np.asarray(normal, np.float64)
    across = []
    for axis in (0, 1):
        inside_a, inside_b = np.delete(mask, -1, axis), np.delete(mask, 0, axis)
        steps = np.abs(np.diff(pixels, axis=axis))
        across.append(steps[inside_a != inside_b])
    normal_steps = np.concatenate([np.abs(np.diff(reference, axis=axis)).ravel() for axis in (0, 1)])
    return np.concatenate(across).mean() / normal_steps.mean()


def test_poisson_blending_leaves_no_seam_where_a_paste_does():
    # The exemplar is much brighter than the destination and its defect fades smoothly into its
    # surroundings: only the blend can remove the step (photometric matching is off to show it).
    rng = np.random.default_rng(0)
    ys, xs = np.ogrid[0:64, 0:64]
    radius = np.sqrt((ys - 32.0) ** 2 + (xs - 32.0) ** 2) / 10
    exemplar_pixels = 190 + rng.normal(0, 2, (64, 64)) - 60 * np.clip(1 - radius**2, 0, 1) ** 2
    exemplar = Exemplar("flat", Image.fromarray(np.clip(exemplar_pixels, 0, 255).astype(np.uint8)), radius < 1,
                        "tile", "spot")
    normal = Image.fromarray(np.clip(90 + rng.normal(0, 2, (64, 64)), 0, 255).astype(np.uint8))
    ratios = {}
    for blend in ("poisson", "paste"):
        params = {**NO_AUGMENTATION, "blend": blend, "match_photometry": False}
        pair = generate_all(SPEC, request_for(params, [exemplar], [normal], count=1))[0]
        ratios[blend] = _seam_ratio(pair.image, normal, pair.mask_u8 > 0)
        # The defect is still there: its middle darker than its rim.
        mask, pixels = pair.mask_u8 > 0, np.asarray(pair.image, float)
        rim = mask & ~ndimage.binary_erosion(mask, iterations=2)
        assert pixels[mask].min() < np.median(pixels[rim]) - 30, blend
    assert ratios["poisson"] < 2.0 < 10 < ratios["paste"], ratios


def test_bad_params_and_exemplars_without_defects_are_refused():
    for bad in ({"blend_margin": 4}, {"defects_per_image": (0, 1)}, {"defects_per_image": (3, 2)},
                {"scale": (0, 1)}, {"blend": "alpha"}, {"margin": 3}):
        with pytest.raises(ValidationError):
            TransplantParams(**bad)
    normal = normal_images("L")[:1]
    empty = Exemplar("n", normal[0], np.zeros((64, 80), bool), "tile", None)
    with pytest.raises(InputError, match="non-empty mask"):
        generate_all(SPEC, request_for({}, [empty], normal, count=1))


def test_feather_ramps_over_the_band_and_mixed_keeps_a_textured_destination():
    rng = np.random.default_rng(1)
    ys, xs = np.ogrid[0:48, 0:48]
    spot = (ys - 24) ** 2 + (xs - 24) ** 2 <= 36
    exemplar = Exemplar("spot", Image.fromarray(np.where(spot, 40, 200).astype(np.uint8)), spot, "tile", "spot")
    stripes = np.broadcast_to(np.where(xs % 4 < 2, 70, 130), (48, 48))
    normal = Image.fromarray(np.clip(stripes + rng.normal(0, 1, (48, 48)), 0, 255).astype(np.uint8))
    base = {**NO_AUGMENTATION, "match_photometry": False}

    feather = generate_all(SPEC, request_for({**base, "blend": "feather"}, [exemplar], [normal], count=1))[0]
    mask, pixels = feather.mask_u8 > 0, np.asarray(feather.image, float)
    ring = dilated(mask, 1) & ~mask  # one pixel out of a 3 px band: alpha 3/4 towards the exemplar's 200
    expected = (3 * 200 + np.asarray(normal, float)[ring]) / 4
    assert np.abs(pixels[ring] - expected).max() <= 1

    # Inside the spot the exemplar is flat: normal cloning flattens the stripes there, mixed keeps them.
    stripe_strength = {}
    for mixed in (False, True):
        pair = generate_all(SPEC, request_for({**base, "mixed": mixed}, [exemplar], [normal], count=1))[0]
        inner = ndimage.binary_erosion(pair.mask_u8 > 0, iterations=2)
        stripe_strength[mixed] = np.abs(np.diff(np.asarray(pair.image, float), axis=1))[inner[:, 1:]].mean()
    assert stripe_strength[True] > 3 * stripe_strength[False] + 5, stripe_strength
