"""AnomalyControl on tiny models: the BLIP-2 loader, CSM + ASEA, the SGA adapter, fine-tuning with
CFG dropout, generation and the adapter's checks.

The BLIP-2 is a tiny random `Blip2ForImageTextRetrieval` with a BERT tokenizer and a BLIP image
processor, written by code, saved with `save_pretrained` and loaded through the production loader."""

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from safetensors.torch import load_file, save_file
from scipy import ndimage

from models.diffusion.images import mask_to_latent
from models.diffusion.loading import ModelUnavailable
from models.diffusion.sampling import encode_prompts
from models.errors import InputError
from models.methods.anomalycontrol import AnomalyControlParams, pipeline
from models.methods.anomalycontrol import method as anomalycontrol_method
from models.methods.anomalycontrol.csm import TEXT_TEMPLATE, anomaly_token_positions, load_blip2, semantic_features
from models.methods.anomalycontrol.sga import WEIGHTS_FILE, SemanticGuidedAdapter
from models.methods.interface import (
    LABEL_BAND,
    Checkpoints,
    Exemplar,
    GenerateRequest,
    NormalImages,
    Pair,
    changed_pixels,
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


@pytest.fixture(scope="module")
def sharp_blip2(blip2):
    """A copy of the tiny BLIP-2 whose Q-Former attends sharply. At random init its attention is
    nearly uniform, so one token's row looks like its neighbour's (1e-4 apart); queries and keys
    scaled by 8 make them differ by a quarter of the map's range, so a wrong row shows."""
    model = copy.deepcopy(blip2.model)
    with torch.no_grad():
        for layer in model.qformer.encoder.layer:
            for part in (layer.attention, layer.crossattention) if layer.has_cross_attention else (layer.attention,):
                part.attention.query.weight.mul_(8)
                part.attention.key.weight.mul_(8)
    return dataclasses.replace(blip2, model=model)


def frozen_state(*modules) -> list[torch.Tensor]:
    return [tensor.detach().clone() for module in modules for tensor in module.state_dict().values()]


def far_from(mask: np.ndarray) -> np.ndarray:
    """bool: the pixels beyond the mask and its blend band, which must be the normal image's."""
    return ~ndimage.binary_dilation(mask, np.ones((3, 3), bool), iterations=LABEL_BAND)


def map_by_transformers(blip2, image, defect: str, guidance: torch.Tensor, row_shift: int = 0):
    """ASEA's chained map (patches,) and C', computed apart from csm.py: the attention weights from
    the Q-Former's own `output_attentions`, the defect's rows found by searching T_a's ids for the
    defect word's (moved by `row_shift`)."""
    model, queries = blip2.model, blip2.num_queries
    pixels = blip2.image_processor(images=image, return_tensors="pt").pixel_values
    text = blip2.tokenizer(TEXT_TEMPLATE.format(defect=defect), return_tensors="pt")
    ids, word = text.input_ids[0].tolist(), blip2.tokenizer(defect, add_special_tokens=False).input_ids
    start = next(i for i in range(len(ids)) if ids[i:i + len(word)] == word)
    rows = [queries + start + row_shift + k for k in range(len(word))]
    with torch.no_grad():
        visual = model.vision_model(pixel_values=pixels).last_hidden_state + guidance
        output = model.qformer(
            query_embeds=model.embeddings(input_ids=text.input_ids, query_embeds=model.query_tokens),
            query_length=queries, attention_mask=torch.cat([torch.ones(1, queries, dtype=torch.long),
                                                            text.attention_mask], dim=1),
            encoder_hidden_states=visual, output_attentions=True)
    # transformers' `attentions` holds the cross-attention maps too (their modules' names end in
    # ".crossattention.attention"): the self-attention maps are those over queries + text.
    self_maps = [a for a in output.attentions if a.shape[-1] == queries + len(ids)]
    cross_layers = [i for i, layer in enumerate(model.qformer.encoder.layer) if layer.has_cross_attention]
    chained = [(self_maps[layer + 1].mean(dim=1)[0, rows, :queries] @ cross.mean(dim=1)[0, :, 1:]).mean(dim=0)
               for layer, cross in zip(cross_layers, output.cross_attentions) if layer + 1 < len(self_maps)]
    return torch.stack(chained).mean(dim=0), output.last_hidden_state[0, :queries]


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


def test_the_anomaly_tokens_are_the_defect_words_own_wherever_the_template_puts_it(blip2):
    tokenizer = blip2.tokenizer
    for template in (TEXT_TEMPLATE, "{defect} on a part", "a part with {defect} on it"):
        for defect in ("crack", "dent", "oil stain"):  # one whole-word token; 4 letter pieces; 2 words
            ids = tokenizer(template.format(defect=defect)).input_ids
            positions = anomaly_token_positions(tokenizer, template, defect)
            assert tokenizer.convert_ids_to_tokens([ids[i] for i in positions]) == tokenizer.tokenize(defect)
            assert positions == list(range(positions[0], positions[-1] + 1))
            # what is left is the template's own tokens: no row of them is counted as the defect's
            rest = ids[:positions[0]] + ids[positions[-1] + 1:]
            assert rest == tokenizer(template.format(defect="")).input_ids, (template, defect)


def test_the_chained_map_is_the_defect_tokens_attention_carried_to_the_patches(sharp_blip2, reference):
    """Checked against transformers' own attention weights and an independent search for the rows."""
    inside = mask_to_latent(reference.mask, sharp_blip2.patch_grid[0]).flatten()
    for defect in ("crack", "dent"):
        focused = semantic_features(sharp_blip2, reference.image, reference.mask, defect, steps=2, step_size=0.3)
        assert focused.guidance.any()
        expected, features = map_by_transformers(sharp_blip2, reference.image, defect, focused.guidance)
        torch.testing.assert_close(focused.attention.flatten(), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(focused.features, features, rtol=0, atol=1e-6)  # C' at the final e_g
        energy = (1 - (expected * inside).sum() / expected.sum()) ** 2
        assert focused.energies[-1] == pytest.approx(float(energy), abs=1e-6)
        # The check has teeth: the next token's rows (an off-by-one) give another map.
        for shift in (-1, 1):
            neighbour, _ = map_by_transformers(sharp_blip2, reference.image, defect, focused.guidance, shift)
            assert (neighbour - expected).abs().max() > 1e-3


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


def test_the_branch_share_is_zero_when_sga_adds_nothing_and_grows_with_gamma(tiny_sd):
    unet = tiny_sd.unet
    generator = torch.Generator().manual_seed(0)
    latents, t = torch.randn((2, 4, 8, 8), generator=generator), torch.tensor([500, 20])
    features = torch.randn((2, 8, 32), generator=generator)
    text = encode_prompts(tiny_sd, ["a photo of a tile with crack"] * 2)
    adapter = SemanticGuidedAdapter.from_unet(unet, feature_width=32, num_tokens=8)
    cond = adapter.condition(text, features, torch.float32)
    with adapter.attached(unet), torch.no_grad():
        eps = unet(latents, t, encoder_hidden_states=cond).sample
        share = adapter.branch_share(unet, latents, t, cond)
        assert torch.equal(unet(latents, t, encoder_hidden_states=cond).sample, eps)  # measuring leaves no trace
        assert 0.1 < share < 0.9  # W', V' copied from W, V: SGA is in play from the first step
        assert adapter.branch_share(unet, latents, t, adapter.condition(text, 0 * features, torch.float32)) == 0
        adapter.gamma = 2.0
        assert adapter.branch_share(unet, latents, t, cond) > share
        adapter.gamma = 0.0
        assert adapter.branch_share(unet, latents, t, cond) == 0


def test_the_default_schedule_trains_sga_and_keeps_its_branch_in_play(tiny_sd, blip2, reference, tmp_path):
    """Floors for the default schedule (lr 1e-4, 2000 steps of 4): W'_k, W'_v move by at least 10%
    of their norm, and the branch keeps at least a quarter of the cross-attention output. AdamW moves
    each weight by about lr a step, so the change grows about linearly at first (on these models
    0.012 after 50 steps, 0.022 after 100, 0.041 after 200; 0.24 after all 2000, the branch share
    0.55 -> 0.67): the test runs the first 50 steps, 1/40 of the schedule, against 1/40 of the floor."""
    defaults = AnomalyControlParams()
    params = AnomalyControlParams(resolution=64, train_steps=50)
    assert (params.learning_rate, params.batch_size, defaults.train_steps) == (1e-4, 4, 2000)
    diagnostics = pipeline.finetune(tiny_sd, blip2, [reference], params, seed=0, out_dir=tmp_path).diagnostics
    assert diagnostics["sga_weight_change"] > 0.1 * params.train_steps / defaults.train_steps
    assert all(0.25 < share < 1 for share in diagnostics["sga_branch_share"])
    assert 0 < diagnostics["losses"]["ldm"] < 2  # the noise MSE, mean over the last 50 steps
    energy_before, energy_after = diagnostics["asea_energy"]
    assert energy_after < energy_before


def test_training_moves_only_the_adapters_keys_and_values(tiny_sd, blip2, reference, tmp_path):
    models = (tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder, blip2.model)
    before = frozen_state(*models)
    start = SemanticGuidedAdapter.from_unet(tiny_sd.unet, blip2.width, blip2.num_queries)
    trained = pipeline.finetune(tiny_sd, blip2, [reference], PARAMS, seed=0, out_dir=tmp_path).adapter

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
    uninterrupted = pipeline.finetune(tiny_sd, blip2, [reference], params, seed=1, out_dir=tmp_path / "once").adapter

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
                                checkpoints=checkpoints, on_progress=lambda _s, done, _t: progress.append(done)).adapter
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
        trained = pipeline.finetune(tiny_sd, blip2, [reference], params, seed=0, out_dir=tmp_path / str(moves)).adapter
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


def test_c_prime_steers_the_defect_through_sga_inside_the_mask_alone(tiny_sd, blip2, reference, adapter_dir):
    """Another C' paints another defect, inside the mask and its blend band only; with SGA ablated
    C' is not read at all, and the output is the plain UNet's (gamma 0). (The tiny random Q-Former
    gives nearly the same C' for any image, 0.6% apart: the other C' is drawn at random instead.)"""
    normal, mask = textured_image(64, 64, "RGB", seed=2), box_mask(64, 64, (16, 12, 44, 40))
    own = pipeline.reference_features(blip2, reference, PARAMS)
    other = torch.randn(own.features.shape, generator=torch.Generator().manual_seed(0))
    features = {"own": own, "other": dataclasses.replace(own, features=other)}

    def image(params, which):
        (result,) = pipeline.generate(tiny_sd, blip2, adapter_dir, reference, [(normal, mask, 5)], params,
                                      features=features[which])
        return np.asarray(result.image)

    own, other = image(PARAMS, "own"), image(PARAMS, "other")
    changed = changed_pixels(Image.fromarray(own), Image.fromarray(other))
    assert changed[mask].mean() > 0.9 and not changed[far_from(mask)].any()
    without_sga = PARAMS.model_copy(update={"ablate": ["sga"]})
    plain = image(PARAMS.model_copy(update={"gamma": 0.0}), "own")
    assert np.array_equal(image(without_sga, "own"), plain) and np.array_equal(image(without_sga, "other"), plain)
    assert not np.array_equal(plain, own)


def test_asea_focuses_c_prime_unless_ablated(tiny_sd, blip2, reference, adapter_dir):
    """Ablated, C' comes straight from the Q-Former (no guidance steps), at fine-tune and generate."""
    focused = pipeline.reference_features(blip2, reference, PARAMS)
    unguided = semantic_features(blip2, reference.image, reference.mask, reference.defect, steps=0)
    ablated = pipeline.reference_features(blip2, reference, PARAMS, ablated=["asea"])
    assert torch.equal(ablated.features, unguided.features) and len(ablated.energies) == 1
    assert not torch.allclose(focused.features, unguided.features)

    items = [(textured_image(64, 64, "L", seed=2), box_mask(64, 64, (16, 12, 44, 40)), 5)]
    without_asea = PARAMS.model_copy(update={"ablate": ["asea"]})
    (computed,) = pipeline.generate(tiny_sd, blip2, adapter_dir, reference, items, without_asea)
    (given,) = pipeline.generate(tiny_sd, blip2, adapter_dir, reference, items, PARAMS, features=unguided)
    (with_asea,) = pipeline.generate(tiny_sd, blip2, adapter_dir, reference, items, PARAMS)
    assert np.array_equal(np.asarray(computed.image), np.asarray(given.image))
    assert not np.array_equal(np.asarray(computed.image), np.asarray(with_asea.image))


def test_a_fine_tune_without_a_component_records_it_and_its_generate_jobs_drop_it(tiny_sd, blip2, reference,
                                                                                   tmp_path):
    params = PARAMS.model_copy(update={"train_steps": 2})
    plain = pipeline.finetune(tiny_sd, blip2, [reference], params, seed=0, out_dir=tmp_path / "plain")
    no_asea = pipeline.finetune(tiny_sd, blip2, [reference], params.model_copy(update={"ablate": ["asea"]}), seed=0,
                                out_dir=tmp_path / "asea")
    energies = no_asea.diagnostics["asea_energy"]
    assert energies[0] == energies[1] and plain.diagnostics["asea_energy"][1] < energies[0]  # trained on C' unguided
    assert not all(torch.equal(a, b) for a, b in zip(plain.adapter.parameters(), no_asea.adapter.parameters()))
    assert pipeline.load_adapter(tmp_path / "asea", tiny_sd, blip2).ablated(PARAMS) == ["asea"]

    start = SemanticGuidedAdapter.from_unet(tiny_sd.unet, blip2.width, blip2.num_queries)
    no_sga = pipeline.finetune(tiny_sd, blip2, [reference], params.model_copy(update={"ablate": ["sga", "asea"]}),
                               seed=0, out_dir=tmp_path / "sga")
    assert all(torch.equal(a, b) for a, b in zip(no_sga.adapter.parameters(), start.parameters()))  # nothing to train
    assert no_sga.diagnostics["sga_branch_share"] == [0.0, 0.0] and "losses" not in no_sga.diagnostics
    loaded = pipeline.load_adapter(tmp_path / "sga", tiny_sd, blip2)
    assert json.loads((tmp_path / "sga" / "adapter_config.json").read_text())["ablate"] == ["asea", "sga"]
    assert loaded.ablated(PARAMS) == ["asea", "sga"]
    items = [(textured_image(64, 64, "RGB", seed=2), box_mask(64, 64, (16, 12, 44, 40)), 5)]
    (dropped,) = pipeline.generate(tiny_sd, blip2, loaded, reference, items, PARAMS)
    (plain_unet,) = pipeline.generate(tiny_sd, blip2, tmp_path / "plain", reference, items,
                                      PARAMS.model_copy(update={"gamma": 0.0}))
    assert np.array_equal(np.asarray(dropped.image), np.asarray(plain_unet.image))
    assert label_contract_violation(items[0][0], dropped.pair(0)) is None


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
        assert pair.details["ablated"] == [] and len(pair.details["asea_energy"]) == 2
