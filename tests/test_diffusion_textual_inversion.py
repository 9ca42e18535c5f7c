"""The embedding trainer: what it may change, its loss, checkpoints and resume, saving."""

import pytest
import torch

from models.diffusion.textual_inversion import (
    LearnedEmbedding,
    initial_vectors,
    masked_mse,
    placeholder_names,
    placeholder_tokens,
    train_embedding,
)
from models.diffusion.training import CHECKPOINT_FILE
from models.methods.interface import Checkpoints

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENS = ["<test-defect>"]


@pytest.fixture(scope="module")
def training_data():
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 8, 8), generator=generator)
    masks = torch.zeros((2, 1, 8, 8))
    masks[0, :, 2:5, 3:6] = 1
    masks[1, :, 5:8, 0:2] = 1
    return latents, masks


def train(sd, training_data, steps, **overrides):
    latents, masks = training_data
    options = {"tokens": TOKENS, "initializer": "defect", "templates": ["a photo of a {}", "a {}"],
               "steps": steps, "learning_rate": 0.005, "batch_size": 2, "seed": 7}
    return train_embedding(sd, latents, masks, **{**options, **overrides})[0]


def test_only_the_placeholder_row_of_the_embedding_table_changes(tiny_sd, training_data):
    table = tiny_sd.text_encoder.get_input_embeddings()
    before = table.weight.clone()
    embedding = train(tiny_sd, training_data, steps=4)

    assert tiny_sd.text_encoder.get_input_embeddings() is table  # the shared model got its table back
    assert torch.equal(table.weight, before)
    start = initial_vectors(tiny_sd, "defect", 1)
    assert not torch.equal(embedding.vectors, start)
    # Seen through the text encoder, the table is the old one plus exactly one new row.
    with placeholder_tokens(tiny_sd, embedding) as (tokenizer, module):
        ids = torch.arange(len(tokenizer))
        rows = module(ids)
    assert torch.equal(rows[:-1], before[: len(tokenizer) - 1])
    assert torch.equal(rows[-1], embedding.vectors[0])
    assert tokenizer.convert_tokens_to_ids(TOKENS) == [len(tokenizer) - 1]
    assert TOKENS[0] not in tiny_sd.tokenizer.get_vocab()  # added to a copy only


def test_the_initial_vector_is_the_initializer_word_or_its_mean(tiny_sd):
    table = tiny_sd.text_encoder.get_input_embeddings().weight
    (defect_id,) = tiny_sd.tokenizer("defect", add_special_tokens=False).input_ids
    assert torch.equal(initial_vectors(tiny_sd, "defect", 2), table[defect_id].repeat(2, 1))
    two_ids = tiny_sd.tokenizer("a photo", add_special_tokens=False).input_ids
    torch.testing.assert_close(initial_vectors(tiny_sd, "a photo", 1)[0], table[two_ids].mean(0))
    assert placeholder_names("<x>", 3) == ["<x>", "<x>_1", "<x>_2"]


def test_with_the_masked_loss_nothing_outside_the_mask_counts():
    """The loss, and its gradient, ignore the predicted and true noise outside the mask.

    (The noisy latent outside the mask still reaches eps_theta inside it through the UNet's
    receptive field: the defect is learnt in its context, as in the paper.)
    """
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn((2, 4, 8, 8), generator=generator, requires_grad=True)
    target = torch.randn((2, 4, 8, 8), generator=generator)
    mask = torch.zeros((2, 1, 8, 8))
    mask[:, :, 2:6, 1:4] = 1
    loss = masked_mse(prediction, target, mask)
    loss.backward()

    outside = (1 - mask).bool().expand_as(target)
    changed_prediction = prediction.detach().masked_fill(outside, 100.0)
    changed_target = target.masked_fill(outside, -3.0)
    assert torch.equal(masked_mse(changed_prediction, changed_target, mask), loss.detach())
    assert torch.all(prediction.grad[outside] == 0) and torch.any(prediction.grad[~outside] != 0)
    assert masked_mse(changed_prediction, changed_target, None) > loss  # without a mask, it all counts


def test_a_resumed_run_ends_exactly_where_the_uninterrupted_one_does(tiny_sd, training_data, tmp_path):
    uninterrupted = train(tiny_sd, training_data, steps=6)

    class Crash(Exception):
        pass

    def crash_at_five(done, total):
        if done == 5:
            raise Crash

    saved = []
    checkpoints = Checkpoints(tmp_path, every=2, saved=lambda: saved.append(1))
    with pytest.raises(Crash):
        train(tiny_sd, training_data, steps=6, checkpoints=checkpoints, on_progress=crash_at_five)
    assert (tmp_path / CHECKPOINT_FILE).is_file() and len(saved) == 2  # after steps 2 and 4

    progress = []
    resumed = train(tiny_sd, training_data, steps=6, checkpoints=checkpoints,
                    on_progress=lambda done, total: progress.append(done))
    assert progress == [5, 6]  # continued from the step-4 checkpoint
    assert torch.equal(resumed.vectors, uninterrupted.vectors)


def test_a_checkpoint_of_another_run_is_refused(tiny_sd, training_data, tmp_path):
    train(tiny_sd, training_data, steps=3, checkpoints=Checkpoints(tmp_path, every=2))
    with pytest.raises(ValueError, match="belongs to a different training run"):
        train(tiny_sd, training_data, steps=3, checkpoints=Checkpoints(tmp_path, every=2), learning_rate=0.1)


def test_saved_and_loaded_embeddings_are_identical(tmp_path):
    embedding = LearnedEmbedding(["<a>", "<a>_1"], torch.randn(2, 32))
    embedding.save(tmp_path, {"method": "test"})
    loaded, config = LearnedEmbedding.load(tmp_path)
    assert loaded.tokens == embedding.tokens and torch.equal(loaded.vectors, embedding.vectors)
    assert config == {"method": "test", "tokens": ["<a>", "<a>_1"], "embedding_dim": 32}
    assert loaded.prompt == "<a> <a>_1"


def test_an_embedding_of_another_width_is_refused_and_the_model_stays_as_it_was(tiny_sd):
    table = tiny_sd.text_encoder.get_input_embeddings()
    too_wide = LearnedEmbedding(TOKENS, torch.zeros(1, 768))
    with pytest.raises(ValueError, match="does not fit this model"), placeholder_tokens(tiny_sd, too_wide):
        pass
    assert tiny_sd.text_encoder.get_input_embeddings() is table
