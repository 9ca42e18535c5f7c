"""Attention-processor plumbing: layer selection, scoped installation, custom processors."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from models.diffusion.attention import (
    AttentionMapRecorder,
    UNetAttention,
    attention_layers,
    attention_processors,
    select_layers,
)
from models.diffusion.sampling import encode_prompts, predict_noise

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

T = torch.tensor(500)


@pytest.fixture(scope="module")
def cond(tiny_sd):
    with torch.no_grad():
        return encode_prompts(tiny_sd, ["a photo of a defect"])


@pytest.fixture(scope="module")
def latents():
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))


def all_sdpa(unet) -> bool:
    return all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())


def test_layers_have_a_kind_and_a_resolution(tiny_sd):
    layers = attention_layers(tiny_sd.unet)
    assert len(layers) == 20  # SD's layout: 3 down levels x 1, mid x 1, 3 up levels x 2; self + cross each
    assert sum(layer.kind == "cross" for layer in layers) == 10
    by_name = {layer.name: layer for layer in layers}
    assert by_name["down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"].resolution(64) == 64
    assert by_name["up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"].resolution(64) == 16
    assert by_name["mid_block.attentions.0.transformer_blocks.0.attn2.processor"].resolution(64) == 8
    cross_16 = select_layers(tiny_sd.unet, kind="cross", resolutions={16}, latent_size=64)
    assert [layer.name.split(".attentions")[0] for layer in cross_16] == ["down_blocks.2", "up_blocks.1", "up_blocks.1"]


def test_the_unet_attention_processor_matches_diffusers_sdpa(tiny_sd, latents, cond):
    with torch.no_grad():
        reference = predict_noise(tiny_sd, latents, T, cond)
        everywhere = {layer.name: UNetAttention() for layer in attention_layers(tiny_sd.unet)}
        with attention_processors(tiny_sd.unet, everywhere):
            ours = predict_noise(tiny_sd, latents, T, cond)
    torch.testing.assert_close(ours, reference)


def test_maps_are_recorded_only_where_installed_and_the_processors_come_back(tiny_sd, latents, cond):
    chosen = select_layers(tiny_sd.unet, kind="cross", resolutions={4})  # 4x4 at the tiny 8x8 latent
    recorders = {layer.name: AttentionMapRecorder() for layer in chosen}
    with torch.no_grad():
        reference = predict_noise(tiny_sd, latents, T, cond)
        with attention_processors(tiny_sd.unet, recorders):
            installed = tiny_sd.unet.attn_processors
            assert sum(isinstance(p, AttentionMapRecorder) for p in installed.values()) == len(chosen) == 3
            output = predict_noise(tiny_sd, latents, T, cond)
    torch.testing.assert_close(output, reference)
    for recorder in recorders.values():
        (attention_map,) = recorder.maps
        assert attention_map.shape == (1, 16, 77)  # (batch, 4x4 queries, 77 text tokens)
        torch.testing.assert_close(attention_map.sum(-1), torch.ones(1, 16))
    assert all_sdpa(tiny_sd.unet)


def test_processors_come_back_after_an_error_and_unknown_layers_are_refused(tiny_sd):
    first_layer = {attention_layers(tiny_sd.unet)[0].name: UNetAttention()}
    with pytest.raises(RuntimeError, match="boom"), attention_processors(tiny_sd.unet, first_layer):
        raise RuntimeError("boom")
    assert all_sdpa(tiny_sd.unet)
    unknown_layer = {"nowhere.processor": UNetAttention()}
    with pytest.raises(KeyError, match="no such attention layers"), attention_processors(tiny_sd.unet, unknown_layer):
        pass


class SharedKeyValues(UNetAttention):
    """An O2MAG-style graft: every batch entry attends to the keys and values of entry 0."""

    def project(self, attn, hidden_states, context):
        query, key, value = super().project(attn, hidden_states, context)
        return query, key[:1].expand_as(key), value[:1].expand_as(value)


def test_a_small_processor_class_can_graft_keys_and_values_between_batch_entries(tiny_sd, cond):
    source, target = torch.randn((2, 1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    self_layers = select_layers(tiny_sd.unet, kind="self")
    with torch.no_grad():
        alone = predict_noise(tiny_sd, target, T, cond)
        with attention_processors(tiny_sd.unet, {layer.name: SharedKeyValues() for layer in self_layers}):
            grafted = predict_noise(tiny_sd, torch.cat([source, target]), T, cond.expand(2, -1, -1))
        source_alone = predict_noise(tiny_sd, source, T, cond)
    torch.testing.assert_close(grafted[:1], source_alone)  # entry 0 attends to itself, as before
    assert not torch.allclose(grafted[1:], alone, atol=1e-3)  # entry 1 saw entry 0's keys and values
