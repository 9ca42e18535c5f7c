"""AnoGen end to end on the tiny model: fine-tune, then generate."""

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from models.diffusion.generation import GenerateItem
from models.diffusion.images import mask_to_latent
from models.diffusion.textual_inversion import LearnedEmbedding, initial_vectors
from models.methods.anogen import COMPONENTS, AnoGenParams
from models.methods.anogen import method as anogen_method
from models.methods.anogen import pipeline as anogen
from models.methods.interface import Checkpoints, Exemplar, FinetuneRequest, GenerateRequest, NormalImages, job_items
from models.methods.params import MaskSpec
from models.methods.registry import METHODS
from tests.diffusion_fixtures import box_mask, textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = AnoGenParams(resolution=64, num_inference_steps=8, train_steps=4, batch_size=2)


def params_with(params=PARAMS, **update) -> AnoGenParams:
    """`params` changed and validated again (model_copy does not validate; ablate and masked_loss move together)."""
    return AnoGenParams(**{**params.model_dump(exclude={"masked_loss"}), **update})


@pytest.fixture(scope="module")
def exemplars():
    return [
        (textured_image(72, 96, "RGB", seed=1), box_mask(72, 96, (30, 20, 50, 40))),
        (textured_image(64, 64, "L", seed=2), box_mask(64, 64, (5, 40, 20, 60))),
    ]


