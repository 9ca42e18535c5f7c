"""GroundingAnomaly on tiny random-weight models: SD 1.5's architecture and a ConvNextModel, both
saved with save_pretrained and loaded from their directories through the production loaders.

The paper's components each have a test of their effect that fails when the component is
disconnected, and shows it gone when ablated: gsm (the map's defect label moves the conditional
noise prediction, gates perturbed open), scm (the map's shapes reach the tokens; box grounding
sees boxes only), sff (every stage and the positions), lora, ndi (the start against an independent
computation), mnt and the flips (the recorded draws of a fine-tune), the learned masks (the
textual inversion), and the gate diagnostics (the default rates open the gates past a floor)."""

from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file

from models.diffusion.images import decode, encode, fade_into_normal, image_to_pixels
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.diffusion.training import CHECKPOINT_FILE
from models.errors import InputError
from models.masks.sampling import foreground_mask, sample_target_mask
from models.methods.groundinganomaly import GroundingAnomalyParams, method, pipeline
from models.methods.groundinganomaly.gsm import GatedBlocks, attached, attached_for_sampling, lora_config, lora_state
from models.methods.groundinganomaly.scm import (
    BACKGROUND,
    FIRST_DEFECT,
    PRODUCT,
    BoxGrounding,
    SemanticFeatureFusion,
    SpatialConditioning,
    bounding_boxes,
    load_convnext,
    position_embeddings,
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


# The main fine-tune: 40 steps of 4 images (160 draws for the MNT share), at the default learning rates.
TRAINED = TINY.model_copy(update={"train_steps": 40, "batch_size": 4})
GATE_FLOOR = {"mean_abs_tanh": 0.005, "max_abs_tanh": 0.02}  # 40 steps at the LoRA's 5e-5: about 0.002


class UNetCalls:
    """Every UNet call's inputs (sample, timestep, cross_attention_kwargs) and output, in a block.

    A wrapper of the UNet's forward rather than a hook: restored_after (models.diffusion.adapters)
    gives the UNet back copies of its hook registries, from which a hook's handle no longer removes it."""

    def __init__(self, unet):
        self.unet, self.inputs, self.outputs = unet, [], []

    def __enter__(self):
        self.wrapped = vars(self.unet).get("forward")  # an enclosing block's wrapper
        forward = self.unet.forward

        def recording(sample, timestep, *args, **kwargs):
            self.inputs.append((sample.detach().clone(), timestep, kwargs.get("cross_attention_kwargs")))
            output = forward(sample, timestep, *args, **kwargs)
            self.outputs.append(output.sample.detach())
            return output

        self.unet.forward = recording
        return self

    def __exit__(self, *_):
        if self.wrapped is None:
            del self.unet.forward
        else:
            self.unet.forward = self.wrapped


@dataclass
class Recorded:
    """What a fine-tune's GSM stage drew and what reached the UNet and the grounding, step by step."""

    batches: list = field(default_factory=list)  # pipeline.TrainingBatch per step
    unet_samples: list = field(default_factory=list)  # every UNet call's noisy latents (the mask inversion's first)
    grounding_labels: list = field(default_factory=list)  # the label maps the grounding encoded


def fine_tune(sd, convnext_dir, exemplars, normals, params, folder, seed=0):
    """A fine-tune recording its draws (pipeline.draw_batch) and its UNet and grounding inputs."""
    recorded = Recorded()
    convnext = load_convnext(str(convnext_dir), sd.device)
    draw = pipeline.draw_batch

    def recording_draw(*args, **kwargs):
        recorded.batches.append(draw(*args, **kwargs))
        return recorded.batches[-1]

    def recording_inputs(inputs):
        def record(self, labels):
            recorded.grounding_labels.append(labels.clone())
            return inputs(self, labels)
        return record

    with pytest.MonkeyPatch.context() as patch, UNetCalls(sd.unet) as calls:
        patch.setattr(pipeline, "draw_batch", recording_draw)
        for grounding in (SpatialConditioning, BoxGrounding):
            patch.setattr(grounding, "grounding_inputs", recording_inputs(grounding.grounding_inputs))
        adapter = pipeline.finetune(sd, convnext, exemplars, normals, params, product="tile", seed=seed,
                                    out_dir=folder)
    recorded.unet_samples = [sample for sample, _, _ in calls.inputs]
    return adapter, recorded


@pytest.fixture(scope="module")
def trained(tiny_sd, tiny_convnext_dir, exemplars, tmp_path_factory):
    """A fine-tune on two defect types and two normal images; the ConvNeXt weights before it; its records."""
    before = {key: value.clone() for key, value in load_convnext(str(tiny_convnext_dir), tiny_sd.device)
              .state_dict().items()}
    folder = tmp_path_factory.mktemp("adapter")
    adapter, recorded = fine_tune(tiny_sd, tiny_convnext_dir, exemplars, [product(3), product(4)], TRAINED, folder)
    return adapter, folder, before, recorded


@pytest.fixture(scope="module")
def ablated(tiny_sd, tiny_convnext_dir, exemplars, tmp_path_factory):
    """Fine-tunes without components, by ablate list: (adapter, folder, records)."""
    runs = {}
    for ablate in (("lora", "mnt", "scm"), ("gsm", "ndi"), ("sff",)):
        folder = tmp_path_factory.mktemp("ablated")
        params = TINY.model_copy(update={"ablate": list(ablate)})
        adapter, recorded = fine_tune(tiny_sd, tiny_convnext_dir, exemplars, [product(3), product(4)], params, folder)
        runs[ablate] = (adapter, folder, recorded)
    return runs


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
    adapter, folder, convnext_before, _ = trained
    assert not torch.all(adapter.gated.gammas() == 0)
    assert torch.all(adapter.gated.gammas() != 0)  # every gate, not one
    assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in adapter.lora_weights.items())
    assert all(value.abs().sum() > 0 for key, value in adapter.lora_weights.items() if key.endswith("lora_B.weight"))
    convnext = adapter.grounding.convnext.state_dict()
    assert any(not torch.equal(value, convnext_before[key]) for key, value in convnext.items())
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
        assert pair.details == {"defect": "crack", "mask_source": "learned", "ablated": []}


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


