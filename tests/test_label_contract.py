"""The label contract, enforced once in the shared output path: outside a pair's written mask (plus
a blend band of at most 3 px) its image is the normal image's, exactly, and every connected
component of the mask has changed.

Every registered method runs here through its interface on small inputs and each of its pairs is
checked; a new method must add its tiny settings to TINY_PARAMS (the test fails until it does).
"""

import numpy as np
import pytest
from PIL import Image

from models.methods.interface import (
    LABEL_BAND,
    Checkpoints,
    Exemplar,
    FinetuneRequest,
    GenerateRequest,
    NormalImages,
    Pair,
    job_items,
    label_contract_violation,
)
from models.methods.params import MaskSpec
from models.methods.registry import METHODS, generate_all, implementation
from service.records import Records, connect
from service.settings import Settings
from service.storage import LocalStorage
from tests.diffusion_fixtures import box_mask, textured_image
from workers.context import JobContext
from workers.outputs import GenerateOutputs, LabelContractBroken

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIFFUSION = {"resolution": 64, "num_inference_steps": 3}
TINY_PARAMS = {
    "draem": {},
    "cutpaste": {},
    "anogen": {**DIFFUSION, "train_steps": 2, "batch_size": 1},
    "o2mag": {**DIFFUSION, "ago_steps": 1, "mask_dilation": 6},  # a fade wider than the band
    "anomalycontrol": {**DIFFUSION, "train_steps": 2, "batch_size": 1, "mask_dilation": 5},
    "cadiff": {**DIFFUSION, "train_steps": 2, "batch_size": 2, "mask_dilation": 5},
    "groundinganomaly": {**DIFFUSION, "train_steps": 2, "mask_train_steps": 1, "batch_size": 2, "mask_dilation": 5},
    "transplant": {},
}


def test_every_method_has_tiny_settings_here():
    assert set(METHODS) <= set(TINY_PARAMS), "add the new method's tiny params to TINY_PARAMS"


@pytest.fixture(scope="module")
def weight_dirs(tiny_sd_dir, tiny_blip2_dir, tiny_convnext_dir):
    return {"SD_MODEL_DIR": str(tiny_sd_dir), "BLIP2_MODEL_DIR": str(tiny_blip2_dir),
            "CONVNEXT_MODEL_DIR": str(tiny_convnext_dir)}


DIFFUSION_METHODS = sorted(name for name, spec in METHODS.items() if spec.family != "model-free")


def thin_multi_part_mask(height: int, width: int) -> np.ndarray:
    """A crack: a blob with a 1 px tail, then a 2 px wide scratch and a small blob apart from it."""
    mask = box_mask(height, width, (14, 14, 30, 30))
    mask[22, 30:50] = True
    mask[40:42, 10:30] = True
    mask |= box_mask(height, width, (56, 44, 59, 47))
    return mask


def generated_pairs(name, mode, precision, masks, weight_dirs, tmp_path, reference_mask=None, given_masks=(),
                    ablate=()):
    """The pairs `name` makes through its interface on two small normal images (a fine-tune first
    where the method needs one), with the normal image of each. The reference's mask is a box
    unless `reference_mask` is given. `ablate`: components to run without, each named on the job
    it acts in (a fine-tune carries its own into the generate job through the adapter)."""
    spec = METHODS[name]
    acts_in = {component.name: component.acts_in for component in spec.components}
    params = spec.params.model_validate(TINY_PARAMS[name])
    if ablate:
        params = params.model_copy(update={"ablate": [c for c in ablate if acts_in[c] == "finetune"]})
    if reference_mask is None:
        reference_mask = box_mask(56, 72, (20, 16, 44, 40))
    reference = Exemplar("ref", textured_image(56, 72, mode, seed=1), reference_mask, "p", "d")
    normals = [textured_image(60, 76, mode, seed=s) for s in (2, 3)]
    adapter = None
    if "finetune" in spec.kinds:
        adapter = tmp_path / "adapter"
        implementation(spec).finetune(FinetuneRequest(
            params, [reference], NormalImages.in_memory(normals), seed=0, adapter_dir=adapter,
            checkpoints=Checkpoints(tmp_path / "checkpoints"), weight_dirs=weight_dirs, device="cpu",
        ), lambda *_: None)
    if ablate:
        params = params.model_copy(update={"ablate": [c for c in ablate if acts_in[c] == "generate"]})
    request = GenerateRequest(
        params=params, masks=masks, exemplars=[reference], given_masks=list(given_masks),
        normals=NormalImages.in_memory(normals), items=job_items(3, 0, 2, 1), adapter_dir=adapter,
        weight_dirs=weight_dirs, device="cpu", precision=precision,
    )
    pairs = generate_all(spec, request)
    assert [pair.index for pair in pairs] == [0, 1, 2]
    return [(normals[request.items[pair.index].normal], pair) for pair in pairs]


