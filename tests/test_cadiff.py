"""CADiff on a tiny random-weight SD: the controlled UNet at initialisation, the loss terms and
what they train, IAR's exactness and locality, the adapter's files."""

import json

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionPipeline
from safetensors.torch import load_file
from scipy import ndimage

from models.diffusion.attention import UNetAttention, attention_layers
from models.diffusion.sampling import predict_noise
from models.diffusion.training import step_generator, train
from models.errors import InputError
from models.methods.cadiff import CADiffParams, pipeline
from models.methods.cadiff.control import SpatialControl
from models.methods.cadiff.iar import FocusSchedule, IntensityReweighting
from models.methods.cadiff.losses import augment
from models.methods.interface import LABEL_BAND, Checkpoints
from tests.diffusion_fixtures import box_mask, textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {"resolution": 64, "num_inference_steps": 4, "guidance_scale": 3.0, "batch_size": 4}


def exemplars():
    """Two defect types of one product, two exemplars each, and a normal image of it."""
    boxes = {"crack": [(8, 8, 28, 20), (30, 34, 56, 44)], "pit": [(36, 10, 50, 24), (12, 40, 24, 54)]}
    images = [pipeline.TrainingImage(textured_image(64, 64, seed=10 * k + i), box_mask(64, 64, box), defect)
              for k, (defect, shapes) in enumerate(boxes.items()) for i, box in enumerate(shapes)]
    return [*images, pipeline.TrainingImage(textured_image(64, 64, seed=99), None, None)]