# --- The paper's components: each in the path, and gone when ablated. ---

NORMAL, MASK = product(5), box_mask(SIZE, SIZE, (20, 20, 36, 36))
FAR = ~np.asarray(Image.fromarray(MASK).filter(ImageFilter.MaxFilter(7)))  # beyond the mask and its 3 px band


def fresh(tiny_sd, tiny_convnext_dir, folder, gates_seed: int | None = 0):
    """The adapter in `folder`, loaded anew (so a test's changes stay its own), its gates set to random
    non-zero values (as diffusers' tests perturb zero-initialised layers) unless gates_seed is None."""
    adapter = pipeline.load_adapter(folder, tiny_sd, load_convnext(str(tiny_convnext_dir), tiny_sd.device))
    if gates_seed is not None and adapter.gated is not None:
        generator = torch.Generator().manual_seed(gates_seed)
        for fuser in adapter.gated.fusers:
            for gate in (fuser.alpha_attn, fuser.alpha_dense):
                sign = torch.sign(torch.randn((), generator=generator))
                gate.data = (0.5 + torch.rand((), generator=generator)) * sign
    return adapter


def generate_both_defects(sd, adapter, params, monkeypatch):
    """crack and hole at the same place from the same seed, the prompt naming neither (so only the
    semantic map's defect label tells them apart): (images, first UNet outputs) of each."""
    monkeypatch.setattr(pipeline, "PROMPT", pipeline.NORMAL_PROMPT)
    images, outputs = [], []
    for defect in ("crack", "hole"):
        with UNetCalls(sd.unet) as calls:
            result = pipeline.generate(sd, adapter, [(NORMAL, MASK, 1)], params, defect=defect)[0]
        images.append(np.asarray(result.image))
        outputs.append(calls.outputs[0])
    return images, outputs


