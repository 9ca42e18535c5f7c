"""AnomalyControl on tiny models: the BLIP-2 loader, CSM + ASEA, the SGA adapter, fine-tuning with
CFG dropout, generation and the adapter's checks.

The BLIP-2 is a tiny random `Blip2ForImageTextRetrieval` with a BERT tokenizer and a BLIP image
processor, written by code, saved with `save_pretrained` and loaded through the production loader."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from safetensors.torch import load_file, save_file

from models.diffusion.loading import ModelUnavailable
from models.diffusion.sampling import encode_prompts
from models.errors import InputError
from models.methods.anomalycontrol import AnomalyControlParams, pipeline
from models.methods.anomalycontrol import method as anomalycontrol_method
from models.methods.anomalycontrol.csm import load_blip2, semantic_features
from models.methods.anomalycontrol.sga import WEIGHTS_FILE, SemanticGuidedAdapter
from models.methods.interface import (
    Checkpoints,
    Exemplar,
    GenerateRequest,
    NormalImages,
    Pair,
    job_items,
    label_contract_violation,
)
from models.methods.params import MaskSpec
from models.weights import blip2_dir_problem
from tests.diffusion_fixtures import box_mask, textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = AnomalyControlParams(resolution=64, num_inference_steps=4, guidance_scale=3.0, train_steps=3, batch_size=2)


@pytest.fixture(scope="module")
def blip2(tiny_blip2_dir):
    return load_blip2(tiny_blip2_dir, "cpu")


@pytest.fixture(scope="module")
def reference():
    return pipeline.Reference(textured_image(56, 72, "RGB", seed=1), box_mask(56, 72, (20, 16, 44, 40)), "tile",
                              "crack")


@pytest.fixture(scope="module")
def adapter_dir(tiny_sd, blip2, reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    pipeline.finetune(tiny_sd, blip2, [reference], PARAMS, seed=0, out_dir=folder)
    return folder


def frozen_state(*modules) -> list[torch.Tensor]:
    return [tensor.detach().clone() for module in modules for tensor in module.state_dict().values()]


def test_the_production_loader_reads_weights_tokenizer_and_processor_from_the_directory(tiny_blip2_dir, blip2,
                                                                                          tmp_path):
    assert blip2_dir_problem(str(tiny_blip2_dir)) is None
    assert blip2.model.qformer.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in blip2.model.parameters())
    assert blip2.tokenizer.convert_ids_to_tokens(blip2.tokenizer("with crack").input_ids) == [
        "[CLS]", "with", "crack", "[SEP]"]
    assert blip2.image_processor.size == {"height": 32, "width": 32} and blip2.patch_grid == (4, 4)

    # A BLIP-2 without the Q-Former's text input (a captioning checkpoint) is refused, not run half-random.
    other = tmp_path / "no_text_input"
    shutil.copytree(tiny_blip2_dir, other)
    weights = load_file(other / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("embeddings.")}, other / "model.safetensors")
    with pytest.raises(ModelUnavailable, match="lacks the Q-Former's text input"):
        load_blip2(other, "cpu")
    with pytest.raises(ModelUnavailable, match="BLIP2_MODEL_DIR is not set"):
        load_blip2(None, "cpu")


def test_asea_lowers_the_energy_and_the_chained_map_has_the_patch_grid_shape(blip2, reference):
    focused = semantic_features(blip2, reference.image, reference.mask, "crack", steps=3, step_size=0.3)
    assert len(focused.energies) == 4
    assert focused.energies[-1] < focused.energies[0]  # fails if e_g gets no gradient
    assert focused.attention.shape == blip2.patch_grid
    assert torch.all(focused.attention >= 0) and focused.attention.sum() > 0
    assert focused.features.shape == (blip2.num_queries, blip2.width)

    plain = semantic_features(blip2, reference.image, reference.mask, "crack", steps=0)
    assert plain.energies == focused.energies[:1] and not plain.guidance.any()
    assert not torch.allclose(plain.features, focused.features)  # e_g reaches C'
    everywhere = semantic_features(blip2, reference.image, np.ones_like(reference.mask), "crack", steps=3)
    assert everywhere.energies == [0.0] * 4  # all attention inside M_A: nothing to move


def test_gamma_zero_gives_the_frozen_unet_exactly_and_detaching_leaves_it_bit_identical(tiny_sd):
    unet = tiny_sd.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    t = torch.tensor([500, 20])
    features = torch.randn((2, 8, 32), generator=generator)
    with torch.no_grad():
        text = encode_prompts(tiny_sd, ["a photo of a tile with crack"] * 2)
        frozen = unet(latents, t, encoder_hidden_states=text).sample
    before = frozen_state(unet)

    adapter = SemanticGuidedAdapter.from_unet(unet, feature_width=32, num_tokens=8, gamma=0.0)
    assert len(adapter.layers) == sum(1 for name in unet.attn_processors if ".attn2." in name)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))  # a trained adapter, say
    with adapter.attached(unet), torch.no_grad():
        assert torch.equal(unet(latents, t, encoder_hidden_states=adapter.condition(text, features, torch.float32))
                           .sample, frozen)
        adapter.gamma = 1.0
        guided = unet(latents, t, encoder_hidden_states=adapter.condition(text, features, torch.float32)).sample
        assert not torch.allclose(guided, frozen)
        # The unconditional C' (zeros) adds nothing whatever gamma: K' = V' = 0.
        zeros = adapter.condition(text, torch.zeros_like(features), torch.float32)
        assert torch.equal(unet(latents, t, encoder_hidden_states=zeros).sample, frozen)

    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    assert all(torch.equal(a, b) for a, b in zip(frozen_state(unet), before))
    assert len(unet.state_dict()) == len(before) and not any(p.requires_grad for p in unet.parameters())
    with torch.no_grad():
        assert torch.equal(unet(latents, t, encoder_hidden_states=text).sample, frozen)


def test_training_moves_only_the_adapters_keys_and_values(tiny_sd, blip2, reference, tmp_path):
    models = (tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, blip2.model)
    before = frozen_state(*models)
    start = SemanticGuidedAdapter.from_unet(tiny_sd.unet, blip2.width, blip2.num_queries)
    trained = pipeline.finetune(tiny_sd, blip2, [reference], PARAMS, seed=0, out_dir=tmp_path)

    assert all(torch.equal(a, b) for a, b in zip(frozen_state(*models), before))
    names = [name for name, _ in trained.named_parameters()]
    assert names and all(".to_k_ip." in name or ".to_v_ip." in name for name in names)
    moved = [not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters())]
    assert all(moved), "every W'_k and W'_v is trained"
    saved = load_file(tmp_path / WEIGHTS_FILE)
    assert len(saved) == len(names) and "ip_adapter.1.to_k_ip.weight" in saved  # diffusers' IP-Adapter layout
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["gamma"] == 1.0 and config["templates"]["text"] == "This is an image with {defect}"
    assert config["sd_fingerprint"] and config["blip2_fingerprint"]


def test_a_resumed_fine_tune_ends_exactly_where_the_uninterrupted_one_does(tiny_sd, blip2, reference, tmp_path):
    params = PARAMS.model_copy(update={"train_steps": 4})
    uninterrupted = pipeline.finetune(tiny_sd, blip2, [reference], params, seed=1, out_dir=tmp_path / "once")

    class Crash(Exception):
        pass

    def crash_at_three(_stage, done, _total):
        if done == 3:
            raise Crash

    checkpoints = Checkpoints(tmp_path / "checkpoints", every=2)
    with pytest.raises(Crash):
        pipeline.finetune(tiny_sd, blip2, [reference], params, seed=1, out_dir=tmp_path / "crashed",
                          checkpoints=checkpoints, on_progress=crash_at_three)
    assert all(isinstance(p, AttnProcessor2_0) for p in tiny_sd.unet.attn_processors.values())
    progress = []
    resumed = pipeline.finetune(tiny_sd, blip2, [reference], params, seed=1, out_dir=tmp_path / "resumed",
                                checkpoints=checkpoints, on_progress=lambda _s, done, _t: progress.append(done))
    assert progress == [3, 4]  # on from the step-2 checkpoint
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), uninterrupted.parameters()))


def test_the_cfg_dropout_rates_are_honoured():
    generator = torch.Generator().manual_seed(0)
    for rates in ((0.05, 0.05, 0.05), (0.1, 0.2, 0.3)):
        drop_text, drop_features = pipeline.cfg_dropout(generator, 400_000, rates)
        shares = [(drop_text & ~drop_features).float().mean(), (drop_features & ~drop_text).float().mean(),
                  (drop_text & drop_features).float().mean()]
        assert all(abs(float(share) - rate) < 0.003 for share, rate in zip(shares, rates)), (rates, shares)


def test_training_sees_the_dropout(tiny_sd, blip2, reference, tmp_path):
    """With C' always dropped (zeros) W'_k and W'_v get no gradient; with the text always dropped they do."""
    start = SemanticGuidedAdapter.from_unet(tiny_sd.unet, blip2.width, blip2.num_queries)
    for rates, moves in (((0.0, 1.0, 0.0), False), ((1.0, 0.0, 0.0), True)):
        params = PARAMS.model_copy(update={"cfg_dropout": rates, "weight_decay": 0.0, "train_steps": 2})
        trained = pipeline.finetune(tiny_sd, blip2, [reference], params, seed=0, out_dir=tmp_path / str(moves))
        changed = any(not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters()))
        assert changed is moves