@pytest.fixture(scope="module")
def adapter(tiny_sd, exemplars, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("adapter")
    embedding = anogen.finetune(tiny_sd, exemplars, PARAMS, seed=3, out_dir=out_dir).embedding
    return out_dir, embedding


@pytest.fixture(scope="module")
def items():
    """Odd sizes, both modes."""
    return [
        GenerateItem(textured_image(90, 120, "RGB", seed=10), box_mask(90, 120, (40, 30, 80, 60)), 101),
        GenerateItem(textured_image(75, 61, "L", seed=11), box_mask(75, 61, (10, 10, 30, 50)), 102),
        GenerateItem(textured_image(64, 64, "RGB", seed=12), box_mask(64, 64, (0, 0, 20, 20)), 103),
    ]


def arrays(results):
    return [np.asarray(result.image) for result in results]


def test_finetune_writes_an_adapter_and_reports_progress(tiny_sd, exemplars, tmp_path):
    progress = []
    anogen.finetune(tiny_sd, exemplars, PARAMS, seed=3, out_dir=tmp_path,
                    on_progress=lambda *report: progress.append(report))
    assert progress == [("train", step, 4) for step in range(1, 5)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter_config.json", "learned_embeds.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["method"] == "anogen" and config["tokens"] == [anogen.PLACEHOLDER]
    assert config["embedding_dim"] == tiny_sd.text_encoder.config.hidden_size
    assert config["params"]["learning_rate"] == 0.005 and config["seed"] == 3
    assert config["ablate"] == [] and set(config["diagnostics"]) == {
        "losses", "objective", "embedding_distance", "relative_distance"}


def test_outside_the_box_the_output_is_the_normal_image_bit_for_bit(tiny_sd, adapter, items):
    results = anogen.generate(tiny_sd, adapter[0], items, PARAMS)
    for item, result in zip(items, results):
        normal, image = np.asarray(item.normal), np.asarray(result.image)
        assert result.image.size == item.normal.size and result.image.mode == item.normal.mode
        assert np.array_equal(image[~item.target_mask], normal[~item.target_mask])
        assert (image[item.target_mask] != normal[item.target_mask]).mean() > 0.5  # the box itself was regenerated
        assert result.mask.dtype == np.uint8 and np.array_equal(result.mask, item.target_mask * np.uint8(255))
        assert result.weak_label and not result.extra_masks and result.seed == item.seed


def test_same_seed_same_output_whatever_the_batch(tiny_sd, adapter, items):
    batched = arrays(anogen.generate(tiny_sd, adapter[0], items, PARAMS, images_per_batch=3))
    again = arrays(anogen.generate(tiny_sd, adapter[0], items, PARAMS, images_per_batch=3))
    alone = arrays(anogen.generate(tiny_sd, adapter[0], items[1:2], PARAMS, images_per_batch=1))
    assert all(np.array_equal(a, b) for a, b in zip(batched, again))
    # Batch size may change floating-point rounding in the kernels, never the draws.
    assert np.abs(alone[0].astype(int) - batched[1]).max() <= 1

    other_seed = [items[1]._replace(seed=999)]
    assert not np.array_equal(arrays(anogen.generate(tiny_sd, adapter[0], other_seed, PARAMS))[0], batched[1])


def test_a_saved_and_loaded_adapter_gives_the_same_output(tiny_sd, adapter, items):
    out_dir, trained = adapter
    loaded, _ = LearnedEmbedding.load(out_dir)
    assert torch.equal(loaded.vectors, trained.vectors)
    from_disk = arrays(anogen.generate(tiny_sd, out_dir, items[:2], PARAMS))
    from_memory = arrays(anogen.generate(tiny_sd, trained, items[:2], PARAMS))
    assert all(np.array_equal(a, b) for a, b in zip(from_disk, from_memory))


def test_the_refined_mask_marks_changed_pixels_inside_the_box(tiny_sd, adapter, items):
    params = PARAMS.model_copy(update={"refined_mask": True})
    for item, result in zip(items, anogen.generate(tiny_sd, adapter[0], items, params)):
        refined = result.extra_masks["refined_mask"]
        assert refined.dtype == np.uint8 and refined.shape == item.target_mask.shape
        assert set(np.unique(refined)) <= {0, 255}
        assert not refined[~item.target_mask].any() and refined[item.target_mask].any()
        changed = np.abs(np.asarray(result.image, int) - np.asarray(item.normal, int))
        changed = changed.max(axis=-1) if changed.ndim == 3 else changed
        assert changed[refined > 0].mean() > changed[item.target_mask & (refined == 0)].mean()


def test_progress_counts_denoising_steps_and_a_raise_cancels(tiny_sd, adapter, items):
    progress = []
    anogen.generate(tiny_sd, adapter[0], items, PARAMS, images_per_batch=2,
                    on_progress=lambda *report: progress.append(report))
    assert progress == [("generate", done, 16) for done in range(1, 17)]  # 2 batches x 8 steps

    class Cancelled(Exception):
        pass

    def cancel(stage, done, total):
        if done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        anogen.generate(tiny_sd, adapter[0], items, PARAMS, on_progress=cancel)
    assert isinstance(tiny_sd.text_encoder.get_input_embeddings(), torch.nn.Embedding)


def test_bad_inputs_are_refused_before_any_work(tiny_sd, adapter, exemplars, tmp_path):
    image = textured_image(64, 64)
    with pytest.raises(ValueError, match="target mask is empty"):
        anogen.generate(tiny_sd, adapter[0], [(image, np.zeros((64, 64), bool), 0)], PARAMS)
    with pytest.raises(ValueError, match="does not match the image"):
        anogen.generate(tiny_sd, adapter[0], [(image, np.ones((32, 64), bool), 0)], PARAMS)
    with pytest.raises(ValueError, match="'RGBA' is not supported"):
        anogen.generate(tiny_sd, adapter[0], [(image.convert("RGBA"), np.ones((64, 64), bool), 0)], PARAMS)
    with pytest.raises(ValueError, match="exemplar 0 has an empty mask"):
        anogen.finetune(tiny_sd, [(image, np.zeros((64, 64), bool))], PARAMS, seed=0, out_dir=tmp_path)

    LearnedEmbedding([anogen.PLACEHOLDER], torch.zeros(1, 32)).save(tmp_path / "other", {"method": "o2mag"})
    with pytest.raises(ValueError, match="made by method 'o2mag'"):
        anogen.generate(tiny_sd, tmp_path / "other", [(image, np.ones((64, 64), bool), 0)], PARAMS)


def test_unmasked_fine_tuning_accepts_exemplars_without_a_defect_mask(tiny_sd, tmp_path):
    image = textured_image(64, 64)
    params = params_with(masked_loss=False, train_steps=1)  # the earlier knob
    assert params.ablate == ["masked_loss"]
    finetuned = anogen.finetune(tiny_sd, [(image, np.zeros((64, 64), bool))], params, seed=0, out_dir=tmp_path)
    assert finetuned.embedding.vectors.shape == (1, tiny_sd.text_encoder.config.hidden_size)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["ablate"] == ["masked_loss"]


def test_the_default_params_follow_the_paper():
    params = AnoGenParams()
    assert (params.learning_rate, params.train_steps, params.batch_size) == (0.005, 6000, 4)
    assert params.initializer_token == "defect" and params.masked_loss and params.guidance_scale == 10.0
    assert params.ablate == [] and [c.name for c in METHODS["anogen"].components] == ["embedding", "masked_loss"]
    assert {c.name: c.acts_in for c in COMPONENTS} == {"embedding": "generate", "masked_loss": "finetune"}


def test_masked_loss_and_ablate_are_one_knob_and_a_contradiction_is_refused():
    assert AnoGenParams(ablate=["masked_loss"]).masked_loss is False
    assert AnoGenParams(masked_loss=False).ablate == ["masked_loss"]  # an earlier job's record loads as the ablation
    for params in (AnoGenParams(masked_loss=False), AnoGenParams(ablate=["masked_loss", "embedding"]), AnoGenParams()):
        assert AnoGenParams.model_validate(params.model_dump()) == params  # a stored record round-trips
    for bad in ({"masked_loss": True, "ablate": ["masked_loss"]}, {"ablate": ["saim"]},
                {"ablate": ["embedding", "embedding"]}):
        with pytest.raises(ValidationError):
            AnoGenParams(**bad)
    assert METHODS["anogen"].ablation_problem(["masked_loss"], "generate")  # a 422 at submit
    assert METHODS["anogen"].ablation_problem(["embedding"], "generate") is None


# -- the components: each in the path, and gone when ablated ----------------------------------------------------
SYMMETRIC = (textured_image(64, 64, "RGB", seed=4), box_mask(64, 64, (16, 16, 48, 48)))  # unchanged by either flip


def test_the_masked_loss_ignores_the_prediction_outside_the_mask_in_training_and_ablated_it_counts(
        tiny_sd, tmp_path):
    """The UNet's prediction pushed far off outside the mask (in every training call): the masked
    fine-tune learns the very same vector; the ablated one, trained on the whole image, does not."""
    outside = 1 - mask_to_latent(SYMMETRIC[1], 8)  # flips leave it in place, so it fits every augmented batch
    params = PARAMS.model_copy(update={"train_steps": 2})

    def trained(params, pushed):
        handle = tiny_sd.unet.register_forward_hook(
            lambda _module, _inputs, output: type(output)(sample=output.sample + 100 * outside)) if pushed else None
        try:
            return anogen.finetune(tiny_sd, [SYMMETRIC], params, seed=0, out_dir=tmp_path).embedding.vectors
        finally:
            if handle is not None:
                handle.remove()

    assert torch.equal(trained(params, pushed=False), trained(params, pushed=True))
    unmasked = params_with(params, ablate=["masked_loss"])
    assert not torch.allclose(trained(unmasked, pushed=False), trained(unmasked, pushed=True))


def test_the_fine_tune_hands_the_trainer_the_exemplar_masks_at_latent_size(tiny_sd, exemplars, tmp_path, monkeypatch):
    seen = []
    trainer = anogen.train_embedding

    def spying(sd, latents, masks, **kwargs):
        seen.append(masks)
        return trainer(sd, latents, masks, **kwargs)

    monkeypatch.setattr(anogen, "train_embedding", spying)
    anogen.finetune(tiny_sd, exemplars, PARAMS.model_copy(update={"train_steps": 1}), seed=0, out_dir=tmp_path)
    anogen.finetune(tiny_sd, exemplars, params_with(ablate=["masked_loss"]),
                    seed=0, out_dir=tmp_path)
    assert torch.equal(seen[0], torch.stack([mask_to_latent(mask, 8) for _, mask in exemplars]))
    assert seen[0].sum() > 0 and seen[1] is None


def test_the_diagnostics_objective_is_the_masked_mse_at_fixed_draws(tiny_sd, adapter, exemplars):
    _, learnt = adapter
    latents = anogen.encode(tiny_sd, torch.stack([anogen.image_to_pixels(image, 64) for image, _ in exemplars]))
    masks = torch.stack([mask_to_latent(mask, 8) for _, mask in exemplars])
    generator = torch.Generator().manual_seed(anogen.DIAGNOSTIC_SEED)
    draws = anogen.DIAGNOSTIC_DRAWS * len(exemplars)
    t = torch.randint(1000, (draws,), generator=generator)
    noise = torch.randn((draws, 4, 8, 8), generator=generator)
    picks = torch.arange(len(exemplars)).repeat_interleave(anogen.DIAGNOSTIC_DRAWS)
    noisy = anogen.fresh_scheduler(tiny_sd).add_noise(latents[picks], noise, t)
    with anogen.placeholder_tokens(tiny_sd, learnt) as (tokenizer, _), torch.no_grad():
        cond = anogen.encode_prompts(tiny_sd, [f"a photo of a {anogen.PLACEHOLDER}"], tokenizer)
        eps = tiny_sd.unet(noisy, t, cond.expand(draws, -1, -1)).sample
    expected = (((eps - noise) * masks[picks]) ** 2).mean()
    assert anogen._objective(tiny_sd, learnt, latents, masks) == pytest.approx(float(expected), rel=1e-5)
    assert anogen._objective(tiny_sd, learnt, latents, None) == pytest.approx(float(((eps - noise) ** 2).mean()),
                                                                           rel=1e-5)


def test_the_default_schedule_moves_the_embedding_and_lowers_its_loss(tiny_sd, exemplars, tmp_path):
    """Default learning rate and batch; 10 of the default 6000 steps. Adam moves each coordinate by
    up to about the learning rate a step, so the distance grows with the steps: measured 0.92 of the
    initializer's norm at 10 steps, 2.8 at 50, 4.5 at 300 (the loss 0.1656, 0.1647, 0.1647 against
    the initializer's 0.1659). The floor, half the initializer's norm, is reached in 10."""
    params = AnoGenParams(resolution=64, train_steps=10)
    learnt, diagnostics = anogen.finetune(tiny_sd, exemplars, params, seed=3, out_dir=tmp_path)
    assert diagnostics["relative_distance"] > 0.5
    assert diagnostics["objective"]["learnt"] < diagnostics["objective"]["initializer"]
    assert 0 < diagnostics["losses"]["noise_prediction"] < 1  # the masked MSE, mean over the last steps
    initializer = initial_vectors(tiny_sd, "defect", 1)
    assert diagnostics["embedding_distance"] == pytest.approx(float((learnt.vectors - initializer).norm()))
    assert diagnostics["relative_distance"] == pytest.approx(diagnostics["embedding_distance"] / initializer.norm())


def test_generation_follows_the_embedding_and_ablated_uses_the_initializers_own(tiny_sd, adapter, items, tmp_path):
    """Another vector changes the box (and nothing outside it); with "embedding" ablated, by the job
    or by the adapter's config, the vector given is ignored: the output is the initializer word's."""
    _, learnt = adapter
    noise = torch.randn(learnt.vectors.shape, generator=torch.Generator().manual_seed(0))
    other = LearnedEmbedding(learnt.tokens, learnt.vectors + noise * learnt.vectors.norm())
    initializer = LearnedEmbedding(learnt.tokens, initial_vectors(tiny_sd, "defect", 1))
    no_embedding = params_with(ablate=["embedding"])
    with_learnt = arrays(anogen.generate(tiny_sd, learnt, items, PARAMS))
    with_other = arrays(anogen.generate(tiny_sd, other, items, PARAMS))
    for item, a, b in zip(items, with_learnt, with_other):
        assert (a[item.target_mask] != b[item.target_mask]).any() and np.array_equal(a[~item.target_mask],
                                                                                    b[~item.target_mask])
    ablated = [arrays(anogen.generate(tiny_sd, embedding, items, no_embedding)) for embedding in (learnt, other)]
    expected = arrays(anogen.generate(tiny_sd, initializer, items, PARAMS))
    assert all(np.array_equal(a, b) and np.array_equal(a, c) for a, b, c in zip(*ablated, expected))
    learnt.save(tmp_path, {"method": "anogen", "params": PARAMS.model_dump(), "ablate": ["embedding"]})
    assert np.array_equal(arrays(anogen.generate(tiny_sd, tmp_path, items[:1], PARAMS))[0], expected[0])


def test_ablations_reach_every_pair_and_without_the_embedding_the_adapters_initializer_serves(
        tiny_sd, tiny_sd_dir, exemplars, items, tmp_path):
    """A fine-tune without the masked loss (initializer "scratch") records it in its result and
    adapter; a generate job on that adapter ablating the embedding records both on every pair and
    paints with the adapter's initializer word, not its own params' "defect"."""
    params = params_with(initializer_token="scratch", ablate=["masked_loss"], train_steps=2)
    references = [Exemplar(str(number), image, mask, "p", "d") for number, (image, mask) in enumerate(exemplars)]
    request = FinetuneRequest(params, references, NormalImages.in_memory([]), seed=0, adapter_dir=tmp_path,
                              checkpoints=Checkpoints(tmp_path / "checkpoints"),
                              weight_dirs={"SD_MODEL_DIR": str(tiny_sd_dir)}, device="cpu")
    result = anogen_method.finetune(request, lambda *_: None)
    assert result["ablated"] == ["masked_loss"] and result["train_steps"] == 2
    assert result["diagnostics"] == json.loads((tmp_path / "adapter_config.json").read_text())["diagnostics"]

    generate = GenerateRequest(
        params=params_with(ablate=["embedding"]), masks=MaskSpec(source="box"), exemplars=[], given_masks=[],
        normals=NormalImages.in_memory([items[2].normal]), items=job_items(1, 5, 1, 1), adapter_dir=tmp_path,
        weight_dirs={"SD_MODEL_DIR": str(tiny_sd_dir)}, device="cpu",
    )
    (pair,) = [pair for batch in anogen_method.generate(generate, anogen_method.calls(generate), lambda *_: None)
               for pair in batch]
    assert pair.details["ablated"] == ["embedding", "masked_loss"]
    scratch = LearnedEmbedding([anogen.PLACEHOLDER], initial_vectors(tiny_sd, "scratch", 1))
    expected = anogen.generate(tiny_sd, scratch, [(items[2].normal, pair.mask > 0, pair.seed)], PARAMS)[0]
    assert np.array_equal(np.asarray(pair.image), np.asarray(expected.image))


def test_a_fine_tune_without_the_embedding_is_refused_it_would_learn_nothing(tiny_sd, exemplars, tmp_path):
    assert "nothing to learn" in METHODS["anogen"].ablation_problem(["embedding"], "finetune")
    assert METHODS["anogen"].ablation_problem(["masked_loss"], "finetune") is None
    with pytest.raises(ValueError, match="nothing to learn"):
        anogen.finetune(tiny_sd, exemplars, params_with(ablate=["embedding"]), seed=0, out_dir=tmp_path)


def test_an_adapter_from_before_ablations_were_recorded_still_says_what_it_ablated(tmp_path):
    config = {"method": "anogen", "params": {**PARAMS.model_dump(exclude={"ablate"}), "masked_loss": False}}
    LearnedEmbedding([anogen.PLACEHOLDER], torch.zeros(1, 32)).save(tmp_path, config)
    assert anogen.adapter_config(tmp_path)["ablate"] == ["masked_loss"]
    assert AnoGenParams.model_validate(config["params"]).ablate == ["masked_loss"]
