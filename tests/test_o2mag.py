"""O2MAG on the tiny model: tri-branch grafting, AGO, DAE, compositing, caching and progress."""

import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from pydantic import ValidationError

from models.diffusion.generation import GenerateItem
from models.diffusion.images import mask_to_latent
from models.diffusion.loading import fresh_scheduler
from models.diffusion.sampling import ddim_invert, encode_prompts
from models.methods.interface import (
    LABEL_BAND,
    DirectoryCache,
    Exemplar,
    GenerateRequest,
    NormalImages,
    Pair,
    job_items,
    label_contract_violation,
)
from models.methods.o2mag import COMPONENTS, O2MAGParams
from models.methods.o2mag import method as o2mag_method
from models.methods.o2mag import pipeline as o2mag
from models.methods.params import MaskSpec
from models.methods.registry import METHODS
from tests.diffusion_fixtures import box_mask, textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

STEPS = 6
PARAMS = O2MAGParams(resolution=64, num_inference_steps=STEPS, graft_start=0.1, ago_steps=0)


@pytest.fixture(scope="module")
def reference():
    """A 80x80 RGB anomaly image and its mask M_R."""
    return textured_image(80, 80, "RGB", seed=1), box_mask(80, 80, (20, 24, 52, 48))


@pytest.fixture(scope="module")
def embedding(tiny_sd, reference):
    """The prompt's own embedding (AGO with 0 steps): what generate needs, at no cost."""
    return o2mag.optimize_embedding(tiny_sd, *reference, PARAMS, seed=0)


@pytest.fixture(scope="module")
def items():
    """Odd sizes, both modes; the first two share a normal image."""
    shared = textured_image(90, 120, "RGB", seed=10)
    return [
        GenerateItem(shared, box_mask(90, 120, (40, 30, 80, 60)), 101),
        GenerateItem(shared, box_mask(90, 120, (5, 50, 30, 85)), 102),
        GenerateItem(textured_image(75, 61, "L", seed=11), box_mask(75, 61, (10, 10, 30, 50)), 103),
    ]


def run(sd, reference, items, embedding, params=PARAMS, **kwargs):
    return [np.asarray(result.image) for result in o2mag.generate(sd, *reference, items, params,
                                                                   embedding=embedding, **kwargs)]