def test_generate_keeps_the_background_and_follows_the_seed(tiny_sd, blip2, reference, adapter_dir):
    normal = textured_image(60, 76, "L", seed=2)
    items = [(normal, box_mask(60, 76, (10, 10, 30, 30)), 5), (textured_image(50, 50, "RGB", seed=3),
                                                               box_mask(50, 50, (20, 5, 45, 25)), 6)]
    results = pipeline.generate(tiny_sd, blip2, adapter_dir, reference, items, PARAMS,
                                prompt="a photo of a screw with crack", images_per_batch=1)
    for (image, mask, _), result in zip(items, results):
        assert label_contract_violation(image, Pair(0, result.image, result.mask, 0)) is None
        assert np.array_equal(result.mask > 0, mask)
        assert (np.asarray(result.image) != np.asarray(image))[mask].mean() > 0.5
    again = pipeline.generate(tiny_sd, blip2, adapter_dir, reference, items[::-1], PARAMS,
                              prompt="a photo of a screw with crack", images_per_batch=2)
    assert np.array_equal(np.asarray(again[1].image), np.asarray(results[0].image))  # any batch, same seed
    other_seed = pipeline.generate(tiny_sd, blip2, adapter_dir, reference, [items[0][:2] + (7,)], PARAMS,
                                   prompt="a photo of a screw with crack")
    assert not np.array_equal(np.asarray(other_seed[0].image), np.asarray(results[0].image))


