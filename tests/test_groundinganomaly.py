"""GroundingAnomaly on tiny random-weight models: SD 1.5's architecture and a ConvNextModel, both
saved with save_pretrained and loaded from their directories through the production loaders."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors.torch import load_file

from models.diffusion.images import decode, encode, fade_into_normal, image_to_pixels
from models.diffusion.training import CHECKPOINT_FILE
from models.errors import InputError
from models.masks.sampling import foreground_mask, sample_target_mask
from models.methods.groundinganomaly import GroundingAnomalyParams, method, pipeline
from models.methods.groundinganomaly.gsm import GatedBlocks, attached, attached_for_sampling, lora_config, lora_state
from models.methods.groundinganomaly.scm import (
    BACKGROUND,
    FIRST_DEFECT,
    PRODUCT,
    SpatialConditioning,
    load_convnext,
    semantic_map,
)
from models.methods.interface import Checkpoints, Exemplar, GenerateRequest, NormalImages, job_items
from models.methods.params import MaskSpec
from tests.conftest import product_image
from tests.diffusion_fixtures import TINY_RESOLUTION, box_mask

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = GroundingAnomalyParams(resolution=TINY_RESOLUTION, num_inference_steps=4, train_steps=4, mask_train_steps=2,
                              batch_size=2, guidance_scale=3.0)
SIZE = TINY_RESOLUTION


def product(seed: int) -> Image.Image:
    return Image.fromarray(product_image(SIZE, SIZE, rgb=True, seed=seed))


@pytest.fixture(scope="module")
def convnext(tiny_sd, tiny_convnext_dir):
    return load_convnext(str(tiny_convnext_dir), tiny_sd.device)


@pytest.fixture(scope="module")
def exemplars():
    return [pipeline.Exemplar(product(1), box_mask(SIZE, SIZE, (16, 16, 32, 28)), "crack"),
            pipeline.Exemplar(product(2), box_mask(SIZE, SIZE, (30, 30, 44, 48)), "hole")]


@pytest.fixture(scope="module")
def trained(tiny_sd, tiny_convnext_dir, exemplars, tmp_path_factory):
    """A fine-tune on two defect types and two normal images; the ConvNeXt weights before it."""
    convnext = load_convnext(str(tiny_convnext_dir), tiny_sd.device)
    before = {key: value.clone() for key, value in convnext.state_dict().items()}
    folder = tmp_path_factory.mktemp("adapter")
    adapter = pipeline.finetune(tiny_sd, convnext, exemplars, [product(3), product(4)], TINY, product="tile", seed=0,
                                out_dir=folder)
    return adapter, folder, before


def test_semantic_map_puts_the_defect_token_exactly_inside_the_mask():
    foreground = box_mask(SIZE, SIZE, (8, 8, 56, 56))
    mask = box_mask(SIZE, SIZE, (20, 24, 27, 40))
    labels = semantic_map(foreground, mask, 1, SIZE).numpy()
    assert np.array_equal(labels == FIRST_DEFECT + 1, mask)
    assert np.array_equal(labels == PRODUCT, foreground & ~mask)
    assert np.array_equal(labels == BACKGROUND, ~foreground)
    assert np.array_equal(semantic_map(foreground, None, None, SIZE).numpy() == PRODUCT, foreground)


def test_with_closed_gates_and_zero_lora_the_unet_predicts_as_frozen_and_is_restored_after(tiny_sd, convnext):
    unet = tiny_sd.unet
    width = unet.config.cross_attention_dim
    scm = SpatialConditioning(torch.randn(4, 32), convnext, width)
    gated = GatedBlocks(unet, width)
    assert len(gated.blocks) == 10  # every transformer block: down, mid and up
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, width, generator=generator)
    t = torch.tensor([500, 20])
    labels = torch.stack([semantic_map(np.ones((SIZE, SIZE), bool), box_mask(SIZE, SIZE, (0, 0, 30, 30)), 0, SIZE)] * 2)
    weights = {key: value.clone() for key, value in unet.state_dict().items()}
    modules = [name for name, _ in unet.named_modules()]
    frozen = unet(latents, t, text).sample
    with attached(unet, gated, scm.fusion, lora_config(8)) as lora_parameters:
        names = [name for name, _ in unet.named_modules()]
        assert any(".attn1.to_q.lora_A" in name for name in names) and any(".attn2.to_out.0.lora_B" in name
                                                                          for name in names)
        assert not any("fuser" in name and "lora" in name for name in names)  # LoRA misses the gated blocks
        state = lora_state(unet)
        assert state and all("lora_" in key and "fuser" not in key for key in state)
        assert all(not value.any() for key, value in state.items() if "lora_B" in key)  # B starts at zero
        assert len(lora_parameters) == 10 * 8 * 2  # 10 blocks x (attn1, attn2) x 4 projections x (A, B)
        grounded = unet(latents, t, text, cross_attention_kwargs={"gligen": {
            "stage_features": scm.stage_features(labels)}}).sample
        assert torch.equal(grounded, frozen)
        gated.fusers[0].alpha_attn.data.fill_(0.5)  # an open gate changes the prediction
        opened = unet(latents, t, text, cross_attention_kwargs={"gligen": {
            "stage_features": scm.stage_features(labels)}}).sample
        assert not torch.equal(opened, frozen)
        # Guidance's batch [unconditional | conditional]: grounding for the second half only leaves
        # the first exactly as without the gated blocks.
        both = unet(latents, t, text, cross_attention_kwargs={"gligen": {
            "stage_features": scm.stage_features(labels[1:])}}).sample
        assert torch.equal(both[0], frozen[0])
        torch.testing.assert_close(both[1], opened[1], rtol=1e-4, atol=1e-5)
    assert [name for name, _ in unet.named_modules()] == modules
    assert all(torch.equal(value, weights[key]) for key, value in unet.state_dict().items())
    assert set(unet.state_dict()) == set(weights)
    assert torch.equal(unet(latents, t, text).sample, frozen)


def test_training_moves_gates_lora_and_the_scm_and_nothing_frozen_gets_a_gradient(tiny_sd, trained):
    adapter, folder, convnext_before = trained
    assert not torch.all(adapter.gated.gammas() == 0)
    assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in adapter.lora_weights.items())
    assert any(not torch.equal(value, convnext_before[key]) for key, value in adapter.scm.convnext.state_dict().items())
    for module in (tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert adapter.defects == ["crack", "hole"] and adapter.product == "tile"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["adapter_config.json", "gsm.safetensors", "learned_embeds.safetensors",
                     "lora/adapter_config.json", "lora/adapter_model.safetensors", "mask_embeds.safetensors",
                     "scm.safetensors"]


def test_ndi_at_strength_zero_gives_the_normal_image_back(tiny_sd, tiny_convnext_dir, trained):
    adapter = pipeline.load_adapter(trained[1], tiny_sd, load_convnext(str(tiny_convnext_dir), tiny_sd.device))
    normal, mask = product(5), box_mask(SIZE, SIZE, (20, 20, 36, 36))
    params = TINY.model_copy(update={"strength": 0.0})
    result = pipeline.generate(tiny_sd, adapter, [(normal, mask, 1)], params, defect="hole")[0]
    round_trip = decode(tiny_sd, encode(tiny_sd, image_to_pixels(normal, SIZE)[None]))[0]
    expected = fade_into_normal(normal, round_trip, mask, params.mask_dilation)
    assert np.array_equal(np.asarray(result.image), np.asarray(expected))
    # At the default strength the defect region is painted anew; still exact outside it.
    painted = pipeline.generate(tiny_sd, adapter, [(normal, mask, 1)], TINY, defect="hole")[0]
    assert not np.array_equal(np.asarray(painted.image), np.asarray(expected))
    far = ~np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(7)))  # beyond the 3 px band
    assert np.array_equal(np.asarray(painted.image)[far], np.asarray(normal)[far])
    # The paper's whole generated image (no labelled pair): the background is generated too.
    whole = pipeline.generate(tiny_sd, adapter, [(normal, mask, 1)], TINY, defect="hole", background="generated")[0]
    assert not np.array_equal(np.asarray(whole.image)[far], np.asarray(normal)[far])


def test_learned_masks_are_binary_non_empty_and_on_the_foreground(tiny_sd, tiny_sd_dir, tiny_convnext_dir, trained):
    normals = [product(6), product(7)]
    request = GenerateRequest(
        params=TINY, masks=MaskSpec(source="learned"), exemplars=[], given_masks=[],
        normals=NormalImages.in_memory(normals), items=job_items(2, 0, 2, 0), defect="crack",
        adapter_dir=trained[1], weight_dirs={"SD_MODEL_DIR": str(tiny_sd_dir),
                                             "CONVNEXT_MODEL_DIR": str(tiny_convnext_dir)}, device="cpu",
    )
    pairs = [pair for call in method.generate(request, method.calls(request), lambda *_: None) for pair in call]
    assert len(pairs) == 2
    for pair in pairs:
        mask = pair.mask_u8
        assert set(np.unique(mask)) == {0, 255}
        inside = mask > 0
        assert inside.any() and not inside.all()
        assert not (inside & ~foreground_mask(normals[pair.index])).any()
        assert pair.details == {"defect": "crack", "mask_source": "learned"}


def test_a_defect_type_the_adapter_did_not_learn_is_refused(tiny_sd_dir, tiny_convnext_dir, trained):
    request = GenerateRequest(
        params=TINY, masks=MaskSpec(source="exemplar"),
        exemplars=[Exemplar("e", product(1), box_mask(SIZE, SIZE, (16, 16, 32, 28)), "tile", "scratch")],
        given_masks=[], normals=NormalImages.in_memory([product(6)]), items=job_items(1, 0, 1, 1),
        adapter_dir=trained[1], weight_dirs={"SD_MODEL_DIR": str(tiny_sd_dir),
                                             "CONVNEXT_MODEL_DIR": str(tiny_convnext_dir)}, device="cpu",
    )
    with pytest.raises(InputError, match="learnt the defect types crack, hole, not 'scratch'"):
        list(method.generate(request, method.calls(request), lambda *_: None))


def test_fine_tune_needs_normals_unless_the_normal_fraction_is_zero(tiny_sd, convnext, exemplars, tmp_path):
    with pytest.raises(InputError, match="normal images too"):
        pipeline.finetune(tiny_sd, convnext, exemplars, [], TINY, product="tile", seed=0, out_dir=tmp_path)
    alone = TINY.model_copy(update={"normal_fraction": 0.0, "train_steps": 1, "mask_train_steps": 1})
    adapter = pipeline.finetune(tiny_sd, convnext, exemplars, [], alone, product="tile", seed=0, out_dir=tmp_path)
    assert adapter.defects == ["crack", "hole"]


def test_a_fine_tune_stopped_mid_training_resumes_to_the_same_adapter(tiny_sd, tiny_convnext_dir, exemplars, tmp_path):
    params = TINY.model_copy(update={"train_steps": 4, "mask_train_steps": 2})
    normals = [product(3)]

    def run(out_dir, checkpoints=None, on_progress=None):
        convnext = load_convnext(str(tiny_convnext_dir), tiny_sd.device)
        return pipeline.finetune(tiny_sd, convnext, exemplars, normals, params, product="tile", seed=7,
                                 out_dir=out_dir, checkpoints=checkpoints, on_progress=on_progress)

    def stop_at_step_3(stage, done, _total):
        if stage == "training" and done == 3:
            raise KeyboardInterrupt

    checkpoints = Checkpoints(tmp_path / "checkpoints", every=2)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "stopped", checkpoints, stop_at_step_3)
    assert (tmp_path / "checkpoints" / "gsm" / CHECKPOINT_FILE).is_file()
    resumed, whole = run(tmp_path / "resumed", checkpoints), run(tmp_path / "whole")
    for name in ("gsm.safetensors", "scm.safetensors", "learned_embeds.safetensors", "mask_embeds.safetensors",
                 "lora/adapter_model.safetensors"):
        first, second = load_file(tmp_path / "resumed" / name), load_file(tmp_path / "whole" / name)
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first), name
    assert resumed.defects == whole.defects


def test_the_learned_source_places_the_sampled_shape_on_the_foreground():
    foreground = box_mask(SIZE, SIZE, (32, 0, 64, 64))
    sampled = box_mask(128, 128, (10, 10, 40, 30))  # at twice the image's size: 30 x 20 px -> 15 x 10 px
    rng = np.random.default_rng(0)
    mask = sample_target_mask(MaskSpec(source="learned"), "learned", rng, (SIZE, SIZE), foreground=foreground,
                              learned=lambda _rng: sampled)
    rows, cols = np.nonzero(mask)
    assert mask.sum() == 150 and {np.ptp(rows) + 1, np.ptp(cols) + 1} == {10, 15}
    assert not (mask & ~foreground).any()
    with pytest.raises(ValueError, match="learned mask model"):
        sample_target_mask(MaskSpec(source="learned"), "learned", rng, (SIZE, SIZE))


def test_sampling_attach_predicts_what_the_training_attach_predicts_and_the_unet_is_restored_after(tiny_sd, convnext):
    """attached_for_sampling merges the LoRA and gives the fusers visual-only queries: the same prediction."""
    unet = tiny_sd.unet
    width = unet.config.cross_attention_dim
    scm = SpatialConditioning(torch.randn(4, 32), convnext, width)
    gated = GatedBlocks(unet, width)
    for fuser in gated.fusers:
        fuser.alpha_attn.data.fill_(0.5)
    processors = [fuser.attn.processor for fuser in gated.fusers]
    generator = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, width, generator=generator)
    t = torch.tensor([500, 20])
    labels = torch.stack([semantic_map(np.ones((SIZE, SIZE), bool), box_mask(SIZE, SIZE, (0, 0, 30, 30)), 0, SIZE)])
    weights = {key: value.clone() for key, value in unet.state_dict().items()}
    frozen = unet(latents, t, text).sample
    with attached(unet, gated, scm.fusion, lora_config(8)):
        trained = {key: torch.randn(value.shape, generator=generator) * 0.1 for key, value in lora_state(unet).items()}
    features = scm.stage_features(labels)
    grounding = {"gligen": {"stage_features": features}}
    tokens = features[-1].shape[-2] * features[-1].shape[-1]
    with attached(unet, gated, scm.fusion, lora_config(8), trained), torch.no_grad():
        layered = unet(latents, t, text, cross_attention_kwargs=grounding).sample
    with attached_for_sampling(unet, gated, scm.fusion, lora_config(8), trained, grounding_tokens=tokens):
        assert not any("lora" in name for name, _ in unet.named_modules())
        sampled = unet(latents, t, text, cross_attention_kwargs=grounding).sample
    assert not torch.allclose(layered, frozen, atol=1e-3)  # LoRA and gates change the prediction...
    torch.testing.assert_close(sampled, layered, rtol=1e-4, atol=1e-5)  # ...and alike when sampling
    assert [fuser.attn.processor for fuser in gated.fusers] == processors
    assert all(torch.equal(value, weights[key]) for key, value in unet.state_dict().items())
    assert set(unet.state_dict()) == set(weights)
