"""Random-weight ConvNeXt models (transformers `ConvNextModel`), built in code.

Tests and benchmarks cannot download ConvNeXt-Tiny, so they build the same class with random
weights, save it with `save_pretrained` and load it through the production loader (a
CONVNEXT_MODEL_DIR), exactly like a real `facebook/convnext-tiny-224` directory.

Sizes: "tiny" for unit tests, "small" for CPU benchmarks (ConvNeXt-Tiny's depths at a quarter of
its widths), and "convnext-tiny" with ConvNeXt-Tiny's exact config for GPU benchmarks.
"""

from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextModel

ARCHITECTURES = {
    "tiny": {"hidden_sizes": [8, 16, 32, 32], "depths": [1, 1, 1, 1]},
    "small": {"hidden_sizes": [24, 48, 96, 192], "depths": [3, 3, 9, 3]},
    "convnext-tiny": {"hidden_sizes": [96, 192, 384, 768], "depths": [3, 3, 9, 3]},
}


def build_random_convnext(path: str | Path, architecture: str = "tiny", seed: int = 0) -> Path:
    """Build a random-weight ConvNextModel of one of `ARCHITECTURES` and save it at `path`."""
    torch.manual_seed(seed)
    model = ConvNextModel(ConvNextConfig(num_channels=3, patch_size=4, **ARCHITECTURES[architecture]))
    path = Path(path)
    model.save_pretrained(path)
    return path
