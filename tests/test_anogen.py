"""AnoGen end to end on the tiny model: fine-tune, then generate."""

import json

import numpy as np
import pytest
import torch

from models.diffusion.generation import GenerateItem
from models.diffusion.textual_inversion import LearnedEmbedding
from models.methods.anogen import AnoGenParams
from models.methods.anogen import pipeline as anogen
from tests.diffusion_fixtures import box_mask, textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

PARAMS = AnoGenParams(resolution=64, num_inference_steps=8, train_steps=4, batch_size=2)


@pytest.fixture(scope="module")
def exemplars():
    return [
        (textured_image(72, 96, "RGB", seed=1), box_mask(72, 96, (30, 20, 50, 40))),
        (textured_image(64, 64, "L", seed=2), box_mask(64, 64, (5, 40, 20, 60))),
    ]


@pytest.fixture(scope="module")
def adapter(tiny_sd, exemplars, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("adapter")
    embedding = anogen.finetune(tiny_sd, exemplars, PARAMS, seed=3, out_dir=out_dir)
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
        assert refined.dtype == np.uint8 and refined.shape == item.target_mask.shape and set(np.unique(refined)) <= {0, 255}
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
    with pytest.raises(ValueError, match="box mask is empty"):
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
    params = PARAMS.model_copy(update={"masked_loss": False, "train_steps": 1})
    embedding = anogen.finetune(tiny_sd, [(image, np.zeros((64, 64), bool))], params, seed=0, out_dir=tmp_path)
    assert embedding.vectors.shape == (1, tiny_sd.text_encoder.config.hidden_size)


def test_the_default_params_follow_the_paper():
    params = AnoGenParams()
    assert (params.learning_rate, params.train_steps, params.batch_size) == (0.005, 6000, 4)
    assert params.initializer_token == "defect" and params.masked_loss and params.guidance_scale == 10.0