def test_the_paper_components_are_declared_and_ablate_names_only_them():
    from pydantic import ValidationError

    from models.methods.groundinganomaly import SPEC
    assert {c.name: c.acts_in for c in SPEC.components} == {
        "scm": "finetune", "sff": "finetune", "gsm": "generate", "lora": "generate", "mnt": "finetune",
        "ndi": "generate"}
    assert GroundingAnomalyParams(ablate=["gsm", "ndi"]).ablate == ["gsm", "ndi"]
    for wrong in (["controlnet"], ["ndi", "ndi"]):
        with pytest.raises(ValidationError):
            GroundingAnomalyParams(ablate=wrong)
    assert "mnt" in SPEC.ablation_problem(["mnt", "ndi"], "generate")
    assert SPEC.ablation_problem(["gsm", "lora", "ndi"], "generate") is None


@pytest.mark.parametrize("run", ["scm", "box"])
def test_gsm_the_map_and_its_defect_label_reach_the_noise_prediction_and_not_when_ablated(
        tiny_sd, tiny_convnext_dir, trained, ablated, run, monkeypatch):
    folder = trained[1] if run == "scm" else ablated[("lora", "mnt", "scm")][1]
    adapter = fresh(tiny_sd, tiny_convnext_dir, folder)
    assert isinstance(adapter.grounding, SpatialConditioning if run == "scm" else BoxGrounding)
    # The tiny CLIP's word vectors, the tokens' start, are ~0.02 in scale: labels would barely differ.
    adapter.grounding.tokens.data = torch.randn(adapter.grounding.tokens.shape,
                                                generator=torch.Generator().manual_seed(6))
    # The grounding encodes the map of the normal's foreground with the defect's label in the mask.
    fused = []
    hook = adapter.grounding.position_net.register_forward_hook(lambda _m, _args, output: fused.append(output))
    (crack, hole), (eps_crack, eps_hole) = generate_both_defects(tiny_sd, adapter, TINY, monkeypatch)
    hook.remove()
    labels = semantic_map(foreground_mask(NORMAL) | MASK, MASK, adapter.defects.index("hole"), SIZE)[None]
    with torch.no_grad():
        expected = adapter.grounding.position_net(**adapter.grounding.grounding_inputs(labels))
    torch.testing.assert_close(fused[-1], expected)
    # [unconditional | conditional]: only the grounded half sees the label; the pixels change in the mask only.
    assert torch.equal(eps_crack[0], eps_hole[0]) and (eps_crack[1] - eps_hole[1]).abs().max() > 1e-3
    assert not np.array_equal(crack, hole) and np.array_equal(crack[FAR], hole[FAR])
    # Ablated at generate: no grounding at all, so the label changes nothing.
    params = TINY.model_copy(update={"ablate": ["gsm"]})
    (crack, hole), (eps_crack, eps_hole) = generate_both_defects(tiny_sd, adapter, params, monkeypatch)
    assert torch.equal(eps_crack, eps_hole) and np.array_equal(crack, hole)


def test_gsm_ablated_in_the_fine_tune_trains_the_lora_alone_and_generates_ungrounded(
        tiny_sd, tiny_convnext_dir, ablated, monkeypatch):
    adapter, folder, recorded = ablated[("gsm", "ndi")]
    assert adapter.grounding is None and adapter.gated is None and not recorded.grounding_labels
    assert any(key.endswith("lora_B.weight") and value.abs().sum() > 0 for key, value in adapter.lora_weights.items())
    assert all(value.abs().sum() > 0 for key, value in adapter.lora_weights.items() if key.endswith("lora_B.weight"))
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["adapter_config.json", "lora/adapter_config.json", "lora/adapter_model.safetensors",
                     "mask_embeds.safetensors"]
    loaded = fresh(tiny_sd, tiny_convnext_dir, folder)
    assert loaded.grounding is None and loaded.config["diagnostics"].keys() == {"losses"}
    with UNetCalls(tiny_sd.unet) as calls:
        (crack, hole), _ = generate_both_defects(tiny_sd, loaded, TINY, monkeypatch)
    assert np.array_equal(crack, hole) and all(kwargs is None for _, _, kwargs in calls.inputs)
    result = pipeline.generate(tiny_sd, loaded, [(NORMAL, MASK, 1)], TINY, defect="hole")[0]
    assert result.details == {"ablated": ["gsm", "ndi"]}
    with pytest.raises(InputError, match="nothing to train"):
        pipeline.finetune(tiny_sd, None, [], [], TINY.model_copy(update={"ablate": ["gsm", "lora"]}),
                          product="tile", seed=0, out_dir=folder)


