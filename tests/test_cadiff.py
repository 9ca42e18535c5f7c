"""CADiff on a tiny random-weight SD: each component of the paper in the path (its effect checked,
and gone when it is ablated), the loss terms against independent computations, the training's
first-order start and its diagnostics, IAR's exactness and locality, the adapter's files, and a
second architecture (a 2x VAE, no cross-attention at a quarter of the latent side)."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from scipy import ndimage

from models.diffusion import tiny
from models.diffusion.attention import UNetAttention, attention_layers
from models.diffusion.loading import load_sd
from models.diffusion.sampling import encode_prompts, predict_noise
from models.diffusion.training import step_generator, train
from models.errors import InputError
from models.methods.cadiff import MAX_DEFAULT_TRAIN_STEPS, CADiffParams, pipeline
from models.methods.cadiff.control import SAIM, SpatialControl
from models.methods.cadiff.iar import FocusSchedule, IntensityReweighting, focus_layers
from models.methods.cadiff.losses import augment, contrastive_loss, localization_loss
from models.methods.interface import LABEL_BAND, Checkpoints
from tests.diffusion_fixtures import box_mask, textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"resolution": 64, "num_inference_steps": 4, "guidance_scale": 3.0, "batch_size": 4}
# The adapter fixture's fine-tune: default learning rates and batch, 10 of the 1250 steps the
# default gives its 5 images. The ControlNet's share of the skip features grows from 0 about
# linearly at first (measured on this model and set: 0.0007 after 10 steps, 0.0011 after 25, 0.0031
# after 100, 0.0063 after 200, then 0.086 after 400), so the floor below, passed within 1% of the
# default schedule, is far exceeded by all of it.
FIXTURE_STEPS = 10
CONTROL_FLOOR = 3e-4  # ||y_f - y|| / ||y||, mean over the ControlNet's residuals
TOKEN_FLOOR = 0.5  # ||v - v_0|| / ||v_0||, mean over the tokens (lr 5e-3; 2.7 after 10 steps)


def exemplars():
    """Two defect types of one product, two exemplars each, and a normal image of it."""
    boxes = {"crack": [(8, 8, 28, 20), (30, 34, 56, 44)], "pit": [(36, 10, 50, 24), (12, 40, 24, 54)]}
    images = [pipeline.TrainingImage(textured_image(64, 64, seed=10 * k + i), box_mask(64, 64, box), defect)
              for k, (defect, shapes) in enumerate(boxes.items()) for i, box in enumerate(shapes)]
    return [*images, pipeline.TrainingImage(textured_image(64, 64, seed=99), None, None)]


def zero_initialised_layers(control: SpatialControl) -> list[torch.nn.Module]:
    """The layers that start at zero: the mask embedding's last conv, the ControlNet's zero
    convolutions (one per residual) and SAIM's last layers."""
    controlnet = control.controlnet
    return [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block, *(saim.mlp[-1] for saim in control.saim)]