@pytest.mark.parametrize(
    "name, mode, precision",
    [(name, mode, "fp32") for name in sorted(TINY_PARAMS) for mode in ("L", "RGB")]
    + [(name, "RGB", "bf16") for name in DIFFUSION_METHODS],  # CPU generation's bf16 autocast
)
def test_every_method_keeps_the_label_contract(name, mode, precision, weight_dirs, tmp_path):
    masks = MaskSpec(source=METHODS[name].default_mask_source)
    for normal, pair in generated_pairs(name, mode, precision, masks, weight_dirs, tmp_path):
        assert label_contract_violation(normal, pair) is None
        assert pair.mask_u8.any()


@pytest.mark.parametrize("name, component", [(name, component.name) for name in DIFFUSION_METHODS
                                             for component in METHODS[name].components])
def test_every_ablation_keeps_the_label_contract_and_every_pair_records_it(name, component, weight_dirs, tmp_path):
    masks = MaskSpec(source=METHODS[name].default_mask_source)
    for normal, pair in generated_pairs(name, "RGB", "fp32", masks, weight_dirs, tmp_path, ablate=[component]):
        assert label_contract_violation(normal, pair) is None
        assert pair.mask_u8.any()
        assert pair.details["ablated"] == [component]


@pytest.mark.parametrize("name", sorted(TINY_PARAMS))
def test_every_method_paints_every_part_of_a_thin_multi_part_mask(name, weight_dirs, tmp_path):
    """A thin tail and small separate parts are where a fade wider than the label band used to
    leave the normal image under the label (the diffusion methods' tiny params fade over 5-6 px).
    The mask is given as it is; the reference's is thin too, for transplant, which writes the
    shape of the defect it moves there."""
    assert "given" in METHODS[name].mask_sources
    masks = MaskSpec(source="given", masks=["ref"])
    pairs = generated_pairs(name, "RGB", "fp32", masks, weight_dirs, tmp_path,
                            reference_mask=thin_multi_part_mask(56, 72), given_masks=[thin_multi_part_mask(60, 76)])
    for normal, pair in pairs:
        assert label_contract_violation(normal, pair) is None


def test_the_check_allows_the_band_and_nothing_beyond():
    normal = textured_image(40, 40, "RGB", seed=4)
    mask = box_mask(40, 40, (10, 10, 20, 20))
    pixels = np.asarray(normal).copy()
    pixels[10:20, 10:20 + LABEL_BAND] = 0  # inside and across the band
    assert label_contract_violation(normal, Pair(0, Image.fromarray(pixels), mask, 0)) is None
    pixels[15, 20 + LABEL_BAND] = 255 - pixels[15, 20 + LABEL_BAND]  # one pixel beyond it
    assert "1 pixels farther than 3 px" in label_contract_violation(normal, Pair(0, Image.fromarray(pixels), mask, 0))
    assert "image is L" in label_contract_violation(normal, Pair(0, normal.convert("L"), mask, 0))
    assert "the mask is" in label_contract_violation(normal, Pair(0, normal, mask[:30], 0))


def test_the_check_refuses_a_mask_component_left_normal():
    normal = textured_image(40, 40, "RGB", seed=4)
    mask = box_mask(40, 40, (4, 4, 12, 12)) | box_mask(40, 40, (20, 30, 34, 32))  # a blob and a 2 px line
    pixels = np.asarray(normal).copy()
    pixels[4:12, 4:12, 1] = 255 - pixels[4:12, 4:12, 1]  # the blob only, in one channel
    violation = label_contract_violation(normal, Pair(0, Image.fromarray(pixels), mask, 0))
    assert "component 2 of the written mask (28 px, bounding box x0, y0, x1, y1 = 20, 30, 34, 32)" in violation
    assert "the label marks a defect that was not painted" in violation
    pixels[31, 33, 0] = 255 - pixels[31, 33, 0]  # one pixel of the line
    assert label_contract_violation(normal, Pair(0, Image.fromarray(pixels), mask, 0)) is None
    assert label_contract_violation(normal, Pair(0, normal, np.zeros((40, 40), bool), 0)) is None  # no defect


def test_the_check_tells_8_connected_pixels_as_one_component():
    normal = textured_image(20, 20, "L", seed=6)
    mask = np.zeros((20, 20), bool)
    mask[5, 5] = mask[6, 6] = True  # diagonal neighbours
    pixels = np.asarray(normal).copy()
    pixels[5, 5] = 255 - pixels[5, 5]
    assert label_contract_violation(normal, Pair(0, Image.fromarray(pixels), mask, 0)) is None


def test_the_worker_refuses_to_write_a_wrong_label(redis_url, tmp_path):
    normal = textured_image(32, 32, "L", seed=5)
    job = {"id": "contract", "tenant": "t", "method": "draem", "defect": "d", "normals": ["n0"]}
    storage = LocalStorage(tmp_path)
    context = JobContext(job, Records(connect(redis_url)), storage, Settings())
    outputs = GenerateOutputs(context, NormalImages(["n0"], lambda _: normal))
    changed = Image.fromarray(np.asarray(normal) // 2)  # every pixel, though the mask is one box
    item = job_items(1, 0, 1, 0)[0]
    with pytest.raises(LabelContractBroken, match="draem broke the label contract"):
        outputs.add(Pair(0, changed, box_mask(32, 32, (4, 4, 8, 8)), item.seed), item)
    assert list(storage.list("jobs/")) == []  # nothing of the pair was written
