"""Loading through the production path, schedulers, tokenizer, and the image plumbing."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from models.diffusion.images import decode, encode, image_to_pixels, mask_to_latent, pixels_to_array
from models.diffusion.loading import ModelUnavailable, fresh_scheduler, load_sd
from tests.diffusion_fixtures import textured_image

pytest_plugins = ["tests.diffusion_fixtures"]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_loaded_once_per_process_in_fp32_with_sdpa_on_cpu(tiny_sd, tiny_sd_dir):
    assert load_sd(tiny_sd_dir, device="cpu") is tiny_sd
    assert load_sd(str(tiny_sd_dir) + "/", device="cpu") is tiny_sd
    assert tiny_sd.dtype == torch.float32 and tiny_sd.device.type == "cpu"
    for module in (tiny_sd.unet, tiny_sd.vae, tiny_sd.text_encoder):
        assert not module.training
        assert all(p.dtype == torch.float32 and not p.requires_grad for p in module.parameters())
    for module in (tiny_sd.unet, tiny_sd.vae):
        assert all(isinstance(p, AttnProcessor2_0) for p in module.attn_processors.values())
    assert tiny_sd.text_encoder.config._attn_implementation == "sdpa"
    assert tiny_sd.vae_scale_factor == 8 and tiny_sd.latent_channels == 4


def test_a_bad_directory_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ModelUnavailable, match="is not a directory"):
        load_sd(tmp_path / "nowhere", device="cpu")


def test_each_job_gets_its_own_scheduler(tiny_sd):
    first, second = fresh_scheduler(tiny_sd), fresh_scheduler(tiny_sd)
    assert isinstance(first, DDIMScheduler) and first is not second
    first.set_timesteps(10)
    second.set_timesteps(50)
    assert len(first.timesteps) == 10 and len(second.timesteps) == 50
    assert first.config.prediction_type == "epsilon" and first.config.steps_offset == 1


def test_the_tiny_vocabulary_has_the_anogen_initializer_as_one_token(tiny_sd):
    assert len(tiny_sd.tokenizer("defect", add_special_tokens=False).input_ids) == 1
    # Any other text still tokenizes, byte by byte, and pads to CLIP's 77 tokens.
    ids = tiny_sd.tokenizer("a dent, 3mm!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert tiny_sd.tokenizer.decode(ids, skip_special_tokens=True) == "a dent , 3 mm !"


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_any_size_goes_to_the_model_resolution_and_back_in_its_mode(mode):
    image = textured_image(37, 101, mode)
    pixels = image_to_pixels(image, 64)
    assert pixels.shape == (3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    back = pixels_to_array(pixels, image.size, mode)
    assert back.dtype == np.uint8
    assert back.shape == ((37, 101) if mode == "L" else (37, 101, 3))
    # Down and up again blurs; the image must still be the same picture.
    assert np.abs(back.astype(int) - np.asarray(image)).mean() < 12


def test_unsupported_modes_are_refused():
    with pytest.raises(ValueError, match="mode 'RGBA' is not supported"):
        image_to_pixels(Image.new("RGBA", (10, 10)), 64)


def test_vae_round_trip_shapes(tiny_sd):
    pixels = image_to_pixels(textured_image(64, 64), 64)[None]
    latents = encode(tiny_sd, pixels)
    assert latents.shape == (1, 4, 8, 8) and latents.dtype == torch.float32
    decoded = decode(tiny_sd, latents)
    assert decoded.shape == (1, 3, 64, 64) and decoded.abs().max() <= 1


def test_a_one_pixel_defect_survives_downsampling_to_latents():
    mask = np.zeros((100, 100), bool)
    mask[50, 77] = True
    latent_mask = mask_to_latent(mask, 8)
    assert latent_mask.shape == (1, 8, 8) and latent_mask.sum() == 1
    assert latent_mask[0, 4, 6] == 1
