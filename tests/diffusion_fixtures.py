"""Fixtures of the diffusion tests: a tiny random-weight SD 1.5-architecture model, built in code,
saved in diffusers format and loaded through the production loader. A test module uses them with

    pytest_plugins = ["tests.diffusion_fixtures"]
    pytestmark = pytest.mark.usefixtures("one_torch_thread")

and may import its image helpers directly. PYTEST_DONT_REWRITE: it has no asserts, and that
direct import comes before pytest would register it for assertion rewriting.
"""

import numpy as np
import pytest
from PIL import Image

from models.diffusion.loading import load_sd
from models.diffusion.tiny import build_tiny_sd
from models.diffusion.tiny_blip2 import build_random_blip2
from models.diffusion.tiny_convnext import build_random_convnext

TINY_RESOLUTION = 64  # the smallest resolution the params allow; latents are 8x8



@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), resolution=TINY_RESOLUTION)


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    return load_sd(tiny_sd_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_blip2_dir(tmp_path_factory):
    """A tiny random Blip2ForImageTextRetrieval with its tokenizer and image processor (BLIP2_MODEL_DIR)."""
    return build_random_blip2(tmp_path_factory.mktemp("tiny_blip2"), "tiny")


@pytest.fixture(scope="session")
def tiny_convnext_dir(tmp_path_factory):
    """A tiny random ConvNextModel saved with save_pretrained (CONVNEXT_MODEL_DIR)."""
    return build_random_convnext(tmp_path_factory.mktemp("tiny_convnext"), "tiny")


def textured_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth random texture (so resizing and the VAE see structure, not only noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
    return image.convert(mode)


def box_mask(height: int, width: int, box: tuple[int, int, int, int]) -> np.ndarray:
    """bool (height, width), True inside box = (x0, y0, x1, y1)."""
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    return mask