def test_scm_encodes_the_shape_inside_the_boxes_and_box_grounding_does_not(tiny_sd, convnext):
    width = tiny_sd.unet.config.cross_attention_dim
    tokens = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    foreground = box_mask(SIZE, SIZE, (4, 4, 60, 60))
    square = box_mask(SIZE, SIZE, (16, 16, 40, 40))
    ell = square & ~box_mask(SIZE, SIZE, (28, 16, 40, 28))  # the same bounding box, another shape
    maps = torch.stack([semantic_map(foreground, mask, defect, SIZE)
                        for mask, defect in ((square, 0), (ell, 0), (ell, 1), (np.roll(ell, 8, axis=1), 0))])
    scm = SpatialConditioning(tokens, convnext, width).eval()
    boxes = BoxGrounding(tokens, width).eval()
    with torch.no_grad():
        encoded = scm.position_net(**scm.grounding_inputs(maps))
        boxed = boxes.position_net(**boxes.grounding_inputs(maps))
    assert not torch.allclose(encoded[0], encoded[1], atol=1e-4)  # the SCM sees the shape...
    assert torch.equal(boxed[0], boxed[1])  # ...box grounding only the box
    assert not torch.allclose(boxed[1], boxed[2]) and not torch.allclose(boxed[1], boxed[3])  # label, place
    assert boxes.token_count(boxes.grounding_inputs(maps)) == 2 == boxed.shape[1]
    expected = torch.tensor([[4, 4, 60, 60], [16, 16, 40, 40]]) / SIZE  # x0, y0, past x1, past y1
    inputs = boxes.grounding_inputs(maps[1:2])
    assert torch.equal(inputs["boxes"][0], expected.float()) and torch.equal(inputs["masks"], torch.ones(1, 2))
    assert torch.equal(inputs["positive_embeddings"][0], tokens[[PRODUCT, FIRST_DEFECT]])
    normal = boxes.grounding_inputs(semantic_map(foreground, None, None, SIZE)[None])
    assert torch.equal(normal["masks"], torch.tensor([[1.0, 0.0]])) and not normal["boxes"][0, 1].any()
    assert torch.equal(bounding_boxes(torch.zeros(1, 8, 8, dtype=torch.bool)), torch.zeros(1, 4))


def test_scm_ablated_fine_tune_trains_box_grounding_without_lora_on_exemplars_alone(
        tiny_sd, tiny_convnext_dir, ablated):
    adapter, folder, recorded = ablated[("lora", "mnt", "scm")]
    assert isinstance(adapter.grounding, BoxGrounding) and adapter.lora is None and adapter.lora_weights is None
    assert not torch.all(adapter.gated.gammas() == 0)
    assert adapter.config["ablate"] == ["lora", "mnt", "scm"] and adapter.config["normals"] == 0
    assert not (folder / "lora").exists()
    assert not any("convnext" in key for key in load_file(folder / "scm.safetensors"))
    assert all(len(batch.picks) and (batch.picks < 2).all() for batch in recorded.batches)  # no normals (MNT off)
    loaded = fresh(tiny_sd, tiny_convnext_dir, folder, gates_seed=None)
    state = adapter.grounding.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in loaded.grounding.state_dict().items())
    params = TINY.model_copy(update={"ablate": ["ndi"]})
    assert pipeline.generate(tiny_sd, loaded, [(NORMAL, MASK, 1)], params, defect="crack")[0].details == {
        "ablated": ["lora", "mnt", "ndi", "scm"]}