def perturb_zero_layers(control: SpatialControl, seed: int = 0) -> None:
    """Give SAIM's zero-initialised last layers small random weights, as a few training steps would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for saim in control.saim:
            last = saim.mlp[-1]
            last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.05)


@pytest.fixture(scope="module")
def adapter_dir(tiny_sd, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cadiff_adapter")
    params = CADiffParams(**TINY, train_steps=2)
    adapter = pipeline.finetune(tiny_sd, exemplars(), params, product="tile", seed=0, out_dir=folder)
    # Two steps at lr 1e-5 leave the zero layers almost at zero: give SAIM visible weights so that
    # generation depends on the control, and save them as the adapter.
    perturb_zero_layers(adapter.control)
    adapter.control.save(folder)
    return folder


def test_at_initialisation_the_controlled_unet_is_the_plain_unet_and_detaching_restores_it(tiny_sd):
    unet = tiny_sd.unet
    before = {name: value.clone() for name, value in unet.state_dict().items()}
    processors = dict(unet.attn_processors)
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(400)
    cond, uncond = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(2)).unbind(0)
    control = SpatialControl.from_unet(unet)
    control.condition = torch.from_numpy(box_mask(64, 64, (10, 10, 40, 40))).float()[None, None]
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
    assert not torch.allclose(trained, plain)  # and the control is really in the path
    assert all(torch.equal(prediction, trained) for prediction in sampled)
    assert not isinstance(control.controlnet.controlnet_cond_embedding, torch.nn.Identity)
    assert torch.equal(after, plain)
    assert all(torch.equal(value, before[name]) for name, value in unet.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in unet.modules())
    assert unet.attn_processors == processors


def test_each_loss_term_is_finite_and_has_a_gradient_only_on_what_it_trains(tiny_sd):
    training = pipeline.CADiffTraining(tiny_sd, exemplars(), CADiffParams(**TINY), product="tile", seed=0)
    perturb_zero_layers(training.control)  # at zero, gradients cannot reach the ControlNet yet
    frozen = [*tiny_sd.unet.parameters(), *tiny_sd.text_encoder.parameters(), *tiny_sd.vae.parameters()]
    assert not any(p.requires_grad for p in frozen)
    with training.attached():
        losses = training.losses(step_generator(0, 0))
        tokens = training.embedding.vectors
        controlnet = [p for p in training.control.controlnet.parameters()]
        saim = [p for p in training.control.saim.parameters()]
        for name, term in losses._asdict().items():
            assert torch.isfinite(term) and term.item() > 0, name
            token_grad, *rest = torch.autograd.grad(term, [tokens, *controlnet, *saim], retain_graph=True,
                                                    allow_unused=True)
            # The context token and both anomaly tokens are in the batch's prompts.
            assert (token_grad.abs().sum(dim=1) > 0).all(), name
            control_grads = [g for g in rest if g is not None]
            assert any(g.abs().sum() > 0 for g in control_grads), name
        sum(losses).backward()
    assert all(p.grad is None for p in frozen)
    assert training.control.condition.shape == (4, 1, 64, 64)


def test_a_short_overfit_on_one_exemplar_lowers_the_localization_loss(tiny_sd):
    one = [pipeline.TrainingImage(textured_image(64, 64, seed=5), box_mask(64, 64, (8, 8, 32, 32)), "crack")]
    params = CADiffParams(**{**TINY, "batch_size": 2}, token_learning_rate=0.05, rotation=0, crop=(1.0, 1.0))
    training = pipeline.CADiffTraining(tiny_sd, one, params, product="tile", seed=0)
    with training.attached():
        before = training.losses(step_generator(123, 0)).loc.item()
        optimizer = torch.optim.Adam([training.embedding.vectors], lr=params.token_learning_rate)
        train({"tokens": training.embedding.vectors}, optimizer, lambda _s, g: training.losses(g).loc, steps=25,
              seed=0, run={}, device=tiny_sd.device, mixed_precision=False)
        after = training.losses(step_generator(123, 0)).loc.item()
    assert after < 0.9 * before, (before, after)


def test_augmentation_moves_image_and_masks_together():
    square = box_mask(64, 64, (16, 20, 40, 36))
    image = torch.from_numpy(square).float()[None, None].repeat(3, 3, 1, 1) * 2 - 1  # the mask, as pixels
    mask = torch.from_numpy(square).float()[None, None].repeat(3, 1, 1, 1)
    moved_image, moved_mask = augment(image, mask, torch.Generator().manual_seed(0), rotation=30, crop=(0.6, 0.9))
    assert not torch.equal(moved_mask, mask)
    disagreement = ((moved_image[:, :1] > 0).float() != moved_mask).float().mean()
    assert disagreement < 0.02  # only along the square's edges (bilinear image, nearest mask)


def test_the_adapter_is_in_library_formats(adapter_dir, tiny_sd, tiny_sd_dir):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["method"] == "cadiff" and config["template"] == "a photo of {context} with {anomaly}"
    assert config["defect_tokens"] == {"crack": "<cadiff-anomaly-0>", "pit": "<cadiff-anomaly-1>"}
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


def test_iar_at_unit_intensity_or_never_focused_is_plain_sampling_exactly(tiny_sd, adapter_dir):
    adapter = pipeline.load_adapter(adapter_dir, tiny_sd)
    params = CADiffParams(**TINY, intensity=(2.0, 2.0))
    plain = pipeline.generate(tiny_sd, adapter, items(), params, defect="pit", reweighting=False)
    unit = pipeline.generate(tiny_sd, adapter, items(), params.model_copy(update={"intensity": (1.0, 1.0)}),
                             defect="pit")
    never = pipeline.generate(tiny_sd, adapter, items(), params.model_copy(update={"alpha_threshold": 1.0}),
                              defect="pit")
    at_once = pipeline.generate(tiny_sd, adapter, items(), params.model_copy(update={"alpha_threshold": 0.0}),
                                defect="pit")
    whole = pipeline.generate(tiny_sd, adapter, items(), params, defect="pit", reweighting=False,
                              background="generated")
    for p, u, n, a, w in zip(plain, unit, never, at_once, whole):
        assert (np.asarray(w.image) != np.asarray(p.image)).any(axis=-1).mean() > 0.5  # the paper's whole image
        assert np.array_equal(np.asarray(u.image), np.asarray(p.image))
        assert np.array_equal(np.asarray(n.image), np.asarray(p.image))
        assert u.details["reweighted_from_step"] is None and n.details["reweighted_from_step"] is None
        assert a.details["reweighted_from_step"] == 1  # alpha_t is known after step 0: re-weighting from step 1 on
        assert not np.array_equal(np.asarray(a.image), np.asarray(p.image))
        outside = ~ndimage.binary_dilation(a.mask > 0, np.ones((3, 3), bool), iterations=LABEL_BAND)
        assert np.array_equal(np.asarray(a.image)[outside], np.asarray(p.image)[outside])


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