def perturb_zero_layers(control: SpatialControl, scale: float = 0.05, seed: int = 0) -> None:
    """Give every zero-initialised layer random weights (as diffusers' tests do), so that each
    part's effect is visible."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in zero_initialised_layers(control):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * scale)


def unet_inputs(sd, seed=1):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, sd.latent_channels, 8, 8, generator=generator)
    text = torch.randn(2, 77, sd.text_encoder.config.hidden_size, generator=generator)
    return latents, torch.tensor([400, 700]), text


def masks(*boxes):
    return torch.stack([torch.from_numpy(box_mask(64, 64, box)).float()[None] for box in boxes])


@pytest.fixture(scope="module")
def adapter_dir(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cadiff_adapter")
    params = CADiffParams(**TINY, train_steps=FIXTURE_STEPS)
    adapter = pipeline.finetune(tiny_sd, exemplars(), params, product="tile", seed=0, out_dir=folder)
    # Generation tests need every part's effect visible: larger weights than 10 steps at lr 1e-5 give.
    perturb_zero_layers(adapter.control)
    adapter.control.save(folder)
    return folder


def test_at_initialisation_the_controlled_unet_is_the_plain_unet_and_detaching_restores_it(tiny_sd):
    unet = tiny_sd.unet
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    processors = dict(unet.attn_processors)
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(400)
    cond, uncond = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(2)).unbind(0)
    control = SpatialControl.from_unet(unet, tiny_sd.vae_scale_factor)
    control.condition = masks((10, 10, 40, 40))
    with torch.no_grad():
        plain = predict_noise(tiny_sd, latents, t, cond, uncond, 3.0)
        with control.attached(unet):
            controlled = predict_noise(tiny_sd, latents, t, cond, uncond, 3.0)
            perturb_zero_layers(control)
            trained = predict_noise(tiny_sd, latents, t, cond, uncond, 3.0)
        with control.attached(unet, sampling=True):  # the mask embedded once per run, not per call
            sampled = [predict_noise(tiny_sd, latents, t, cond, uncond, 3.0) for _ in range(2)]
        after = predict_noise(tiny_sd, latents, t, cond, uncond, 3.0)
    assert torch.equal(controlled, plain)  # zero layers: exactly the frozen model's prediction
    assert not torch.allclose(trained, plain)
    # The embedding of one mask, not of the guided batch's two copies: equal up to float rounding.
    torch.testing.assert_close(sampled[0], trained)
    assert torch.equal(sampled[1], sampled[0])
    assert not isinstance(control.controlnet.controlnet_cond_embedding, torch.nn.Identity)
    assert torch.equal(after, plain)
    assert all(torch.equal(value, before[name]) for name, value in unet.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    assert unet.attn_processors == processors


def test_the_mask_reaches_the_noise_prediction_through_the_controlnet_and_saim(tiny_sd):
    unet = tiny_sd.unet
    control = SpatialControl.from_unet(unet, tiny_sd.vae_scale_factor)
    # The mask enters through the whole ControlNet: larger weights than elsewhere make its effect
    # clear of float noise (max |difference| about 0.007 here).
    perturb_zero_layers(control, scale=0.5)
    latents, t, text = unet_inputs(tiny_sd)
    one, other = masks((8, 8, 30, 30), (8, 8, 30, 30)), masks((30, 20, 60, 50), (0, 40, 20, 64))

    def predict(condition, saim=True):
        control.condition = condition
        with control.attached(unet, saim=saim), torch.no_grad():
            return unet(latents, t, encoder_hidden_states=text).sample

    with torch.no_grad():
        plain = unet(latents, t, encoder_hidden_states=text).sample
        # Plain ControlNet, computed by diffusers itself: the "saim" ablation must be exactly this.
        down, mid = control.controlnet(latents, t, encoder_hidden_states=text, controlnet_cond=one, return_dict=False)
        diffusers_controlnet = unet(latents, t, encoder_hidden_states=text, down_block_additional_residuals=down,
                                    mid_block_additional_residual=mid).sample
    fused, fused_other = predict(one), predict(other)
    added, added_other = predict(one, saim=False), predict(other, saim=False)
    assert (fused - fused_other).abs().max() > 1e-3  # the mask is in the path, through SAIM
    assert (added - added_other).abs().max() > 1e-3  # and through plain addition
    torch.testing.assert_close(added, diffusers_controlnet)
    assert (fused - added).abs().max() > 1e-2  # SAIM's interaction term is in the path
    assert (added - plain).abs().max() > 1e-2


def test_saim_is_y_plus_y_c_plus_the_mlp_of_its_cross_attention_and_y_c():
    torch.manual_seed(0)
    saim = SAIM(32)
    with torch.no_grad():
        saim.mlp[-1].weight.normal_(0, 0.1)
        saim.mlp[-1].bias.normal_(0, 0.1)
    feature, control = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4)
    with torch.no_grad():
        fused = saim(feature, control)
        # Independently: y_a = softmax(q k^T / sqrt(d)) v with queries from RMSNorm(y), keys and
        # values from RMSNorm(y_c), one head (32 channels < 64), then the output projection.
        y, y_c = feature.flatten(2).transpose(1, 2), control.flatten(2).transpose(1, 2)

        def rms(x, norm):
            return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight

        attention = saim.attention
        q = attention.to_q(rms(y, saim.norm_feature))
        k, v = attention.to_k(rms(y_c, saim.norm_control)), attention.to_v(rms(y_c, saim.norm_control))
        y_a = attention.to_out[0]((q @ k.transpose(1, 2) / math.sqrt(32)).softmax(-1) @ v)
        first, last = saim.mlp[0], saim.mlp[-1]
        interaction = last(F.gelu(first(torch.cat([y_a, y_c], -1))))
        expected = feature + control + interaction.transpose(1, 2).reshape(2, 32, 4, 4)
    torch.testing.assert_close(fused, expected)


def test_at_initialisation_every_loss_term_sends_a_first_order_gradient_to_every_zero_layer(tiny_sd):
    # Unperturbed: the ControlNet's zero convolutions must learn from step 0, not only once SAIM's
    # zero last layers have moved (a chain of two zero layers passes no gradient).
    training = pipeline.CADiffTraining(tiny_sd, exemplars(), CADiffParams(**TINY), product="tile", seed=0)
    controlnet = training.control.controlnet
    zero_convolutions = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    saim_last = [saim.mlp[-1] for saim in training.control.saim]
    frozen = [*tiny_sd.unet.parameters(), *tiny_sd.text_encoder.parameters(), *tiny_sd.vae.parameters()]
    assert not any(p.requires_grad for p in frozen)
    with training.attached():
        losses = training.losses(training.draw(step_generator(0, 0)))
        tokens = training.embedding.vectors
        weights = [layer.weight for layer in zero_convolutions + saim_last]
        for name, term in losses._asdict().items():
            assert torch.isfinite(term) and term.item() > 0, name
            token_grad, *grads = torch.autograd.grad(term, [tokens, *weights], retain_graph=True, allow_unused=True)
            # The context token and both anomaly tokens are in the batch's prompts.
            assert (token_grad.abs().sum(dim=1) > 0).all(), name
            moved = [g is not None and g.abs().sum() > 0 for g in grads]
            convolutions, saims = moved[:len(zero_convolutions)], moved[len(zero_convolutions):]
            if name == "contrastive":  # its focus layers come before the finer skips are used: the mid block's
                convolutions, saims = convolutions[-1:], saims[-1:]
            assert all(convolutions), f"{name}: a zero convolution has no gradient"
            assert all(saims), f"{name}: a SAIM last layer has no gradient"
        sum(losses).backward()
    assert all(p.grad is None for p in frozen)
    assert training.control.condition.shape == (4, 1, 64, 64)


def token_columns(tokenizer, concept):
    """(context, anomaly) columns of the prompt of a sample of this concept (0: a normal image)."""
    anomaly_token = pipeline.ANOMALY_TOKEN.format(concept - 1) if concept else None
    ids = tokenizer(pipeline.prompt_for(anomaly_token), padding="max_length", max_length=77).input_ids
    anomaly = ids.index(tokenizer.convert_tokens_to_ids(anomaly_token)) if concept else None
    return ids.index(tokenizer.convert_tokens_to_ids(pipeline.CONTEXT_TOKEN)), anomaly


def test_the_loss_is_its_three_terms_each_as_computed_independently(tiny_sd):
    params = CADiffParams(**TINY, loc_weight=0.3, contrastive_weight=0.7)  # weights that show in the total
    training = pipeline.CADiffTraining(tiny_sd, exemplars(), params, product="tile", seed=0)
    perturb_zero_layers(training.control)
    with training.attached(), torch.no_grad():
        terms = training.loss(step_generator(0, 3))
        recorded = {name: (r.maps[0], r.hidden[0] if r.hidden else None) for name, r in training.recorders.items()}
        batch = training.draw(step_generator(0, 3))  # the same batch again
        concepts = batch.concepts.tolist()
        # L_CALDM: the controlled UNet's noise prediction, with each sample's own prompt.
        prompts = [pipeline.prompt_for(None if c == 0 else pipeline.ANOMALY_TOKEN.format(c - 1)) for c in concepts]
        training.control.condition = batch.anomaly
        eps = tiny_sd.unet(batch.noisy, batch.timesteps,
                           encoder_hidden_states=encode_prompts(tiny_sd, prompts, training.tokenizer)).sample
        caldm = ((eps - batch.noise) ** 2).mean()
        columns = [token_columns(training.tokenizer, c) for c in concepts]

    # L_loc: per layer, per present (sample, token): the token's map scaled to max 1 against its
    # own mask (the context token: the product outside the anomaly; the anomaly token: its mask).
    loc = 0.0
    for maps, _ in recorded.values():
        side = int(math.isqrt(maps.shape[1]))
        errors = []
        for b, (context_column, anomaly_column) in enumerate(columns):
            for column, mask in ((context_column, batch.context[b, 0]), (anomaly_column, batch.anomaly[b, 0])):
                if column is None:
                    continue
                attention = maps[b, :, column].reshape(side, side)
                target = mask.reshape(side, 64 // side, side, 64 // side).amax(dim=(1, 3))
                errors.append(((attention / attention.max() - target) ** 2).mean())
        loc += torch.stack(errors).mean()

    # L_contrastive: NT-Xent over the tokens' attention-pooled focus-layer features, positives the
    # same concept (the context token's is 0, defect k's anomaly token's is 1 + k).
    features, labels = [], []
    for b, (context_column, anomaly_column) in enumerate(columns):
        for column, label in ((context_column, 0), (anomaly_column, concepts[b])):
            if column is None:
                continue
            pooled = [maps[b, :, column] @ hidden[b] / maps[b, :, column].sum()
                      for maps, hidden in recorded.values() if hidden is not None]
            features.append(F.normalize(torch.cat(pooled), dim=0))
            labels.append(label)
    per_anchor = []
    for i, anchor in enumerate(features):
        others = [j for j in range(len(features)) if j != i]
        logits = torch.stack([anchor @ features[j] / params.temperature for j in others])
        positives = [n for n, j in enumerate(others) if labels[j] == labels[i]]
        if positives:
            per_anchor.append(-(logits.log_softmax(0)[positives]).mean())
    contrastive = torch.stack(per_anchor).mean()

    torch.testing.assert_close(terms["caldm"], caldm)
    torch.testing.assert_close(terms["loc_unweighted"], loc)
    torch.testing.assert_close(terms["contrastive_unweighted"], contrastive)
    torch.testing.assert_close(terms["total"], caldm + 0.3 * loc + 0.7 * contrastive)


def test_the_localization_loss_is_lowest_when_each_token_attends_to_its_own_mask():
    context, anomaly = torch.zeros(4, 4), torch.zeros(4, 4)
    context[:, :2], anomaly[1:3, 2:] = 1, 1
    maps = torch.full((1, 16, 77), 0.01)
    maps[0, :, 5], maps[0, :, 7] = context.flatten() * 0.5, anomaly.flatten() * 0.5  # tokens 5 and 7
    positions, present = torch.tensor([[5, 7]]), torch.tensor([[True, True]])
    own = localization_loss([maps], positions, torch.stack([context, anomaly])[None], present)
    swapped = localization_loss([maps], positions, torch.stack([anomaly, context])[None], present)
    assert own.item() < 1e-6 < swapped.item()


def test_the_contrastive_loss_is_lower_when_same_concept_features_align():
    generator = torch.Generator().manual_seed(0)
    concepts = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 2]])  # the context token, then each defect's
    present = torch.ones(4, 2, dtype=torch.bool)
    prototypes = torch.randn(3, 16, generator=generator)
    aligned = prototypes[concepts] + 0.1 * torch.randn(4, 2, 16, generator=generator)
    scattered = torch.randn(4, 2, 16, generator=generator)
    assert contrastive_loss(aligned, concepts, present, 0.1) < contrastive_loss(scattered, concepts, present, 0.1)


def test_an_ablated_loss_term_is_left_out_of_the_total(tiny_sd):
    for ablated, kept in (("loc_loss", "contrastive_unweighted"), ("contrastive_loss", "loc_unweighted")):
        params = CADiffParams(**TINY, ablate=[ablated])
        training = pipeline.CADiffTraining(tiny_sd, exemplars(), params, product="tile", seed=0)
        with training.attached(), torch.no_grad():
            terms = training.loss(step_generator(0, 0))
        weight = params.contrastive_weight if ablated == "loc_loss" else params.loc_weight
        assert set(terms) == {"total", "caldm", kept}, ablated
        torch.testing.assert_close(terms["total"], terms["caldm"] + weight * terms[kept])
    training = pipeline.CADiffTraining(tiny_sd, exemplars(), CADiffParams(**TINY, ablate=["loc_loss",
                                                                                          "contrastive_loss"]),
                                       product="tile", seed=0)
    assert training.recorders == {}  # nothing recorded: plain SDPA everywhere


def test_a_short_overfit_on_one_exemplar_lowers_the_localization_loss(tiny_sd):
    one = [pipeline.TrainingImage(textured_image(64, 64, seed=5), box_mask(64, 64, (8, 8, 32, 32)), "crack")]
    params = CADiffParams(**{**TINY, "batch_size": 2}, token_learning_rate=0.05, rotation=0, crop=(1.0, 1.0))
    training = pipeline.CADiffTraining(tiny_sd, one, params, product="tile", seed=0)
    with training.attached():
        before = training.losses(training.draw(step_generator(123, 0))).loc.item()
        optimizer = torch.optim.Adam([training.embedding.vectors], lr=params.token_learning_rate)
        train({"tokens": training.embedding.vectors}, optimizer,
              lambda _s, g: training.losses(training.draw(g)).loc, steps=25, seed=0, run={}, device=tiny_sd.device,
              mixed_precision=False)
        after = training.losses(training.draw(step_generator(123, 0))).loc.item()
    assert after < 0.9 * before, (before, after)


def test_augmentation_moves_image_and_masks_together():
    square = box_mask(64, 64, (16, 20, 40, 36))
    image = torch.from_numpy(square).float()[None, None].repeat(3, 3, 1, 1) * 2 - 1  # the mask, as pixels
    mask = torch.from_numpy(square).float()[None, None].repeat(3, 1, 1, 1)
    moved_image, moved_mask = augment(image, mask, torch.Generator().manual_seed(0), rotation=30, crop=(0.6, 0.9))
    assert not torch.equal(moved_mask, mask)
    disagreement = ((moved_image[:, :1] > 0).float() != moved_mask).float().mean()
    assert disagreement < 0.02  # only along the square's edges (bilinear image, nearest mask)


def test_the_default_schedule_is_the_papers_epochs_capped():
    params = CADiffParams(**TINY)
    assert params.train_steps is None
    assert params.for_training_set(4, 1).train_steps == math.ceil(1000 * 5 / 4)  # 1000 epochs at batch 4
    assert params.for_training_set(400, 0).train_steps == MAX_DEFAULT_TRAIN_STEPS
    assert CADiffParams(**TINY, train_steps=7).for_training_set(4, 1).train_steps == 7


def test_the_adapter_is_in_library_formats_with_its_diagnostics(adapter_dir, tiny_sd, tiny_sd_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["method"] == "cadiff" and config["template"] == "a photo of {context} with {anomaly}"
    assert config["defect_tokens"] == {"crack": "<cadiff-anomaly-0>", "pit": "<cadiff-anomaly-1>"}
    assert config["ablate"] == [] and config["params"]["train_steps"] == FIXTURE_STEPS
    # The fine-tune's diagnostics: the mechanism has started to act under the default learning rates.
    diagnostics = config["diagnostics"]
    assert set(diagnostics["losses"]) == {"total", "caldm", "loc_unweighted", "contrastive_unweighted"}
    assert all(math.isfinite(value) and value > 0 for value in diagnostics["losses"].values())
    assert diagnostics["control_to_skip_norm"]["mean"] > CONTROL_FLOOR, diagnostics
    assert diagnostics["token_shift"]["mean"] > TOKEN_FLOOR, diagnostics
    entries = load_file(adapter_dir / "learned_embeds.safetensors")
    assert set(entries) == {"<cadiff-context>", "<cadiff-anomaly-0>", "<cadiff-anomaly-1>"}
    assert all(vector.shape == (tiny_sd.text_encoder.config.hidden_size,) for vector in entries.values())
    # Plain diffusers loads both: the tokens one entry each, the ControlNet as saved.
    sd_pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    sd_pipeline.load_textual_inversion([{token: vector} for token, vector in entries.items()], token=list(entries))
    ids = sd_pipeline.tokenizer.convert_tokens_to_ids(list(entries))
    table = sd_pipeline.text_encoder.get_input_embeddings().weight
    assert all(torch.equal(table[i], vector) for i, vector in zip(ids, entries.values()))
    controlnet = ControlNetModel.from_pretrained(adapter_dir / "controlnet")
    assert controlnet.config.conditioning_channels == 1
    with pytest.raises(InputError, match="learnt no defect 'dent'"):
        pipeline.generate(tiny_sd, adapter_dir, [], CADiffParams(**TINY), defect="dent")
    (adapter_dir.parent / "other").mkdir()
    (adapter_dir.parent / "other" / "adapter_config.json").write_text('{"method": "anogen"}')
    with pytest.raises(InputError, match="made by method 'anogen'"):
        pipeline.load_adapter(adapter_dir.parent / "other", tiny_sd)


def items():
    return [(textured_image(64, 72, seed=s), box_mask(64, 72, (20, 12, 52, 44)), s) for s in (31, 32)]


def outside_band(result):
    return ~ndimage.binary_dilation(result.mask > 0, np.ones((3, 3), bool), iterations=LABEL_BAND)


def test_each_generate_ablation_runs_without_its_component_and_changes_only_the_masked_region(tiny_sd, adapter_dir):
    adapter = pipeline.load_adapter(adapter_dir, tiny_sd)
    params = CADiffParams(**TINY, ablate=["iar"])  # IAR has its own tests below

    def run(adapter, *ablate):
        return pipeline.generate(tiny_sd, adapter, items(), params.model_copy(update={"ablate": ["iar", *ablate]}),
                                 defect="pit")

    def variant(**changes):
        return pipeline.CADiffAdapter(**{**vars(adapter), **changes})

    # What each ablation must equal, built independently of `ablate`: the control at initialisation
    # (exactly the plain UNet), SAIM's interaction term at zero (plain ControlNet addition), the
    # tokens at their initializers.
    fresh = SpatialControl.from_unet(tiny_sd.unet, tiny_sd.vae_scale_factor).eval().requires_grad_(False)
    no_interaction = SpatialControl.load(adapter_dir, tiny_sd.device, tiny_sd.dtype)
    with torch.no_grad():
        for saim in no_interaction.saim:
            saim.mlp[-1].weight.zero_()
            saim.mlp[-1].bias.zero_()
    initial = pipeline.initial_embedding(tiny_sd, "tile", "anomaly", 2)
    assert not torch.equal(initial.vectors, adapter.embedding.vectors)
    expected = {"controlnet": run(variant(control=fresh)), "saim": run(variant(control=no_interaction)),
                "ctp_tokens": run(variant(embedding=initial))}
    full = run(adapter)
    for component, references in expected.items():
        for ablated, reference, whole in zip(run(adapter, component), references, full):
            assert np.array_equal(np.asarray(ablated.image), np.asarray(reference.image)), component
            image, other = np.asarray(ablated.image), np.asarray(whole.image)
            assert (image != other).any(axis=-1).mean() > 0.05, component  # the component acted
            assert np.array_equal(image[outside_band(ablated)], other[outside_band(ablated)]), component
            assert ablated.details == {"intensity": None, "reweighted_from_step": None}


def test_finetune_ablations_train_without_their_component(tiny_sd, tmp_path):
    params = CADiffParams(**{**TINY, "batch_size": 2}, train_steps=2)
    without_tokens = pipeline.finetune(tiny_sd, exemplars(), params.model_copy(update={"ablate": ["ctp_tokens",
                                                                                                  "saim"]}),
                                       product="tile", seed=0, out_dir=tmp_path / "a")
    initial = pipeline.initial_embedding(tiny_sd, "tile", "anomaly", 2)
    assert torch.equal(without_tokens.embedding.vectors, initial.vectors)  # the tokens were not trained
    control = without_tokens.control
    assert all(conv.weight.abs().sum() > 0 for conv in control.controlnet.controlnet_down_blocks)  # it was
    assert all(saim.mlp[-1].weight.abs().sum() == 0 for saim in control.saim)  # SAIM was not
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["ablate"] == ["ctp_tokens", "saim"] and config["diagnostics"]["token_shift"]["max"] == 0

    without_control = pipeline.finetune(tiny_sd, exemplars(), params.model_copy(update={"ablate": ["controlnet"]}),
                                        product="tile", seed=0, out_dir=tmp_path / "b")
    assert without_control.control is None
    assert not (tmp_path / "b" / "controlnet").exists() and not (tmp_path / "b" / "saim.safetensors").exists()
    assert "control_to_skip_norm" not in without_control.config["diagnostics"]
    loaded = pipeline.load_adapter(tmp_path / "b", tiny_sd)
    assert loaded.control is None and not torch.equal(loaded.embedding.vectors, initial.vectors)
    results = pipeline.generate(tiny_sd, tmp_path / "b", items(), CADiffParams(**TINY), defect="crack")
    assert all(np.array_equal(np.asarray(r.image)[outside_band(r)], np.asarray(item[0])[outside_band(r)])
               for r, item in zip(results, items()))
    with pytest.raises(InputError, match="nothing to train"):
        pipeline.finetune(tiny_sd, exemplars(), params.model_copy(update={"ablate": ["ctp_tokens", "controlnet"]}),
                          product="tile", seed=0, out_dir=tmp_path / "c")


def test_iar_at_unit_intensity_or_never_focused_or_ablated_is_plain_sampling_exactly(tiny_sd, adapter_dir):
    adapter = pipeline.load_adapter(adapter_dir, tiny_sd)
    params = CADiffParams(**TINY, intensity=(2.0, 2.0))
    plain = pipeline.generate(tiny_sd, adapter, items(), params.model_copy(update={"intensity": (1.0, 1.0)}),
                              defect="pit")
    never = pipeline.generate(tiny_sd, adapter, items(), params.model_copy(update={"alpha_threshold": 1.0}),
                              defect="pit")
    at_once = params.model_copy(update={"alpha_threshold": 0.0})
    reweighted = pipeline.generate(tiny_sd, adapter, items(), at_once, defect="pit")
    ablated = pipeline.generate(tiny_sd, adapter, items(), at_once.model_copy(update={"ablate": ["iar"]}),
                                defect="pit")
    whole = pipeline.generate(tiny_sd, adapter, items(), params, defect="pit", background="generated")
    for p, n, r, a, w in zip(plain, never, reweighted, ablated, whole):
        assert (np.asarray(w.image) != np.asarray(p.image)).any(axis=-1).mean() > 0.5  # the paper's whole image
        assert np.array_equal(np.asarray(n.image), np.asarray(p.image))
        assert np.array_equal(np.asarray(a.image), np.asarray(p.image))
        assert p.details["reweighted_from_step"] is None and n.details["reweighted_from_step"] is None
        assert a.details == {"intensity": None, "reweighted_from_step": None}
        assert r.details == {"intensity": 2.0, "reweighted_from_step": 1}  # alpha_t is known after step 0
        assert not np.array_equal(np.asarray(r.image), np.asarray(p.image))
        outside = outside_band(r)
        assert np.array_equal(np.asarray(r.image)[outside], np.asarray(p.image)[outside])


def test_iar_above_unit_intensity_changes_only_the_masks_attention(tiny_sd):
    layer = next(layer for layer in attention_layers(tiny_sd.unet) if layer.kind == "cross")
    attn = tiny_sd.unet.get_submodule(layer.name.removesuffix(".processor"))
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 64, attn.to_q.in_features, generator=generator)  # [uncond, cond] x 2 pairs, 8x8
    context = torch.randn(4, 77, attn.to_k.in_features, generator=generator)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:5, 3:7] = 1
    schedule = FocusSchedule(token=5, intensities=torch.tensor([2.0, 1.0]), masks=masks, threshold=0.5, steps=4)
    schedule.active[0] = True  # as after the scheduler switched pair 0 on (it never does a w = 1 pair)
    with torch.no_grad():
        plain = UNetAttention()(attn, hidden, context)
        reweighted = IntensityReweighting(schedule, focus=False)(attn, hidden, context)
    inside = masks.flatten(1).bool()
    changed = (reweighted != plain).any(dim=-1)  # (batch, queries)
    assert not changed[:2].any()  # the unconditional half is untouched
    assert changed[2][inside[0]].all() and not changed[2][~inside[0]].any()  # w = 2: only the mask's rows
    assert not changed[3].any()  # a pair not switched on: nothing


def test_the_delayed_focus_scheduler_starts_a_pair_once_its_token_covers_enough_of_the_mask():
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, :4, :4] = 1  # 16 of 64 cells, all in the top half
    schedule = FocusSchedule(token=5, intensities=torch.tensor([1.5, 1.5]), masks=masks, threshold=0.75, steps=3)
    bottom_half_high = torch.arange(64.0)  # an 8x8 focus map, above its mean on the bottom half only
    top_half_high = bottom_half_high.flip(0)
    schedule.record(torch.stack([bottom_half_high, top_half_high]))  # alpha: pair 0 is 0, pair 1 is 1
    schedule.end_step()
    assert schedule.started_at == [None, 1] and schedule.active.tolist() == [False, True]
    assert schedule.measuring  # pair 0 is still waiting
    schedule.record(torch.stack([top_half_high, top_half_high]))
    schedule.end_step()
    assert schedule.started_at == [2, 1] and not schedule.measuring
    late = FocusSchedule(token=5, intensities=torch.tensor([1.5, 1.5]), masks=masks, threshold=0.75, steps=1)
    late.record(torch.stack([top_half_high, top_half_high]))
    late.end_step()  # after the last step: nothing is left to re-weight
    assert late.started_at == [None, None]


def test_finetune_resumes_from_its_checkpoint(tiny_sd, tmp_path):
    params = CADiffParams(**{**TINY, "batch_size": 2}, train_steps=4)

    def crash_at_three(_stage, done, _total):
        if done == 3:
            raise RuntimeError("worker lost")

    checkpoints = Checkpoints(tmp_path / "checkpoints", every=2)
    with pytest.raises(RuntimeError, match="worker lost"):
        pipeline.finetune(tiny_sd, exemplars(), params, product="tile", seed=1, out_dir=tmp_path / "a",
                          checkpoints=checkpoints, on_progress=crash_at_three)
    progress = []
    pipeline.finetune(tiny_sd, exemplars(), params, product="tile", seed=1, out_dir=tmp_path / "a",
                      checkpoints=checkpoints, on_progress=lambda _s, done, _t: progress.append(done))
    assert progress == [3, 4]  # on from the step-2 checkpoint
    pipeline.finetune(tiny_sd, exemplars(), params, product="tile", seed=1, out_dir=tmp_path / "b")
    for file in ("saim.safetensors", "learned_embeds.safetensors", "controlnet/diffusion_pytorch_model.safetensors"):
        resumed, uninterrupted = (load_file(tmp_path / run / file) for run in ("a", "b"))
        assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted), file


# A second well-formed SD: a VAE that scales by 2, a UNet of two levels with cross-attention only
# at full latent size and in its mid block (none at a quarter of the latent side).
TWO_LEVELS = {
    "unet": {**tiny.ARCHITECTURES["tiny"]["unet"], "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "block_out_channels": (16, 32)},
    "vae": {**tiny.ARCHITECTURES["tiny"]["vae"], "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16)},
    "text_encoder": tiny.ARCHITECTURES["tiny"]["text_encoder"],
}


@pytest.fixture(scope="module")
def two_level_sd(tmp_path_factory):
    tiny.ARCHITECTURES["two_levels"] = TWO_LEVELS  # build_random_sd builds only the architectures listed there
    try:
        folder = tiny.build_random_sd(tmp_path_factory.mktemp("two_level_sd"), "two_levels", resolution=64)
    finally:
        del tiny.ARCHITECTURES["two_levels"]
    return load_sd(folder, device="cpu")


def test_another_sd_architecture_fine_tunes_and_generates(two_level_sd, tmp_path):
    sd = two_level_sd
    assert sd.vae_scale_factor == 2
    # The focus layers: the cross-attention scale nearest a quarter of the 32x32 latent, the mid block's 16x16.
    assert {layer.name.split(".")[0] for layer in focus_layers(sd.unet)} == {"mid_block"}
    control = SpatialControl.from_unet(sd.unet, sd.vae_scale_factor)
    latents, t = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 600])
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = sd.unet(latents, t, encoder_hidden_states=text).sample
        control.condition = masks((8, 8, 30, 30), (30, 20, 60, 50))
        with control.attached(sd.unet):
            assert torch.equal(sd.unet(latents, t, encoder_hidden_states=text).sample, plain)
            perturb_zero_layers(control, scale=0.5)
            one = sd.unet(latents, t, encoder_hidden_states=text).sample
            control.condition = masks((30, 20, 60, 50), (8, 8, 30, 30))
            other = sd.unet(latents, t, encoder_hidden_states=text).sample
    assert (one - other).abs().max() > 1e-3  # the mask, embedded at 2x, is in the path

    params = CADiffParams(**{**TINY, "batch_size": 2}, train_steps=1)
    adapter = pipeline.finetune(sd, exemplars(), params, product="tile", seed=0, out_dir=tmp_path)
    assert adapter.config["diagnostics"]["control_to_skip_norm"]["mean"] > 0
    results = pipeline.generate(sd, tmp_path, items(), CADiffParams(**TINY, alpha_threshold=0.0), defect="crack")
    for result, (normal, _, _) in zip(results, items()):
        assert result.details["reweighted_from_step"] == 1  # IAR measured its focus on the mid block
        assert np.array_equal(np.asarray(result.image)[outside_band(result)], np.asarray(normal)[outside_band(result)])


def test_a_unet_without_cross_attention_is_refused_with_the_reason():
    unet = UNet2DConditionModel(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D",) * 2,
                                mid_block_type="UNetMidBlock2D", block_out_channels=(16, 32), layers_per_block=1,
                                cross_attention_dim=32, norm_num_groups=8, sample_size=8)
    with pytest.raises(InputError, match="cross-attention"):
        focus_layers(unet)