def binary_dilation(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by `radius` pixels in every direction, diagonals included."""
    padded = np.pad(mask, radius)
    height, width = mask.shape
    return np.any([padded[dy : dy + height, dx : dx + width] for dy in range(2 * radius + 1)
                   for dx in range(2 * radius + 1)], axis=0)


def same(outputs, others) -> bool:
    return len(outputs) == len(others) and all(np.array_equal(a, b) for a, b in zip(outputs, others))


def all_sdpa(unet) -> bool:
    return all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_outside_the_dilated_target_mask_the_output_is_the_normal_image_bit_for_bit(tiny_sd, reference, embedding,
                                                                                  items):
    results = o2mag.generate(tiny_sd, *reference, items, PARAMS, embedding=embedding)
    for item, result in zip(items, results):
        normal, image = np.asarray(item.normal), np.asarray(result.image)
        assert result.image.size == item.normal.size and result.image.mode == item.normal.mode
        dilated = binary_dilation(item.target_mask, min(PARAMS.mask_dilation, LABEL_BAND))
        assert np.array_equal(image[~dilated], normal[~dilated])
        ring = dilated & ~item.target_mask  # fades from the generated pixels to the normal image's
        assert (image[ring] != normal[ring]).any()
        assert (image[item.target_mask] != normal[item.target_mask]).mean() > 0.5
        assert result.mask.dtype == np.uint8 and np.array_equal(result.mask, item.target_mask * np.uint8(255))
        assert result.seed == item.seed


def test_a_wide_fade_reaches_only_the_label_band_outside_the_mask_and_the_rest_inside(tiny_sd, reference,
                                                                                      embedding, items):
    wide = PARAMS.model_copy(update={"mask_dilation": 8})
    for item, result in zip(items, o2mag.generate(tiny_sd, *reference, items, wide, embedding=embedding)):
        normal, image = np.asarray(item.normal), np.asarray(result.image)
        band = binary_dilation(item.target_mask, LABEL_BAND)
        assert np.array_equal(image[~band], normal[~band])
        assert label_contract_violation(item.normal, Pair(0, result.image, result.mask, 0)) is None
    narrow = [np.asarray(r.image) for r in o2mag.generate(tiny_sd, *reference, items[:1], PARAMS, embedding=embedding)]
    wide_image = np.asarray(o2mag.generate(tiny_sd, *reference, items[:1], wide, embedding=embedding)[0].image)
    just_inside = items[0].target_mask & binary_dilation(~items[0].target_mask, 2)
    assert (wide_image[just_inside] != narrow[0][just_inside]).any()  # the fade moved inside the mask


def test_an_empty_target_mask_gives_the_normal_branch_its_own_reconstruction(tiny_sd, reference, embedding, items):
    normal = items[0].normal
    empty = GenerateItem(normal, np.zeros((90, 120), bool), 7)
    scheduler = fresh_scheduler(tiny_sd)
    scheduler.set_timesteps(STEPS)
    cond = embedding[None]
    with torch.no_grad():
        uncond = encode_prompts(tiny_sd, [""])
    reference_latents, _ = o2mag._reference_latents(tiny_sd, *reference, 64)
    reference_path = o2mag._inverted_path(tiny_sd, scheduler, reference_latents, cond, None)
    normal_latents = o2mag.encode(tiny_sd, o2mag.image_to_pixels(normal, 64)[None])
    normal_path = o2mag._inverted_path(tiny_sd, scheduler, normal_latents, uncond, None)
    params = PARAMS.model_copy(update={"dae_factor": 3.0, "target_noise": 0.5})  # nothing may leak in
    target = o2mag._denoise_targets(tiny_sd, scheduler, reference_path, normal_path, reference[1], [empty],
                                    cond, uncond, params, None)
    assert torch.equal(target, normal_path[0]) and torch.equal(normal_path[0], normal_latents)
    (result,) = o2mag.generate(tiny_sd, *reference, [empty], params, embedding=embedding)
    assert np.array_equal(np.asarray(result.image), np.asarray(normal)) and not result.mask.any()


def test_the_reference_outside_its_mask_never_reaches_the_output(tiny_sd, reference, embedding, items):
    image, mask = reference
    other_background = np.where(mask[..., None], np.asarray(image), np.asarray(textured_image(80, 80, seed=99)))
    moved = (Image.fromarray(other_background), mask)
    assert same(run(tiny_sd, reference, items, embedding), run(tiny_sd, moved, items, embedding))
    assert o2mag.ago_cache_key(*reference, PARAMS) == o2mag.ago_cache_key(*moved, PARAMS)

    other_defect = np.where(mask[..., None], np.asarray(textured_image(80, 80, seed=98)), np.asarray(image))
    changed = (Image.fromarray(other_defect), mask)
    outputs, changed_outputs = run(tiny_sd, reference, items, embedding), run(tiny_sd, changed, items, embedding)
    assert all(not np.array_equal(a, b) for a, b in zip(outputs, changed_outputs))  # R inside M_R does reach it
    assert o2mag.ago_cache_key(*reference, PARAMS) != o2mag.ago_cache_key(*changed, PARAMS)
    # Through the graft alone (the embedding is fixed here): without it the reference's pixels reach nothing.
    no_graft = PARAMS.model_copy(update={"ablate": ["graft"]})
    assert same(run(tiny_sd, reference, items[:1], embedding, no_graft),
                run(tiny_sd, changed, items[:1], embedding, no_graft))


def test_dae_factor_one_is_exactly_no_dae(tiny_sd, reference, embedding, items):
    factor_one = run(tiny_sd, reference, items, embedding, PARAMS.model_copy(update={"dae_factor": 1.0}))
    empty_window = run(tiny_sd, reference, items, embedding, PARAMS.model_copy(update={"dae_window": (0.5, 0.5)}))
    boosted = run(tiny_sd, reference, items, embedding, PARAMS.model_copy(update={"dae_factor": 3.0}))
    ablated = run(tiny_sd, reference, items, embedding,
                  PARAMS.model_copy(update={"dae_factor": 3.0, "ablate": ["dae"]}))
    assert same(factor_one, empty_window) and same(factor_one, ablated)
    assert all(not np.array_equal(a, b) for a, b in zip(factor_one, boosted))


@pytest.mark.parametrize("ablate", [[], ["dae"]])
def test_dae_scales_the_targets_attention_inside_their_masks_only_and_only_in_its_window(
        tiny_sd, reference, embedding, items, monkeypatch, ablate):
    """Every controlled layer's output at every step against an independent computation of DAE."""
    recorded = []

    class RecordingControl(o2mag.AttentionControl):
        def boost(self, out):
            recorded.append((out, super().boost(out)))
            return recorded[-1][1]

    monkeypatch.setattr(o2mag, "AttentionControl", RecordingControl)
    params = PARAMS.model_copy(update={"dae_factor": 3.0, "dae_window": (0.3, 0.7), "ablate": ablate})
    targets = items[:2]  # one normal image: one batch of [R, N, T1, T2] per guidance half
    run(tiny_sd, reference, targets, embedding, params)
    layers = len(o2mag.controlled_layers(tiny_sd.unet, params.graft_resolutions))
    assert len(recorded) == STEPS * layers  # each layer once per step, both guidance halves in one call
    for number, (out, boosted) in enumerate(recorded):
        step = number // layers
        factor = 3.0 if 0.3 <= step / STEPS < 0.7 and not ablate else 1.0  # steps 2, 3 and 4 of 6
        side = math.isqrt(out.shape[2])
        inside = torch.stack([mask_to_latent(item.target_mask, side).flatten() > 0 for item in targets])
        expected = out.unflatten(0, (2, 4)).clone()
        expected[:, 2:] = torch.where(inside[None, :, None, :, None], factor * expected[:, 2:], expected[:, 2:])
        torch.testing.assert_close(boosted, expected.flatten(0, 1), rtol=0, atol=0)
    assert sum(not torch.equal(out, boosted) for out, boosted in recorded) == (0 if ablate else 3 * layers)


@contextmanager
def branch_keys_and_values_perturbed(unet, branch: int, batch: int):
    """Noise added to one branch's keys and values in every controlled self-attention layer while
    sampling (rows `branch`, `branch + batch`: the branch in each guidance half of [R, N, T..]),
    not in the inversions."""
    def perturb(_module, _inputs, output):
        if len(output) != 2 * batch:
            return output
        output = output.clone()
        noise = torch.randn(output[branch::batch].shape, generator=torch.Generator().manual_seed(0))
        output[branch::batch] += output.std() * noise
        return output

    handles = [
        getattr(unet.get_submodule(layer.name.removesuffix(".processor")), projection).register_forward_hook(perturb)
        for layer in o2mag.controlled_layers(unet, PARAMS.graft_resolutions) if layer.kind == "self"
        for projection in ("to_k", "to_v")
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("component, branch", [("graft", o2mag.REFERENCE), ("background", o2mag.NORMAL)])
def test_each_grafted_source_reaches_the_target_through_its_keys_and_values_unless_ablated(
        tiny_sd, reference, embedding, items, component, branch):
    """R's (graft) and N's (background) keys/values perturbed in the controlled layers: the target
    changes; with that source ablated, not a bit of it (R and N reach T through nothing else there)."""
    target = items[2:]  # one target: [R, N, T] per guidance half
    for ablate in ([], [component]):
        params = PARAMS.model_copy(update={"ablate": ablate})
        plain = run(tiny_sd, reference, target, embedding, params)
        with branch_keys_and_values_perturbed(tiny_sd.unet, branch, o2mag.SOURCES + 1):
            perturbed = run(tiny_sd, reference, target, embedding, params)
        assert same(plain, perturbed) == bool(ablate), ablate


@pytest.fixture(scope="module")
def with_everything(tiny_sd, reference, items):
    """Outputs with nothing ablated, AGO run inside generate (a few large steps, so it moves)."""
    return o2mag.generate(tiny_sd, *reference, items, AGO_PARAMS)


AGO_PARAMS = PARAMS.model_copy(update={"ago_steps": 3, "ago_learning_rate": 0.1})


@pytest.mark.parametrize("component", [component.name for component in COMPONENTS])
def test_each_ablation_changes_the_output_only_inside_the_mask_and_band_and_keeps_the_label_contract(
        tiny_sd, reference, items, with_everything, component):
    ablated = o2mag.generate(tiny_sd, *reference, items, AGO_PARAMS.model_copy(update={"ablate": [component]}))
    for item, full, without in zip(items, with_everything, ablated):
        band = binary_dilation(item.target_mask, min(PARAMS.mask_dilation, LABEL_BAND))
        full_image, image = np.asarray(full.image), np.asarray(without.image)
        assert np.array_equal(image[~band], full_image[~band]) and np.array_equal(without.mask, full.mask)
        assert (image[item.target_mask] != full_image[item.target_mask]).any(), component
        assert label_contract_violation(item.normal, Pair(0, without.image, without.mask, 0)) is None


def test_ago_moves_the_embedding_off_the_prompts_and_ablated_it_is_the_prompts(tiny_sd, reference, embedding, items):
    with torch.no_grad():
        prompt = encode_prompts(tiny_sd, [PARAMS.prompt])[0].float()
    optimised = o2mag.optimize_embedding(tiny_sd, *reference, AGO_PARAMS, seed=0)
    progress = []
    ablated = o2mag.optimize_embedding(tiny_sd, *reference, AGO_PARAMS.model_copy(update={"ablate": ["ago"]}), seed=0,
                                       on_progress=lambda *report: progress.append(report))
    assert torch.equal(ablated, prompt) and torch.equal(embedding, prompt) and progress == []
    assert (optimised - prompt).norm() > 0.1 * prompt.norm()
    # It changes the noise prediction of the target branch...
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        predictions = [tiny_sd.unet(latents, t, encoder_hidden_states=e[None]).sample for e in (optimised, prompt)]
    assert not torch.allclose(*predictions, atol=1e-3)
    # ...and, run inside generate with AGO ablated, the output is the prompt embedding's to the bit.
    without_ago = o2mag.generate(tiny_sd, *reference, items[2:], AGO_PARAMS.model_copy(update={"ablate": ["ago"]}))
    assert same([np.asarray(r.image) for r in without_ago], run(tiny_sd, reference, items[2:], prompt, AGO_PARAMS))


def test_ago_lowers_its_loss_and_leaves_the_model_alone(tiny_sd, reference):
    # A random tiny UNet barely listens to its text, so a larger step than the paper's shows the trend.
    params = PARAMS.model_copy(update={"ago_steps": 40, "ago_learning_rate": 0.1})
    unet_before = [p.clone() for p in tiny_sd.unet.parameters()]
    progress = []
    optimised = o2mag.optimize_embedding(tiny_sd, *reference, params, seed=5,
                                         on_progress=lambda *report: progress.append(report))
    start = o2mag.optimize_embedding(tiny_sd, *reference, PARAMS, seed=5)  # 0 steps: the prompt's embedding
    assert progress == [("ago", step, 40) for step in range(1, 41)]
    assert optimised.shape == start.shape == (77, tiny_sd.text_encoder.config.hidden_size)
    assert optimised.dtype == torch.float32 and optimised.device.type == "cpu"

    # The objective at fixed draws it never trained on.
    latents, loss_mask = o2mag._reference_latents(tiny_sd, *reference, 64)
    generator = torch.Generator().manual_seed(1234)
    t = torch.randint(1000, (32,), generator=generator)
    noise = torch.randn((32, *latents.shape[1:]), generator=generator)
    scheduler = fresh_scheduler(tiny_sd)

    def loss(embedding):
        with torch.no_grad():
            return o2mag._masked_diffusion_loss(tiny_sd, scheduler, latents.expand(32, -1, -1, -1),
                                                loss_mask, embedding, t, noise).item()

    assert loss(optimised) < 0.97 * loss(start)  # measured: 4% lower
    assert all(torch.equal(a, b) for a, b in zip(unet_before, tiny_sd.unet.parameters()))
    assert not any(p.requires_grad for p in tiny_sd.unet.parameters())


def test_an_embedding_survives_saving_and_a_wrong_one_is_refused(tiny_sd, reference, embedding, items, tmp_path):
    o2mag.save_embedding(embedding, tmp_path / "ago.safetensors")
    loaded = o2mag.load_embedding(tmp_path / "ago.safetensors")
    assert torch.equal(loaded, embedding)
    assert same(run(tiny_sd, reference, items[2:], loaded), run(tiny_sd, reference, items[2:], embedding))

    from safetensors.torch import save_file

    save_file({"other": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="holds no o2mag embedding"):
        o2mag.load_embedding(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="does not fit this model"):
        o2mag.generate(tiny_sd, *reference, items[2:], PARAMS, embedding=torch.zeros(77, 768))


def test_the_cache_key_covers_what_ago_depends_on_and_nothing_else(reference):
    key = o2mag.ago_cache_key(*reference, PARAMS)
    assert len(key) == 64 and int(key, 16) >= 0 and key == o2mag.ago_cache_key(*reference, PARAMS.model_copy())
    for change in ({"ago_steps": 499}, {"ago_learning_rate": 0.01}, {"prompt": "a scratch"}, {"resolution": 128}):
        assert o2mag.ago_cache_key(*reference, PARAMS.model_copy(update=change)) != key
    for change in ({"guidance_scale": 3.0}, {"dae_factor": 2.0}, {"num_inference_steps": 20}, {"mask_dilation": 0},
                   {"ablate": ["dae", "graft", "background"]}):
        assert o2mag.ago_cache_key(*reference, PARAMS.model_copy(update=change)) == key
    # Without AGO the embedding is the prompt's, whatever the steps: one cache entry, that of 0 steps.
    no_ago = O2MAGParams(ablate=["ago"])
    assert o2mag.ago_cache_key(*reference, no_ago) == o2mag.ago_cache_key(*reference, O2MAGParams(ago_steps=0))
    assert o2mag.ago_cache_key(*reference, no_ago) != o2mag.ago_cache_key(*reference, O2MAGParams())
    image, mask = reference
    assert o2mag.ago_cache_key(image.convert("L"), mask, PARAMS) != key
    assert o2mag.ago_cache_key(image, np.roll(mask, 1, axis=0), PARAMS) != key


def test_same_seed_same_output_and_seeds_matter_only_with_target_noise(tiny_sd, reference, embedding, items):
    noisy = PARAMS.model_copy(update={"target_noise": 0.5})
    first = run(tiny_sd, reference, items, embedding, noisy)
    assert same(first, run(tiny_sd, reference, items, embedding, noisy))
    # Batch composition may change floating-point rounding in the kernels, never the draws.
    alone = run(tiny_sd, reference, items[1:2], embedding, noisy, targets_per_call=1)
    assert np.abs(alone[0].astype(int) - first[1]).max() <= 1

    reseeded = [item._replace(seed=item.seed + 1000) for item in items]
    assert not np.array_equal(run(tiny_sd, reference, reseeded, embedding, noisy)[0], first[0])
    plain = run(tiny_sd, reference, items, embedding)
    assert same(plain, run(tiny_sd, reference, reseeded, embedding))


def test_each_normal_image_is_inverted_once_and_progress_counts_every_step(tiny_sd, reference, embedding, items):
    shared, other = items[0].normal, items[2].normal
    many = [items[0], items[2], items[1], items[0]._replace(seed=5), GenerateItem(shared.copy(), items[1][1], 6)]
    progress = []
    o2mag.generate(tiny_sd, *reference, many, PARAMS, embedding=embedding, targets_per_call=2,
                   on_progress=lambda *report: progress.append(report))
    # Inversions: the reference, the shared normal (4 items, one a copy), the other; sampling runs: 2 + 1.
    stages = ["invert"] * 2 * STEPS + ["generate"] * 2 * STEPS + ["invert"] * STEPS + ["generate"] * STEPS
    assert progress == [(stage, done, 6 * STEPS) for done, stage in enumerate(stages, start=1)]
    assert other is not shared

    progress.clear()
    o2mag.generate(tiny_sd, *reference, items[2:], PARAMS.model_copy(update={"ago_steps": 2}),
                   on_progress=lambda *report: progress.append(report))
    assert [stage for stage, _, _ in progress] == ["ago"] * 2 + ["invert"] * 2 * STEPS + ["generate"] * STEPS
    assert progress[-1] == ("generate", 2 + 3 * STEPS, 2 + 3 * STEPS)


def test_a_raise_in_the_progress_callback_cancels_and_the_model_is_restored(tiny_sd, reference, embedding, items):
    class Cancelled(Exception):
        pass

    def cancel(stage, done, total):
        if stage == "generate":
            raise Cancelled

    table = tiny_sd.text_encoder.get_input_embeddings()
    with pytest.raises(Cancelled):
        o2mag.generate(tiny_sd, *reference, items, PARAMS, embedding=embedding, on_progress=cancel)
    assert all_sdpa(tiny_sd.unet) and tiny_sd.text_encoder.get_input_embeddings() is table


def test_sampling_never_computes_an_explicit_attention_matrix(tiny_sd, reference, embedding, items, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an explicit softmax ran")

    monkeypatch.setattr(torch, "softmax", refuse)
    monkeypatch.setattr(torch.Tensor, "softmax", refuse)
    monkeypatch.setattr(torch.nn.functional, "softmax", refuse)
    run(tiny_sd, reference, items[:1], embedding, PARAMS.model_copy(update={"dae_factor": 2.0}))


@pytest.mark.parametrize("ablate", [[], ["graft"], ["background"], ["graft", "background"]])
def test_grafted_attention_is_masked_attention_to_the_right_branch(ablate):
    """Against an explicit computation: 2 guidance halves of [R, N, T1, T2], 4x4 tokens. An ablated
    source leaves the target its own keys/values there."""
    side, heads, dim = 4, 2, 8
    reference_mask = box_mask(side, side, (1, 1, 3, 2))
    target_masks = [box_mask(side, side, (0, 0, 2, 2)), np.zeros((side, side), bool)]
    control = o2mag.AttentionControl(reference_mask, target_masks, {side}, torch.device("cpu"), ablate)
    control.grafting = True
    query, key, value = torch.randn((3, 2 * 4, heads, side * side, dim), generator=torch.Generator().manual_seed(0))
    attn = type("Attn", (), {"scale": dim**-0.5})()
    out = o2mag.GraftedSelfAttention(control).attend(attn, query, key, value)

    def explicit(q, k, v):
        return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1) @ v

    defect = torch.from_numpy(reference_mask.flatten())
    for half in (0, 4):
        r, n = half, half + 1
        torch.testing.assert_close(out[r], explicit(query[r], key[r], value[r]))
        torch.testing.assert_close(out[n], explicit(query[n], key[n], value[n]))
        for number, mask in enumerate(target_masks):
            t = half + 2 + number
            inside = torch.from_numpy(mask.flatten())[:, None]
            own = explicit(query[t], key[t], value[t])
            grafted = own if "graft" in ablate else explicit(query[t], key[r][:, defect], value[r][:, defect])
            background = own if "background" in ablate else explicit(query[t], key[n], value[n])
            torch.testing.assert_close(out[t], torch.where(inside, grafted, background))

    control.dae_scale = 2.0
    boosted = o2mag.GraftedSelfAttention(control).attend(attn, query, key, value)
    inside = torch.from_numpy(target_masks[0].flatten())[:, None]
    torch.testing.assert_close(boosted[2], torch.where(inside, 2 * out[2], out[2]))
    torch.testing.assert_close(boosted[[0, 1, 3, 4, 5, 7]], out[[0, 1, 3, 4, 5, 7]])


def test_the_controlled_layers_are_the_decoders_at_the_chosen_resolutions(tiny_sd):
    default = o2mag.controlled_layers(tiny_sd.unet, O2MAGParams().graft_resolutions)
    blocks = sorted({layer.name.split(".attentions")[0] for layer in default})
    assert blocks == ["up_blocks.2", "up_blocks.3"]
    assert len(default) == 8  # 2 blocks x 2 transformer layers (tiny: 1 per block + 1) x self and cross
    (middle_self, middle_cross) = o2mag.controlled_layers(tiny_sd.unet, [8])
    assert middle_self.name.startswith("mid_block") and (middle_self.kind, middle_cross.kind) == ("self", "cross")


def test_the_inverted_path_is_kept_step_by_step(tiny_sd):
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond = encode_prompts(tiny_sd, [""])
    scheduler = fresh_scheduler(tiny_sd)
    scheduler.set_timesteps(STEPS)
    path = []
    noise = ddim_invert(tiny_sd, scheduler, latents, cond, trajectory=path)
    assert len(path) == STEPS + 1 and torch.equal(path[0], latents) and torch.equal(path[-1], noise)
    assert torch.equal(ddim_invert(tiny_sd, scheduler, latents, cond), noise)


def test_bad_inputs_are_refused_before_any_work(tiny_sd, reference, embedding, items):
    image, mask = reference
    with pytest.raises(ValueError, match="reference mask is empty"):
        o2mag.generate(tiny_sd, image, np.zeros_like(mask), items, PARAMS, embedding=embedding)
    with pytest.raises(ValueError, match="does not match the image"):
        o2mag.generate(tiny_sd, image, mask, [(items[0].normal, np.ones((5, 5), bool), 0)], PARAMS,
                       embedding=embedding)
    with pytest.raises(ValueError, match="'RGBA' is not supported"):
        o2mag.optimize_embedding(tiny_sd, image.convert("RGBA"), mask, PARAMS, seed=0)
    with pytest.raises(ValueError, match="targets_per_call"):
        o2mag.generate(tiny_sd, image, mask, items, PARAMS, embedding=embedding, targets_per_call=0)


def test_params_follow_the_paper_and_refuse_nonsense():
    params = O2MAGParams()
    assert METHODS["o2mag"].params is O2MAGParams
    assert (params.ago_steps, params.ago_learning_rate, params.num_inference_steps) == (500, 3e-3, 50)
    assert params.graft_resolutions == [32, 64] and params.graft_start * 50 == 4
    for bad in ({"unknown": 1}, {"graft_start": 1.0}, {"dae_window": (0.7, 0.3)}, {"dae_window": (0.5, 1.5)},
                {"graft_resolutions": [48]}, {"graft_resolutions": []}, {"graft_resolutions": [32, 32]},
                {"dae_factor": 0.5}, {"target_noise": 2}, {"mask_dilation": -1}, {"ablate": ["saim"]},
                {"ablate": ["dae", "dae"]}):
        with pytest.raises(ValidationError):
            O2MAGParams(**bad)
    parsed = O2MAGParams.model_validate({"graft_resolutions": [16, 64], "dae_window": [0.2, 0.8]})
    assert parsed.dae_window == (0.2, 0.8) and parsed.graft_resolutions == [16, 64] and parsed.ablate == []
    assert [c.name for c in METHODS["o2mag"].components] == ["graft", "background", "ago", "dae"]
    assert all(c.acts_in == "generate" for c in COMPONENTS)  # no fine-tune: everything acts while images are made


# -- the method interface (models.methods.o2mag.method): several references, once per job each ----------------
def interface_request(tiny_sd_dir, references, normals, count, cache=None, masks=None):
    return GenerateRequest(
        params=PARAMS.model_copy(update={"ago_steps": 1}), masks=masks or MaskSpec(source="exemplar"),
        exemplars=references, given_masks=[], normals=NormalImages.in_memory(normals),
        items=job_items(count, 5, len(normals), len(references)), cache=cache,
        weight_dirs={"SD_MODEL_DIR": str(tiny_sd_dir)}, device="cpu",
    )


def test_each_reference_is_optimised_and_inverted_once_per_job_and_its_masks_are_its_own(
        tiny_sd_dir, monkeypatch, tmp_path):
    wide, tall = box_mask(64, 64, (4, 28, 60, 36)), box_mask(64, 64, (28, 4, 36, 60))
    references = [Exemplar("wide", textured_image(64, 64, "RGB", seed=3), wide, "p", "d"),
                  Exemplar("tall", textured_image(64, 64, "RGB", seed=4), tall, "p", "d")]
    normals = [textured_image(64, 64, "RGB", seed=s) for s in (5, 6)]
    masks = MaskSpec(source="exemplar", scale=(1, 1), rotation=0, inside_foreground=False)
    request = interface_request(tiny_sd_dir, references, normals, 8, DirectoryCache(tmp_path), masks)
    calls = o2mag_method.calls(request)
    # One call per (reference, normal image) pair: they share both inversions.
    assert sorted((call[0].reference, call[0].normal) for call in calls) == [(0, 0), (0, 1), (1, 0), (1, 1)]

    counted = {"optimize_embedding": 0, "invert_reference": 0}

    def counting(name, function):
        def counted_call(*args, **kwargs):
            counted[name] += 1
            return function(*args, **kwargs)
        return counted_call

    for name in counted:
        monkeypatch.setattr(o2mag, name, counting(name, getattr(o2mag, name)))
    pairs = [pair for batch in o2mag_method.generate(request, calls, lambda *_: None) for pair in batch]
    assert counted == {"optimize_embedding": 2, "invert_reference": 2}
    for pair in pairs:
        item = request.items[pair.index]
        assert pair.details["reference"] == references[item.reference].id
        rows, cols = np.nonzero(pair.mask)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        assert (width > height) == (item.reference == 0)  # jittered from its own reference's mask

    # A second job finds both embeddings in the cache.
    list(o2mag_method.generate(request, calls[:1], lambda *_: None))
    assert counted["optimize_embedding"] == 2


def test_every_pair_records_what_its_job_ablated_and_without_ago_no_step_is_taken(tiny_sd_dir):
    reference = Exemplar("ref", textured_image(64, 64, "RGB", seed=3), box_mask(64, 64, (20, 20, 40, 40)), "p", "d")
    request = interface_request(tiny_sd_dir, [reference], [textured_image(64, 64, "RGB", seed=5)], 2)
    request.params = request.params.model_copy(update={"ablate": ["dae", "ago"]})
    stages = []
    pairs = [pair for batch in o2mag_method.generate(request, o2mag_method.calls(request),
                                                       lambda stage, *_: stages.append(stage))
             for pair in batch]
    assert [pair.details["ablated"] for pair in pairs] == [["ago", "dae"]] * 2  # sorted
    assert "optimising the text embedding" not in stages