def test_sff_fuses_every_stage_with_positions_and_ablated_the_last_alone(tiny_sd, tiny_convnext_dir, ablated):
    generator = torch.Generator().manual_seed(4)
    widths, width, side = [8, 16, 24, 32], 16, 2
    stages = tuple(torch.randn(1, w, side * 2 ** (3 - i), side * 2 ** (3 - i), generator=generator)
                   for i, w in enumerate(widths))
    for last_stage_only, used in ((False, [0, 1, 2, 3]), (True, [3])):
        fusion = SemanticFeatureFusion(widths, width, last_stage_only)
        with torch.no_grad():
            fused = fusion(stages)
            for i in range(4):
                changed = list(stages)
                changed[i] = changed[i] + torch.randn(changed[i].shape, generator=generator)
                assert (not torch.allclose(fusion(tuple(changed)), fused)) == (i in used), (last_stage_only, i)
            # Features alike at every place: the tokens still differ, by the fixed positions exactly.
            flat = fusion(tuple(torch.ones_like(stage) for stage in stages))
        assert not torch.allclose(flat[0, 0], flat[0, 1])
        unplaced = flat[0] - position_embeddings(side, side, width)
        torch.testing.assert_close(unplaced, unplaced[:1].expand_as(unplaced))
    rows = torch.arange(side, dtype=torch.float32)
    torch.testing.assert_close(position_embeddings(side, side, 8)[:, 0], rows.repeat_interleave(side).sin())
    torch.testing.assert_close(position_embeddings(side, side, 8)[:, 4], rows.repeat(side).sin())
    # Ablated in a fine-tune: its adapter has the last stage's projection alone, and its pairs say so.
    adapter, folder, _ = ablated[("sff",)]
    loaded = fresh(tiny_sd, tiny_convnext_dir, folder, gates_seed=None)
    assert len(loaded.grounding.fusion.projections) == 1 and loaded.grounding.fusion.first_stage == 3
    assert pipeline.generate(tiny_sd, loaded, [(NORMAL, MASK, 1)], TINY, defect="crack")[0].details == {
        "ablated": ["sff"]}


def test_lora_changes_the_prediction_and_ablated_it_is_not_applied(tiny_sd, tiny_convnext_dir, trained):
    adapter = fresh(tiny_sd, tiny_convnext_dir, trained[1])
    generator = torch.Generator().manual_seed(5)

    def perturbed():  # LoRA's zero-initialised B set to random values
        return replace(adapter, lora_weights={key: torch.randn(value.shape, generator=generator) * 0.3
                                              if key.endswith("lora_B.weight") else value
                                              for key, value in adapter.lora_weights.items()})

    def image(adapter, params):
        return np.asarray(pipeline.generate(tiny_sd, adapter, [(NORMAL, MASK, 1)], params, defect="crack")[0].image)

    first, second = perturbed(), perturbed()
    assert not np.array_equal(image(first, TINY), image(second, TINY))
    without = TINY.model_copy(update={"ablate": ["lora"]})
    assert np.array_equal(image(first, without), image(second, without))
    assert np.array_equal(image(first, without), image(replace(adapter, lora=None, lora_weights=None), TINY))