def test_an_adapter_of_other_checkpoints_or_methods_is_refused(tiny_sd, blip2, adapter_dir, tmp_path):
    for key, setting in (("sd_fingerprint", "SD_MODEL_DIR"), ("blip2_fingerprint", "BLIP2_MODEL_DIR")):
        folder = tmp_path / key
        shutil.copytree(adapter_dir, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, key: "0123456789abcdef"}))
        with pytest.raises(InputError, match=f"trained on another {setting} checkpoint"):
            pipeline.load_adapter(folder, tiny_sd, blip2)
    (tmp_path / "anogen").mkdir()
    (tmp_path / "anogen" / "adapter_config.json").write_text(json.dumps({"method": "anogen"}))
    with pytest.raises(InputError, match="made by method 'anogen'"):
        pipeline.load_adapter(tmp_path / "anogen", tiny_sd, blip2)


def test_a_projection_brings_a_narrower_q_former_to_the_unets_width(tiny_sd, tmp_path):
    adapter = SemanticGuidedAdapter.from_unet(tiny_sd.unet, feature_width=24, num_tokens=4)
    assert adapter.projection is not None
    packed = adapter.condition(torch.zeros(1, 77, 32), torch.randn(1, 4, 24), torch.float32)
    assert packed.shape == (1, 81, 32)
    adapter.save(tmp_path)
    assert {"image_proj.weight", "image_proj.bias"} <= set(load_file(tmp_path / WEIGHTS_FILE))
    loaded = SemanticGuidedAdapter.load(tmp_path, tiny_sd.unet, 24, 4, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), adapter.parameters()))
    with pytest.raises(ValueError, match="tensors"):
        SemanticGuidedAdapter.load(tmp_path, tiny_sd.unet, 32, 4, 1.0)


def test_outputs_spread_over_references_of_any_product_with_the_jobs_product_in_the_prompt(
        tiny_sd_dir, tiny_blip2_dir, adapter_dir):
    references = [
        Exemplar("r1", textured_image(56, 72, "RGB", seed=1), box_mask(56, 72, (20, 16, 44, 40)), "tile", "crack"),
        Exemplar("r2", textured_image(40, 40, "L", seed=4), box_mask(40, 40, (5, 5, 20, 30)), "screw", "scratch"),
    ]
    normals = [textured_image(64, 64, "RGB", seed=8)]
    request = GenerateRequest(
        params=PARAMS, masks=MaskSpec(source="exemplar"), exemplars=references, given_masks=[],
        normals=NormalImages.in_memory(normals), items=job_items(4, 0, 1, 2), product="carpet",
        adapter_dir=adapter_dir, weight_dirs={"SD_MODEL_DIR": str(tiny_sd_dir), "BLIP2_MODEL_DIR": str(tiny_blip2_dir)},
        device="cpu",
    )
    calls = anomalycontrol_method.calls(request)
    assert [[item.index for item in call] for call in calls] == [[0, 2], [1, 3]]
    pairs = {pair.index: pair for call in anomalycontrol_method.generate(request, calls, lambda *_: None)
             for pair in call}
    assert [pairs[i].details["reference"] for i in range(4)] == ["r1", "r2", "r1", "r2"]
    assert pairs[0].details["prompt"] == "a photo of a carpet with crack"
    assert pairs[1].details["prompt"] == "a photo of a carpet with scratch"
    for pair in pairs.values():
        assert label_contract_violation(normals[0], pair) is None and pair.mask_u8.any()