@pytest.mark.parametrize("ablate", [[], ["ndi"]])
def test_ndi_starts_from_the_noised_normal_and_ablated_from_pure_noise(tiny_sd, tiny_sd_dir, trained, ablate):
    from diffusers import DDIMScheduler

    adapter, seed = trained[0], 11
    params = TINY.model_copy(update={"ablate": ablate})
    with UNetCalls(tiny_sd.unet) as calls:
        pipeline.generate(tiny_sd, adapter, [(NORMAL, MASK, seed)], params, defect="crack")
    scheduler = DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler")
    scheduler.set_timesteps(TINY.num_inference_steps)
    steps = int(TINY.num_inference_steps * TINY.strength) if not ablate else TINY.num_inference_steps
    assert [int(t) for _, t, _ in calls.inputs] == scheduler.timesteps[-steps:].tolist()
    first = calls.inputs[0][0][1]  # the conditional row of the first call
    noise = torch.randn((steps + 1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    z_normal = encode(tiny_sd, image_to_pixels(NORMAL, SIZE)[None])[0]
    alpha_bar = scheduler.alphas_cumprod[int(scheduler.timesteps[-steps])]
    inside = F.max_pool2d(torch.from_numpy(MASK).float()[None, None], 8)[0]  # latent cells under the mask
    region = F.max_pool2d(inside, 3, stride=1, padding=1)  # ... dilated by one cell, as generate keeps it
    outside = alpha_bar.sqrt() * z_normal + (1 - alpha_bar).sqrt() * noise[1]
    start = alpha_bar.sqrt() * z_normal + (1 - alpha_bar).sqrt() * noise[0] if not ablate else noise[0]
    torch.testing.assert_close(first, start * region + outside * (1 - region), rtol=1e-5, atol=1e-5)


def test_mnt_draws_normals_at_normal_fraction_and_maps_flip_with_their_latents(tiny_sd, tiny_sd_dir, exemplars,
                                                                              trained):
    from diffusers import DDIMScheduler

    *_, recorded = trained
    images = [e.image for e in exemplars] + [product(3), product(4)]
    latents = encode(tiny_sd, torch.stack([image_to_pixels(image, SIZE) for image in images]))
    maps = [semantic_map(foreground_mask(e.image) | e.mask, e.mask, k, SIZE) for k, e in enumerate(exemplars)]
    maps += [semantic_map(foreground_mask(image), None, None, SIZE) for image in images[2:]]
    picks = torch.cat([batch.picks for batch in recorded.batches])
    assert len(picks) == TRAINED.train_steps * TRAINED.batch_size
    assert abs(float((picks >= 2).float().mean()) - TRAINED.normal_fraction) < 0.1  # 160 draws: 2.5 sigma
    alphas = DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler").alphas_cumprod
    unet_samples = recorded.unet_samples[-len(recorded.batches):]  # after the mask inversion's calls
    grounded = iter(recorded.grounding_labels)
    flipped_maps = 0
    for batch, sample in zip(recorded.batches, unet_samples):
        for row, (pick, (left_right, upside_down)) in enumerate(zip(batch.picks.tolist(), batch.flips.tolist())):
            dims = [d for d, flip in ((-1, left_right), (-2, upside_down)) if flip]
            assert torch.equal(batch.latents[row], latents[pick].flip(dims) if dims else latents[pick])
            assert torch.equal(batch.maps[row], maps[pick].flip(dims) if dims else maps[pick])
            flipped_maps += bool(dims) and not torch.equal(maps[pick].flip(dims), maps[pick])
        a = alphas[batch.t].view(-1, 1, 1, 1)
        torch.testing.assert_close(sample, a.sqrt() * batch.latents + (1 - a).sqrt() * batch.noise)
        if not batch.unconditional:
            assert torch.equal(next(grounded), batch.maps)
    assert flipped_maps > 10 and next(grounded, None) is None


def test_diagnostics_the_default_rates_open_the_gates_past_the_floor(trained):
    adapter, *_ = trained
    diagnostics = adapter.config["diagnostics"]
    openings = adapter.gated.gammas().tanh().abs()
    assert diagnostics["gates"] == {"mean_abs_tanh": pytest.approx(float(openings.mean())),
                                    "max_abs_tanh": pytest.approx(float(openings.max()))}
    for key, floor in GATE_FLOOR.items():
        assert diagnostics["gates"][key] > floor, key
    assert 0 < diagnostics["losses"]["noise_prediction"] < 10
    assert {key for key in diagnostics["losses"] if key.startswith("mask_inversion_")} == {
        f"mask_inversion_{defect}" for defect in adapter.defects}
    assert all(0 < value < 10 for value in diagnostics["losses"].values())
    # Adam's step is at most (1 - beta1) / sqrt(1 - beta2) ~ 3.2 learning rates (about one, typically): at the
    # LoRA's rate no gate could pass the floor in these steps.
    assert 3.2 * GroundingAnomalyParams().learning_rate * TRAINED.train_steps < GATE_FLOOR["max_abs_tanh"]


def test_learned_masks_come_from_the_mask_textual_inversion(tiny_sd, trained):
    adapter, *_ = trained
    vectors = adapter.mask_embeddings.vectors
    initial = initial_vectors(tiny_sd, pipeline.MASK_INITIALIZER, 1)[0]
    assert vectors.shape[0] == 2 and not torch.allclose(vectors[0], vectors[1])
    assert all(not torch.allclose(vector, initial) for vector in vectors)  # each inverted on its own masks
    masks = pipeline.sample_masks(tiny_sd, adapter, "crack", [1, 2], TINY)
    swapped = replace(adapter, mask_embeddings=LearnedEmbedding(adapter.mask_embeddings.tokens, vectors.flip(0)))
    assert not np.array_equal(masks[0], masks[1])  # each from its seed, and from the embedding:
    assert not np.array_equal(pipeline.sample_masks(tiny_sd, swapped, "crack", [1, 2], TINY)[0], masks[0])
